//! Micro-benchmarks of the request path's pure parts and of one store commit batch.
//! `cargo bench --bench micro`.

use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kallina_relay::config::Secret;
use kallina_relay::ingress::parse_envelope;
use kallina_relay::signature::{sign, verify};
use kallina_relay::store::{unix_millis, OutboxRecord, Store, StoreOptions};

fn body() -> Vec<u8> {
    let mut body = String::from(
        r#"{"event":"call.ended","timestamp":"2025-01-23T10:30:00Z","data":{"call_id":"call_789","agent_id":"agent_456","duration":180,"outcome":"appointment_booked","actions":[{"type":"calendar_booking","status":"completed","data":{"date":"2025-01-25","time":"14:00"}}],"notes":""#,
    );
    while body.len() < 596 {
        body.push('x');
    }
    body.push_str("\"}}");
    body.into_bytes()
}

fn signature_and_envelope(c: &mut Criterion) {
    let body = body();
    let secrets = vec![Secret::new("whsec_bench")];
    let header = sign(b"whsec_bench", &body);
    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("verify_600B", |b| {
        b.iter(|| verify(&secrets, Some(header.as_bytes()), &body).unwrap())
    });
    group.bench_function("envelope_parse_600B", |b| {
        b.iter(|| parse_envelope(&body).unwrap().timestamp)
    });
    group.finish();
}

fn store_commit_batch(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreOptions {
        cache_size: 32 << 20,
        outbox_max: u64::MAX,
        ..StoreOptions::at(dir.path().join("data"))
    })
    .unwrap();
    let body = body();
    let mut counter = 0u64;
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    group.throughput(Throughput::Elements(64));
    // 64 writers at once, as 64 connections would: they share the writer's batches and fsyncs.
    group.bench_function("commit_64_concurrent_durable", |b| {
        b.iter_batched(
            || {
                (0..64)
                    .map(|_| {
                        counter += 1;
                        OutboxRecord {
                            key: format!("bench-{counter}"),
                            event: "call.ended".into(),
                            signature: "sha256=00".into(),
                            received_at_ms: unix_millis(SystemTime::now()),
                            source: "bench".into(),
                            body: body.clone(),
                            redelivered: false,
                            attempts_before: 0,
                            delivery_id: None,
                            trace: None,
                        }
                    })
                    .collect::<Vec<_>>()
            },
            |records| {
                runtime.block_on(async {
                    let tasks: Vec<_> = records
                        .into_iter()
                        .map(|r| {
                            tokio::spawn({
                                let store = store.clone();
                                async move { store.accept(r).await.unwrap() }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    store.close();
}

criterion_group!(benches, signature_and_envelope, store_commit_batch);
criterion_main!(benches);
