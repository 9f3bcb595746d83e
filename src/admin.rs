//! The operator port, separate from tenant traffic: `/livez`, `/readyz`, `/metrics`.
//!
//! Contract: `/livez` answers 200 while the process serves at all. `/readyz` is a latch: 503
//! until configuration, tenants, pricing (and the outbox, when durable) are loaded, 200 after,
//! and 503 again once shutdown begins so the sidecar's pod stops receiving traffic first.
//! `/metrics` is Prometheus text; names come from `telemetry::names`.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{web, HttpResponse};

use crate::ingest::AppState;
use crate::telemetry::names;
use crate::upstream::credentials::Credentials;
use crate::upstream::forwarder::ForwarderStats;

/// The readiness latch.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn set_draining(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct AdminState {
    pub app: Arc<AppState>,
    pub readiness: Arc<Readiness>,
    /// Whether Credyt accepts the platform key.
    pub credentials: Arc<Credentials>,
    /// The forwarder's figures, when it runs.
    pub forwarder: Option<Arc<ForwarderStats>>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/livez",
        web::get().to(|| async { HttpResponse::Ok().body("ok") }),
    )
    .route("/readyz", web::get().to(readyz))
    .route("/metrics", web::get().to(metrics));
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let poisoned = state
        .app
        .outbox
        .as_ref()
        .is_some_and(|o| o.stats().poisoned);
    if poisoned {
        // Writes are refused until a restart: take this replica out of rotation.
        HttpResponse::ServiceUnavailable().body("outbox stopped after a failed write")
    } else if state.credentials.is_refused() {
        // Nothing could reach Credyt: take this replica out until the key works.
        HttpResponse::ServiceUnavailable().body("credyt refused the platform key")
    } else if state.readiness.is_ready() {
        HttpResponse::Ok().body("ready")
    } else {
        HttpResponse::ServiceUnavailable().body("not ready")
    }
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let c = &state.app.counters;
    let mut out = String::with_capacity(1024);
    let mut counter = |name: &str, help: &str, labels: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (label, value) in labels {
            let _ = writeln!(out, "{name}{{outcome=\"{label}\"}} {value}");
        }
    };
    counter(
        names::EVENTS_TOTAL,
        "usage events by outcome",
        &[
            ("accepted", c.accepted.load(Ordering::Relaxed)),
            ("duplicate", c.duplicate.load(Ordering::Relaxed)),
            ("rejected", c.rejected.load(Ordering::Relaxed)),
        ],
    );
    let _ = writeln!(
        out,
        "# HELP {n} fees accepted for charging\n# TYPE {n} counter\n{n} {v}",
        n = names::FEES_TOTAL,
        v = c.fees.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP {n} cached end-user identities\n# TYPE {n} gauge\n{n} {v}",
        n = names::IDENTITY_CACHED,
        v = state.app.identity.cached_customers().await
    );
    let _ = writeln!(
        out,
        "# HELP {n} 1 while credyt refuses the platform key (delivery paused, not ready)\n# TYPE {n} gauge\n{n} {v}",
        n = names::UPSTREAM_KEY_REFUSED,
        v = u64::from(state.credentials.is_refused())
    );
    if let Some(f) = &state.forwarder {
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
        for (name, help, kind, value) in [
            (
                names::FORWARDER_CONCURRENCY_LIMIT,
                "calls to credyt the forwarder may have in flight now (adaptive)",
                "gauge",
                load(&f.limit),
            ),
            (
                names::FORWARDER_IN_FLIGHT,
                "calls to credyt in flight",
                "gauge",
                load(&f.in_flight),
            ),
            (
                names::FORWARDER_WAITING,
                "records waiting for their retry timer",
                "gauge",
                load(&f.waiting),
            ),
            (
                names::FORWARDER_BREAKER,
                "circuit breaker state: 0 closed, 1 open, 2 half-open",
                "gauge",
                load(&f.breaker),
            ),
            (
                names::FORWARDER_DELIVERED_TOTAL,
                "calls that delivered to credyt (a coalesced charge is one)",
                "counter",
                f.delivered.load(Ordering::Relaxed),
            ),
            (
                names::FORWARDER_RETRIES_TOTAL,
                "transient delivery failures, each retried",
                "counter",
                f.retries.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let n = names::FORWARDER_DEAD_LETTERED_TOTAL;
        let _ = writeln!(
            out,
            "# HELP {n} records dead-lettered, by reason\n# TYPE {n} counter"
        );
        for (code, value) in ["refused", "conflict", "retries_exhausted"]
            .iter()
            .zip(&f.dead)
        {
            let _ = writeln!(
                out,
                "{n}{{reason=\"{code}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
    if let Some(outbox) = &state.app.outbox {
        let oldest = outbox.oldest_accepted_at().map_or(0.0, |at| {
            (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
        });
        let _ = writeln!(
            out,
            "# HELP {n} age of the oldest undelivered record (how far behind credyt the proxy is), 0 when none\n# TYPE {n} gauge\n{n} {oldest:.3}",
            n = names::OUTBOX_OLDEST_AGE_SECONDS,
        );
        let stats = outbox.stats();
        for (name, help, kind, value) in [
            (
                names::OUTBOX_DEPTH,
                "undelivered debits in the outbox",
                "gauge",
                stats.depth as u64,
            ),
            (
                names::OUTBOX_DEAD_LETTERS,
                "dead letters awaiting an operator",
                "gauge",
                stats.dead_letters as u64,
            ),
            (
                names::OUTBOX_SYNCS_TOTAL,
                "outbox fdatasync calls",
                "counter",
                stats.syncs,
            ),
            (
                names::OUTBOX_GROUPS_TOTAL,
                "outbox commit groups",
                "counter",
                stats.groups,
            ),
            (
                names::OUTBOX_APPENDS_TOTAL,
                "outbox append calls",
                "counter",
                stats.appends,
            ),
            (
                names::OUTBOX_DEDUPE_FILTER_BYTES,
                "heap bytes of the outbox's dedupe filter",
                "gauge",
                stats.dedupe_filter_bytes as u64,
            ),
            (
                names::OUTBOX_LOG_SEGMENTS,
                "segments of the outbox's record log on disk",
                "gauge",
                stats.log_segments as u64,
            ),
            (
                names::OUTBOX_UNINDEXED_IDS,
                "accepted event ids not yet in the outbox's dedupe index",
                "gauge",
                stats.unindexed_ids as u64,
            ),
            (
                names::OUTBOX_POISONED,
                "1 when a failed write stopped the outbox",
                "gauge",
                u64::from(stats.poisoned),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out)
}
