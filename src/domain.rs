//! Domain newtypes shared by the pipeline stages: parse, don't validate.
//!
//! A value of one of these types has already passed the checks its constructor makes, so the
//! stages after ingest never re-check them. Money and quantities are `rust_decimal::Decimal`
//! end to end; nothing here is ever a float.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Arc<str>);

        impl $name {
            pub fn new(value: impl Into<Arc<str>>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(Arc::from(value))
            }
        }
    };
}

string_id!(
    /// The proxy's own name for a tenant (the platform's customer), from the tenants file.
    TenantId
);
string_id!(
    /// A tenant's event id: the idempotency key of a usage event, unique per tenant.
    EventId
);
string_id!(
    /// A Credyt connected account id (`acc_...`).
    AccountId
);
string_id!(
    /// A Credyt customer id (`cust_...`): one end user of one tenant.
    CustomerId
);

/// A value of an event's `data` map, of the kinds Credyt accepts (string, boolean, number).
/// Numbers are kept exactly: they are parsed from their JSON literal into a `Decimal`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataValue {
    Bool(bool),
    Number(#[serde(with = "rust_decimal::serde::arbitrary_precision")] Decimal),
    String(String),
}

impl DataValue {
    /// The value as text, for matching price dimensions (`model = gpt-4o`, `hd = true`).
    pub fn as_dimension(&self) -> std::borrow::Cow<'_, str> {
        match self {
            DataValue::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
            DataValue::Bool(b) => std::borrow::Cow::Borrowed(if *b { "true" } else { "false" }),
            DataValue::Number(d) => std::borrow::Cow::Owned(d.normalize().to_string()),
        }
    }
}

/// An event's `data` map.
pub type EventData = BTreeMap<String, DataValue>;

/// A usage event that passed validation: what pricing sees.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub id: EventId,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub data: EventData,
}

/// How a price reads an event (Credyt's `usage_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageType {
    Unit,
    Volume,
    UnitAndVolume,
}

/// One priced fee: the result of applying one price of a price book to one event.
/// `amount` is already rounded to the asset's precision (pricing rounds, once, in one place).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fee {
    /// The price's id within its book (stable across versions; part of the transaction id).
    pub price_id: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_name: Option<Arc<str>>,
    pub usage_type: UsageType,
    /// The dimension values that selected the rate row (empty when the price has none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_field: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_rate: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_size: Option<Decimal>,
    pub amount: Decimal,
    pub asset: Arc<str>,
    /// The price book that priced it, e.g. `standard`.
    pub book: Arc<str>,
    /// The version of that book in force at `occurred_at` (its `effective_from` label).
    pub book_version: Arc<str>,
    /// Content hash of the whole pricing set that was active (stamped on every debit).
    pub pricing_hash: Arc<str>,
}

/// The priced, immutable hand-off between pricing and forwarding: one wallet charge to make.
///
/// Built once at accept time and never recomputed: the amount is what the tenant was told and
/// the transaction id is derived only from tenant, event id and price id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Debit {
    pub transaction_id: Uuid,
    pub tenant: TenantId,
    pub account: AccountId,
    pub customer: CustomerId,
    pub event_id: EventId,
    pub subject: Option<String>,
    pub description: Option<String>,
    pub fee: Fee,
    pub accepted_at: DateTime<Utc>,
    /// The tenant request that accepted it, when that request was traced and sampled: the
    /// forwarder's call to Credyt links to it. Advisory only, never part of the charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

/// A usage event forwarded as-is to Credyt's `POST /events` (tenants with `forward = "events"`:
/// Credyt prices it), already mapped to the tenant's account and customer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForwardedUsage {
    pub tenant: TenantId,
    pub account: AccountId,
    pub customer: CustomerId,
    pub event: UsageEvent,
    pub accepted_at: DateTime<Utc>,
    /// As [`Debit::trace`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

