//! `kallina-relay events`: the admin API (`docs/admin-api.md`) from a shell.
//!
//! Getting a consumer's lost events back is a task for a bad day: this makes it one command
//! (`events redrive --since 2h`) instead of hand-made requests with a bearer header, Unix
//! times and cursors. Answers of the platform's error shape become one line on stderr and exit
//! status 1; a command line that cannot make a valid request stops before any is sent, with 2.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{presets, CellAlignment, Table};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{error_chain, progress_bar, Failure, ServeArgs};
mod client;
mod quarantine;

use crate::admin::contract::{EventDetail, EventList, EventSummary, Redelivered, RedriveStarted};
use client::AdminClient;
use quarantine::QuarantineArgs;

const TIMES: &str = "Times (--since, --until) read RFC 3339 (2026-11-29T06:00:00Z), Unix \
seconds, `now`, or an age: 90m, 2h, 7d mean that long ago.";

#[derive(Debug, Args)]
#[command(after_help = "\
The admin API answers on the admin listener only when the service has an admin token \
(KALLINA_RELAY_ADMIN_TOKEN); without one, every request gets 404.

Exit status: 0 on success; 1 when the admin API cannot be reached or answers an error \
(printed as one line on stderr); 2 on a bad command line, or no token.")]
pub struct EventsArgs {
    #[command(subcommand)]
    pub command: EventsCommand,
    /// Admin API base URL [default: http://<admin_listen>, from the settings]
    #[arg(long, global = true, value_name = "URL")]
    pub admin_url: Option<String>,
    /// Admin bearer token [default: the `admin_token` setting]
    #[arg(
        long,
        global = true,
        env = "KALLINA_RELAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List stored events (pending and published), oldest first.
    List(ListArgs),
    /// Show one event: its summary, then its body.
    Show(ShowArgs),
    /// Publish one published event again: same message_id, header `x-redelivered: true`.
    Redeliver(RedeliverArgs),
    /// Publish again every published event received in a time range, at the service's
    /// `redrive_rate`.
    Redrive(RedriveArgs),
    /// Outbox records the relay could not publish and set aside: list them, put one back.
    Quarantine(QuarantineArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Status {
    /// Waiting for the broker's confirm.
    Pending,
    /// Confirmed by the broker, kept in the archive.
    Published,
}

#[derive(Debug, Args)]
#[command(after_help = TIMES)]
pub struct ListArgs {
    /// Received at or after this time.
    #[arg(long, value_parser = time_arg)]
    pub since: Option<String>,
    /// Received before this time.
    #[arg(long, value_parser = time_arg)]
    pub until: Option<String>,
    /// Only this event type (exact).
    #[arg(long)]
    pub event: Option<String>,
    /// Only events from this source (its name, as in `x-source`).
    #[arg(long)]
    pub source: Option<String>,
    /// Only events in this state.
    #[arg(long, value_enum)]
    pub status: Option<Status>,
    /// Events per page (1 to 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Fetch every page, following the cursors, instead of the first.
    #[arg(long)]
    pub all: bool,
    /// Start after this cursor (the `next_cursor` a previous page printed).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Print JSON (`{"events": [...], "next_cursor": ...}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The event's id (its dedup key, the AMQP message_id).
    pub id: String,
    /// Print the admin API's answer as it came.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RedeliverArgs {
    /// The event's id (its dedup key, the AMQP message_id).
    pub id: String,
    /// Print the admin API's answer as it came.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = TIMES)]
pub struct RedriveArgs {
    /// Received at or after this time.
    #[arg(long, value_parser = time_arg)]
    pub since: String,
    /// Received before this time.
    #[arg(long, value_parser = time_arg, default_value = "now")]
    pub until: String,
    /// Only this event type (exact).
    #[arg(long)]
    pub event: Option<String>,
    /// Only events from this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Count the matching events, publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stay until the service has put every matched event back, with a progress bar (read
    /// from the admin listener's /metrics).
    #[arg(long)]
    pub wait: bool,
    /// Print the admin API's answer as it came.
    #[arg(long)]
    pub json: bool,
}

/// A time for the API: RFC 3339 and Unix seconds pass as they are; `now` and ages become
/// RFC 3339, so that the service reads the same instant this command meant.
fn time_arg(text: &str) -> Result<String, String> {
    let text = text.trim();
    let format = |t: OffsetDateTime| t.format(&Rfc3339).map_err(|e| e.to_string());
    if text == "now" {
        return format(OffsetDateTime::now_utc());
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(text.to_string());
    }
    if OffsetDateTime::parse(text, &Rfc3339).is_ok() {
        return Ok(text.to_string());
    }
    match crate::config::parse_duration(text) {
        // Checked: an age past the calendar's start would panic in plain subtraction.
        Some(age) => time::Duration::try_from(age)
            .ok()
            .and_then(|age| OffsetDateTime::now_utc().checked_sub(age))
            .map_or_else(
                || Err(format!("the age {text:?} reaches before year -9999")),
                format,
            ),
        None => Err(format!(
            "expected an RFC 3339 time (2026-11-29T06:00:00Z), Unix seconds, `now`, or an \
             age such as 90m, 2h or 7d; got {text:?}"
        )),
    }
}

pub async fn run(args: EventsArgs, global: &ServeArgs) -> Result<(), Failure> {
    let admin = AdminClient::new(&args, global)?;
    match args.command {
        EventsCommand::List(list_args) => list(&admin, &list_args).await,
        EventsCommand::Show(show_args) => show(&admin, &show_args).await,
        EventsCommand::Redeliver(redeliver_args) => redeliver(&admin, &redeliver_args).await,
        EventsCommand::Redrive(redrive_args) => redrive(&admin, &redrive_args).await,
        EventsCommand::Quarantine(quarantine_args) => {
            quarantine::run(&admin, &quarantine_args).await
        }
    }
}

async fn list(admin: &AdminClient, args: &ListArgs) -> Result<(), Failure> {
    let mut query: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
    let filters = [
        ("since", args.since.clone()),
        ("until", args.until.clone()),
        ("event", args.event.clone()),
        ("source", args.source.clone()),
        (
            "status",
            args.status.map(|s| {
                match s {
                    Status::Pending => "pending",
                    Status::Published => "published",
                }
                .to_string()
            }),
        ),
    ];
    query.extend(filters.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    let bar = match args.all {
        true => progress_bar(None, "{spinner} {pos} events listed {elapsed}"),
        false => indicatif::ProgressBar::hidden(),
    };
    let mut events: Vec<EventSummary> = Vec::new();
    let mut cursor = args.cursor.clone();
    loop {
        let mut page_query = query.clone();
        if let Some(cursor) = &cursor {
            page_query.push(("cursor", cursor.clone()));
        }
        let page: EventList = admin.get(&["admin", "events"], &page_query).await?;
        events.extend(page.events);
        cursor = page.next_cursor;
        bar.set_position(events.len() as u64);
        if !args.all || cursor.is_none() {
            break;
        }
    }
    bar.finish_and_clear();
    if args.json {
        let list = EventList {
            events,
            next_cursor: cursor.clone(),
        };
        out!("{}", json!(list))?;
    } else if events.is_empty() {
        eprintln!("no events match");
    } else {
        out!("{}", table(&events))?;
    }
    if let (Some(cursor), false) = (&cursor, args.json) {
        eprintln!("more events: --cursor {cursor} for the next page, or --all for every page");
    }
    Ok(())
}

fn table(events: &[EventSummary]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "ID",
        "EVENT",
        "SOURCE",
        "STATUS",
        "RECEIVED",
        "PUBLISHED",
        "ATTEMPTS",
        "REDELIVERED",
        "BYTES",
    ]);
    for event in events {
        table.add_row([
            event.id.clone(),
            event.event.clone(),
            event.source.clone(),
            event.status.clone(),
            event.received.clone(),
            event.published.clone().unwrap_or_else(|| "-".into()),
            event.attempts.to_string(),
            yes_no(event.redelivered).into(),
            event.size_bytes.to_string(),
        ]);
    }
    for column in [6, 8] {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

async fn show(admin: &AdminClient, args: &ShowArgs) -> Result<(), Failure> {
    let event: EventDetail = admin.get(&["admin", "events", &args.id], &[]).await?;
    if args.json {
        out!("{}", json!(event))?;
        return Ok(());
    }
    let s = &event.summary;
    for (label, value) in [
        ("id", s.id.clone()),
        ("event", s.event.clone()),
        ("source", s.source.clone()),
        ("status", s.status.clone()),
        ("received", s.received.clone()),
        (
            "published",
            s.published.clone().unwrap_or_else(|| "-".into()),
        ),
        ("attempts", s.attempts.to_string()),
        ("redelivered", yes_no(s.redelivered).into()),
        ("bytes", s.size_bytes.to_string()),
    ] {
        out!("{label:<12} {value}")?;
    }
    out!("")?;
    match &event.body {
        // A body that was not JSON comes as a string: shown as it is.
        Value::String(raw) => out!("{raw}"),
        body => out!(
            "{}",
            serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string())
        ),
    }
}

async fn redeliver(admin: &AdminClient, args: &RedeliverArgs) -> Result<(), Failure> {
    let answer: Redelivered = admin
        .post(&["admin", "events", &args.id, "redeliver"], None)
        .await?;
    if args.json {
        out!("{}", json!(answer))?;
    } else {
        out!(
            "event {} is back in the outbox ({}); it will be published again with \
             x-redelivered: true",
            args.id,
            answer.status
        )?;
    }
    Ok(())
}

async fn redrive(admin: &AdminClient, args: &RedriveArgs) -> Result<(), Failure> {
    let mut body = json!({
        "since": args.since,
        "until": args.until,
        "dry_run": args.dry_run,
    });
    if let Some(event) = &args.event {
        body["event"] = json!(event);
    }
    if let Some(source) = &args.source {
        body["source"] = json!(source);
    }
    let answer: RedriveStarted = admin.post(&["admin", "redrive"], Some(body)).await?;
    let matched = answer.matched as u64;
    if args.json {
        out!("{}", json!(answer))?;
    } else if args.dry_run {
        out!(
            "{matched} published events match from {} to {} (dry run: nothing republished)",
            args.since,
            args.until
        )?;
    } else {
        out!(
            "{matched} published events match from {} to {}; the service republishes them in \
             the background at its redrive_rate",
            args.since,
            args.until
        )?;
    }
    if args.wait && !args.dry_run && matched > 0 {
        wait_for_redrive(admin, matched).await?;
    }
    Ok(())
}

/// Follows `kallina_relay_redrive_pending_events` on /metrics (open, no token) down to zero.
async fn wait_for_redrive(admin: &AdminClient, matched: u64) -> Result<(), Failure> {
    let bar = progress_bar(
        Some(matched),
        "{spinner} {pos}/{len} events put back {wide_bar} {elapsed_precise}",
    );
    let url = admin.url(&["metrics"]);
    loop {
        let text = admin
            .client
            .get(url.clone())
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Failure::Work(format!("reading {url}: {}", error_chain(&e))))?
            .text()
            .await
            .map_err(|e| Failure::Work(format!("reading {url}: {}", error_chain(&e))))?;
        let Some(pending) = pending_redrive(&text) else {
            bar.finish_and_clear();
            eprintln!("this service does not report redrive progress on /metrics; not waiting");
            return Ok(());
        };
        bar.set_position(matched.saturating_sub(pending));
        if pending == 0 {
            bar.finish_and_clear();
            out!("every matched event is back in the outbox")?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn pending_redrive(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix("kallina_relay_redrive_pending_events ")?;
        value.trim().parse::<f64>().ok().map(|v| v.max(0.0) as u64)
    })
}

fn yes_no(yes: bool) -> &'static str {
    if yes {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_pass_through_or_become_rfc3339() {
        assert_eq!(time_arg("1700000000").unwrap(), "1700000000");
        assert_eq!(
            time_arg("2026-11-29T06:00:00Z").unwrap(),
            "2026-11-29T06:00:00Z"
        );
        let two_hours_ago = OffsetDateTime::parse(&time_arg("2h").unwrap(), &Rfc3339).unwrap();
        let age = OffsetDateTime::now_utc() - two_hours_ago;
        assert!((age.whole_seconds() - 7200).abs() < 5, "{age}");
        assert!(OffsetDateTime::parse(&time_arg("now").unwrap(), &Rfc3339).is_ok());
        assert!(time_arg("99999999999d").is_err());
        assert!(time_arg("yesterday").is_err());
        assert_eq!(
            pending_redrive("# TYPE x gauge\nkallina_relay_redrive_pending_events 12\n"),
            Some(12)
        );
    }
}
