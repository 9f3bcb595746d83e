//! Traces: OpenTelemetry spans of the request path and of the deliveries to Credyt, exported
//! over OTLP/HTTP (protobuf). `tracing` stays the one instrumentation API; spans become
//! OpenTelemetry spans through `tracing-opentelemetry`.
//!
//! # Contract
//!
//! - **Off unless configured.** Without an endpoint ([`crate::config::traces`]) there is no
//!   [`Traces`]: no exporter, no span processor, no thread, nothing buffered, and the code
//!   below creates no span ([`active`] is false, so every span is `Span::none()`).
//! - **Per application.** [`Traces::start`] builds a provider and a [`Dispatch`] of its own
//!   (the log layer plus the OpenTelemetry layer) that the application runs its request
//!   handlers and its forwarder under; the process-wide subscriber is left alone, so several
//!   applications in one process (tests, the sandbox) each export to their own endpoint.
//! - **Never blocks the request path.** A finished span is handed to a bounded queue with
//!   `try_send`; when the queue is full the span is dropped and counted
//!   ([`TraceStats::dropped`], and [`spans_dropped_total`] over the process). One thread per
//!   provider batches the queue (up to the batch size, or after the schedule delay) and exports.
//! - **Spans** (names and attributes are bounded and never secret: no keys, no bodies, no end
//!   user or event ids):
//!   - a *server* span per tenant request (`POST /events`, `POST /v1/events`,
//!     `POST /v1/quote`) that continues the caller's trace (W3C `traceparent` / `tracestate`);
//!   - its children: `outbox commit` (waiting for the durable append) or `upstream delivery`
//!     (`ack = "upstream"`), and a *client* span per call to Credyt (identity lookups on a
//!     cache miss, the charges of `ack = "upstream"`);
//!   - a *client* span per call of the forwarder to Credyt, a root span that **links** to the
//!     server span of every tenant request whose records it carries (the link travels in the
//!     outbox record, see [`crate::domain::TraceContext`]); such a span is sampled whenever a
//!     request it links to was. Every call to Credyt carries its client span's `traceparent`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SamplingDecision, SamplingResult, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags,
    TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, ShouldSample, Span as SdkSpan, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing::{Dispatch, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::traces::{SamplerSetting, TraceSettings};
use crate::config::LogSettings;
use crate::domain::TraceContext;

/// Spans dropped because an export queue was full, over every provider of the process (the
/// hook for `/metrics`).
static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans dropped because an export queue was full since the process started.
pub fn spans_dropped_total() -> u64 {
    SPANS_DROPPED.load(Ordering::Relaxed)
}

/// Why traces could not be started (at startup).
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("the otlp http client could not be built: {0}")]
    Client(#[from] reqwest::Error),
    #[error("the otlp exporter could not be built: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("the span export thread could not be started: {0}")]
    Thread(#[from] std::io::Error),
}

/// What the span processor of one provider did.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans handed to the queue.
    pub queued: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans the receiver accepted.
    pub exported: AtomicU64,
    /// Batches that could not be exported (the receiver was unreachable or refused them).
    pub failed_batches: AtomicU64,
}

/// The marker layer of a dispatch that exports traces (see [`active`]).
struct TracesOn;

impl<S: tracing::Subscriber> Layer<S> for TracesOn {}

/// Whether the code running now is traced: its dispatch is an application's [`Traces`]
/// dispatch. A thread-local read and a few type comparisons; false when traces are off.
pub fn active() -> bool {
    tracing::dispatcher::get_default(|d| d.is::<TracesOn>())
}

/// The current dispatch when it is a traced one (to carry it into a future polled elsewhere).
pub fn current_dispatch() -> Option<Dispatch> {
    tracing::dispatcher::get_default(|d| d.is::<TracesOn>().then(|| d.clone()))
}

/// A running trace pipeline of one application: its provider, and the dispatch its request
/// handlers and forwarder run under.
pub struct Traces {
    provider: SdkTracerProvider,
    dispatch: Dispatch,
    stats: Arc<TraceStats>,
}

