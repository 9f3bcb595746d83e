//! Building and running the proxy: shared state, the tenant server and the admin server.
//!
//! Contract: [`Application::build`] loads tenants and pricing, binds both ports (port 0 is
//! fine: the real addresses are in [`Application::tenant_addr`] / [`Application::admin_addr`])
//! and starts serving; readiness is released only after everything is loaded. [`Application::
//! run_until_stopped`] waits for a signal (or a caller's stop) and drains.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_http::error::DispatchError;
use actix_http::{HttpService, KeepAlive};
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::{AppConfig, ServerHandle};
use actix_web::{web, App, HttpServer};
use anyhow::Context;

use crate::admin::{AdminState, Readiness};
use crate::balance::Gate;
use crate::config::{AckMode, Settings, SyncMode};
use crate::identity::{Identity, Tenants};
use crate::ingest::conn::ProblemIo;
use crate::ingest::sink::Sink;
use crate::ingest::{self, AppState};
use crate::outbox::{Outbox, OutboxSettings, SyncPolicy};
use crate::pricing::Pricing;
use crate::ratelimit::TenantQuota;
use crate::telemetry::metrics::{LiveState, Metrics};
use crate::telemetry::traces::Traces;
use crate::upstream::credentials::{Credentials, KeyStatus};
use crate::upstream::forward::Forwarder;
use crate::upstream::forwarder::{ForwarderHandle, ForwarderSettings};
use crate::upstream::CredytClient;
use crate::webhooks::deliver::DelivererHandle;
use crate::webhooks::Relay;

/// A running proxy.
pub struct Application {
    tenant_addr: SocketAddr,
    admin_addr: SocketAddr,
    tenant_server: ServerHandle,
    admin_server: ServerHandle,
    readiness: Arc<Readiness>,
    state: Arc<AppState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shutdown: crate::config::ShutdownSettings,
    outbox: Option<Outbox>,
    forwarder: Option<ForwarderHandle>,
    relay: Option<RelayParts>,
    traces: Option<Traces>,
}

/// The webhook relay, when configured: its listener, deliverer and outbox.
struct RelayParts {
    addr: SocketAddr,
    server: ServerHandle,
    deliverer: DelivererHandle,
    outbox: Outbox,
}

/// The tenant port's server. Built from actix-server and actix-http rather than `HttpServer`
/// (with the same settings) to wrap each connection in [`ProblemIo`], which answers what the
/// HTTP/1 codec refuses by itself with problem+json ([`ingest::conn`]).
fn tenant_server(
    settings: &Settings,
    state: Arc<AppState>,
    gateway: web::Data<crate::gateway::Gateway>,
    listener: TcpListener,
    trace_requests: ingest::TraceRequests,
) -> anyhow::Result<actix_server::Server> {
    let addr = listener.local_addr()?;
    let data = web::Data::from(state);
    let builder = actix_server::Server::build()
        .workers(settings.server.workers)
        .backlog(4096)
        .shutdown_timeout(settings.shutdown.grace.as_secs().max(1))
        .disable_signals();
    // Idle keep-alive connections close as soon as a graceful stop starts (as HttpServer does).
    let shutdown = builder.graceful_shutdown_signal();
    let server = builder
        .listen("credyt-proxy-tenant", listener, move || {
            let app = App::new()
                .app_data(data.clone())
                .app_data(gateway.clone())
                .wrap(actix_web::middleware::from_fn(ingest::conn::header_limits))
                // Outermost: the server span covers every answer, refusals included.
                .wrap(trace_requests.clone())
                .configure(ingest::routes)
                // Everything else: the Credyt gateway, or 404/405.
                .default_service(web::to(crate::gateway::handle))
                .into_factory()
                .map_err(|e| e.error_response());
            let shutdown = shutdown.clone();
            let http = HttpService::build()
                .keep_alive(KeepAlive::default())
                .client_request_timeout(std::time::Duration::from_secs(5))
                .client_disconnect_timeout(std::time::Duration::from_secs(1))
                .local_addr(addr)
                .graceful_shutdown_signal(move || {
                    let shutdown = shutdown.clone();
                    async move { shutdown.notified().await }
                })
                // Host and address of the config serve URL generation, which no route uses.
                .h1(map_config(app, |_| AppConfig::default()));
            fn_service(|io: tokio::net::TcpStream| async move {
                let peer = io.peer_addr().ok();
                Ok::<_, DispatchError>((ProblemIo::new(io), peer))
            })
            .and_then(http)
        })?
        .run();
    Ok(server)
}

