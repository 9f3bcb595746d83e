//! The webhook relay: Credyt's webhooks for connected accounts, relayed to the tenant that owns
//! each account, re-signed, exactly once per webhook id.
//!
//! # Contract
//!
//! * **Receipt** (`POST <webhooks.path>` on the relay's own listener, `webhooks.listen`; no
//!   tenant key reaches it and it needs none): the body is read raw (at most
//!   `webhooks.max_body_bytes`, else 413), its `Credyt-Signature` verified against every
//!   configured Credyt secret ([`verify`]: 401 `missing_signature`, `stale_signature`,
//!   `invalid_signature`; 400 `malformed_signature`), and only then parsed ([`envelope`]: both
//!   envelopes; 400 `invalid_webhook`). A refused webhook stores nothing.
//! * **Routing**: the envelope's `account` is mapped to the tenant whose connected account it
//!   is ([`Identity::tenant_of_account`]: tenants configured by `account` or by
//!   `account_external_id`), and `data.customer_id` is enriched with the end user's external
//!   id ([`Identity::external_id_of`]); both through the identity caches. An upstream failure
//!   of those lookups answers 503 (Credyt retries later) and stores nothing. A verified
//!   webhook naming a customer of an account also marks that customer's cached balance stale
//!   for balance gating ([`crate::balance::Gate::invalidate`]).
//! * **Durable before 2xx**: the webhook is appended to the relay's own [`Outbox`] (the same
//!   storage and recovery as the events', in `webhooks.dir`), its id claimed in the same atomic
//!   write (dedupe window `webhooks.dedupe_window_secs`, at least 7 days), and Credyt gets its
//!   200 only once that append is durable per `outbox.sync`. A redelivery of a recorded id is
//!   answered 200 and stores nothing. A webhook no tenant owns is recorded too (and becomes an
//!   `unroutable` dead letter at the deliverer): Credyt still gets 200 so it stops retrying. A
//!   webhook whose tenant has no endpoint or does not take the topic only claims its id.
//! * **Delivery** ([`deliver`]): to the tenant's `webhook.url`, Standard Webhooks signed
//!   ([`sign`]), retried per `webhooks.retry_schedule_ms` with jitter, at most
//!   `webhooks.per_tenant_concurrency` at once per tenant (a slow tenant holds only its own
//!   slots), each attempt bounded by `webhooks.attempt_timeout_ms`; a dead letter after the last
//!   retry. Marked delivered only after the tenant's 2xx.

pub mod deliver;
pub mod envelope;
pub mod sign;
pub mod verify;

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use crate::config::WebhookSettings;
use crate::domain::{
    AccountId, CustomerId, Delivery, EventId, RelayedWebhook, TenantId, WebhookCustomer,
};
use crate::identity::{Identity, Tenants};
use crate::ingest::problem::ApiError;
use crate::outbox::{AcceptedEvent, AppendOutcome, Outbox};
use crate::telemetry::metrics::{WebhookMetrics, WebhookReceipt};

/// The dedupe namespace of webhook ids in the relay's outbox: Credyt's ids are global, so one
/// namespace for every tenant.
pub const DEDUPE_NAMESPACE: &str = "credyt";

/// The header Credyt signs its deliveries with.
pub const CREDYT_SIGNATURE: &str = "Credyt-Signature";

/// The receiving side of the relay, shared by the relay listener's workers.
pub struct Relay {
    settings: WebhookSettings,
    tenants: Arc<Tenants>,
    identity: Arc<Identity>,
    outbox: Outbox,
    metrics: WebhookMetrics,
    /// Told of every webhook naming a customer (its balance may have moved).
    gate: Option<Arc<crate::balance::Gate>>,
}

impl Relay {
    /// Tells balance gating of each verified webhook that names a customer of an account.
    pub fn with_gate(mut self, gate: Arc<crate::balance::Gate>) -> Relay {
        self.gate = Some(gate);
        self
    }

    pub fn new(
        settings: WebhookSettings,
        tenants: Arc<Tenants>,
        identity: Arc<Identity>,
        outbox: Outbox,
        metrics: WebhookMetrics,
    ) -> Relay {
        Relay {
            settings,
            tenants,
            identity,
            outbox,
            metrics,
            gate: None,
        }
    }

