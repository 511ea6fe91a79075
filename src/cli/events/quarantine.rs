//! `kallina-relay events quarantine list|redeliver`: the outbox records the relay set aside
//! because it could not publish them, and putting one back once its cause is fixed.

use clap::{Args, Subcommand};
use comfy_table::{presets, Table};
use serde_json::json;

use super::client::AdminClient;
use crate::admin::contract::{QuarantineList, Redelivered};
use crate::cli::Failure;

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    pub command: QuarantineCommand,
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List the quarantined records, oldest first, with why each was set aside.
    List {
        /// Print JSON (`{"events": [...], "next_cursor": ...}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put one back into the outbox (by its SEQ, as `list` shows it), to be published again.
    Redeliver {
        seq: String,
        /// Print the admin API's answer as it came.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(admin: &AdminClient, args: &QuarantineArgs) -> Result<(), Failure> {
    match &args.command {
        QuarantineCommand::List { json } => list(admin, *json).await,
        QuarantineCommand::Redeliver { seq, json } => redeliver(admin, seq, *json).await,
    }
}

async fn list(admin: &AdminClient, json: bool) -> Result<(), Failure> {
    let mut all = QuarantineList {
        events: Vec::new(),
        next_cursor: None,
    };
    let mut cursor: Option<String> = None;
    loop {
        let query: Vec<(&str, String)> = cursor.iter().map(|c| ("cursor", c.clone())).collect();
        let page: QuarantineList = admin.get(&["admin", "quarantine"], &query).await?;
        all.events.extend(page.events);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    if json {
        return out!("{}", json!(all));
    }
    if all.events.is_empty() {
        eprintln!("nothing is quarantined");
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "SEQ",
        "QUARANTINED",
        "ID",
        "EVENT",
        "BYTES",
        "REASON",
    ]);
    let dash = || "-".to_string();
    for e in &all.events {
        table.add_row([
            e.seq.clone(),
            e.quarantined.clone(),
            e.id.clone().unwrap_or_else(dash),
            e.event.clone().unwrap_or_else(dash),
            e.size_bytes.to_string(),
            e.reason.clone(),
        ]);
    }
    out!("{table}")
}

async fn redeliver(admin: &AdminClient, seq: &str, json: bool) -> Result<(), Failure> {
    let answer: Redelivered = admin
        .post(&["admin", "quarantine", seq, "redeliver"], None)
        .await?;
    if json {
        out!("{}", json!(answer))
    } else {
        out!("quarantined record {seq} is back in the outbox; the relay tries it again")
    }
}
