//! Wire payloads -> domain: Credyt's `UsageRequest`, checked field by field.
//!
//! The body is read in one pass into the fields this service looks at (numbers kept as their
//! literal text, never through f64; unknown fields skipped without being built), and each event
//! is validated on its own, so one bad event yields a precise rejection naming its index and
//! field (`events[3].occurred_at`) while the others are still judged. A field's value is kept as
//! a small JSON value, so "absent", `null` and "of the wrong type" stay distinct; a key given
//! twice counts with its last value.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::IngestSettings;
use crate::domain::{DataValue, EventData, EventId, UsageEvent};
use crate::outcome::Rejection;

use super::problem::ApiError;

/// Who the events are for, as the request names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerRef {
    /// A Credyt `cust_...` id (checked to belong to the tenant's account).
    Id(String),
    /// The tenant's own id of the end user.
    ExternalId(String),
}

/// A parsed request: the customer and, per event index, a valid event or its rejection.
#[derive(Debug)]
pub struct ParsedRequest {
    pub customer: CustomerRef,
    pub events: Vec<Result<UsageEvent, Rejection>>,
}

fn reject(code: &'static str, field: String, message: impl Into<String>) -> Rejection {
    Rejection {
        code,
        field,
        message: message.into(),
    }
}

/// Parses a `UsageRequest` body. Errors that concern the request as a whole (not JSON, no
/// customer, no events array, too many events) fail the request; per-event problems become
/// per-event rejections.
pub fn parse_request(
    body: &[u8],
    limits: &IngestSettings,
    now: DateTime<Utc>,
) -> Result<ParsedRequest, ApiError> {
    if first_byte(body) != Some(b'{') {
        // Not an object: say whether it is JSON at all.
        return Err(ApiError::BadJson(
            match serde_json::from_slice::<IgnoredAny>(body) {
                Err(e) => e.to_string(),
                Ok(_) => "the body must be a JSON object".into(),
            },
        ));
    }
    let root: RawRequest<'_> =
        serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let whole = |code, field: &str, msg: &str| {
        ApiError::Validation(vec![reject(code, field.to_string(), msg)])
    };
    let customer = match (root.customer_id, root.customer_external_id) {
        (Some(Value::String(id)), None | Some(Value::Null)) if valid_customer(&id, 128) => {
            CustomerRef::Id(id)
        }
        (None | Some(Value::Null), Some(Value::String(ext))) if valid_customer(&ext, 256) => {
            CustomerRef::ExternalId(ext)
        }
        (Some(Value::String(_)), Some(Value::String(_))) => {
            return Err(whole(
                "invalid_customer",
                "customer_id",
                "give either customer_id or customer_external_id, not both",
            ))
        }
        (None | Some(Value::Null), None | Some(Value::Null)) => {
            return Err(whole(
                "missing_customer",
                "customer_external_id",
                "customer_id or customer_external_id is required",
            ))
        }
        _ => {
            return Err(whole(
                "invalid_customer",
                "customer_external_id",
                "the customer id must be a non-blank string without control characters",
            ))
        }
    };
    let events: Vec<&RawValue> = match root.events {
        Some(raw) if first_byte(raw.get().as_bytes()) == Some(b'[') => {
            serde_json::from_str(raw.get()).map_err(|e| ApiError::BadJson(e.to_string()))?
        }
        Some(_) => return Err(whole("invalid_events", "events", "events must be an array")),
        None => return Err(whole("missing_events", "events", "events is required")),
    };
    if events.is_empty() {
        return Err(whole(
            "invalid_events",
            "events",
            "events must not be empty",
        ));
    }
    if events.len() > limits.max_events_per_request {
        return Err(whole(
            "too_many_events",
            "events",
            &format!(
                "at most {} events per request",
                limits.max_events_per_request
            ),
        ));
    }
    let mut seen: HashSet<String> = HashSet::with_capacity(events.len());
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let event = parse_event(i, v, limits, now)?;
            if !seen.insert(event.id.as_str().to_string()) {
                return Err(reject(
                    "duplicate_id_in_request",
                    format!("events[{i}].id"),
                    format!(
                        "event id `{}` appears more than once in this request",
                        event.id
                    ),
                ));
            }
            Ok(event)
        })
        .collect();
    Ok(ParsedRequest { customer, events })
}