    /// Verifies, routes and durably records one webhook.
    pub async fn receive(
        &self,
        signature: Option<&[u8]>,
        body: &[u8],
    ) -> Result<WebhookReceipt, ApiError> {
        let secrets: Vec<&[u8]> = self
            .settings
            .credyt_secrets
            .iter()
            .map(|s| s.expose().as_bytes())
            .collect();
        let now = chrono::Utc::now();
        verify::verify(
            signature,
            body,
            &secrets,
            self.settings.tolerance.as_secs(),
            now.timestamp(),
        )
        .map_err(ApiError::Signature)?;
        let inbound = envelope::parse(body).map_err(|e| ApiError::InvalidWebhook(e.0))?;

        let account = inbound
            .account
            .as_deref()
            .filter(|a| a.starts_with("acc_"))
            .map(AccountId::new);
        // A balance webhook (or any other naming a customer): gating reads the balance again
        // before judging that customer's next event, whatever becomes of the webhook here.
        if let (Some(gate), Some(a), Some(c)) = (&self.gate, &account, inbound.customer_id()) {
            gate.invalidate(a, &CustomerId::new(c));
        }
        let table = self.tenants.current();
        let tenant = match &account {
            Some(a) => self.identity.tenant_of_account(&table, a).await?,
            None => None,
        };
        let outcome = match &tenant {
            None => WebhookReceipt::Unroutable,
            Some(t) if t.webhook.as_ref().is_some_and(|w| w.wants(&inbound.topic)) => {
                WebhookReceipt::Accepted
            }
            Some(_) => WebhookReceipt::Filtered,
        };
        let customer = match (inbound.customer_id(), &account) {
            (Some(c), Some(a)) if outcome == WebhookReceipt::Accepted => {
                let id = CustomerId::new(c);
                let external_id = self.identity.external_id_of(a, &id).await?;
                Some(WebhookCustomer {
                    id,
                    external_id: external_id.map(|e| e.to_string()),
                })
            }
            (Some(c), _) => Some(WebhookCustomer {
                id: CustomerId::new(c),
                external_id: None,
            }),
            (None, _) => None,
        };
        let id = EventId::new(inbound.id.as_str());
        let deliveries = match outcome {
            WebhookReceipt::Filtered => Vec::new(),
            _ => vec![Delivery::Webhook(RelayedWebhook {
                id: id.clone(),
                topic: inbound.topic,
                occurred_at: inbound.occurred_at,
                account,
                tenant: tenant.map(|t| t.id.clone()),
                customer,
                data: inbound.data,
                received_at: now,
            })],
        };
        let appended = self
            .outbox
            .append(vec![AcceptedEvent {
                tenant: TenantId::new(DEDUPE_NAMESPACE),
                event_id: id,
                deliveries,
                totals: Vec::new(),
            }])
            .await
            .map_err(ApiError::Outbox)?;
        let outcome = match appended.first() {
            Some(AppendOutcome::Duplicate) => WebhookReceipt::Duplicate,
            _ => outcome,
        };
        Ok(outcome)
    }
}

/// The relay listener's routes: `POST <path>`; any other method there is 405.
pub fn routes(path: &str) -> impl FnOnce(&mut web::ServiceConfig) + '_ {
    move |cfg| {
        cfg.service(
            web::resource(path)
                .route(web::post().to(receive))
                .default_service(web::to(|| async {
                    actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed {
                        allow: "POST",
                    })
                })),
        )
        .default_service(web::to(crate::ingest::not_found));
    }
}

async fn receive(
    req: HttpRequest,
    mut payload: web::Payload,
    relay: web::Data<Relay>,
) -> Result<HttpResponse, ApiError> {
    let result = async {
        let limit = relay.settings.max_body_bytes;
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| ApiError::MalformedRequest)?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        let signature = req.headers().get(CREDYT_SIGNATURE).map(|v| v.as_bytes());
        relay.receive(signature, &body).await
    }
    .await;
    match result {
        Ok(outcome) => {
            relay.metrics.received(outcome);
            Ok(HttpResponse::Ok().json(serde_json::json!({ "outcome": outcome.as_str() })))
        }
        Err(e) => {
            if e.is_client_error() {
                relay.metrics.received(WebhookReceipt::Refused);
            }
            Err(e)
        }
    }
}