/// A W3C trace context (`traceparent` without its version): the span of the tenant request that
/// accepted a record. Kept with the record (the outbox's `CHARGE_V2` form, or the JSON form's
/// `trace` field) so the call that delivers it can link to that request, also after a restart.
///
/// Serialized as a `traceparent` string (`00-<trace id>-<span id>-<flags>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The W3C trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// A context is valid when neither id is all zeros (W3C Trace Context §3.2.2).
    pub fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` header value (version `00`).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// Parses a version-`00` `traceparent` (lowercase hex, as the specification requires);
    /// `None` for anything else or for an invalid (all-zero) id.
    pub fn from_traceparent(value: &str) -> Option<TraceContext> {
        let mut parts = value.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if parts.next().is_some()
            || version != "00"
            || ![trace, span, flags].iter().all(|s| lower_hex(s))
        {
            return None;
        }
        let mut cx = TraceContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex::decode_to_slice(trace, &mut cx.trace_id).ok()?;
        hex::decode_to_slice(span, &mut cx.span_id).ok()?;
        let mut f = [0u8; 1];
        hex::decode_to_slice(flags, &mut f).ok()?;
        cx.flags = f[0];
        cx.is_valid().then_some(cx)
    }
}

impl Serialize for TraceContext {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.traceparent())
    }
}

impl<'de> Deserialize<'de> for TraceContext {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TraceContext::from_traceparent(&s)
            .ok_or_else(|| serde::de::Error::custom("not a valid traceparent"))
    }
}

/// One unit of work for the forwarder: what the outbox stores and delivers exactly once.
// A charge is the common case and is moved a handful of times per event; boxing it would add an
// allocation per fee on the hot path to shrink the rarer usage variant.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Delivery {
    /// A wallet charge (`POST /customers/{id}/wallet/charges`).
    Charge(Debit),
    /// A usage event (`POST /events`).
    Usage(ForwardedUsage),
    /// A Credyt webhook to relay to a tenant (the relay's own outbox only; see
    /// [`crate::webhooks`]).
    Webhook(RelayedWebhook),
}

/// A Credyt webhook as the relay recorded it: what its tenant-facing delivery is built from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayedWebhook {
    /// Credyt's envelope id (`whe_...` or `evt_...`): the dedupe key and the `webhook-id`.
    pub id: EventId,
    /// The topic (`event_type` of the C4P envelope, `type` of the generic one).
    pub topic: String,
    /// When it occurred per Credyt, as Credyt wrote it (RFC 3339).
    pub occurred_at: String,
    /// The connected account it is about (absent in a generic envelope of the platform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountId>,
    /// The tenant owning that account when it arrived; `None`: unroutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// `data.customer_id` with the end user's external id, when the data names a customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<WebhookCustomer>,
    /// Credyt's `data`, verbatim (numbers exact).
    pub data: serde_json::Value,
    pub received_at: DateTime<Utc>,
}

/// The end user a webhook is about, as the tenant knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookCustomer {
    pub id: CustomerId,
    /// `None` when the customer has no external id (or is not found in the account).
    pub external_id: Option<String>,
}

impl Delivery {
    /// The tenant it belongs to (`None`: a webhook no tenant owns).
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Delivery::Charge(d) => Some(&d.tenant),
            Delivery::Usage(u) => Some(&u.tenant),
            Delivery::Webhook(w) => w.tenant.as_ref(),
        }
    }
    /// The event id (a webhook's: Credyt's envelope id).
    pub fn event_id(&self) -> &EventId {
        match self {
            Delivery::Charge(d) => &d.event_id,
            Delivery::Usage(u) => &u.event.id,
            Delivery::Webhook(w) => &w.id,
        }
    }
    /// When the proxy accepted the event (or received the webhook) this delivery belongs to.
    pub fn accepted_at(&self) -> DateTime<Utc> {
        match self {
            Delivery::Charge(d) => d.accepted_at,
            Delivery::Usage(u) => u.accepted_at,
            Delivery::Webhook(w) => w.received_at,
        }
    }
}

/// Namespace for charge transaction ids (UUIDv5). Never change it: every retry, from any
/// replica and any version, must produce the same id for the same fee.
pub const TRANSACTION_NAMESPACE: Uuid = Uuid::from_u128(0x5c1e_7d0a_4b9e_4f61_9a63_2d0c_8e51_f4a7);

/// The deterministic Credyt `transaction_id` of one fee of one event of one tenant.
pub fn transaction_id(tenant: &TenantId, event: &EventId, price_id: &str) -> Uuid {
    use sha1::{Digest, Sha1};
    // UUIDv5 (RFC 9562): SHA-1 of the namespace and the name. The name length-prefixes each
    // part so ("a", "bc") and ("ab", "c") cannot collide.
    let mut sha = Sha1::new();
    sha.update(TRANSACTION_NAMESPACE.as_bytes());
    for part in [tenant.as_str(), event.as_str(), price_id] {
        sha.update((part.len() as u64).to_be_bytes());
        sha.update(part.as_bytes());
    }
    let digest = sha.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// Percent-decodes `text` once (`%XX`, hex of either case); `None` for a malformed escape or
/// bytes that are not UTF-8. Borrows when there is nothing to decode.
pub fn percent_decode(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !text.contains('%') {
        return Some(std::borrow::Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let mut b = [0u8; 1];
            hex::decode_to_slice(bytes.get(i + 1..i + 3)?, &mut b).ok()?;
            out.push(b[0]);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

/// Lowercase Crockford base32 (`0-9a-z` without `i l o u`), the alphabet of Credyt ids.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_id_is_deterministic_and_unambiguous() {
        let t = TenantId::from("acme");
        let a = transaction_id(&t, &EventId::from("e1"), "input");
        assert_eq!(a, transaction_id(&t, &EventId::from("e1"), "input"));
        assert_ne!(a, transaction_id(&t, &EventId::from("e1"), "output"));
        assert_ne!(
            transaction_id(&TenantId::from("a"), &EventId::from("bc"), "p"),
            transaction_id(&TenantId::from("ab"), &EventId::from("c"), "p")
        );
        assert_eq!(a.get_version_num(), 5);
    }

    /// Ids already sent to Credyt must come out the same from every later version: pinned.
    #[test]
    fn transaction_ids_never_change() {
        let id = transaction_id(&TenantId::from("acme"), &EventId::from("e1"), "input");
        assert_eq!(id.to_string(), "6283e60b-8591-5947-88c3-2cbd220742a1");
    }

    proptest::proptest! {
        /// Equal to RFC 9562's UUIDv5 of the length-prefixed parts, as `uuid` computes it.
        #[test]
        fn transaction_id_is_the_uuid_v5_of_its_parts(
            tenant in "\\PC{0,40}", event in "\\PC{0,80}", price in "[a-z_]{0,20}"
        ) {
            let mut name = Vec::new();
            for part in [&tenant, &event, &price] {
                name.extend_from_slice(&(part.len() as u64).to_be_bytes());
                name.extend_from_slice(part.as_bytes());
            }
            proptest::prop_assert_eq!(
                transaction_id(&TenantId::from(tenant.as_str()), &EventId::from(event.as_str()), &price),
                Uuid::new_v5(&TRANSACTION_NAMESPACE, &name)
            );
        }
    }

    #[test]
    fn trace_contexts_round_trip_as_traceparent() {
        let cx = TraceContext {
            trace_id: [0x4b; 16],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            flags: 1,
        };
        let text = cx.traceparent();
        assert_eq!(
            text,
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-00f067aa0ba902b7-01"
        );
        assert_eq!(TraceContext::from_traceparent(&text), Some(cx));
        let json = serde_json::to_string(&cx).unwrap();
        assert_eq!(serde_json::from_str::<TraceContext>(&json).unwrap(), cx);
        for bad in [
            "",
            "01-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-00f067aa0ba902b7-01",
            "00-4B4B4B4B4B4B4B4B4B4B4B4B4B4B4B4B-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0000000000000000-01",
            "00-4b4b-00f067aa0ba902b7-01",
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn data_values_keep_exact_numbers() {
        let data: EventData =
            serde_json::from_str(r#"{"n": 9007199254740993, "r": 1.005, "s": "x", "b": true}"#)
                .unwrap();
        assert_eq!(
            data["n"],
            DataValue::Number(Decimal::from(9_007_199_254_740_993_i64))
        );
        assert_eq!(data["r"].as_dimension(), "1.005");
        assert_eq!(data["s"], DataValue::String("x".into()));
        assert_eq!(data["b"].as_dimension(), "true");
    }
}
