//! Append throughput: single-event appends from 32 concurrent appenders, both sync policies,
//! and `always` once more without preallocated log segments (what that saves per sync).
//!
//! Run with `cargo bench --bench outbox`. Each iteration is one acknowledged append; the
//! figure to read is the throughput (elements/s) and the time per append.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The binary's allocator (see `src/main.rs`), so these figures match what it runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credyt_proxy::domain::{
    transaction_id, AccountId, CustomerId, Debit, Delivery, EventId, Fee, TenantId, UsageType,
};
use credyt_proxy::outbox::{AcceptedEvent, Outbox, OutboxSettings, SyncPolicy};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rust_decimal::Decimal;

const APPENDERS: u64 = 32;

fn event(n: u64) -> AcceptedEvent {
    let tenant = TenantId::from("bench");
    let event_id = EventId::new(format!("evt-{n}"));
    let delivery = Delivery::Charge(Debit {
        transaction_id: transaction_id(&tenant, &event_id, "tokens"),
        tenant: tenant.clone(),
        account: AccountId::from("acc_bench"),
        customer: CustomerId::from("cust_bench"),
        event_id: event_id.clone(),
        subject: Some("user-42".into()),
        description: None,
        fee: Fee {
            price_id: "tokens".into(),
            price_name: Some("Tokens".into()),
            usage_type: UsageType::Volume,
            dimensions: BTreeMap::from([("model".into(), "gpt-4o".into())]),
            volume_field: Some("tokens".into()),
            volume: Some(Decimal::new(1234, 0)),
            unit_price: None,
            volume_rate: Some(Decimal::new(25, 7)),
            package_size: None,
            amount: Decimal::new(3085, 6),
            asset: "USD".into(),
            book: "standard".into(),
            book_version: "2026-01-01".into(),
            pricing_hash: "0123456789abcdef".into(),
        },
        accepted_at: chrono::Utc::now(),
        trace: None,
    });
    AcceptedEvent {
        tenant,
        event_id,
        deliveries: vec![delivery],
        totals: Vec::new(),
    }
}

fn bench_policy(c: &mut Criterion, name: &str, sync: SyncPolicy, preallocate: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(OutboxSettings {
        sync,
        max_pending: usize::MAX,
        log_preallocate: preallocate,
        ..OutboxSettings::new(dir.path())
    })
    .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("outbox_append_32");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let outbox = outbox.clone();
            let counter = Arc::clone(&counter);
            rt.block_on(async move {
                let start = Instant::now();
                let tasks: Vec<_> = (0..APPENDERS)
                    .map(|a| {
                        let outbox = outbox.clone();
                        let counter = Arc::clone(&counter);
                        // Spread `iters` appends over the appenders.
                        let n = iters / APPENDERS + u64::from(a < iters % APPENDERS);
                        tokio::spawn(async move {
                            for _ in 0..n {
                                let id = counter.fetch_add(1, Ordering::Relaxed);
                                outbox.append(vec![event(id)]).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    let stats = outbox.stats();
    eprintln!(
        "{name}: appends={} groups={} syncs={} appends/group={:.1} last_sync={:?}",
        stats.appends,
        stats.groups,
        stats.syncs,
        stats.appends as f64 / stats.groups.max(1) as f64,
        stats.last_sync_latency
    );
    rt.block_on(outbox.close()).unwrap();
}

fn appends(c: &mut Criterion) {
    bench_policy(c, "always", SyncPolicy::Always, true);
    bench_policy(c, "always_not_preallocated", SyncPolicy::Always, false);
    // as the proxy runs them: segments preallocated with `always` only
    bench_policy(
        c,
        "interval_500ms",
        SyncPolicy::Interval(Duration::from_millis(500)),
        false,
    );
}

criterion_group!(benches, appends);
criterion_main!(benches);
