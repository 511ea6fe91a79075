//! An idempotent consumer of the events kallina-relay publishes to RabbitMQ.
//!
//! The relay delivers at least once, and every copy of an event carries the same `message_id`.
//! This consumer records each processed id, with the processing's result, in a sled tree, makes
//! that durable (sled's flush, then an fdatasync of sled's log file), and only then
//! acknowledges. A delivery whose id is already recorded is acknowledged without being
//! processed again, also after a restart.
//!
//! ```sh
//! cargo run --example consumer -- --exchange kallina.events --queue crm.events \
//!     --binding 'call.*' --db processed.sled
//! ```
//!
//! One line per delivery on standard output: `processed <message_id> <event>`,
//! `skipped duplicate <message_id>`, or `rejected <message_id> <reason>`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
#[command(
    about = "An idempotent consumer of the events kallina-relay publishes to RabbitMQ",
    after_help = "Exit status: 0 after --max-messages or on SIGINT/SIGTERM; 1 when the broker \
                  or the database fails; 2 on bad usage or when the exchange does not exist."
)]
struct Args {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, default_value = "kallina.events")]
    exchange: String,
    /// Durable queue, declared if missing.
    #[arg(long)]
    queue: String,
    /// Routing pattern (an event type, `call.*`, `#`); repeatable.
    #[arg(long, default_value = "#")]
    binding: Vec<String>,
    /// x-queue-type to declare with; needed to match a quorum queue declared elsewhere.
    #[arg(long)]
    queue_type: Option<QueueType>,
    /// sled directory of processed message ids.
    #[arg(long)]
    db: PathBuf,
    #[arg(long, default_value_t = 16)]
    prefetch: u16,
    /// Exit after this many processed or skipped deliveries (0: never).
    #[arg(long, default_value_t = 0)]
    max_messages: u64,
    /// Verify x-kallina-signature with this webhook secret; repeatable for a rotation.
    #[arg(
        long,
        env = "KALLINA_WEBHOOK_SECRET",
        value_delimiter = ',',
        hide_env_values = true
    )]
    secret: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueueType {
    Classic,
    Quorum,
}

/// What became of one delivery.
enum Outcome {
    Processed(String),
    Duplicate,
    /// Can never be processed, however often it is retried.
    Rejected(String),
}

/// The ids already processed, kept across restarts.
#[derive(Clone)]
struct Processed {
    db: sled::Db,
    ids: sled::Tree,
    /// sled's flush on Linux is `sync_file_range`, which does not reach the device's cache.
    log_file: Arc<File>,
}

