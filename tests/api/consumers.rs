//! The example consumers of `examples/consumers/` against relayed events: a consumer processes
//! an event once, however many copies of it the at-least-once relay delivers.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::helpers::*;

const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The Python example as a child process. Dropping it kills it, so that a failed assertion
/// leaves no consumer behind on the broker.
struct PythonConsumer {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl PythonConsumer {
    /// Starts it and waits until it has declared and bound its queue.
    async fn start(exchange: &str, queue: &str, db: &Path, max_messages: u32) -> Self {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/consumers/python/consumer.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([
                "--amqp-url",
                BROKER_URL,
                "--exchange",
                exchange,
                "--queue",
                queue,
            ])
            .args(["--binding", "call.*", "--secret", SECRET])
            .arg("--db")
            .arg(db)
            .args(["--max-messages", &max_messages.to_string()])
            .env_remove("KALLINA_WEBHOOK_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 starts");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut consumer = Self { child, stdout };
        let ready = consumer.line().await;
        assert!(ready.starts_with("ready "), "first line: {ready}");
        consumer
    }

    async fn line(&mut self) -> String {
        match tokio::time::timeout(LINE_TIMEOUT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!(
                "the Python consumer ended its output early (exit: {:?}; its stderr is above)",
                self.child.try_wait()
            ),
            Ok(Err(e)) => panic!("reading the Python consumer's output: {e}"),
            Err(_) => panic!("no line from the Python consumer within {LINE_TIMEOUT:?}"),
        }
    }

    /// After --max-messages: exit 0, nothing more printed.
    async fn finishes(mut self) {
        let status = tokio::time::timeout(LINE_TIMEOUT, self.child.wait())
            .await
            .expect("the Python consumer exits after --max-messages")
            .unwrap();
        assert!(status.success(), "the Python consumer exited with {status}");
        let rest = self.stdout.next_line().await.unwrap();
        assert_eq!(rest, None, "nothing after the last delivery");
    }
}

/// Fails with the fix when pika is not installed, rather than skipping the test silently.
fn require_pika() {
    let found = std::process::Command::new("python3")
        .args(["-c", "import pika"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "the Python example consumer needs python3 with pika: run \
         `python3 -m pip install -r examples/consumers/python/requirements.txt` \
         (scripts/test.sh does it when pika is missing)"
    );
}

/// The same event published again, with the relay's properties and message_id: what a
/// republish after a lost confirm, or an operator's redelivery (`x-redelivered`), looks like.
async fn publish_again(
    connection: &Connection,
    exchange: &str,
    body: &str,
    id: &str,
    redelivery: bool,
) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    let signature = kallina_relay::signature::sign(SECRET.as_bytes(), body.as_bytes());
    for (name, value) in [
        ("x-kallina-signature", signature.as_str()),
        ("x-received-at", now_rfc3339().as_str()),
        ("x-source", "kallina-relay"),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    if redelivery {
        headers.insert("x-redelivered".into(), AMQPValue::Boolean(true));
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_type("call.ended".into())
        .with_app_id("kallina-relay".into())
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            exchange.into(),
            "call.ended".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.as_bytes(),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, Confirmation::Ack(None)),
        "routed and confirmed: {confirm:?}"
    );
    let _ = channel.close(200, "done".into()).await;
}

/// `message_id|event` of every row of the consumer's SQLite database.
fn recorded(db: &Path) -> Vec<String> {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             for row in sqlite3.connect(sys.argv[1]).execute(\
             'SELECT message_id, event FROM processed ORDER BY message_id'):\n    \
             print('|'.join(row))",
        ])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_python_consumer_processes_an_event_once_and_skips_its_copies_across_a_restart() {
    require_pika();
    let connection = broker().await;
    let app = spawn_app(Config::default().with_broker(BROKER_URL)).await;
    // The relay declares the exchange on connecting; the consumer only binds to it.
    app.wait_broker_connected().await;
    let exchange = app.names.exchange.clone();
    let queue = random_name("test.consumer-py");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("processed.sqlite3");

    let mut consumer = PythonConsumer::start(&exchange, &queue, &db, 2).await;
    let body = event_body("call.ended", "consumer-py");
    let id = sha256_hex(body.as_bytes());
    assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    assert_eq!(consumer.line().await, format!("processed {id} call.ended"));

    publish_again(&connection, &exchange, &body, &id, false).await;
    assert_eq!(consumer.line().await, format!("skipped duplicate {id}"));
    consumer.finishes().await;

    // The record outlives the process: an operator's redelivery, waiting in the queue while no
    // consumer runs, is recognised by the next one.
    publish_again(&connection, &exchange, &body, &id, true).await;
    let mut restarted = PythonConsumer::start(&exchange, &queue, &db, 1).await;
    assert_eq!(restarted.line().await, format!("skipped duplicate {id}"));
    restarted.finishes().await;

    assert_eq!(recorded(&db), vec![format!("{id}|call.ended")], "one row");
    let left = drain_queue(&connection, &queue).await;
    assert!(
        left.is_empty(),
        "every delivery acknowledged, {} left",
        left.len()
    );
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

/// `examples/consumers/python/stream_reader.py` from `offset`, until it has read `count`:
/// the `offset <n> <message_id> <event>` lines it printed.
async fn read_stream(queue: &str, offset: &str, count: usize) -> Vec<(u64, String)> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/consumers/python/stream_reader.py");
    let run = Command::new("python3")
        .arg(script)
        .args([
            "--amqp-url",
            BROKER_URL,
            "--queue",
            queue,
            "--offset",
            offset,
        ])
        .args(["--max-messages", &count.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LINE_TIMEOUT, run)
        .await
        .expect("the stream reader exits after --max-messages")
        .unwrap();
    assert!(
        output.status.success(),
        "stream_reader.py: {}",
        output.status
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields[0], "offset", "{line}");
            (fields[1].parse().unwrap(), fields[2].to_string())
        })
        .collect()
}

#[tokio::test]
async fn a_stream_declared_by_the_relay_is_read_again_from_any_offset() {
    require_pika();
    let connection = broker().await;
    let queue = random_name("test.stream");
    let app = spawn_app(Config::default().with_broker(BROKER_URL).file(&format!(
        "[[queues]]\nname = \"{queue}\"\nbindings = [\"#\"]\ntype = \"stream\"\nmax_age = \"1D\"\n"
    )))
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = event_body("call.ended", &format!("stream-{i}"));
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
        ids.push(sha256_hex(body.as_bytes()));
    }
    app.wait_outbox_empty().await;
    // Reading removes nothing: two readers from the first offset both see every event.
    let first = read_stream(&queue, "first", 3).await;
    let again = read_stream(&queue, "first", 3).await;
    assert_eq!(first, again);
    let read: Vec<String> = first.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(read, ids);
    // From the second event's offset: the second and the third.
    let from_second = read_stream(&queue, &first[1].0.to_string(), 2).await;
    assert_eq!(from_second, first[1..].to_vec());
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}
