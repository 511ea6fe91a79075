//! Prometheus metrics, one registry per running application (so tests never share counters).
//!
//! Names follow `kallina_relay_<name>_<unit>[_total]`; label values come from small fixed
//! sets (event types fold into `other`, outcomes are error codes), never from ids or bodies.

mod per_thread;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub use per_thread::PerThread;

use crate::store::StoreStats;

/// The event types the platform documents; anything else is labelled `other`.
pub const KNOWN_EVENTS: [&str; 4] = [
    "call.started",
    "call.ended",
    "agent.action_completed",
    "conversation.updated",
];

/// Every value of the `event` label: the known types, then `other`, then `none`.
pub const EVENT_LABELS: [&str; 6] = [
    KNOWN_EVENTS[0],
    KNOWN_EVENTS[1],
    KNOWN_EVENTS[2],
    KNOWN_EVENTS[3],
    "other",
    "none",
];

/// Bounded label for an event type: a known type, `other`, or `none` when the body never parsed.
pub fn event_label(event: Option<&str>) -> &'static str {
    EVENT_LABELS[event_label_index(event)]
}

/// The position of [`event_label`]'s answer in [`EVENT_LABELS`].
pub fn event_label_index(event: Option<&str>) -> usize {
    match event {
        None => EVENT_LABELS.len() - 1,
        Some(e) => KNOWN_EVENTS
            .iter()
            .position(|k| *k == e)
            .unwrap_or(KNOWN_EVENTS.len()),
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    // What every webhook request writes is kept per thread (see `per_thread`).
    pub webhooks: PerThread<IntCounterVec>,
    pub request_duration: PerThread<Histogram>,
    pub signature_matches: PerThread<IntCounterVec>,
    pub store_commit_duration: PerThread<Histogram>,
    pub event_age: PerThread<Histogram>,
    outbox_events: IntGauge,
    outbox_oldest_age: Gauge,
    dedup_keys: IntGauge,
    pub published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    pub publish_confirm_duration: Histogram,
    pub broker_connected: IntGauge,
    pub broker_blocked: IntGauge,
    pub broker_node: IntGauge,
    pub broker_connections: prometheus::IntCounter,
    pub delivery_lag: Histogram,
    archive_events: IntGauge,
    quarantined_events: IntGauge,
    store_writable: IntGauge,
    pub redelivered: IntCounterVec,
    pub redrive_pending: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        // The same, one copy per thread: for what every webhook request writes.
        let per_thread_counter = |name: &str, help: &str, labels: &[&str]| {
            let c = PerThread::new(|| {
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
            });
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let per_thread_histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = PerThread::new(|| {
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                    .expect("valid metric")
            });
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let fast = prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("valid buckets");
        let ages = vec![
            0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21_600.0, 86_400.0,
        ];
        let outbox_oldest_age = Gauge::new(
            "kallina_relay_outbox_oldest_age_seconds",
            "Age of the oldest event still waiting in the outbox",
        )
        .expect("valid metric");
        registry
            .register(Box::new(outbox_oldest_age.clone()))
            .expect("unique metric");
        let metrics = Self {
            webhooks: per_thread_counter(
                "kallina_relay_webhooks_total",
                "Webhook requests answered, by source, event type and outcome",
                &["source", "event", "outcome"],
            ),
            request_duration: per_thread_histogram(
                "kallina_relay_request_duration_seconds",
                "Time to answer a webhook request",
                &fast,
            ),
            signature_matches: per_thread_counter(
                "kallina_relay_signature_matches_total",
                "Verified requests by source and the position of the secret that matched (0 = first)",
                &["source", "secret"],
            ),
            store_commit_duration: per_thread_histogram(
                "kallina_relay_store_commit_duration_seconds",
                "How long a request waits for the store: its batch's append to the body log and the fsync",
                &fast,
            ),
            event_age: per_thread_histogram(
                "kallina_relay_event_age_seconds",
                "Receive time minus the signed timestamp",
                &ages,
            ),
            outbox_events: int_gauge(
                "kallina_relay_outbox_events",
                "Events stored and not yet confirmed by the broker",
            ),
            outbox_oldest_age,
            dedup_keys: int_gauge(
                "kallina_relay_dedup_keys",
                "Dedup keys kept for the retention period",
            ),
            published: counter(
                "kallina_relay_published_total",
                "Events confirmed by the broker, by source and event type",
                &["source", "event"],
            ),
            publish_errors: counter(
                "kallina_relay_publish_errors_total",
                "Failed publishes by reason: nack, returned, timeout, connection, channel",
                &["reason"],
            ),
            publish_confirm_duration: histogram(
                "kallina_relay_publish_confirm_duration_seconds",
                "Time from publish to the broker's confirm",
                fast,
            ),
            broker_connected: int_gauge(
                "kallina_relay_broker_connected",
                "1 while the relay has a broker connection",
            ),
            broker_blocked: int_gauge(
                "kallina_relay_broker_blocked",
                "1 while the broker has blocked publishing on the relay's connection (an alarm)",
            ),
            broker_node: int_gauge(
                "kallina_relay_broker_node",
                "Position in amqp_url (from 1) of the broker node the relay is connected to; 0 \
                 while it is not connected",
            ),
            broker_connections: {
                let c = prometheus::IntCounter::new(
                    "kallina_relay_broker_connections_total",
                    "Connections the relay opened to the broker (each reconnect counts)",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            delivery_lag: histogram(
                "kallina_relay_delivery_lag_seconds",
                "Time from receiving an event to the broker's confirm",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
                    3600.0,
                ],
            ),
            archive_events: int_gauge(
                "kallina_relay_archive_events",
                "Published events kept in the archive for the admin API",
            ),
            quarantined_events: int_gauge(
                "kallina_relay_quarantined_events",
                "Outbox records the relay could not publish and set aside (admin API: /admin/quarantine)",
            ),
            store_writable: int_gauge(
                "kallina_relay_store_writable",
                "1 while the store can write; 0 after a disk error, until it reopens",
            ),
            redelivered: counter(
                "kallina_relay_redelivered_events_total",
                "Archived events put back into the outbox by an operator, by trigger",
                &["trigger"],
            ),
            redrive_pending: int_gauge(
                "kallina_relay_redrive_pending_events",
                "Events a running redrive has still to put back",
            ),
            registry,
        };
        for trigger in ["redeliver", "redrive", "quarantine"] {
            metrics.redelivered.with_label_values(&[trigger]);
        }
        for reason in [
            "nack",
            "returned",
            "timeout",
            "connection",
            "channel",
            "refused",
        ] {
            metrics.publish_errors.with_label_values(&[reason]);
        }
        metrics
    }

    /// The Prometheus text exposition, with the store gauges read fresh.
    /// Shows a zero for each configured source and known event type before the first
    /// publish, so that rates and alerts have a series from the start.
    pub fn seed_sources<'a>(&self, sources: impl IntoIterator<Item = &'a str>) {
        for source in sources {
            for event in KNOWN_EVENTS.iter().chain(&["other"]) {
                self.published.with_label_values(&[source, event]);
            }
        }
    }

    pub fn render(&self, store: &StoreStats) -> String {
        self.outbox_events.set(store.outbox_events as i64);
        self.outbox_oldest_age
            .set(store.outbox_oldest_age.map_or(0.0, |d| d.as_secs_f64()));
        self.dedup_keys.set(store.dedup_keys as i64);
        self.archive_events.set(store.archive_events as i64);
        self.quarantined_events.set(store.quarantined_events as i64);
        self.store_writable.set(i64::from(store.writable));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_events_fold_into_other() {
        assert_eq!(event_label(Some("call.ended")), "call.ended");
        assert_eq!(event_label(Some("call.exploded")), "other");
        assert_eq!(event_label(None), "none");
        for (i, label) in EVENT_LABELS.iter().enumerate() {
            let event = (*label != "none").then_some(*label);
            assert_eq!(event_label_index(event), i);
        }
    }

    #[test]
    fn histograms_and_gauges_render() {
        let m = Metrics::new();
        m.webhooks
            .local()
            .with_label_values(&["kallina-relay", "call.ended", "accepted"])
            .inc();
        let text = m.render(&StoreStats {
            outbox_events: 3,
            outbox_capacity: 10,
            outbox_oldest_age: None,
            dedup_keys: 7,
            archive_events: 2,
            quarantined_events: 1,
            writable: true,
        });
        assert!(text.contains(
            "kallina_relay_webhooks_total{event=\"call.ended\",outcome=\"accepted\",source=\"kallina-relay\"} 1"
        ), "{text}");
        assert!(text.contains("kallina_relay_outbox_events 3"));
        assert!(text.contains("kallina_relay_dedup_keys 7"));
        assert!(text.contains("kallina_relay_archive_events 2"));
        assert!(text.contains("kallina_relay_quarantined_events 1"));
        assert!(text.contains("kallina_relay_store_writable 1"));
    }
}