impl Processed {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = sled::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        let ids = db.open_tree("processed")?;
        let log_file = Arc::new(File::open(dir.join("db"))?);
        Ok(Self { db, ids, log_file })
    }

    fn contains(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.ids.contains_key(id)?)
    }

    /// Durable on return: the ack that follows must never be for an id that a crash could
    /// forget, or its next copy would be processed again.
    fn record(&self, id: &str, value: &serde_json::Value) -> anyhow::Result<()> {
        self.ids.insert(id, serde_json::to_vec(value)?)?;
        self.db.flush()?;
        self.log_file.sync_data()?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    // An empty KALLINA_WEBHOOK_SECRET means no check, not a check against the empty key.
    args.secret.retain(|s| !s.is_empty());
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let processed = Processed::open(&args.db)?;
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let channel = connection.create_channel().await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    if let Err(e) = channel
        .exchange_declare(
            args.exchange.as_str().into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
    {
        // Declaring it here with other arguments than the relay's would make the relay's own
        // declaration fail; the relay creates it when it first connects.
        eprintln!(
            "the exchange `{}` does not exist ({e}): start the relay first, with this exchange",
            args.exchange
        );
        return Ok(ExitCode::from(2));
    }
    let channel = connection.create_channel().await?;
    let mut arguments = FieldTable::default();
    if let Some(kind) = args.queue_type {
        let kind = match kind {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        };
        arguments.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(args.queue.as_str().into(), durable, arguments)
        .await
        .with_context(|| format!("declaring queue `{}`", args.queue))?;
    for pattern in &args.binding {
        channel
            .queue_bind(
                args.queue.as_str().into(),
                args.exchange.as_str().into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding `{}` with `{pattern}`", args.queue))?;
    }
    // Bounds what is unacknowledged at once: with manual acks the broker would otherwise push
    // the whole queue into this process's memory.
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "kallina-consumer-example".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    say(&format!(
        "ready queue={} exchange={} bindings={}",
        args.queue,
        args.exchange,
        args.binding.join(",")
    ));

    let stop = stop_signal();
    tokio::pin!(stop);
    let mut handled = 0u64;
    let result = loop {
        let delivery = tokio::select! {
            _ = &mut stop => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                // Unacked messages go back to the queue; a supervisor restarts this process,
                // and what it had already recorded is skipped when it comes again.
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("broker connection lost")),
                None => break Err(anyhow::anyhow!("the broker ended the subscription")),
            },
        };
        // The relay always sets message_id; for a message from elsewhere, the SHA-256 of the
        // body is the key the relay would have used.
        let id = match delivery.properties.message_id() {
            Some(id) => id.to_string(),
            None => hex::encode(Sha256::digest(&delivery.data)),
        };
        let outcome = {
            let (processed, id, secrets) = (processed.clone(), id.clone(), args.secret.clone());
            let (data, properties) = (delivery.data.clone(), delivery.properties.clone());
            // sled and the fsync block: off the runtime's threads.
            tokio::task::spawn_blocking(move || {
                consume(&processed, &id, &data, &properties, &secrets)
            })
            .await?
        };
        // A database failure is not this message's fault: stop without acking, and the broker
        // hands it to the next consumer.
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => break Err(e.context(format!("processing {id}"))),
        };
        if let Outcome::Rejected(reason) = &outcome {
            // Not requeued: the same bytes would fail the same way forever, in a hot loop.
            // Give the queue a dead-letter policy to keep such messages for inspection.
            let no_requeue = BasicNackOptions {
                requeue: false,
                ..Default::default()
            };
            delivery.nack(no_requeue).await?;
            say(&format!("rejected {id} {reason}"));
            continue;
        }
        delivery.ack(BasicAckOptions::default()).await?;
        match outcome {
            Outcome::Processed(event) => say(&format!("processed {id} {event}")),
            _ => say(&format!("skipped duplicate {id}")),
        }
        handled += 1;
        if args.max_messages > 0 && handled >= args.max_messages {
            break Ok(());
        }
    };
    let _ = connection.close(200, "consumer stopping".into()).await;
    let flushed = processed.db.flush();
    result?;
    flushed?;
    Ok(ExitCode::SUCCESS)
}

fn consume(
    processed: &Processed,
    id: &str,
    data: &[u8],
    properties: &BasicProperties,
    secrets: &[String],
) -> anyhow::Result<Outcome> {
    if !secrets.is_empty() {
        if let Err(reason) = verify_signature(secrets, data, properties) {
            return Ok(Outcome::Rejected(reason.into()));
        }
    }
    let envelope: serde_json::Value = match serde_json::from_slice(data) {
        Ok(envelope) => envelope,
        Err(e) => return Ok(Outcome::Rejected(format!("body is not JSON: {e}"))),
    };
    let Some(event) = envelope["event"].as_str() else {
        return Ok(Outcome::Rejected("body has no string `event`".into()));
    };
    // Deliveries are handled one at a time, so nothing can record this id between the check
    // and the insert.
    if processed.contains(id)? {
        return Ok(Outcome::Duplicate);
    }
    let result = handle(&envelope);
    processed.record(id, &serde_json::json!({"event": event, "result": result}))?;
    Ok(Outcome::Processed(event.to_string()))
}

/// Stands for the real work. It runs before the id is recorded, so a crash between the two
/// repeats it: give an outside effect (an HTTP call, an email) the message_id as its own
/// idempotency key, or keep its result in the same store as the id, as here.
fn handle(envelope: &serde_json::Value) -> serde_json::Value {
    let data = &envelope["data"];
    serde_json::json!({"call_id": data["call_id"], "outcome": data["outcome"]})
}

/// The relay passes on X-Kallina-Signature as received: `sha256=<hex HMAC-SHA256 of the body>`.
fn verify_signature(
    secrets: &[String],
    data: &[u8],
    properties: &BasicProperties,
) -> Result<(), &'static str> {
    let header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-kallina-signature").cloned());
    let header = match header {
        Some(AMQPValue::LongString(value)) => value,
        _ => return Err("missing x-kallina-signature"),
    };
    let digest = header
        .as_bytes()
        .strip_prefix(b"sha256=")
        .and_then(|hex_digest| hex::decode(hex_digest).ok())
        .filter(|digest| digest.len() == 32)
        .ok_or("malformed x-kallina-signature")?;
    for secret in secrets {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(data);
        // verify_slice compares in constant time.
        if mac.verify_slice(&digest).is_ok() {
            return Ok(());
        }
    }
    Err("signature mismatch")
}

fn say(line: &str) {
    // Rust's stdout is line-buffered: each line is out before the next delivery is read.
    println!("{line}");
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