impl Traces {
    /// Builds the exporter, the span processor (and its thread) and the dispatch: the log
    /// layer as [`super::init`] builds it, plus the OpenTelemetry layer for this crate's spans.
    pub fn start(settings: &TraceSettings, log: &LogSettings) -> Result<Traces, TracesError> {
        let mut attributes: Vec<KeyValue> = settings
            .resource_attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        if !settings
            .resource_attributes
            .iter()
            .any(|(k, _)| k == "service.version")
        {
            attributes.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        }
        let resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(attributes)
            .with_service_name(settings.service_name.clone())
            .build();
        let http = reqwest::Client::builder()
            .timeout(settings.export_timeout)
            .pool_max_idle_per_host(1)
            .user_agent(concat!("credyt-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http)
            .with_endpoint(settings.endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(settings.export_timeout)
            .build()?;
        exporter.set_resource(&resource);
        let stats = Arc::new(TraceStats::default());
        let processor = QueueProcessor::start(exporter, settings, Arc::clone(&stats))?;
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(LinkSampler(sampler(settings.sampler)))
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("credyt-proxy");
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            // Nothing here reads the OpenTelemetry context of the thread; not attaching it at
            // every poll of every span saves work on the request path.
            .with_context_activation(false)
            .with_filter(Targets::new().with_target("credyt_proxy", tracing::Level::INFO));
        let subscriber = Registry::default()
            .with(super::log_layer(log))
            .with(otel)
            .with(TracesOn);
        tracing::info!(
            endpoint = %without_userinfo(&settings.endpoint),
            service_name = %settings.service_name,
            sampler = ?settings.sampler,
            "exporting traces over otlp"
        );
        Ok(Traces {
            provider,
            dispatch: Dispatch::new(subscriber),
            stats,
        })
    }

    /// The dispatch to run traced work under.
    pub fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    pub fn stats(&self) -> &Arc<TraceStats> {
        &self.stats
    }

    /// Exports what is queued (blocking, up to the export timeout).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }

    /// Exports what is queued and stops the export thread. Blocking: call it off the runtime.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "stopping the trace exporter failed");
        }
        let s = &self.stats;
        tracing::info!(
            exported = s.exported.load(Ordering::Relaxed),
            dropped = s.dropped.load(Ordering::Relaxed),
            failed_batches = s.failed_batches.load(Ordering::Relaxed),
            "trace exporter stopped"
        );
    }
}

/// The endpoint for a log line: a user or password in the URL is a credential.
fn without_userinfo(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "(unparsable)".into(),
    }
}

fn sampler(setting: SamplerSetting) -> Sampler {
    match setting {
        SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
        SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
        SamplerSetting::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
        SamplerSetting::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        SamplerSetting::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        SamplerSetting::ParentBasedTraceIdRatio(r) => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
        }
    }
}

/// The configured sampler, except that a root span linked to a sampled span is sampled: a
/// delivery to Credyt is traced whenever a tenant request it carries was (else at 1% sampling
/// a traced request's delivery would be traced 1% of the time).
#[derive(Debug, Clone)]
struct LinkSampler(Sampler);

impl ShouldSample for LinkSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let root = parent_context.is_none_or(|cx| !cx.has_active_span());
        if root && links.iter().any(|l| l.span_context.is_sampled()) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

enum Msg {
    Span(Box<SpanData>),
    Flush(mpsc::Sender<()>),
    Shutdown(mpsc::Sender<()>),
}

/// A batch span processor whose `on_end` never waits: a bounded queue (full: the span is
/// dropped and counted) drained by one thread that exports batches on a runtime of its own.
#[derive(Debug)]
struct QueueProcessor {
    tx: SyncSender<Msg>,
    stats: Arc<TraceStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Span(_) => "span",
            Msg::Flush(_) => "flush",
            Msg::Shutdown(_) => "shutdown",
        })
    }
}

