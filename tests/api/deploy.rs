//! The files in `deploy/` against the service itself: every metric the alert rules and the
//! dashboard query is one the service exposes (a renamed metric would otherwise leave an alert
//! that can never fire and an empty panel), and the settings files and placeholder secrets
//! shipped there pass the service's own validation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kallina_relay::config::Layers;
use kallina_relay::settings::Settings;

use crate::helpers::{event_body, spawn_app, Config};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `kallina_relay_*` name in `text`, as the metric family it belongs to: a histogram's
/// `_bucket`, `_sum` and `_count` series belong to the histogram's name.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "kallina_relay_";
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

/// The metric families in a Prometheus text exposition, from its `# TYPE` lines.
fn exposed_families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exposed() {
    let app = spawn_app(Config::default()).await;
    // Labelled counters appear once they have a first value.
    let response = app.post_signed(event_body("call.ended", "deploy")).await;
    assert_eq!(response.status().as_u16(), 202);
    let exposed = exposed_families(&app.metrics().await);

    for file in ["prometheus/alerts.yaml", "grafana/dashboard.json"] {
        let referenced = metric_names_in(&read(file));
        assert!(
            !referenced.is_empty(),
            "deploy/{file} names no kallina_relay_ metric: is the scan broken?"
        );
        let missing: Vec<_> = referenced.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "deploy/{file} uses metrics that /metrics does not expose: {missing:?}\nexposed: {exposed:?}"
        );
    }
    app.stop().await;
}

#[test]
fn the_scan_finds_histogram_families_and_stops_at_label_braces() {
    let names = metric_names_in(
        "histogram_quantile(0.99, rate(kallina_relay_delivery_lag_seconds_bucket{x=\"1\"}[5m])) \
         and kallina_relay_outbox_events>3",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "kallina_relay_delivery_lag_seconds",
            "kallina_relay_outbox_events"
        ]
    );
}

/// `KEY=value` lines, as systemd's EnvironmentFile and compose's .env read them.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {line}"));
            (key.to_string(), value.to_string())
        })
        .collect()
}

fn load(file: Option<&str>, env: BTreeMap<String, String>) -> Settings {
    let layers = Layers {
        file: file.map(|relative| (PathBuf::from(relative), read(relative))),
        env,
        flags: BTreeMap::new(),
    };
    Settings::load(&layers).unwrap_or_else(|e| panic!("deploy/ settings refused: {e}"))
}

/// With the placeholders as they are, the service starts: a deployment made from these files
/// comes up (and is then given real secrets) instead of stopping on a setting.
#[test]
fn the_settings_and_placeholder_secrets_in_deploy_are_accepted() {
    let systemd = load(
        Some("kallina-relay.example.toml"),
        env_file(&read("systemd/kallina-relay.env.example")),
    );
    assert!(systemd.admin.token.is_some(), "the admin API is on");

    let compose_env: BTreeMap<_, _> = env_file(&read(".env.example"))
        .into_iter()
        .filter(|(key, _)| key.starts_with("KALLINA_"))
        .collect();
    let compose = load(Some("kallina-relay.example.toml"), compose_env);
    assert!(compose.admin.token.is_some(), "the admin API is on");

    let mut secret = BTreeMap::new();
    secret.insert("KALLINA_WEBHOOK_SECRET".to_string(), "s".to_string());
    let kubernetes = load(Some("kubernetes/kallina-relay.toml"), secret);
    assert_eq!(
        kubernetes.store.outbox_max, 1_000_000,
        "alerts.yaml assumes it"
    );
}
