//! Delivery of recorded webhooks to tenants' endpoints.
//!
//! Contract:
//! - Every record of the relay's outbox is leased once and held until it is settled: delivered
//!   (the tenant answered 2xx: marked delivered), or a dead letter (`unroutable`: no tenant
//!   owns its account, also after routing it again; `retries_exhausted`: the last attempt of
//!   the schedule failed, with the last status and body; a tenant whose endpoint was removed
//!   after the webhook was recorded fails each attempt this way too).
//! - At most `per_tenant_concurrency` attempts run at once per tenant; the others of that
//!   tenant wait in its own queue, so a slow or hanging endpoint holds only its own slots and
//!   never another tenant's delivery. Each attempt runs as a task of its own, bounded by
//!   `attempt_timeout`.
//! - A failed attempt (any status but 2xx, a timeout, no connection) is retried after the next
//!   wait of `retry_schedule`, with ±20 % jitter. The attempt count is kept in memory: a
//!   restart begins the schedule again for what is still pending.
//! - The request is built at each attempt from the record and the tenant's current entry (URL,
//!   secrets), so a tenants-file change applies to the next attempt; `webhook-id` is Credyt's
//!   envelope id (stable across attempts and Credyt's redeliveries) and `webhook-timestamp` the
//!   attempt's time.
//! - On stop nothing new starts; attempts in flight get the grace to settle, and everything
//!   unsettled stays pending in the outbox for the next start.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::WebhookSettings;
use crate::domain::{Delivery, RelayedWebhook, TenantId, WebhookCustomer};
use crate::identity::{Identity, Tenants};
use crate::outbox::{DeadCode, Outbox, Pending};
use crate::telemetry::metrics::{WebhookAttempt, WebhookMetrics};

use super::sign;

/// The most records leased at once.
const LEASE: usize = 256;

/// The tenant-facing body (documented in `docs/webhook-payload.schema.json`).
#[derive(Serialize)]
struct Outgoing<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: &'a str,
    data: &'a serde_json::Value,
    tenant: &'a str,
    account: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer: Option<&'a WebhookCustomer>,
}

/// Why an attempt failed.
struct Failure {
    reason: String,
    status: Option<u16>,
    body: Option<String>,
}

/// How one attempt ended.
struct Settled {
    seq: u64,
    tenant: TenantId,
    result: Result<(), Failure>,
}

/// The delivery task.
pub struct DelivererHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DelivererHandle {
    pub fn spawn(
        outbox: Outbox,
        tenants: Arc<Tenants>,
        identity: Arc<Identity>,
        settings: WebhookSettings,
        metrics: WebhookMetrics,
    ) -> anyhow::Result<DelivererHandle> {
        let http = reqwest::Client::builder()
            .timeout(settings.attempt_timeout)
            .connect_timeout(settings.attempt_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credyt-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (stop, stopped) = watch::channel(false);
        let mut deliverer = Deliverer {
            outbox,
            tenants,
            identity,
            settings,
            metrics,
            http,
            records: HashMap::new(),
            queues: HashMap::new(),
            in_flight: HashMap::new(),
            timers: BinaryHeap::new(),
            attempts: HashMap::new(),
            running: FuturesUnordered::new(),
        };
        let task = tokio::spawn(async move { deliverer.run(stopped).await });
        Ok(DelivererHandle { stop, task })
    }

    /// Starts nothing new; waits up to `grace` for attempts in flight to settle.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(
                "webhook attempts still in flight at exit; they are sent again at the next start"
            );
        }
    }
}

struct Deliverer {
    outbox: Outbox,
    tenants: Arc<Tenants>,
    identity: Arc<Identity>,
    settings: WebhookSettings,
    metrics: WebhookMetrics,
    http: reqwest::Client,
    /// Every leased, unsettled record.
    records: HashMap<u64, Arc<RelayedWebhook>>,
    /// Per tenant: records ready for an attempt, oldest first.
    queues: HashMap<TenantId, VecDeque<u64>>,
    in_flight: HashMap<TenantId, usize>,
    /// Records waiting for their next attempt.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Failed attempts per record, in this process.
    attempts: HashMap<u64, usize>,
    running: FuturesUnordered<JoinHandle<Settled>>,
}