impl QueueProcessor {
    fn start(
        exporter: opentelemetry_otlp::SpanExporter,
        settings: &TraceSettings,
        stats: Arc<TraceStats>,
    ) -> Result<QueueProcessor, std::io::Error> {
        let (tx, rx) = mpsc::sync_channel(settings.max_queue_size);
        let worker = Worker {
            exporter,
            batch: Vec::with_capacity(settings.max_export_batch_size),
            max_batch: settings.max_export_batch_size,
            delay: settings.schedule_delay,
            timeout: settings.export_timeout,
            stats: Arc::clone(&stats),
            last_warning: None,
        };
        let thread = std::thread::Builder::new()
            .name("otel-export".into())
            .spawn(move || worker.run(rx))?;
        Ok(QueueProcessor {
            tx,
            stats,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends a control message and waits for its answer, at most `timeout`.
    fn control(&self, make: fn(mpsc::Sender<()>) -> Msg, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = mpsc::channel();
        self.tx
            .send(make(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        wait.recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut SdkSpan, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                SPANS_DROPPED.fetch_add(1, Ordering::Relaxed);
                super::metrics::otel_spans_dropped().inc();
            }
            // Shut down: spans that end afterwards are not exported.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Msg::Flush, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.control(Msg::Shutdown, timeout);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let (Ok(()), Some(thread)) = (&result, thread) {
            let _ = thread.join();
        }
        result
    }
}

/// The export thread's state.
struct Worker {
    exporter: opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    max_batch: usize,
    delay: Duration,
    timeout: Duration,
    stats: Arc<TraceStats>,
    last_warning: Option<Instant>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        // The HTTP client is async; this thread drives it on a runtime of its own, away from
        // the application's workers.
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the trace export runtime; traces are not exported");
                return;
            }
        };
        let mut deadline = Instant::now() + self.delay;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Span(span)) => {
                    self.batch.push(*span);
                    if self.batch.len() >= self.max_batch {
                        self.export(&runtime);
                        deadline = Instant::now() + self.delay;
                    }
                }
                Ok(Msg::Flush(done)) => {
                    let stop = self.drain(&rx, &runtime);
                    let _ = done.send(());
                    if let Some(done) = stop {
                        self.stop(done);
                        return;
                    }
                }
                Ok(Msg::Shutdown(done)) => {
                    self.drain(&rx, &runtime);
                    self.stop(done);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.export(&runtime);
                    deadline = Instant::now() + self.delay;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.export(&runtime);
                    return;
                }
            }
        }
    }

    /// Exports everything queued now; a shutdown met on the way is returned.
    fn drain(
        &mut self,
        rx: &mpsc::Receiver<Msg>,
        runtime: &tokio::runtime::Runtime,
    ) -> Option<mpsc::Sender<()>> {
        let mut stop = None;
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Span(span) => {
                    self.batch.push(*span);
                    if self.batch.len() >= self.max_batch {
                        self.export(runtime);
                    }
                }
                Msg::Flush(done) => {
                    let _ = done.send(());
                }
                Msg::Shutdown(done) => stop = Some(done),
            }
        }
        self.export(runtime);
        stop
    }

    fn stop(&mut self, done: mpsc::Sender<()>) {
        let _ = self.exporter.shutdown();
        let _ = done.send(());
    }

    fn export(&mut self, runtime: &tokio::runtime::Runtime) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(self.max_batch));
        let n = batch.len() as u64;
        let (timeout, exporter) = (self.timeout, &self.exporter);
        // The timer is made inside the runtime (it needs its time driver).
        let result =
            runtime.block_on(async { tokio::time::timeout(timeout, exporter.export(batch)).await });
        match result {
            Ok(Ok(())) => {
                self.stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            failed => {
                self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", self.timeout),
                };
                // A receiver that is down would otherwise log at every batch.
                let now = Instant::now();
                if self
                    .last_warning
                    .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
                {
                    self.last_warning = Some(now);
                    tracing::warn!(spans = n, error = %error, "cannot export traces; dropping the batch");
                } else {
                    tracing::debug!(spans = n, error = %error, "cannot export traces; dropping the batch");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Spans of the proxy. Each helper returns `Span::none()` (and costs a check) when traces are off.

/// Span attribute names (OpenTelemetry semantic conventions where one exists).
pub mod attr {
    pub const TENANT: &str = "credyt_proxy.tenant";
    pub const EVENTS: &str = "credyt_proxy.events";
    pub const ACCEPTED: &str = "credyt_proxy.accepted";
    pub const DUPLICATES: &str = "credyt_proxy.duplicates";
    pub const REJECTED: &str = "credyt_proxy.rejected";
    pub const RECORDS: &str = "credyt_proxy.records";
    pub const OPERATION: &str = "credyt_proxy.upstream.operation";
    pub const STATUS: &str = "http.response.status_code";
    pub const ERROR_TYPE: &str = "error.type";
}

struct HeaderExtractor<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The server span (`POST <route>`) of a tenant request to `route`, a child of the caller's
/// span when the request carries a valid `traceparent`. Created under `dispatch`; none without
/// one.
pub fn server_span(
    dispatch: Option<&Dispatch>,
    name: &'static str,
    route: &'static str,
    headers: &actix_web::http::header::HeaderMap,
) -> Span {
    let Some(dispatch) = dispatch else {
        return Span::none();
    };
    let span = tracing::dispatcher::with_default(dispatch, || {
        tracing::info_span!(
            "tenant request",
            otel.name = name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            credyt_proxy.tenant = tracing::field::Empty,
            credyt_proxy.events = tracing::field::Empty,
            credyt_proxy.accepted = tracing::field::Empty,
            credyt_proxy.duplicates = tracing::field::Empty,
            credyt_proxy.rejected = tracing::field::Empty,
        )
    });
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

/// Records a tenant request's answer on its server span: the status, and for a 5xx the error
/// status (a 4xx is the client's error, not the server's).
pub fn record_response(span: &Span, status: u16, error_code: Option<&'static str>) {
    if span.is_disabled() {
        return;
    }
    span.record(attr::STATUS, status);
    if let Some(code) = error_code {
        span.record(attr::ERROR_TYPE, code);
    }
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
}

/// Records `value` as `field` on the current span, when traced.
pub fn record_current(field: &'static str, value: impl tracing::Value) {
    if active() {
        Span::current().record(field, value);
    }
}

/// The context of the current span, when traced and sampled: what an accepted record keeps to
/// link its delivery back to this request.
pub fn current_context() -> Option<TraceContext> {
    if !active() {
        return None;
    }
    let cx = Span::current().context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| TraceContext {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

/// A child span of the current one for a stage of the request path (`outbox commit`,
/// `upstream delivery`), with the number of events and records it handles.
pub fn stage_span(name: &'static str, events: usize, records: usize) -> Span {
    if !active() {
        return Span::none();
    }
    tracing::info_span!(
        "stage",
        otel.name = name,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        credyt_proxy.events = events,
        credyt_proxy.records = records,
    )
}

/// Marks a stage span failed with a bounded error code.
pub fn record_error(span: &Span, code: &'static str) {
    if span.is_disabled() {
        return;
    }
    span.record(attr::ERROR_TYPE, code);
    span.record("otel.status_code", "error");
}

/// One call to Credyt: its span name (`METHOD url-template`), method and operation.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub name: &'static str,
    pub method: &'static str,
    pub operation: &'static str,
}

/// The client span of one call to Credyt carrying `records` records of `tenant` (if known),
/// linked to every tenant request in `links`. Links are added before the span starts, so the
/// sampler sees them.
pub fn client_span<'a>(
    call: Call,
    tenant: Option<&str>,
    records: usize,
    links: impl Iterator<Item = &'a TraceContext>,
) -> Span {
    if !active() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "credyt call",
        otel.name = call.name,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = call.method,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        credyt_proxy.upstream.operation = call.operation,
        credyt_proxy.records = records,
        credyt_proxy.tenant = tenant,
    );
    for cx in links {
        span.add_link(SpanContext::new(
            TraceId::from_bytes(cx.trace_id),
            SpanId::from_bytes(cx.span_id),
            TraceFlags::new(cx.flags),
            true,
            TraceState::default(),
        ));
    }
    span
}

/// Adds the current span's `traceparent` (and `tracestate`) to an outgoing request, when
/// traced.
pub fn inject(headers: &mut reqwest::header::HeaderMap) {
    if !active() {
        return;
    }
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoint: &str) -> TraceSettings {
        TraceSettings {
            endpoint: endpoint.into(),
            service_name: "test".into(),
            resource_attributes: Vec::new(),
            sampler: SamplerSetting::AlwaysOn,
            max_queue_size: 2,
            max_export_batch_size: 2,
            schedule_delay: Duration::from_secs(3600),
            export_timeout: Duration::from_millis(200),
        }
    }

    fn log() -> LogSettings {
        LogSettings {
            format: crate::config::LogFormat::Pretty,
            filter: "off".into(),
        }
    }

    #[test]
    fn the_logged_endpoint_has_no_credentials() {
        assert_eq!(
            without_userinfo("https://user:secret@otel.example:4318/v1/traces"),
            "https://otel.example:4318/v1/traces"
        );
    }

    #[test]
    fn outside_a_traced_dispatch_nothing_is_traced() {
        assert!(!active());
        assert!(current_dispatch().is_none());
        assert!(current_context().is_none());
        assert!(stage_span("outbox commit", 1, 1).is_disabled());
        let call = Call {
            name: "GET /x",
            method: "GET",
            operation: "x",
        };
        assert!(client_span(call, None, 0, std::iter::empty()).is_disabled());
        let mut headers = reqwest::header::HeaderMap::new();
        inject(&mut headers);
        assert!(headers.is_empty());
        assert!(server_span(None, "POST /events", "/events", &Default::default()).is_disabled());
    }

    /// A full queue drops (and counts) instead of waiting; the export thread is stuck on an
    /// endpoint that never answers meanwhile, so the request path would have waited.
    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A listener that accepts and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let traces = Traces::start(&settings(&url), &log()).unwrap();
        let before = spans_dropped_total();
        let started = Instant::now();
        tracing::dispatcher::with_default(traces.dispatch(), || {
            assert!(active());
            for _ in 0..50 {
                let span = stage_span("outbox commit", 1, 1);
                assert!(!span.is_disabled());
                drop(span.entered());
            }
        });
        assert!(started.elapsed() < Duration::from_secs(1));
        let stats = Arc::clone(traces.stats());
        // 50 spans, a queue of 2 and batches of 2 (one batch may be out at the receiver).
        let dropped = stats.dropped.load(Ordering::Relaxed);
        assert!(dropped >= 44, "dropped {dropped}");
        assert!(spans_dropped_total() >= before + dropped);
        drop(listener);
        traces.shutdown();
    }
}
