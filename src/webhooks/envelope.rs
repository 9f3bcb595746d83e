//! The two envelopes Credyt posts (API.md §8.2), read into one shape.
//!
//! - C4P: `{id: "whe_...", account: "acc_...", event_type, occurred_at, data}`;
//! - generic: `{id: "evt_...", type, created, live_mode, data}`, with a top-level `account` on a
//!   connected account's destination.
//!
//! The id is required (it is the dedupe key), so are a topic and an RFC 3339 time; `data` must
//! be an object when present. Anything else is an unparseable webhook, refused before anything
//! is stored.

use chrono::DateTime;
use serde::Deserialize;

/// The longest envelope id accepted (Credyt's are ~30 characters).
const MAX_ID_LEN: usize = 200;

/// A Credyt webhook, whichever envelope it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub id: String,
    pub topic: String,
    pub occurred_at: String,
    pub account: Option<String>,
    pub data: serde_json::Value,
}

impl Inbound {
    /// `data.customer_id`, when the data names a customer.
    pub fn customer_id(&self) -> Option<&str> {
        self.data
            .get("customer_id")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    }
}

#[derive(Deserialize)]
struct Raw {
    id: Option<String>,
    event_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    occurred_at: Option<String>,
    created: Option<String>,
    account: Option<String>,
    data: Option<serde_json::Value>,
}

/// Why a body is not a webhook.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EnvelopeError(pub String);

pub fn parse(body: &[u8]) -> Result<Inbound, EnvelopeError> {
    let raw: Raw = serde_json::from_slice(body)
        .map_err(|e| EnvelopeError(format!("the body is not a json webhook envelope: {e}")))?;
    let id = raw
        .id
        .filter(|id| !id.is_empty() && id.len() <= MAX_ID_LEN && !id.contains(char::is_control))
        .ok_or_else(|| {
            EnvelopeError(format!(
                "id must be a string of 1 to {MAX_ID_LEN} characters"
            ))
        })?;
    let topic = raw
        .event_type
        .or(raw.kind)
        .filter(|t| !t.is_empty() && t.len() <= 200)
        .ok_or_else(|| EnvelopeError("event_type (or type) must be a non-empty string".into()))?;
    let occurred_at = raw
        .occurred_at
        .or(raw.created)
        .filter(|t| DateTime::parse_from_rfc3339(t).is_ok())
        .ok_or_else(|| EnvelopeError("occurred_at (or created) must be an RFC 3339 time".into()))?;
    let data = match raw.data {
        None => serde_json::Value::Object(Default::default()),
        Some(v @ serde_json::Value::Object(_)) => v,
        Some(_) => return Err(EnvelopeError("data must be an object".into())),
    };
    Ok(Inbound {
        id,
        topic,
        occurred_at,
        account: raw.account.filter(|a| !a.is_empty()),
        data,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn example(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../shared/credyt/examples/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    #[test]
    fn the_c4p_envelope() {
        let w = parse(&example("webhook-balance-threshold-hit.json")).unwrap();
        assert!(w.id.starts_with("whe_"));
        assert_eq!(w.topic, "balance_threshold_hit");
        assert!(w.account.as_deref().unwrap().starts_with("acc_"));
        assert!(w.customer_id().unwrap().starts_with("cust_"));
    }

    #[test]
    fn the_generic_envelope() {
        let w = parse(&example("webhook-subscription-activated.json")).unwrap();
        assert_eq!(w.topic, "subscription.activated");
        assert_eq!(w.account, None);
        assert!(w.customer_id().is_some());
    }

    #[test]
    fn numbers_in_data_stay_exact() {
        let body = br#"{"id":"whe_1","event_type":"x","occurred_at":"2026-01-01T00:00:00Z","data":{"available":0.1000000000000000055511}}"#;
        let w = parse(body).unwrap();
        assert_eq!(
            serde_json::to_string(&w.data).unwrap(),
            r#"{"available":0.1000000000000000055511}"#
        );
    }

    #[test]
    fn what_is_not_a_webhook() {
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"event_type":"x","occurred_at":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":"","event_type":"x","occurred_at":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":"a","occurred_at":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":"a","type":"x","created":"yesterday"}"#,
            br#"{"id":"a","type":"x","created":"2026-01-01T00:00:00Z","data":[1]}"#,
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