impl Deliverer {
    async fn run(&mut self, mut stopped: watch::Receiver<bool>) {
        loop {
            if *stopped.borrow() {
                break;
            }
            for pending in self.outbox.next_batch(LEASE) {
                self.take(pending).await;
            }
            let now = Instant::now();
            while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
                if at > now {
                    break;
                }
                self.timers.pop();
                self.enqueue(seq);
            }
            self.start_attempts();
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                Some(done) = self.running.next() => {
                    if let Ok(settled) = done {
                        self.settle(settled).await;
                    }
                }
                _ = self.outbox.wait_pending() => {}
                _ = sleep_until(next_timer) => {}
                _ = stopped.changed() => {}
            }
        }
        // Stopping: let the attempts in flight settle (the handle bounds the wait).
        while let Some(done) = self.running.next().await {
            if let Ok(settled) = done {
                self.settle(settled).await;
            }
        }
    }

    /// A newly leased record: routed (again, if it was unroutable) and queued, or a dead letter.
    async fn take(&mut self, pending: Pending) {
        let Delivery::Webhook(mut webhook) = pending.delivery else {
            self.dead(
                pending.seq,
                DeadCode::Refused,
                "not a webhook: the relay's outbox holds webhooks only".into(),
                None,
            )
            .await;
            return;
        };
        if webhook.tenant.is_none() {
            if let Some(account) = &webhook.account {
                let table = self.tenants.current();
                match self.identity.tenant_of_account(&table, account).await {
                    Ok(Some(t)) => webhook.tenant = Some(t.id.clone()),
                    Ok(None) => {}
                    Err(e) => {
                        // Routing needs credyt for tenants configured by external id: try later.
                        tracing::warn!(error = %e, webhook_id = %webhook.id, "webhook routing failed; retrying");
                        self.records.insert(pending.seq, Arc::new(webhook));
                        self.retry_later(pending.seq);
                        return;
                    }
                }
            }
        }
        let Some(tenant) = webhook.tenant.clone() else {
            let reason = match &webhook.account {
                Some(a) => format!("no tenant owns account {a}"),
                None => "the webhook names no connected account".into(),
            };
            self.dead(pending.seq, DeadCode::Unroutable, reason, None)
                .await;
            return;
        };
        self.records.insert(pending.seq, Arc::new(webhook));
        self.queues
            .entry(tenant)
            .or_default()
            .push_back(pending.seq);
    }

    fn enqueue(&mut self, seq: u64) {
        if let Some(tenant) = self.records.get(&seq).and_then(|w| w.tenant.clone()) {
            self.queues.entry(tenant).or_default().push_back(seq);
        }
    }

    /// Starts what the tenants' free slots allow.
    fn start_attempts(&mut self) {
        let limit = self.settings.per_tenant_concurrency;
        let table = self.tenants.current();
        let mut starts = Vec::new();
        for (tenant, queue) in self.queues.iter_mut() {
            let busy = self.in_flight.entry(tenant.clone()).or_default();
            while *busy < limit {
                let Some(seq) = queue.pop_front() else { break };
                *busy += 1;
                starts.push((tenant.clone(), seq));
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        for (tenant, seq) in starts {
            let Some(webhook) = self.records.get(&seq).cloned() else {
                continue;
            };
            let endpoint = table
                .get(tenant.as_str())
                .and_then(|t| t.webhook.clone())
                .filter(|w| w.wants(&webhook.topic));
            let http = self.http.clone();
            self.running.push(tokio::spawn(async move {
                let result = match endpoint {
                    Some(endpoint) => attempt(&http, &endpoint, &tenant, &webhook).await,
                    None => Err(Failure {
                        reason: format!(
                            "tenant {tenant} has no webhook endpoint for {}",
                            webhook.topic
                        ),
                        status: None,
                        body: None,
                    }),
                };
                Settled {
                    seq,
                    tenant,
                    result,
                }
            }));
        }
    }

    async fn settle(&mut self, settled: Settled) {
        if let Some(busy) = self.in_flight.get_mut(&settled.tenant) {
            *busy = busy.saturating_sub(1);
        }
        let seq = settled.seq;
        match settled.result {
            Ok(()) => {
                self.metrics.attempt(WebhookAttempt::Delivered);
                if let Some(w) = self.records.remove(&seq) {
                    let age = chrono::Utc::now() - w.received_at;
                    self.metrics
                        .observe_delivered(age.to_std().unwrap_or_default());
                }
                self.attempts.remove(&seq);
                if let Err(e) = self.outbox.mark_delivered(&[seq]).await {
                    tracing::error!(seq, error = %e, "marking a webhook delivered failed");
                }
            }
            Err(failure) => {
                self.metrics.attempt(WebhookAttempt::Failed);
                let failed = self.attempts.entry(seq).or_default();
                *failed += 1;
                if *failed > self.settings.retry_schedule.len() {
                    let reason =
                        format!("{} attempts failed; the last: {}", *failed, failure.reason);
                    self.attempts.remove(&seq);
                    self.records.remove(&seq);
                    self.dead(seq, DeadCode::RetriesExhausted, reason, Some(failure))
                        .await;
                } else {
                    tracing::debug!(seq, reason = %failure.reason, "webhook attempt failed; retrying");
                    self.retry_later(seq);
                }
            }
        }
    }

    /// Schedules the next attempt per the retry schedule, with ±20 % jitter.
    fn retry_later(&mut self, seq: u64) {
        let failed = self.attempts.get(&seq).copied().unwrap_or(1).max(1);
        let wait = self
            .settings
            .retry_schedule
            .get(failed - 1)
            .or(self.settings.retry_schedule.last())
            .copied()
            .unwrap_or(Duration::from_secs(1));
        let jitter = rand::thread_rng().gen_range(0.8..=1.2);
        self.timers
            .push(Reverse((Instant::now() + wait.mul_f64(jitter), seq)));
    }

    async fn dead(&mut self, seq: u64, code: DeadCode, reason: String, failure: Option<Failure>) {
        let (status, body) = failure.map_or((None, None), |f| (f.status, f.body));
        tracing::warn!(seq, code = code.as_str(), reason = %reason, "webhook dead-lettered");
        self.metrics.dead_lettered(code.as_str());
        if let Err(e) = self
            .outbox
            .dead_letter(seq, code, reason, status, body)
            .await
        {
            tracing::error!(seq, error = %e, "dead-lettering a webhook failed; it stays pending");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The tenant-facing body of a webhook.
pub fn body(tenant: &TenantId, webhook: &RelayedWebhook) -> Vec<u8> {
    let outgoing = Outgoing {
        kind: &webhook.topic,
        timestamp: &webhook.occurred_at,
        data: &webhook.data,
        tenant: tenant.as_str(),
        account: webhook.account.as_ref().map_or("", |a| a.as_str()),
        customer: webhook.customer.as_ref(),
    };
    serde_json::to_vec(&outgoing).unwrap_or_default()
}

/// One signed POST to the tenant's endpoint.
async fn attempt(
    http: &reqwest::Client,
    endpoint: &crate::identity::tenants::TenantWebhook,
    tenant: &TenantId,
    webhook: &RelayedWebhook,
) -> Result<(), Failure> {
    let body = body(tenant, webhook);
    let timestamp = chrono::Utc::now().timestamp();
    let signature =
        sign::signature_header(&endpoint.secrets, webhook.id.as_str(), timestamp, &body);
    let sent = http
        .post(&endpoint.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", webhook.id.as_str())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            Err(Failure {
                reason: format!("the endpoint answered {status}"),
                status: Some(status.as_u16()),
                body: Some(text.chars().take(2048).collect()),
            })
        }
        Err(e) if e.is_timeout() => Err(Failure {
            reason: "the endpoint did not answer within the attempt timeout".into(),
            status: None,
            body: None,
        }),
        Err(e) => Err(Failure {
            reason: format!(
                "the endpoint could not be reached: {}",
                crate::upstream::error_chain(&e)
            ),
            status: None,
            body: None,
        }),
    }
}
