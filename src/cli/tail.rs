//! `kallina-relay tail`: watch events go through the exchange, as a consumer sees them, without
//! touching any consumer's queue.
//!
//! It binds a queue of its own, named by the server, exclusive and auto-deleted: it takes
//! nothing away from real consumers and leaves nothing behind when it stops, however it stops.
//! Messages are taken without acknowledgements: a line lost on a terminal costs nothing.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, Consumer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::time::timeout;

use super::{client_settings, Failure, ServeArgs};
use crate::admin::contract::about;
use crate::relay::{refused_with, Brokers};

#[derive(Debug, Args)]
#[command(after_help = "\
Each line: receive time, routing key (the event type), message_id (the event's id, for \
`kallina-relay events show`), and the call, conversation or agent it is about.

Exit status: 0 on Ctrl-C, SIGTERM or a closed output pipe (`kallina-relay tail | head -3`); \
1 when the broker cannot be reached or the connection is lost; 2 on a bad command line or \
configuration.

The broker URL and the exchange come from the settings (KALLINA_RELAY_AMQP_URL, \
KALLINA_RELAY_EXCHANGE, or the configuration file).")]
pub struct TailArgs {
    /// Binding pattern: an event type, or `*` for one word and `#` for any number
    /// (`call.*`). Repeat the option for several.
    #[arg(long, short, value_name = "PATTERN", default_value = "#")]
    pub pattern: Vec<String>,
    /// Print each event's body instead, one per line: the JSON as received, with the
    /// whitespace between its tokens removed.
    #[arg(long)]
    pub json: bool,
    /// Exchange to watch [default: the `exchange` setting]
    #[arg(long)]
    pub exchange: Option<String>,
}

pub async fn run(args: TailArgs, global: &ServeArgs) -> Result<(), Failure> {
    let settings = client_settings(global, false)?;
    let exchange = args
        .exchange
        .clone()
        .unwrap_or(settings.relay.topology.exchange.clone());
    let brokers = &settings.relay.brokers;
    // Whatever the broker library puts in its messages, the passwords must not reach stderr.
    let failed =
        |what: String, e: lapin::Error| Failure::Work(scrub(&format!("{what}: {e}"), brokers));
    let limit = settings.relay.confirm_timeout;
    let (connection, shown) = connect(brokers, limit, &failed).await?;
    let broker = Broker {
        shown: &shown,
        failed: &failed,
    };
    let consumer = subscribe(&connection, &broker, &exchange, &args.pattern).await?;
    eprintln!(
        "tailing exchange `{exchange}` on {shown}, bound with {}; Ctrl-C stops",
        args.pattern.join(", ")
    );
    let result = print_deliveries(consumer, args.json, &failed).await;
    let _ = timeout(
        Duration::from_secs(2),
        connection.close(200, "kallina-relay tail stopped".into()),
    )
    .await;
    result
}

type BrokerFailure<'a> = &'a dyn Fn(String, lapin::Error) -> Failure;

/// Which broker node is used, as shown, and how its errors are reported.
struct Broker<'a> {
    shown: &'a str,
    failed: BrokerFailure<'a>,
}

/// The first node of the list that answers, and how it is shown (password redacted).
async fn connect(
    brokers: &Brokers,
    limit: Duration,
    failed: BrokerFailure<'_>,
) -> Result<(Connection, String), Failure> {
    let mut last = None;
    for index in 0..brokers.len() {
        let shown = brokers.node(index).redacted();
        match timeout(
            limit,
            brokers.connect(index, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(connection)) => return Ok((connection, shown)),
            Ok(Err(e)) => {
                last = Some(failed(
                    format!("cannot connect to the broker at {shown}"),
                    e,
                ))
            }
            Err(_) => {
                last = Some(Failure::Work(format!(
                    "no answer from the broker at {shown} within {}",
                    crate::config::format_duration(limit)
                )))
            }
        }
    }
    Err(last.expect("at least one broker URL"))
}

/// A queue of our own (exclusive, deleted with the connection), bound to `exchange` with each
/// pattern, and a consumer on it.
async fn subscribe(
    connection: &Connection,
    broker: &Broker<'_>,
    exchange: &str,
    patterns: &[String],
) -> Result<Consumer, Failure> {
    let Broker { shown, failed } = *broker;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| failed("cannot open a channel".into(), e))?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| failed("cannot declare a queue".into(), e))?;
    for pattern in patterns {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if refused_with(&e) == Some(&AMQPSoftError::NOTFOUND) {
                    Failure::Work(format!(
                        "the exchange `{exchange}` does not exist on {shown}: the relay \
                         declares it when it first connects (is it running, with this exchange?)"
                    ))
                } else {
                    failed(format!("cannot bind to `{exchange}` with `{pattern}`"), e)
                }
            })?;
    }
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "kallina-relay-tail".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| failed("cannot consume".into(), e))?;
    Ok(consumer)
}

