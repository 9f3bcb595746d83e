//! Telemetry: tracing initialisation and everything the proxy counts.
//!
//! Contract: [`init`] installs one global subscriber (pretty or JSON lines on stderr, filtered
//! by the configured directive; `RUST_LOG` wins when set). Every metric (name, type, help,
//! labels, buckets) is defined in [`metrics`] and nowhere else, and every label value comes
//! from a bounded set (route patterns, status classes, operations, outcome codes; tenant ids
//! from the tenants file only when configured, capped), never from tenant input. The operator
//! reference (every metric, the alerts and their runbooks) is `docs/operations.md`.

pub mod metrics;

use crate::config::{LogFormat, LogSettings};

/// Installs the global tracing subscriber. Safe to call more than once (later calls are no-ops),
/// which keeps in-process tests and the sandbox simple.
pub fn init(settings: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
