//! The Credyt API emulator: an in-memory, Credyt-compatible HTTP server for development,
//! tests and load tests (the proxy's stripe-mock).
//!
//! Contract:
//! - Speaks the subset of the Credyt / C4P API the proxy and the official SDK
//!   (`credyt-api==0.2.0`) use: accounts, customers, wallet (adjustments, charges,
//!   transactions), usage events, webhook destinations; see `routes`.
//! - Each configured API key is a platform with its own account; every account (platform or
//!   connected) is a separate data partition selected by `X-CREDYT-ACCOUNT`.
//! - Sends signed C4P `balance_threshold_hit` webhooks in the background (`webhooks`).
//! - Offers a control API under `/_emulator/` (`control`) and fault injection (`faults`).
//! - Shares no code with the proxy's Credyt client: its wire types live in `wire`.

mod control;
mod error;
mod faults;
mod ids;
mod routes;
mod seed;
mod state;
mod webhooks;
mod wire;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::BoxBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpServer};
use futures_util::future::LocalBoxFuture;
use parking_lot::Mutex;
use rust_decimal::Decimal;
use tokio::sync::watch;

pub use seed::{Seed, SeedAccount, SeedCustomer, SeedWebhook};

use faults::{Action, Faults, RequestLog, RequestRecord};
use state::Store;
use webhooks::Deliverer;

/// Emulator settings.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Accepted `X-CREDYT-API-KEY` values; each one is a separate platform.
    pub platform_keys: Vec<String>,
    /// Default `balance_threshold_hit` threshold (None: no threshold events unless set).
    pub default_threshold: Option<Decimal>,
    /// Delays before each webhook retry (default 1m, 5m, 30m, 2h).
    pub webhook_retry_schedule: Vec<Duration>,
    /// Per-attempt webhook timeout (default 10s).
    pub webhook_timeout: Duration,
    /// Size of the request log ring (default 10 000).
    pub request_log_capacity: usize,
    /// actix worker threads (default 1).
    pub workers: usize,
}

// Hand-written so the API keys never end up in logs.
impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field(
                "platform_keys",
                &format!("<{} redacted>", self.platform_keys.len()),
            )
            .field("default_threshold", &self.default_threshold)
            .field("webhook_retry_schedule", &self.webhook_retry_schedule)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("request_log_capacity", &self.request_log_capacity)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            platform_keys: Vec::new(),
            default_threshold: None,
            webhook_retry_schedule: vec![
                Duration::from_secs(60),
                Duration::from_secs(5 * 60),
                Duration::from_secs(30 * 60),
                Duration::from_secs(2 * 60 * 60),
            ],
            webhook_timeout: Duration::from_secs(10),
            request_log_capacity: 10_000,
            workers: 1,
        }
    }
}

/// State shared by all workers.
pub(crate) struct Shared {
    store: Store,
    first_key: String,
    configured_threshold: Option<Decimal>,
    seeds: Mutex<Vec<Seed>>,
    faults: Faults,
    requests: RequestLog,
    deliverer: Arc<Deliverer>,
}

impl Shared {
    fn apply_seed(&self, seed: &Seed) -> anyhow::Result<()> {
        seed.apply(&self.store, &self.first_key)?;
        self.seeds.lock().push(seed.clone());
        Ok(())
    }

    /// Forgets everything, then re-applies the seeds applied so far.
    fn reset(&self) -> anyhow::Result<()> {
        self.store.reset(self.configured_threshold);
        self.faults.replace(faults::FaultSet::default());
        self.requests.clear();
        self.deliverer.reset();
        let seeds = self.seeds.lock().clone();
        for seed in &seeds {
            seed.apply(&self.store, &self.first_key)?;
        }
        Ok(())
    }
}

/// A started emulator.
pub struct RunningEmulator {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown: watch::Sender<bool>,
}

impl RunningEmulator {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Loads a seed into the running emulator (kept and re-applied by `POST /_emulator/reset`).
    pub fn apply_seed(&self, seed: &Seed) -> anyhow::Result<()> {
        self.shared.apply_seed(seed)
    }

    /// Stops accepting, finishes in-flight requests, abandons pending webhook retries.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.handle.stop(true).await;
        if let Err(error) = self.server.await {
            tracing::warn!(%error, "emulator server task failed");
        }
    }
}