/// The sync policy of `outbox.sync` (the relay's outbox follows it too).
fn sync_policy(settings: &Settings) -> SyncPolicy {
    match settings.outbox.sync {
        SyncMode::Always => SyncPolicy::Always,
        SyncMode::Interval => SyncPolicy::Interval(settings.outbox.sync_interval),
    }
}

/// Starts the webhook relay: opens (and recovers) its outbox, starts its deliverer and binds
/// its listener.
async fn start_relay(
    settings: &Settings,
    tenants: &Arc<Tenants>,
    identity: &Arc<Identity>,
    gate: &Arc<Gate>,
    metrics: &Metrics,
) -> anyhow::Result<Option<RelayParts>> {
    let Some(w) = settings.webhooks.clone() else {
        return Ok(None);
    };
    let outbox_settings = OutboxSettings {
        sync: sync_policy(settings),
        max_pending: w.max_pending,
        dedupe_window: w.dedupe_window,
        log_preallocate: settings.outbox.sync == SyncMode::Always,
        // Webhooks are few: small segments.
        log_segment_bytes: 4 * 1024 * 1024,
        ..OutboxSettings::new(w.dir.clone())
    };
    let dir = w.dir.clone();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(outbox_settings))
        .await
        .context("opening the webhook outbox")?
        .with_context(|| format!("opening the webhook outbox in {}", dir.display()))?;
    let deliverer = DelivererHandle::spawn(
        outbox.clone(),
        Arc::clone(tenants),
        Arc::clone(identity),
        w.clone(),
        metrics.webhooks.clone(),
    )
    .context("starting the webhook deliverer")?;
    let listener = TcpListener::bind(w.listen).with_context(|| format!("binding {}", w.listen))?;
    let addr = listener.local_addr()?;
    let path = w.path.clone();
    let relay = web::Data::new(
        Relay::new(
            w,
            Arc::clone(tenants),
            Arc::clone(identity),
            outbox.clone(),
            metrics.webhooks.clone(),
        )
        .with_gate(Arc::clone(gate)),
    );
    let server = HttpServer::new(move || {
        App::new()
            .app_data(relay.clone())
            .configure(crate::webhooks::routes(&path))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(Some(RelayParts {
        addr,
        server: handle,
        deliverer,
        outbox,
    }))
}

/// Balance gating holds what gated tenants' end users owe already: every debit of theirs still
/// pending in the outbox (accepted before a restart, not yet confirmed by Credyt).
fn hold_pending_debits(outbox: &Outbox, tenants: &Tenants, gate: &Gate) {
    let table = tenants.current();
    if table.iter().all(|t| t.gate.is_none()) {
        return;
    }
    let mut held = 0usize;
    for delivery in outbox.pending_deliveries() {
        if let crate::domain::Delivery::Charge(debit) = delivery {
            if table
                .get(debit.tenant.as_str())
                .is_some_and(|t| t.gate.is_some())
            {
                gate.track(&debit);
                held += 1;
            }
        }
    }
    tracing::info!(
        held,
        "balance gating holds the pending debits of gated tenants"
    );
}

/// Opens (and recovers) the outbox before anything is accepted.
async fn open_outbox(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Outbox> {
    let s = &settings.outbox;
    let outbox_settings = OutboxSettings {
        dir: s.dir.clone(),
        sync: sync_policy(settings),
        max_pending: s.max_pending,
        dedupe_window: settings.ingest.dedupe_window,
        max_group: s.max_group,
        // Zero-filled segments pay off only where an answer waits for a sync; with `interval`
        // they would only write every byte twice (a 100-event burst: 2.8% of the core).
        log_preallocate: s.sync == SyncMode::Always,
        metrics: Some(metrics.outbox.clone()),
        ..OutboxSettings::new(s.dir.clone())
    };
    let dir = s.dir.clone();
    tokio::task::spawn_blocking(move || Outbox::open(outbox_settings))
        .await
        .context("opening the outbox")?
        .with_context(|| format!("opening the outbox in {}", dir.display()))
}

impl Application {
    /// Loads everything, binds both ports and starts serving.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let settings = Arc::new(settings);
        // Traces first: the forwarder and the tenant server below run under their dispatch.
        let traces = match &settings.telemetry.traces {
            Some(t) => Some(Traces::start(t, &settings.log).context("starting traces")?),
            None => None,
        };
        let dispatch = traces.as_ref().map(|t| t.dispatch().clone());
        let quota = TenantQuota {
            per_second: settings.rate_limit.per_second,
            burst: settings.rate_limit.burst,
        };
        let tenants = Arc::new(
            Tenants::load(&settings.tenants.file, quota)
                .map_err(|p| anyhow::anyhow!("tenants file rejected:\n  {}", p.join("\n  ")))?,
        );
        let pricing = Arc::new(
            Pricing::load(&settings.pricing.dir)
                .map_err(|e| anyhow::anyhow!("pricing rejected:\n{e}"))?,
        );
        // Running totals of period tiers are kept in the outbox only: refused without one
        // (a reload that brings them in later has their events rejected, `period_needs_outbox`).
        if settings.ingest.ack == AckMode::Upstream && pricing.current().has_period_tiers() {
            anyhow::bail!(
                "pricing rejected: a price uses `tiering` (tiers over a period), whose running totals are kept in the outbox; ack = \"upstream\" has none: use ack = \"durable\" or remove `tiering`"
            );
        }
        // The idle pool keeps a connection for every slot the forwarder may use: reopening
        // connections at high concurrency cost a third of the forwarder's CPU.
        let mut credyt = settings.credyt.clone();
        if settings.ingest.ack == AckMode::Durable && settings.outbox.forwarder {
            credyt.max_idle_per_host = credyt
                .max_idle_per_host
                .max(settings.outbox.forwarder_concurrency.1);
        }
        let mut metrics = Metrics::new(&settings.telemetry);
        let client = CredytClient::with_metrics(&credyt, Some(metrics.upstream.clone()))
            .context("building the credyt client")?;
        // Is the platform key accepted? Refused: stay alive but not ready (the monitor checks
        // again); unreachable: ready, with a warning (durable mode accepts while Credyt is down).
        let credentials = Arc::new(Credentials::default());
        if credentials.check(&client).await == KeyStatus::Unknown {
            tracing::warn!(
                "credyt could not be reached to check the platform key; starting anyway"
            );
        }
        let mut tasks = vec![tokio::spawn(
            Arc::clone(&credentials).monitor(client.clone()),
        )];
        let identity = Arc::new(
            Identity::new(client.clone(), &settings.identity)
                .with_metrics(metrics.identity.clone()),
        );
        let gate = Arc::new(Gate::new(
            client.clone(),
            settings.balance.clone(),
            metrics.balance.clone(),
        ));
        tasks.push(gate.spawn_sweeper());
        let gateway = web::Data::new(
            crate::gateway::Gateway::new(
                Arc::clone(&tenants),
                Arc::clone(&identity),
                client.clone(),
                settings.gateway.default_quota,
                settings.server.max_body_bytes,
                metrics.gateway.clone(),
            )
            .with_gate(Arc::clone(&gate)),
        );
        let (sink, outbox, forwarder) = match settings.ingest.ack {
            AckMode::Upstream => (
                Sink::upstream(Forwarder::new(client), &settings.ingest),
                None,
                None,
            ),
            AckMode::Durable => {
                let outbox = open_outbox(&settings, &metrics).await?;
                hold_pending_debits(&outbox, &tenants, &gate);
                let forwarder = settings.outbox.forwarder.then(|| {
                    let (min, max) = settings.outbox.forwarder_concurrency;
                    ForwarderHandle::spawn(
                        outbox.clone(),
                        client,
                        ForwarderSettings {
                            concurrency_min: min,
                            concurrency_max: max,
                            max_age: settings.outbox.retry_max_age,
                            coalesce_window: settings.outbox.coalesce_window,
                            gate: Some(Arc::clone(&gate)),
                            ..ForwarderSettings::default()
                        },
                        Arc::clone(&credentials),
                        dispatch.clone(),
                    )
                });
                if forwarder.is_none() {
                    tracing::warn!(
                        "outbox forwarder disabled: accepted debits stay on disk until it runs"
                    );
                }
                (Sink::Durable(outbox.clone()), Some(outbox), forwarder)
            }
        };
        let relay = start_relay(&settings, &tenants, &identity, &gate, &metrics).await?;
        let readiness = Arc::new(Readiness::default());
        metrics.register_live(LiveState {
            readiness: Arc::clone(&readiness),
            credentials: Arc::clone(&credentials),
            identity: Arc::clone(&identity),
            outbox: outbox.clone(),
            webhooks: relay.as_ref().map(|r| r.outbox.clone()),
            forwarder: forwarder.as_ref().map(|f| Arc::clone(f.stats())),
            tenants: Arc::clone(&tenants),
            pricing: Arc::clone(&pricing),
        });
        let state = Arc::new(AppState {
            settings: settings.clone(),
            tenants: tenants.clone(),
            identity,
            pricing: pricing.clone(),
            sink,
            outbox: outbox.clone(),
            metrics: Arc::new(metrics),
            gate,
        });
        tasks.push(tenants.spawn_watcher(settings.tenants.reload_interval));
        tasks.push(pricing.spawn_watcher(settings.pricing.reload_interval));

        let tenant_listener = TcpListener::bind(settings.server.listen)
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let tenant_addr = tenant_listener.local_addr()?;
        let trace_requests = ingest::TraceRequests::new(dispatch);
        let tenant_server = tenant_server(
            &settings,
            state.clone(),
            gateway,
            tenant_listener,
            trace_requests,
        )?;
        let tenant_handle = tenant_server.handle();
        tokio::spawn(tenant_server);

        let admin_listener = TcpListener::bind(settings.server.admin_listen)
            .with_context(|| format!("binding {}", settings.server.admin_listen))?;
        let admin_addr = admin_listener.local_addr()?;
        let admin_data = web::Data::new(AdminState::new(
            state.clone(),
            readiness.clone(),
            Arc::clone(&credentials),
            forwarder.as_ref().map(|f| Arc::clone(f.stats())),
            relay.as_ref().map(|r| r.outbox.clone()),
        ));
        let admin_server = HttpServer::new(move || {
            App::new()
                .app_data(admin_data.clone())
                .configure(crate::admin::routes)
        })
        .workers(1)
        .disable_signals()
        .listen(admin_listener)?
        .run();
        let admin_handle = admin_server.handle();
        tokio::spawn(admin_server);

        readiness.set_ready();
        if credentials.is_refused() {
            tracing::error!("not ready until credyt accepts the platform key");
        }
        tracing::info!(
            tenant_addr = %tenant_addr,
            admin_addr = %admin_addr,
            tenants = tenants.current().len(),
            pricing_version = pricing.current().version(),
            ack = ?settings.ingest.ack,
            webhook_relay = ?relay.as_ref().map(|r| r.addr),
            "credyt-proxy ready"
        );
        crate::admin::log_dead_letter_endpoints(&settings);
        Ok(Application {
            tenant_addr,
            admin_addr,
            tenant_server: tenant_handle,
            admin_server: admin_handle,
            readiness,
            state,
            tasks,
            shutdown: settings.shutdown.clone(),
            outbox,
            forwarder,
            relay,
            traces,
        })
    }

    /// The webhook relay's outbox, when the relay is configured.
    pub fn webhook_outbox(&self) -> Option<&Outbox> {
        self.relay.as_ref().map(|r| &r.outbox)
    }

    /// The webhook relay's address, when the relay is configured.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().map(|r| r.addr)
    }

    /// The application's trace pipeline, when traces are configured.
    pub fn traces(&self) -> Option<&Traces> {
        self.traces.as_ref()
    }

    pub fn tenant_addr(&self) -> SocketAddr {
        self.tenant_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until SIGTERM/SIGINT, then drains (see [`Application::stop`]).
    pub async fn run_until_stopped(self) {
        self.drain_on(crate::shutdown::Signals::new()).await;
    }

    /// Serves until the first of `signals`, then drains; a second signal during the drain
    /// exits the process at once (what was acknowledged is in the outbox already).
    pub async fn drain_on(self, mut signals: crate::shutdown::Signals) {
        let first = signals.recv().await;
        tracing::info!(signal = %first, "shutdown started");
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let second = signals.recv().await;
            tracing::warn!(
                signal = %second,
                undelivered = outbox.as_ref().map_or(0, |o| o.depth()),
                "second signal: exiting now; undelivered debits stay in the outbox for the next start"
            );
            std::process::exit(i32::from(second.exit_status()));
        });
        self.stop().await;
    }

    /// The outbox, when `ack = "durable"`.
    pub fn outbox(&self) -> Option<&Outbox> {
        self.outbox.as_ref()
    }

    /// Drains as a pod's shutdown wants, within `server.shutdown_grace_ms` from now:
    /// 1. not ready at once (`/readyz` 503), still taking requests for `shutdown.drain_delay_ms`
    ///    while the endpoints that route here are updated;
    /// 2. stop accepting, finish in-flight requests;
    /// 3. deliver the outbox until it is empty or the grace is nearly spent, logging progress;
    /// 4. stop the forwarder, sync and close the outbox. What is left stays on disk for the next
    ///    start, and the log says how much.
    pub async fn stop(self) {
        let started = tokio::time::Instant::now();
        let deadline = started + self.shutdown.grace;
        // Kept back from the delivery phase for in-flight sends to settle and the close.
        let reserve = (self.shutdown.grace / 10).min(std::time::Duration::from_secs(2));
        self.readiness.set_draining();
        if !self.shutdown.drain_delay.is_zero() {
            tracing::info!(
                drain_delay_ms = self.shutdown.drain_delay.as_millis() as u64,
                "not ready; still taking requests during the drain delay"
            );
            tokio::time::sleep(self.shutdown.drain_delay).await;
        }
        tracing::info!("stopped accepting; finishing in-flight requests");
        let relay_server = self.relay.as_ref().map(|r| r.server.clone());
        let graceful = async {
            let tenant = self.tenant_server.stop(true);
            match relay_server {
                Some(relay) => {
                    futures_util::future::join(tenant, relay.stop(true)).await;
                }
                None => tenant.await,
            }
        };
        if tokio::time::timeout_at(deadline, graceful).await.is_err() {
            tracing::warn!(
                grace_ms = self.shutdown.grace.as_millis() as u64,
                "in-flight requests did not finish within the grace period"
            );
        }
        for t in self.tasks {
            t.abort();
        }
        if let (Some(forwarder), Some(outbox)) = (self.forwarder, self.outbox.as_ref()) {
            deliver_outbox(outbox, deadline - reserve).await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            forwarder
                .stop(left.max(std::time::Duration::from_millis(100)))
                .await;
        }
        if let Some(relay) = self.relay {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            relay
                .deliverer
                .stop(left.min(std::time::Duration::from_secs(2)))
                .await;
            let depth = relay.outbox.depth();
            if let Err(e) = relay.outbox.close().await {
                tracing::error!(error = %e, "closing the webhook outbox failed");
            } else if depth > 0 {
                tracing::info!(
                    undelivered = depth,
                    "webhook outbox closed; undelivered webhooks are sent at the next start"
                );
            }
        }
        // The state holds a clone of the outbox; closing ours syncs it.
        if let Some(outbox) = self.outbox {
            let depth = outbox.depth();
            if let Err(e) = outbox.close().await {
                tracing::error!(error = %e, "closing the outbox failed");
            }
            if depth == 0 {
                tracing::info!(undelivered = 0, "outbox closed, everything delivered");
            } else {
                tracing::warn!(
                    undelivered = depth,
                    "outbox closed with undelivered debits; they are durable and sent at the next start"
                );
            }
        }
        self.admin_server.stop(true).await;
        // After the forwarder: its last spans go out too.
        if let Some(traces) = self.traces {
            let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        }
        release(self.state).await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "credyt-proxy stopped"
        );
    }
}

