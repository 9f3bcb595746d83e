//! Webhook destinations, `Credyt-Signature` signing, and background delivery.
//!
//! Contract:
//! - Signature (API.md §8.3): `Credyt-Signature: t=<unix>,v0=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
//!   keyed with the whole secret string (`whsec_` included). Each attempt is re-signed.
//! - A `balance_threshold_hit` goes to every enabled destination of the platform whose `connect`
//!   flag matches the partition (true for connected accounts) and whose topics match, in the C4P
//!   page's envelope.
//! - Deliveries run as tasks on the runtime that called `start`, never on the request path, and
//!   hold no lock across I/O. 2xx = delivered; anything else or a timeout is retried after each
//!   delay of the configured schedule, then marked failed. Every attempt lands in a bounded log.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::watch;

use super::ids::new_id;
use super::state::ThresholdHit;
use super::wire::{ThresholdHitData, ThresholdHitEnvelope, WebhookDestinationWire};

/// The topic of the C4P low-balance event.
pub(crate) const BALANCE_THRESHOLD_HIT: &str = "balance_threshold_hit";

/// How many delivery attempts the log keeps.
const DELIVERY_LOG_CAPACITY: usize = 1_000;

#[derive(Clone)]
pub(crate) struct Destination {
    pub id: String,
    pub url: String,
    pub topics: Vec<String>,
    pub connect: bool,
    pub enabled: bool,
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Destination {
    pub fn matches(&self, topic: &str) -> bool {
        self.topics.iter().any(|t| t == "*" || t == topic)
    }

    pub fn to_wire(&self, with_secret: bool) -> WebhookDestinationWire {
        WebhookDestinationWire {
            id: self.id.clone(),
            url: self.url.clone(),
            topics: self.topics.clone(),
            connect: self.connect,
            enabled: self.enabled,
            created_at: self.created_at,
            updated_at: self.updated_at,
            secret: with_secret.then(|| self.secret.clone()),
        }
    }
}

/// Lowercase hex HMAC-SHA256 over `"<t>.<body>"` keyed with `secret`.
pub(crate) fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail; fall back to an empty mac anyway.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The full `Credyt-Signature` header value.
pub(crate) fn signature_header(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v0={}", sign(secret, t, body))
}

/// The C4P `balance_threshold_hit` body.
pub(crate) fn threshold_hit_body(event_id: &str, hit: &ThresholdHit, at: DateTime<Utc>) -> Vec<u8> {
    let envelope = ThresholdHitEnvelope {
        id: event_id,
        account: &hit.account,
        event_type: BALANCE_THRESHOLD_HIT,
        occurred_at: at.to_rfc3339_opts(SecondsFormat::Millis, true),
        data: ThresholdHitData {
            customer_id: &hit.customer_id,
            account_id: &hit.account_id,
            available: hit.available,
            threshold: hit.threshold,
        },
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// One attempt in the delivery log.
#[derive(Serialize, Clone)]
pub(crate) struct DeliveryRecord {
    pub event_id: String,
    pub destination_id: String,
    pub url: String,
    pub topic: &'static str,
    pub attempt: usize,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `delivered`, `retrying` or `failed`.
    pub outcome: &'static str,
}

pub(crate) struct Deliverer {
    client: reqwest::Client,
    schedule: Vec<Duration>,
    runtime: tokio::runtime::Handle,
    shutdown: watch::Receiver<bool>,
    /// Bumped by a reset so pending retries of forgotten state stop.
    epoch: AtomicU64,
    log: Mutex<VecDeque<DeliveryRecord>>,
}

impl Deliverer {
    pub fn new(
        schedule: Vec<Duration>,
        timeout: Duration,
        runtime: tokio::runtime::Handle,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Deliverer {
            client,
            schedule,
            runtime,
            shutdown,
            epoch: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
        })
    }

    /// Queues one delivery of `hit` per matching destination; returns at once.
    pub fn dispatch(self: &Arc<Self>, destinations: &[Destination], hit: &ThresholdHit) {
        let targets: Vec<Destination> = destinations
            .iter()
            .filter(|d| d.enabled && d.connect == hit.connected && d.matches(BALANCE_THRESHOLD_HIT))
            .cloned()
            .collect();
        if targets.is_empty() {
            return;
        }
        let event_id = new_id("whe");
        let body = bytes::Bytes::from(threshold_hit_body(&event_id, hit, Utc::now()));
        let epoch = self.epoch.load(Ordering::SeqCst);
        for destination in targets {
            let this = Arc::clone(self);
            let body = body.clone();
            let event_id = event_id.clone();
            self.runtime.spawn(async move {
                this.deliver(destination, event_id, body, epoch).await;
            });
        }
    }

    async fn deliver(
        self: Arc<Self>,
        destination: Destination,
        event_id: String,
        body: bytes::Bytes,
        epoch: u64,
    ) {
        let mut shutdown = self.shutdown.clone();
        let attempts = self.schedule.len() + 1;
        for attempt in 1..=attempts {
            if *shutdown.borrow() || self.epoch.load(Ordering::SeqCst) != epoch {
                return;
            }
            let t = Utc::now().timestamp();
            let result = self
                .client
                .post(&destination.url)
                .header("content-type", "application/json")
                .header(
                    "credyt-signature",
                    signature_header(&destination.secret, t, &body),
                )
                .body(body.clone())
                .send()
                .await;
            let (status, error) = match result {
                Ok(response) => (Some(response.status().as_u16()), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let delivered = status.is_some_and(|s| (200..300).contains(&s));
            let outcome = if delivered {
                "delivered"
            } else if attempt == attempts {
                "failed"
            } else {
                "retrying"
            };
            if !delivered {
                tracing::debug!(destination = %destination.id, attempt, ?status, ?error, "webhook delivery failed");
            }
            self.record(DeliveryRecord {
                event_id: event_id.clone(),
                destination_id: destination.id.clone(),
                url: destination.url.clone(),
                topic: BALANCE_THRESHOLD_HIT,
                attempt,
                at: Utc::now(),
                status,
                error,
                outcome,
            });
            if delivered || attempt == attempts {
                return;
            }
            let delay = self.schedule[attempt - 1];
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn record(&self, record: DeliveryRecord) {
        let mut log = self.log.lock();
        if log.len() == DELIVERY_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(record);
    }

    pub fn records(&self) -> Vec<DeliveryRecord> {
        self.log.lock().iter().cloned().collect()
    }

    /// Drops the log and abandons pending retries.
    pub fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.log.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_api_md_test_vector() {
        // API.md §8.3: the compact form of examples/webhook-subscription-activated.json.
        let body = r#"{"id":"evt_4k7m2q9x5v8c3n6b1z0t4r7w2y","type":"subscription.activated","created":"2026-01-01T00:00:00Z","live_mode":false,"data":{"customer_id":"cust_4g8h2k5m9p3q7r1s6t0v4w8x2y","subscription_id":"sub_4b6d8f0h2j4k6m8n0p2q4r6s8t","occurred_at":"2026-01-01T00:00:00Z"}}"#;
        assert_eq!(body.len(), 267);
        assert_eq!(
            signature_header(
                "whsec_4emulatortestsecret0000000",
                1_767_225_600,
                body.as_bytes()
            ),
            "t=1767225600,v0=c43474218af66f2ad9627b952dcd71b1225204aebf6db8a5559d3ac0f1d47c01"
        );
    }

    #[test]
    fn threshold_body_has_the_c4p_shape() {
        use std::str::FromStr;
        let hit = ThresholdHit {
            account: "acc_4y7dxxqt8dzzpf4w58te001zxb".into(),
            connected: true,
            customer_id: "cust_4tqzchnwchbwf87m7g86pw0xmm".into(),
            account_id: "default:USD".into(),
            available: rust_decimal::Decimal::from_str("9.24").unwrap(),
            threshold: rust_decimal::Decimal::from_str("10.0").unwrap(),
        };
        let at = DateTime::parse_from_rfc3339("2026-01-07T13:19:18.265Z")
            .unwrap()
            .with_timezone(&Utc);
        let body = threshold_hit_body("whe_48b9cet5d6h6vf2rwg4w3ezkw2", &hit, at);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"id":"whe_48b9cet5d6h6vf2rwg4w3ezkw2","account":"acc_4y7dxxqt8dzzpf4w58te001zxb","event_type":"balance_threshold_hit","occurred_at":"2026-01-07T13:19:18.265Z","data":{"customer_id":"cust_4tqzchnwchbwf87m7g86pw0xmm","account_id":"default:USD","available":9.24,"threshold":10.0}}"#
        );
    }

    #[test]
    fn topics_match_wildcard_or_exact() {
        let mut d = Destination {
            id: "whd".into(),
            url: "http://x".into(),
            topics: vec!["*".into()],
            connect: true,
            enabled: true,
            secret: "s".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        assert!(d.matches(BALANCE_THRESHOLD_HIT));
        d.topics = vec!["subscription.activated".into()];
        assert!(!d.matches(BALANCE_THRESHOLD_HIT));
        d.topics = vec![BALANCE_THRESHOLD_HIT.into()];
        assert!(d.matches(BALANCE_THRESHOLD_HIT));
    }
}
