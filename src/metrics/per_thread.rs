//! A metric kept once per thread and added up when scraped.
//!
//! **Why.** A Prometheus counter or histogram is a handful of atomics every thread writes. On
//! the webhook path the two HTTP workers wrote the same ones for every request, and each write
//! waited for the cache line to come over from the other core: `Histogram::observe` alone was
//! 2.8 % of the relay's CPU answering duplicates, its samples on the instructions just after
//! its `lock xadd` and `lock inc` (perf annotate, README performance section). Here each thread
//! writes a copy of its own and only a scrape reads them all.
//!
//! **What a scrape sees** is what one metric would have shown: the copies are added up, counter
//! by counter and bucket by bucket, under the one name and help text, every observation visible
//! as soon as it is made (there is nothing to flush).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Histogram, Metric, MetricFamily, MetricType};

/// Copies of each metric. Threads beyond this many share copies: still correct, only slower.
const COPIES: usize = 8;

/// One copy of `M` per thread (up to [`COPIES`]); cloning shares the copies.
#[derive(Clone)]
pub struct PerThread<M> {
    copies: Arc<[M]>,
}

impl<M> PerThread<M> {
    pub fn new(mut make: impl FnMut() -> M) -> Self {
        Self {
            copies: (0..COPIES).map(|_| make()).collect(),
        }
    }

    /// The calling thread's copy.
    pub fn local(&self) -> &M {
        &self.copies[thread_number() % self.copies.len()]
    }

    /// The same thing derived from every copy, such as one label set of a vector resolved once
    /// (what is derived is not registered: its parent is).
    pub fn map<N>(&self, f: impl FnMut(&M) -> N) -> PerThread<N> {
        PerThread {
            copies: self.copies.iter().map(f).collect(),
        }
    }
}

/// A number per thread, handed out in the order threads first ask.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

impl<M: Collector> Collector for PerThread<M> {
    fn desc(&self) -> Vec<&Desc> {
        self.copies[0].desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.copies[0].collect();
        for copy in &self.copies[1..] {
            for (family, mut other) in families.iter_mut().zip(copy.collect()) {
                let kind = family.get_field_type();
                for metric in other.take_metric() {
                    let series = family
                        .mut_metric()
                        .iter_mut()
                        .find(|m| m.get_label() == metric.get_label());
                    match series {
                        Some(into) => add(kind, into, &metric),
                        None => family.mut_metric().push(metric),
                    }
                }
            }
        }
        families
    }
}

/// Adds a counter's value or a histogram's counts and sum to those of the same series.
fn add(kind: MetricType, into: &mut Metric, from: &Metric) {
    match kind {
        MetricType::COUNTER => {
            let mut counter = Counter::default();
            counter.set_value(into.get_counter().get_value() + from.get_counter().get_value());
            into.set_counter(counter);
        }
        MetricType::HISTOGRAM => {
            let (a, b) = (into.get_histogram(), from.get_histogram());
            let mut sum = Histogram::default();
            sum.set_sample_count(a.get_sample_count() + b.get_sample_count());
            sum.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
            sum.set_bucket(
                a.get_bucket()
                    .iter()
                    .zip(b.get_bucket())
                    .map(|(x, y)| {
                        let mut bucket = x.clone();
                        bucket.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                        bucket
                    })
                    .collect(),
            );
            into.set_histogram(sum);
        }
        // Only counters and histograms are kept per thread.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, HistogramOpts, IntCounterVec, Opts, Registry};

    #[test]
    fn a_scrape_adds_up_what_every_thread_counted() {
        let registry = Registry::new();
        let counter = PerThread::new(|| {
            IntCounterVec::new(Opts::new("c_total", "help"), &["outcome"]).unwrap()
        });
        let histogram = PerThread::new(|| {
            prometheus::Histogram::with_opts(
                HistogramOpts::new("h_seconds", "help").buckets(vec![1.0, 2.0]),
            )
            .unwrap()
        });
        registry.register(Box::new(counter.clone())).unwrap();
        registry.register(Box::new(histogram.clone())).unwrap();
        let accepted = counter.map(|c| c.with_label_values(&["accepted"]));
        // More threads than copies: some share one.
        std::thread::scope(|s| {
            for i in 0..(COPIES + 3) {
                let (counter, histogram, accepted) = (&counter, &histogram, &accepted);
                s.spawn(move || {
                    accepted.local().inc();
                    if i % 2 == 0 {
                        counter.local().with_label_values(&["refused"]).inc_by(2);
                    }
                    histogram.local().observe(0.5);
                    histogram.local().observe(1.5);
                });
            }
        });
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        let n = COPIES + 3;
        for line in [
            format!("c_total{{outcome=\"accepted\"}} {n}"),
            format!("c_total{{outcome=\"refused\"}} {}", 2 * n.div_ceil(2)),
            format!("h_seconds_bucket{{le=\"1\"}} {n}"),
            format!("h_seconds_bucket{{le=\"2\"}} {}", 2 * n),
            format!("h_seconds_count {}", 2 * n),
            format!("h_seconds_sum {}", n as f64 * 2.0),
            "# HELP c_total help".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        // One series per label set, however many copies counted it.
        assert_eq!(text.matches("c_total{outcome=\"accepted\"}").count(), 1);
    }
}