/// Starts the emulator on `listener`; must be called inside a tokio (or actix) runtime, which
/// also runs the webhook deliveries.
pub async fn start(
    config: EmulatorConfig,
    listener: TcpListener,
) -> anyhow::Result<RunningEmulator> {
    let Some(first_key) = config.platform_keys.first().cloned() else {
        anyhow::bail!("the emulator needs at least one platform key");
    };
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let deliverer = Arc::new(Deliverer::new(
        config.webhook_retry_schedule.clone(),
        config.webhook_timeout,
        tokio::runtime::Handle::current(),
        shutdown_rx,
    )?);
    let shared = Arc::new(Shared {
        store: Store::new(&config.platform_keys, config.default_threshold),
        first_key,
        configured_threshold: config.default_threshold,
        seeds: Mutex::new(Vec::new()),
        faults: Faults::default(),
        requests: RequestLog::new(config.request_log_capacity),
        deliverer,
    });
    let app_shared = shared.clone();
    let server = HttpServer::new(move || {
        let data = web::Data::from(app_shared.clone());
        let mw_shared = app_shared.clone();
        App::new()
            .app_data(data)
            .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
            .wrap_fn(move |req, srv| middleware(mw_shared.clone(), req, srv))
            .configure(control::configure)
            .configure(routes::configure)
            .default_service(web::to(routes::not_found))
    })
    .on_connect(faults::capture_socket)
    .workers(config.workers.max(1))
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    let server = tokio::spawn(server);
    tracing::info!(%addr, workers = config.workers, "credyt emulator listening");
    Ok(RunningEmulator {
        addr,
        shared,
        handle,
        server,
        shutdown,
    })
}

/// Applies faults and logs the request (control API excluded from both).
fn middleware<S>(
    shared: Arc<Shared>,
    req: ServiceRequest,
    srv: &S,
) -> LocalBoxFuture<'static, Result<ServiceResponse<BoxBody>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
    S::Future: 'static,
{
    let path = req.path().to_owned();
    if path.starts_with("/_emulator/") || path == "/_emulator" {
        let fut = srv.call(req);
        return Box::pin(fut);
    }
    let pattern = faults::route_pattern(&path);
    let method = req.method().as_str().to_owned();
    let query = req.query_string().to_owned();
    let account = req
        .headers()
        .get("x-credyt-account")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (latency, action) = shared.faults.decide(&method, &path);
    let record = move |status: u16, pattern: Option<&str>| RequestRecord {
        kind: faults::request_kind(&method, pattern, &query),
        method,
        path,
        query: (!query.is_empty()).then_some(query.clone()),
        account,
        status,
        time: chrono::Utc::now(),
        traceparent,
    };
    match action {
        Action::Pass => {
            let fut = srv.call(req);
            Box::pin(async move {
                // An async sleep: a slow request (a `slow_rate` tail of seconds) holds its own
                // connection only; the worker goes on answering every other request.
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let res = fut.await?;
                let status = res.status().as_u16();
                shared.requests.push(record(status, pattern));
                Ok(res)
            })
        }
        Action::Status {
            status,
            retry_after,
        } => Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = if code == StatusCode::UNAUTHORIZED {
                // As Credyt refuses a key (and as `ApiError::Unauthorized` answers): no body.
                actix_web::HttpResponse::Unauthorized().finish()
            } else {
                error::problem_response(
                    code,
                    Some("Injected by the emulator's fault rules.".to_owned()),
                    None,
                )
            };
            if let Some(retry_after) = retry_after {
                let value = retry_after.header_value(std::time::SystemTime::now());
                if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&value) {
                    response
                        .headers_mut()
                        .insert(actix_web::http::header::RETRY_AFTER, value);
                }
            }
            shared.requests.push(record(status, None));
            Ok(req.into_response(response))
        }),
        Action::Drop => Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            shared.requests.push(record(0, None));
            #[cfg(unix)]
            {
                match req.conn_data::<faults::ConnKiller>() {
                    Some(killer) if killer.kill() => {}
                    _ => tracing::warn!("drop fault: connection socket unavailable"),
                }
            }
            // The socket is shut down: whatever is written now never reaches the client.
            let response = actix_web::HttpResponse::InternalServerError().finish();
            Ok(req.into_response(response))
        }),
    }
}
