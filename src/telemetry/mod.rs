//! Telemetry: tracing initialisation, traces over OTLP, and everything the proxy counts.
//!
//! Contract: [`init`] installs one global subscriber (pretty or JSON lines on stderr, filtered
//! by the configured directive; `RUST_LOG` wins when set). Traces, when configured, run under
//! a dispatch of their application's own ([`traces`]) that logs the same way. Every metric
//! (name, type, help, labels, buckets) is defined in [`metrics`] and nowhere else, and every
//! label value comes from a bounded set (route patterns, status classes, operations, outcome
//! codes; tenant ids from the tenants file only when configured, capped), never from tenant
//! input. The operator reference (every metric, the alerts and their runbooks) is
//! `docs/operations.md`.

pub mod metrics;
pub mod traces;

use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::{LogFormat, LogSettings};

fn log_filter(settings: &LogSettings) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// The log output of [`init`] as a layer with its own filter (for a traced dispatch, whose
/// other layers see spans the log filter may not want).
pub(crate) fn log_layer<S>(settings: &LogSettings) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_filter(log_filter(settings))
            .boxed(),
        LogFormat::Pretty => layer.compact().with_filter(log_filter(settings)).boxed(),
    }
}

/// Installs the global tracing subscriber. Safe to call more than once (later calls are no-ops),
/// which keeps in-process tests and the sandbox simple.
pub fn init(settings: &LogSettings) {
    let filter = log_filter(settings);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
