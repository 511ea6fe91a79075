//! What a replay run says at the end: answers per status and code, failures per kind,
//! latency percentiles, and hints for the usual mistakes.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::task::JoinError;

use super::Outcome;

/// What the summary says about the run besides the answers.
pub(super) struct Run<'a> {
    pub(super) url: &'a str,
    pub(super) payloads: usize,
    pub(super) repeat: u32,
    pub(super) elapsed: Duration,
}

/// Counts per status and per code, failures per kind, and the latency of the answers.
pub(super) struct Summary {
    pub(super) requests: u64,
    pub(super) statuses: BTreeMap<u16, (u64, BTreeMap<String, u64>)>,
    pub(super) failures: BTreeMap<&'static str, (u64, String)>,
    /// Microseconds, from 1 µs to an hour, three significant digits.
    pub(super) latency: Histogram<u64>,
}

impl Summary {
    pub(super) fn new() -> Self {
        Self {
            requests: 0,
            statuses: BTreeMap::new(),
            failures: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    pub(super) fn add(&mut self, done: Result<Outcome, JoinError>) {
        self.requests += 1;
        let outcome = done.unwrap_or_else(|e| Outcome::Failed {
            kind: "panic",
            error: e.to_string(),
        });
        match outcome {
            Outcome::Answered {
                status,
                code,
                latency,
            } => {
                let (count, codes) = self.statuses.entry(status).or_default();
                *count += 1;
                if let Some(code) = code {
                    *codes.entry(code).or_default() += 1;
                }
                self.latency
                    .saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            }
            Outcome::Failed { kind, error } => {
                // The first error of each kind is kept: one example says enough.
                self.failures.entry(kind).or_insert((0, error)).0 += 1;
            }
        }
    }

    pub(super) fn not_2xx(&self) -> u64 {
        let answered_badly: u64 = self
            .statuses
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, (count, _))| count)
            .sum();
        answered_badly + self.failures.values().map(|(count, _)| count).sum::<u64>()
    }

    pub(super) fn code_count(&self, code: &str) -> u64 {
        self.statuses
            .values()
            .filter_map(|(_, codes)| codes.get(code))
            .sum()
    }

    /// p50, p90, p99 and max in milliseconds; `None` when nothing was answered.
    pub(super) fn percentiles(&self) -> Option<[(&'static str, f64); 4]> {
        if self.latency.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some([
            ("p50", ms(self.latency.value_at_quantile(0.50))),
            ("p90", ms(self.latency.value_at_quantile(0.90))),
            ("p99", ms(self.latency.value_at_quantile(0.99))),
            ("max", ms(self.latency.max())),
        ])
    }

    pub(super) fn to_text(&self, run: &Run) -> String {
        let mut text = format!(
            "{} requests ({} payloads x {}) to {} in {:.2}s ({:.1}/s)\n",
            self.requests,
            run.payloads,
            run.repeat,
            run.url,
            run.elapsed.as_secs_f64(),
            self.requests as f64 / run.elapsed.as_secs_f64().max(1e-9),
        );
        for (status, (count, codes)) in &self.statuses {
            let reason = reqwest::StatusCode::from_u16(*status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            let codes = codes
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            text.push_str(&format!(
                "  {:<28}{count:>7}  {codes}\n",
                format!("{status} {reason}")
            ));
        }
        for (kind, (count, error)) in &self.failures {
            text.push_str(&format!(
                "  {:<28}{count:>7}  {error}\n",
                format!("no answer ({kind})")
            ));
        }
        if let Some(percentiles) = self.percentiles() {
            let parts: Vec<String> = percentiles
                .iter()
                .map(|(name, ms)| format!("{name} {}", millis(*ms)))
                .collect();
            text.push_str(&format!("latency  {}\n", parts.join("  ")));
        }
        text
    }

    pub(super) fn to_json(&self, run: &Run) -> Value {
        let statuses: serde_json::Map<String, Value> = self
            .statuses
            .iter()
            .map(|(status, (count, codes))| {
                (
                    status.to_string(),
                    json!({ "count": count, "codes": codes }),
                )
            })
            .collect();
        let failures: serde_json::Map<String, Value> = self
            .failures
            .iter()
            .map(|(kind, (count, error))| {
                (
                    kind.to_string(),
                    json!({ "count": count, "example": error }),
                )
            })
            .collect();
        let latency = self.percentiles().map(|p| {
            p.iter()
                .map(|(name, ms)| (name.to_string(), json!(ms)))
                .collect::<serde_json::Map<_, _>>()
        });
        json!({
            "url": run.url,
            "payloads": run.payloads,
            "repeat": run.repeat,
            "requests": self.requests,
            "not_2xx": self.not_2xx(),
            "elapsed_seconds": run.elapsed.as_secs_f64(),
            "statuses": statuses,
            "failures": failures,
            "latency_ms": latency,
        })
    }

    /// The two mistakes everyone makes once, said on stderr so that the summary stays clean.
    pub(super) fn print_hints(&self, fresh_timestamp: bool) {
        if !fresh_timestamp && self.code_count("timestamp_out_of_tolerance") > 0 {
            eprintln!(
                "hint: the payloads' signed timestamps are outside the receiver's tolerance; \
                 --fresh-timestamp rewrites them to now"
            );
        }
        if self.code_count("invalid_signature") > 0 {
            eprintln!(
                "hint: the receiver refused the signature: sign with its secret (--secret or \
                 KALLINA_WEBHOOK_SECRET)"
            );
        }
    }
}

fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        format!("{ms:.1}ms")
    }
}