fn valid_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// A customer id or external id: text that is not only whitespace either. Credyt refuses a
/// blank customer name, and a customer created for an external id is named after it.
fn valid_customer(s: &str, max: usize) -> bool {
    valid_text(s, max) && !s.trim().is_empty()
}

fn parse_event(
    i: usize,
    raw: &RawValue,
    limits: &IngestSettings,
    now: DateTime<Utc>,
) -> Result<UsageEvent, Rejection> {
    let field = |name: &str| format!("events[{i}].{name}");
    let not_object = || {
        reject(
            "invalid_event",
            format!("events[{i}]"),
            "each event must be an object",
        )
    };
    if first_byte(raw.get().as_bytes()) != Some(b'{') {
        return Err(not_object());
    }
    // Valid JSON already (the request parsed), and an object: this cannot fail.
    let mut obj: RawEvent = serde_json::from_str(raw.get()).map_err(|_| not_object())?;
    let id = match obj.id.take() {
        Some(Value::String(id)) if valid_text(&id, limits.max_event_id_len) => id,
        Some(Value::String(_)) => {
            return Err(reject(
                "invalid_id",
                field("id"),
                format!(
                    "id must be 1 to {} characters without control characters",
                    limits.max_event_id_len
                ),
            ))
        }
        Some(_) => return Err(reject("invalid_id", field("id"), "id must be a string")),
        None => return Err(reject("missing_id", field("id"), "id is required")),
    };
    let event_type = match obj.event_type.take() {
        Some(Value::String(t)) if valid_text(&t, 256) => t,
        Some(_) => {
            return Err(reject(
                "invalid_event_type",
                field("event_type"),
                "event_type must be a non-empty string of at most 256 characters",
            ))
        }
        None => {
            return Err(reject(
                "missing_event_type",
                field("event_type"),
                "event_type is required",
            ))
        }
    };
    let occurred_at = match obj.occurred_at.take() {
        Some(Value::String(s)) => parse_time(&s, limits, now)
            .map_err(|(code, msg)| reject(code, field("occurred_at"), msg))?,
        Some(_) => {
            return Err(reject(
                "invalid_occurred_at",
                field("occurred_at"),
                "occurred_at must be an RFC 3339 string",
            ))
        }
        None => {
            return Err(reject(
                "missing_occurred_at",
                field("occurred_at"),
                "occurred_at is required",
            ))
        }
    };
    let optional_text = |name: &str, value: Option<Value>| -> Result<Option<String>, Rejection> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= limits.max_field_len => Ok(Some(s)),
            Some(_) => Err(reject(
                "invalid_field",
                field(name),
                format!(
                    "{name} must be a string of at most {} bytes",
                    limits.max_field_len
                ),
            )),
        }
    };
    let subject = optional_text("subject", obj.subject.take())?;
    let description = optional_text("description", obj.description.take())?;
    let data = match obj.data.take() {
        None | Some(Value::Null) => EventData::new(),
        Some(Value::Object(map)) => parse_data(i, map, limits)?,
        Some(_) => {
            return Err(reject(
                "invalid_data",
                field("data"),
                "data must be an object",
            ))
        }
    };
    match obj.costs.take() {
        None | Some(Value::Null) | Some(Value::Array(_)) => {}
        Some(_) => {
            return Err(reject(
                "invalid_field",
                field("costs"),
                "costs must be an array",
            ))
        }
    }
    Ok(UsageEvent {
        id: EventId::new(id),
        event_type,
        occurred_at,
        subject,
        description,
        data,
    })
}

/// The first byte of a JSON text that is not whitespace.
fn first_byte(json: &[u8]) -> Option<u8> {
    json.iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// The fields of a `UsageRequest` this service reads; the events stay raw until each is judged.
#[derive(Default)]
struct RawRequest<'a> {
    customer_id: Option<Value>,
    customer_external_id: Option<Value>,
    events: Option<&'a RawValue>,
}

/// The fields of one usage event this service reads.
#[derive(Default)]
struct RawEvent {
    id: Option<Value>,
    event_type: Option<Value>,
    occurred_at: Option<Value>,
    subject: Option<Value>,
    description: Option<Value>,
    data: Option<Value>,
    costs: Option<Value>,
}