/// The delivery phase of a drain: the forwarder keeps running while this waits for the
/// outbox to empty, until `until`; progress goes to the log once a second.
async fn deliver_outbox(outbox: &Outbox, until: tokio::time::Instant) {
    let at_start = outbox.depth();
    if at_start == 0 {
        return;
    }
    tracing::info!(
        undelivered = at_start,
        budget_ms = until
            .saturating_duration_since(tokio::time::Instant::now())
            .as_millis() as u64,
        "delivering the outbox before exit"
    );
    let mut report = tokio::time::interval(std::time::Duration::from_secs(1));
    report.tick().await;
    loop {
        let depth = outbox.depth();
        if depth == 0 {
            tracing::info!(delivered = at_start, "outbox delivered");
            return;
        }
        if tokio::time::Instant::now() >= until {
            tracing::warn!(
                delivered = at_start.saturating_sub(depth),
                undelivered = depth,
                "grace period spent before the outbox was delivered"
            );
            return;
        }
        tokio::select! {
            _ = report.tick() => tracing::info!(
                delivered = at_start.saturating_sub(depth),
                undelivered = depth,
                "delivering the outbox"
            ),
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// Waits (up to 5 s) until the servers' workers dropped their share of the state, then drops
/// it: with the last outbox handle goes the store and its directory lock, so a new
/// `Application` can open the same outbox as soon as `stop` returned.
async fn release(state: Arc<AppState>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut state = state;
    loop {
        match Arc::try_unwrap(state) {
            Ok(state) => {
                // Closing the store joins its threads: blocking.
                let _ = tokio::task::spawn_blocking(move || drop(state)).await;
                return;
            }
            Err(shared) if std::time::Instant::now() < deadline => {
                state = shared;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(_) => {
                tracing::warn!("the application state is still shared after stop; the outbox directory stays locked until it is dropped");
                return;
            }
        }
    }
}
