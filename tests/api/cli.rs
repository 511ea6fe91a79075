//! The client commands (`replay`, `tail`, `events`) as an operator runs them: the real binary,
//! against a service in this process, judged by what it prints and by its exit status.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;

use crate::helpers::*;

const ADMIN_TOKEN: &str = "admin-token-for-cli-tests-0123";

/// What a finished command left.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}): {}\n{}", self.stdout, self.stderr)
        })
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The binary with a clean environment (only `PATH` and `env`), so that nothing of the
/// developer's shell (a KALLINA_* variable, a configuration file) leaks into the test.
fn command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Ran {
    let mut command = command(args, env);
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().expect("the kallina-relay binary starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).await.unwrap();
    }
    let output = timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kallina-relay {args:?} did not end within 120s"))
        .unwrap();
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn webhook_url(app: &TestApp) -> String {
    format!("{}/webhooks/kallina", app.address)
}

fn events_dir() -> String {
    fixtures_dir().join("events").display().to_string()
}

const SIGNED: &[(&str, &str)] = &[("KALLINA_WEBHOOK_SECRET", SECRET)];

#[tokio::test]
async fn replay_of_the_fixtures_with_fresh_timestamps_is_accepted_in_full() {
    let app = spawn_app(Config::default()).await;
    let (url, dir) = (webhook_url(&app), events_dir());

    let ran = run(
        &["replay", &dir, "--url", &url, "--fresh-timestamp"],
        SIGNED,
        None,
    )
    .await;
    assert_eq!(ran.code, 0, "{ran}");
    assert!(ran.stdout.contains("5 requests (5 payloads x 1)"), "{ran}");
    let statuses: Vec<&str> = ran.stdout.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(statuses.len(), 1, "{ran}");
    let words: Vec<&str> = statuses[0].split_whitespace().collect();
    assert_eq!(words, ["202", "Accepted", "5", "accepted:", "5"], "{ran}");
    assert!(ran.stdout.contains("latency  p50 "), "{ran}");
    assert_eq!(app.outbox_depth().await, 5, "every fixture stored once");

    // As captured, they are too old: refused, counted, exit 1, and a hint says what to do.
    let ran = run(&["replay", &dir, "--url", &url, "--json"], SIGNED, None).await;
    assert_eq!(ran.code, 1, "{ran}");
    let summary = ran.json();
    assert_eq!(summary["statuses"]["400"]["count"], 5, "{ran}");
    assert_eq!(
        summary["statuses"]["400"]["codes"]["timestamp_out_of_tolerance"], 5,
        "{ran}"
    );
    assert!(ran.stderr.contains("--fresh-timestamp"), "{ran}");
    app.stop().await;
}

#[tokio::test]
async fn replay_repeats_are_byte_identical_and_answered_as_duplicates() {
    let app = spawn_app(Config::default()).await;
    let ran = run(
        &[
            "replay",
            &events_dir(),
            "--url",
            &webhook_url(&app),
            "--fresh-timestamp",
            "--repeat",
            "2",
            "--json",
        ],
        SIGNED,
        None,
    )
    .await;
    assert_eq!(ran.code, 0, "{ran}");
    let summary = ran.json();
    assert_eq!(summary["requests"], 10, "{ran}");
    assert_eq!(summary["statuses"]["202"]["codes"]["accepted"], 5, "{ran}");
    assert_eq!(summary["statuses"]["200"]["codes"]["duplicate"], 5, "{ran}");
    assert_eq!(summary["not_2xx"], 0, "{ran}");
    for percentile in ["p50", "p90", "p99", "max"] {
        assert!(
            summary["latency_ms"][percentile].as_f64().is_some(),
            "{ran}"
        );
    }
    assert_eq!(app.outbox_depth().await, 5, "the copies were not stored");
    app.stop().await;
}

#[tokio::test]
async fn replay_reads_json_lines_from_standard_input() {
    let app = spawn_app(Config::default()).await;
    let lines: Vec<String> = (0..3)
        .map(|i| event_body("call.started", &format!("cli-stdin-{i}")))
        .collect();
    let input = format!("{}\n", lines.join("\n"));
    let ran = run(
        &[
            "replay",
            "-",
            "--url",
            &webhook_url(&app),
            "--rate",
            "50",
            "--concurrency",
            "2",
            "--json",
        ],
        SIGNED,
        Some(input.as_bytes()),
    )
    .await;
    assert_eq!(ran.code, 0, "{ran}");
    assert_eq!(ran.json()["statuses"]["202"]["count"], 3, "{ran}");
    // Each line was sent as it was: its dedup key is the SHA-256 of exactly those bytes.
    let ids: Vec<String> = lines.iter().map(|l| sha256_hex(l.as_bytes())).collect();
    for line in &lines {
        let resend = app.post_signed(line.clone()).await;
        assert_eq!(resend.status().as_u16(), 200);
        let answer: Value = resend.json().await.unwrap();
        assert!(ids.contains(&answer["id"].as_str().unwrap().to_string()));
    }
    app.stop().await;
}

#[tokio::test]
async fn replay_with_the_wrong_secret_exits_1_and_counts_the_401s() {
    let app = spawn_app(Config::default()).await;
    let ran = run(
        &[
            "replay",
            &events_dir(),
            "--url",
            &webhook_url(&app),
            "--fresh-timestamp",
            "--secret",
            "not-the-secret",
            "--json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(ran.code, 1, "{ran}");
    let summary = ran.json();
    assert_eq!(summary["statuses"]["401"]["count"], 5, "{ran}");
    assert_eq!(
        summary["statuses"]["401"]["codes"]["invalid_signature"], 5,
        "{ran}"
    );
    assert!(
        ran.stderr.contains("5 of 5 requests were not answered 2xx"),
        "{ran}"
    );
    assert_eq!(app.outbox_depth().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn replay_exit_status_tells_bad_input_from_failed_work() {
    let dir = events_dir();
    let url = format!("http://127.0.0.1:{}/webhooks/kallina", free_port());

    // Nobody listens: the work failed (1), and the summary says how.
    let ran = run(&["replay", &dir, "--url", &url, "--json"], SIGNED, None).await;
    assert_eq!(ran.code, 1, "{ran}");
    assert_eq!(ran.json()["failures"]["connect"]["count"], 5, "{ran}");

    // The call itself is wrong (2): a missing file, no secret anywhere, a bad flag value.
    let missing = run(
        &["replay", "/nonexistent/x.json", "--url", &url],
        SIGNED,
        None,
    )
    .await;
    assert_eq!(missing.code, 2, "{missing}");
    assert!(missing.stderr.contains("/nonexistent/x.json"), "{missing}");
    let no_secret = run(&["replay", &dir, "--url", &url], &[], None).await;
    assert_eq!(no_secret.code, 2, "{no_secret}");
    assert!(
        no_secret.stderr.contains("KALLINA_WEBHOOK_SECRET"),
        "{no_secret}"
    );
    let zero = run(&["replay", &dir, "--concurrency", "0"], SIGNED, None).await;
    assert_eq!(zero.code, 2, "{zero}");
    let empty = run(&["replay", "-", "--url", &url], SIGNED, Some(b"\n")).await;
    assert_eq!(empty.code, 2, "{empty}");
}

#[tokio::test]
async fn tail_prints_the_matching_event_and_exits_0_when_its_pipe_closes() {
    let connection = broker().await;
    let app = spawn_app(Config::default().with_broker(BROKER_URL)).await;
    app.wait_broker_connected().await;

    let mut tail = command(
        &["tail", "--pattern", "call.*"],
        &[
            ("KALLINA_RELAY_AMQP_URL", BROKER_URL),
            ("KALLINA_RELAY_EXCHANGE", &app.names.exchange),
        ],
    )
    .spawn()
    .expect("the kallina-relay binary starts");
    // The queue is bound once the command says so; only events after that reach it.
    let mut stderr = BufReader::new(tail.stderr.take().unwrap()).lines();
    let ready = timeout(Duration::from_secs(30), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.starts_with("tailing exchange") {
                return line;
            }
            eprintln!("tail: {line}");
        }
        panic!("tail ended before it was ready: {:?}", tail.try_wait());
    })
    .await
    .expect("tail is ready within 30s");
    assert!(
        !ready.contains("guest:guest"),
        "the password shows: {ready}"
    );

    let other = event_body("agent.action_completed", "cli-tail-other");
    let wanted = event_body("call.ended", "cli-tail");
    for body in [&other, &wanted] {
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    }
    let mut stdout = BufReader::new(tail.stdout.take().unwrap()).lines();
    let line = timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("an event line within 30s")
        .unwrap()
        .expect("a line before the end");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{line}");
    assert_eq!(
        fields[1], "call.ended",
        "the other type is not bound: {line}"
    );
    assert_eq!(fields[2], sha256_hex(wanted.as_bytes()), "{line}");
    assert_eq!(fields[3], "call_id=call_cli-tail", "{line}");

    // The reader goes away, as `head` does: a normal end, without waiting for another event.
    drop(stdout);
    let status = timeout(Duration::from_secs(15), tail.wait())
        .await
        .expect("tail ends once its output is closed")
        .unwrap();
    assert!(status.success(), "{status:?}");
    app.stop_and_clean_broker(&connection, &[]).await;
}

#[tokio::test]
async fn tail_on_an_exchange_that_does_not_exist_says_so_and_exits_1() {
    let exchange = format!("kallina.missing.{}", fastrand::u64(..));
    let ran = run(
        &["tail"],
        &[
            ("KALLINA_RELAY_AMQP_URL", BROKER_URL),
            ("KALLINA_RELAY_EXCHANGE", &exchange),
        ],
        None,
    )
    .await;
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr
            .contains(&format!("the exchange `{exchange}` does not exist")),
        "{ran}"
    );
}

#[test]
fn every_subcommand_explains_itself() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["sign", "--help"],
        &["replay", "--help"],
        &["tail", "--help"],
        &["events", "--help"],
        &["events", "list", "--help"],
        &["events", "show", "--help"],
        &["events", "redeliver", "--help"],
        &["events", "redrive", "--help"],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {output:?}");
        assert!(
            stdout.contains("Usage: kallina-relay"),
            "{args:?}: {stdout}"
        );
    }
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .args(["events", "frobnicate"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
}

#[tokio::test]
async fn events_are_listed_shown_redriven_and_redelivered_through_the_cli() {
    let connection = broker().await;
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    app.wait_broker_connected().await;
    let bodies = [
        event_body("call.ended", "cli-events-1"),
        event_body("call.started", "cli-events-2"),
    ];
    for body in &bodies {
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    }
    app.wait_outbox_empty().await;
    let ids: Vec<String> = bodies.iter().map(|b| sha256_hex(b.as_bytes())).collect();
    let admin = app.admin_address.as_str();
    let with_token: &[(&str, &str)] = &[("KALLINA_RELAY_ADMIN_TOKEN", ADMIN_TOKEN)];

    // Every page, in acceptance order, as JSON; then the table a person reads.
    let listed = events(
        admin,
        &["list", "--all", "--limit", "1", "--json"],
        with_token,
    )
    .await;
    assert_eq!(listed.code, 0, "{listed}");
    let listed_ids: Vec<String> = listed.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed_ids, ids, "{listed}");
    let table = events(admin, &["list", "--event", "call.ended"], with_token).await;
    assert_eq!(table.code, 0, "{table}");
    assert!(table.stdout.contains(&ids[0]), "{table}");
    assert!(!table.stdout.contains(&ids[1]), "{table}");
    assert!(table.stdout.contains("published"), "{table}");

    // One event: summary and body, or the answer as it came.
    let shown = events(admin, &["show", &ids[0]], with_token).await;
    assert_eq!(shown.code, 0, "{shown}");
    assert!(shown.stdout.contains("call_cli-events-1"), "{shown}");
    assert!(shown.stdout.contains("published"), "{shown}");
    let raw = events(admin, &["show", &ids[0], "--json"], with_token).await;
    assert_eq!(
        raw.json()["body"]["data"]["call_id"],
        "call_cli-events-1",
        "{raw}"
    );

    let dry = events(
        admin,
        &["redrive", "--since", "1h", "--dry-run", "--json"],
        with_token,
    )
    .await;
    assert_eq!(dry.code, 0, "{dry}");
    assert_eq!(dry.json()["matched"], 2, "{dry}");

    let redelivered = events(admin, &["redeliver", &ids[1]], with_token).await;
    assert_eq!(redelivered.code, 0, "{redelivered}");
    assert!(redelivered.stdout.contains(&ids[1]), "{redelivered}");
    app.wait_outbox_empty().await;

    // Error answers: one line and a hint on stderr, exit 1; no token at all is a usage error.
    let unknown = events(admin, &["show", "no-such-event"], with_token).await;
    assert_eq!(unknown.code, 1, "{unknown}");
    assert!(unknown.stderr.contains("404 not_found"), "{unknown}");
    let wrong = events(
        admin,
        &["list"],
        &[("KALLINA_RELAY_ADMIN_TOKEN", "a-wrong-token-0123456789")],
    )
    .await;
    assert_eq!(wrong.code, 1, "{wrong}");
    assert!(wrong.stderr.contains("401 unauthorized"), "{wrong}");
    assert!(wrong.stderr.contains("hint:"), "{wrong}");
    assert!(!wrong.stderr.contains(ADMIN_TOKEN), "{wrong}");
    let tokenless = events(admin, &["list"], &[]).await;
    assert_eq!(tokenless.code, 2, "{tokenless}");

    app.stop_and_clean_broker(&connection, &[]).await;
}

/// `kallina-relay events --admin-url <admin> <args>`.
async fn events(admin: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut all = vec!["events", "--admin-url", admin];
    all.extend_from_slice(args);
    run(&all, env, None).await
}