/// Reads an object key as its index in the given names (`None`: a key this service ignores),
/// without allocating.
struct KeySeed(&'static [&'static str]);

impl<'de> de::DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| *n == key))
    }
}

const REQUEST_KEYS: &[&str] = &["customer_id", "customer_external_id", "events"];
const EVENT_KEYS: &[&str] = &[
    "id",
    "event_type",
    "occurred_at",
    "subject",
    "description",
    "data",
    "costs",
];

impl<'de: 'a, 'a> Deserialize<'de> for RawRequest<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawRequest<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RawRequest<'a>, A::Error> {
                let mut r = RawRequest::default();
                while let Some(key) = m.next_key_seed(KeySeed(REQUEST_KEYS))? {
                    match key {
                        Some(0) => r.customer_id = Some(m.next_value()?),
                        Some(1) => r.customer_external_id = Some(m.next_value()?),
                        Some(2) => r.events = Some(m.next_value()?),
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for RawEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEvent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RawEvent, A::Error> {
                let mut e = RawEvent::default();
                while let Some(key) = m.next_key_seed(KeySeed(EVENT_KEYS))? {
                    let slot = match key {
                        Some(0) => &mut e.id,
                        Some(1) => &mut e.event_type,
                        Some(2) => &mut e.occurred_at,
                        Some(3) => &mut e.subject,
                        Some(4) => &mut e.description,
                        Some(5) => &mut e.data,
                        Some(6) => &mut e.costs,
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(m.next_value()?);
                }
                Ok(e)
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_time(
    s: &str,
    limits: &IngestSettings,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, (&'static str, String)> {
    let t = DateTime::parse_from_rfc3339(s)
        .map_err(|_| {
            (
                "invalid_occurred_at",
                format!(
                    "`{s}` is not an RFC 3339 timestamp with a zone, e.g. 2026-01-05T10:15:00Z"
                ),
            )
        })?
        .with_timezone(&Utc);
    let future = chrono::Duration::from_std(limits.future_skew).unwrap_or_default();
    let past = chrono::Duration::from_std(limits.past_window).unwrap_or_default();
    if t > now + future {
        return Err((
            "occurred_at_in_future",
            format!(
                "occurred_at is more than {}s in the future",
                limits.future_skew.as_secs()
            ),
        ));
    }
    if t < now - past {
        return Err((
            "occurred_at_too_old",
            format!(
                "occurred_at is older than the accepted window of {}s",
                limits.past_window.as_secs()
            ),
        ));
    }
    Ok(t)
}

fn parse_data(
    i: usize,
    map: Map<String, Value>,
    limits: &IngestSettings,
) -> Result<EventData, Rejection> {
    if map.len() > limits.max_data_entries {
        return Err(reject(
            "invalid_data",
            format!("events[{i}].data"),
            format!("data has more than {} entries", limits.max_data_entries),
        ));
    }
    let mut data = EventData::new();
    for (key, value) in map {
        let field = format!("events[{i}].data.{key}");
        if !valid_text(&key, 128) {
            return Err(reject(
                "invalid_data",
                field,
                "data keys must be 1 to 128 characters",
            ));
        }
        let v = match value {
            Value::String(s) if s.len() <= limits.max_field_len => DataValue::String(s),
            Value::Bool(b) => DataValue::Bool(b),
            Value::Number(n) => DataValue::Number(exact_decimal(n.as_str()).ok_or_else(|| {
                reject(
                    "invalid_data",
                    field.clone(),
                    format!("`{n}` is not a number this service can hold exactly"),
                )
            })?),
            _ => {
                return Err(reject(
                    "invalid_data",
                    field,
                    "data values must be strings, booleans or numbers",
                ))
            }
        };
        data.insert(key, v);
    }
    Ok(data)
}

/// A JSON number's literal as an exact decimal (plain or exponent form), or `None` if it cannot
/// be held exactly (too many digits, out of range).
pub fn exact_decimal(literal: &str) -> Option<Decimal> {
    let Some((mantissa, exp)) = literal.split_once(['e', 'E']) else {
        return Decimal::from_str_exact(literal).ok();
    };
    let m = Decimal::from_str_exact(mantissa).ok()?;
    let exp: i64 = exp.strip_prefix('+').unwrap_or(exp).parse().ok()?;
    if exp >= 0 {
        let mut value = m;
        for _ in 0..exp.min(40) {
            value = value.checked_mul(Decimal::TEN)?;
        }
        (exp <= 40).then_some(value)
    } else {
        let scale = i64::from(m.scale()) - exp;
        let scale = u32::try_from(scale)
            .ok()
            .filter(|s| *s <= Decimal::MAX_SCALE)?;
        Decimal::try_from_i128_with_scale(m.mantissa(), scale).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn limits() -> IngestSettings {
        Settings::from_toml(
            "[credyt]\napi_key = \"k\"\n",
            std::path::Path::new("."),
            Some(Default::default()),
        )
        .unwrap()
        .ingest
    }

    fn now() -> DateTime<Utc> {
        "2026-01-05T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn exact_numbers_never_go_through_floats() {
        assert_eq!(
            exact_decimal("9007199254740993").unwrap().to_string(),
            "9007199254740993"
        );
        assert_eq!(exact_decimal("1.005").unwrap().to_string(), "1.005");
        assert_eq!(exact_decimal("5e-05").unwrap().to_string(), "0.00005");
        assert_eq!(exact_decimal("2.5E3").unwrap(), Decimal::from(2500));
        assert!(exact_decimal("1e400").is_none());
        assert!(exact_decimal("123456789012345678901234567890123").is_none());
    }

    #[test]
    fn each_event_is_judged_on_its_own() {
        let body = br#"{"customer_external_id":"u1","events":[
            {"id":"a","event_type":"t","occurred_at":"2026-01-05T11:00:00Z","data":{"n":1.005,"m":"x","b":true}},
            {"id":"b","event_type":"t","occurred_at":"yesterday"},
            {"id":"a","event_type":"t","occurred_at":"2026-01-05T11:00:00Z"},
            {"id":"c","event_type":"t","occurred_at":"2026-01-05T12:06:00Z"},
            {"id":"d","event_type":"t","occurred_at":"2026-01-05T11:00:00","data":{}},
            {"id":"e","event_type":"t","occurred_at":"2026-01-05T11:00:00+02:00","data":{"x":{"nested":1}}},
            {"id":"","event_type":"t","occurred_at":"2026-01-05T11:00:00Z"}
        ]}"#;
        let parsed = parse_request(body, &limits(), now()).unwrap();
        assert_eq!(parsed.customer, CustomerRef::ExternalId("u1".into()));
        let codes: Vec<&str> = parsed
            .events
            .iter()
            .map(|e| e.as_ref().map(|_| "ok").unwrap_or_else(|r| r.code))
            .collect();
        assert_eq!(
            codes,
            [
                "ok",
                "invalid_occurred_at",
                "duplicate_id_in_request",
                "occurred_at_in_future",
                "invalid_occurred_at",
                "invalid_data",
                "invalid_id"
            ]
        );
        let first = parsed.events[0].as_ref().unwrap();
        assert_eq!(first.data["n"], DataValue::Number(Decimal::new(1005, 3)));
        let bad = parsed.events[1].as_ref().unwrap_err();
        assert_eq!(bad.field, "events[1].occurred_at");
    }

    fn codes_of(body: &str) -> Vec<String> {
        let parsed = parse_request(body.as_bytes(), &limits(), now()).unwrap();
        parsed
            .events
            .iter()
            .map(|e| match e {
                Ok(ev) => format!("ok:{}", ev.id),
                Err(r) => format!("{}@{}", r.code, r.field),
            })
            .collect()
    }

    fn bad_json(body: &str) -> String {
        match parse_request(body.as_bytes(), &limits(), now()) {
            Err(ApiError::BadJson(m)) => m,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn absent_null_and_wrong_types_stay_distinct() {
        const T: &str = r#""event_type":"t","occurred_at":"2026-01-05T11:00:00Z""#;
        let body = format!(
            r#"{{"customer_id":null,"customer_external_id":"u","events":[
                {{{T}}},
                {{"id":null,{T}}},
                {{"id":7,{T}}},
                {{"id":"a","event_type":null,"occurred_at":"2026-01-05T11:00:00Z"}},
                {{"id":"b","event_type":"t"}},
                {{"id":"c",{T},"subject":null,"description":"d","data":null,"costs":null}},
                {{"id":"d",{T},"subject":5}},
                {{"id":"e",{T},"data":[1]}},
                {{"id":"f",{T},"costs":[{{"x":1}}]}},
                {{"id":"g",{T},"costs":{{}}}},
                7, "x", null, [], 1.5e3
            ]}}"#
        );
        assert_eq!(
            codes_of(&body),
            [
                "missing_id@events[0].id",
                "invalid_id@events[1].id",
                "invalid_id@events[2].id",
                "invalid_event_type@events[3].event_type",
                "missing_occurred_at@events[4].occurred_at",
                "ok:c",
                "invalid_field@events[6].subject",
                "invalid_data@events[7].data",
                "ok:f",
                "invalid_field@events[9].costs",
                "invalid_event@events[10]",
                "invalid_event@events[11]",
                "invalid_event@events[12]",
                "invalid_event@events[13]",
                "invalid_event@events[14]",
            ]
        );
    }

    #[test]
    fn keys_count_with_their_last_value_and_unknown_ones_are_skipped() {
        let body = r#"{"customer_external_id":"old","events":"no","customer_external_id":"u",
            "extra":{"deep":[1,{"x":null}]},"events":[
            {"id":"first","id":"second","event_type":"t","occurred_at":"2026-01-05T11:00:00Z",
             "unknown":{"a":[1,2,{"b":"c"}]},"\u0069\u0064":"escaped",
             "data":{"n":1,"n":"two"}}
        ]}"#;
        let parsed = parse_request(body.as_bytes(), &limits(), now()).unwrap();
        assert_eq!(parsed.customer, CustomerRef::ExternalId("u".into()));
        let ev = parsed.events[0].as_ref().unwrap();
        assert_eq!(ev.id.as_str(), "escaped", "an escaped key is the same key");
        assert_eq!(ev.data["n"], DataValue::String("two".into()));
    }

    #[test]
    fn a_body_that_is_not_one_json_object_is_bad_json() {
        for body in ["[]", " 1", "\"x\"", "null", "  [{\"id\":1}]"] {
            assert_eq!(bad_json(body), "the body must be a JSON object", "{body}");
        }
        for body in [
            "",
            "{not json",
            r#"{"customer_id":"c","events":[{"id":"a",}]}"#,
            r#"{"customer_id":"c","events":[]} trailing"#,
            r#"{"customer_id":"c","events":[{"id":"a"}]"#,
            "[1,",
        ] {
            assert_ne!(bad_json(body), "the body must be a JSON object", "{body}");
        }
        for (body, code) in [
            (r#"{"customer_id":"c","events":null}"#, "invalid_events"),
            (r#"{"customer_id":"c","events":{}}"#, "invalid_events"),
            (r#"{"customer_id":"c","events":12.50}"#, "invalid_events"),
            (r#"{"customer_id":"c"}"#, "missing_events"),
            (r#"{"customer_id":1,"events":[]}"#, "invalid_customer"),
            (r#"{"customer_id":" ","events":[{}]}"#, "invalid_customer"),
            (
                r#"{"customer_external_id":"\u00a0\u3000","events":[{}]}"#,
                "invalid_customer",
            ),
            (r#"{"events":[{}]}"#, "missing_customer"),
        ] {
            match parse_request(body.as_bytes(), &limits(), now()) {
                Err(ApiError::Validation(v)) => assert_eq!(v[0].code, code, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn request_level_problems_fail_the_request() {
        let l = limits();
        assert!(matches!(
            parse_request(b"{not json", &l, now()),
            Err(ApiError::BadJson(_))
        ));
        assert!(matches!(
            parse_request(b"[]", &l, now()),
            Err(ApiError::BadJson(_))
        ));
        assert!(matches!(
            parse_request(br#"{"events":[]}"#, &l, now()),
            Err(ApiError::Validation(_))
        ));
        let many = format!(
            r#"{{"customer_id":"cust_1","events":[{}]}}"#,
            vec![r#"{"id":"x"}"#; 101].join(",")
        );
        assert!(matches!(
            parse_request(many.as_bytes(), &l, now()),
            Err(ApiError::Validation(v)) if v[0].code == "too_many_events"
        ));
    }
}