/// Prints each delivery until Ctrl-C, a closed standard output, or the broker ending it.
async fn print_deliveries(
    mut consumer: Consumer,
    json: bool,
    failed: BrokerFailure<'_>,
) -> Result<(), Failure> {
    let stop = crate::shutdown::os_signal();
    let closed = stdout_closed();
    tokio::pin!(stop, closed);
    loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = &mut closed => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let text = if json { one_line(&delivery.data) } else { line(&delivery) };
                    match print(&text) {
                        Ok(()) => {}
                        // The reader is gone (`| head`): what it wanted, it has.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
                        Err(e) => break Err(Failure::Work(format!("cannot write to standard output: {e}"))),
                    }
                }
                Some(Err(e)) => break Err(failed("lost the broker connection".into(), e)),
                None => break Err(Failure::Work("the broker ended the subscription".into())),
            }
        }
    }
}

fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Resolves once nobody reads standard output any more, so that `tail | head -3` ends when
/// `head` does rather than at the next event, which may be a long time coming. On Linux the
/// write end of a pipe reports an error event once its reader is gone; a terminal or a file
/// never does, and cannot even be registered (then this never resolves).
#[cfg(unix)]
async fn stdout_closed() {
    use std::os::fd::AsFd;
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    // A duplicate of stdout's descriptor, owned here, is watched: it refers to the same pipe,
    // and the process's own stdout stays untouched (still blocking, still open).
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return std::future::pending().await;
    };
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which keeps it open, and always the
    // same descriptor, until it is dropped.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::ERROR) } {
        Ok(fd) => {
            if fd.ready(Interest::ERROR).await.is_ok() {
                return;
            }
            std::future::pending().await
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn stdout_closed() {
    std::future::pending::<()>().await
}

/// `time  routing key  message_id  call_id=…`, with `(redelivered)` for an admin redelivery.
fn line(delivery: &Delivery) -> String {
    let properties = &delivery.properties;
    let headers = properties.headers().as_ref().map(|h| h.inner());
    let header = |name: &str| headers.and_then(|h| h.get(name));
    let time = match header("x-received-at") {
        Some(AMQPValue::LongString(at)) => at.to_string(),
        _ => properties
            .timestamp()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs as i64).ok())
            .unwrap_or_else(OffsetDateTime::now_utc)
            .format(&Rfc3339)
            .unwrap_or_default(),
    };
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .unwrap_or("-");
    let mut text = format!("{time}  {}  {id}", delivery.routing_key.as_str());
    // One field only: the line's columns are split on whitespace.
    if let Some(about) = about(&delivery.data) {
        text.push_str("  ");
        text.push_str(about.split(' ').next().unwrap_or_default());
    }
    if header("x-redelivered") == Some(&AMQPValue::Boolean(true)) {
        text.push_str("  (redelivered)");
    }
    text
}

/// The body on one line: whitespace outside strings dropped, every other byte as received
/// (key order, escapes, numbers), so it is the same JSON, and pretty-printed payloads do not
/// span lines.
fn one_line(body: &[u8]) -> String {
    let (mut kept, mut in_string, mut escaped) = (Vec::with_capacity(body.len()), false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b.is_ascii_whitespace() {
            continue;
        } else if b == b'"' {
            in_string = true;
        }
        kept.push(b);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// `text` with the URL's password, raw or percent-encoded, replaced.
fn scrub(text: &str, brokers: &Brokers) -> String {
    let mut text = text.to_string();
    for index in 0..brokers.len() {
        let password = reqwest::Url::parse(brokers.node(index).expose())
            .ok()
            .and_then(|u| u.password().map(str::to_string));
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            let decoded = percent_encoding::percent_decode_str(&password).decode_utf8_lossy();
            text = text
                .replace(&password, "***")
                .replace(decoded.as_ref(), "***");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pretty_body_becomes_one_line_of_the_same_json() {
        let body = b"{\r\n  \"event\": \"call.ended\",\n  \"data\": {\"call_id\": \"c\"}\n}\n";
        let line = one_line(body);
        assert_eq!(line, r#"{"event":"call.ended","data":{"call_id":"c"}}"#);
        assert_eq!(
            one_line(br#"{"a": "x \" y\\", "b": [1, 2]}"#),
            r#"{"a":"x \" y\\","b":[1,2]}"#
        );
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_slice(body).unwrap(),
            serde_json::from_str(&line).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(about(body).as_deref(), Some("call_id=c"));
    }

    #[test]
    fn the_password_never_shows() {
        let nodes = [
            "amqp://relay:p%40ss@a:5672/%2f",
            "amqp://relay:s3cret@b:5672/%2f",
        ]
        .iter()
        .map(|url| crate::relay::Node::parse(url).unwrap())
        .collect();
        let brokers = Brokers::new(nodes, None, None);
        assert_eq!(
            scrub("refused p@ss and p%40ss, then s3cret", &brokers),
            "refused *** and ***, then ***"
        );
    }
}
