//! Filling a store directly (for the 1M-event memory scenario) and measuring disk use.

use super::*;

pub(crate) fn store_options(dir: &Path) -> StoreOptions {
    StoreOptions {
        cache_size: 32 << 20,
        outbox_max: u64::MAX,
        ..StoreOptions::at(dir)
    }
}

/// Writes `count` events straight into a store (as 256 concurrent writers would).
pub(crate) async fn prefill(dir: &Path, count: u64) -> Result<u64> {
    let store = Store::open(&store_options(dir))?;
    let body = body("prefill");
    let signature = sign(SECRET.as_bytes(), &body);
    let started = Instant::now();
    let writers = 256;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, body, signature) = (store.clone(), body.clone(), signature.clone());
            tokio::spawn(async move {
                for i in (w..count).step_by(writers as usize) {
                    let record = OutboxRecord {
                        key: format!("prefill-{i}"),
                        event: "call.ended".into(),
                        signature: signature.clone(),
                        received_at_ms: unix_millis(SystemTime::now()),
                        source: "bench".into(),
                        body: body.clone(),
                        redelivered: false,
                        attempts_before: 0,
                        delivery_id: None,
                        trace: None,
                    };
                    store.accept(record).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    println!("  prefill: {count} durable events straight into the store at {rate:.0}/s");
    store.close();
    Ok(count)
}

pub(crate) fn du(dir: &Path) -> u64 {
    pub(crate) fn walk(p: &PathBuf) -> u64 {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p).map_or(0, |it| {
                it.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum()
            }),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        }
    }
    walk(&dir.to_path_buf())
}
