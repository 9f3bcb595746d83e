//! Wire payloads -> domain: Credyt's `UsageRequest`, checked field by field.
//!
//! The body is read as a JSON tree (numbers kept as their literal text, never through f64) and
//! each event is validated on its own, so one bad event yields a precise rejection naming its
//! index and field (`events[3].occurred_at`) while the others are still judged.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
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
    let root: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let Value::Object(mut root) = root else {
        return Err(ApiError::BadJson("the body must be a JSON object".into()));
    };
    let whole = |code, field: &str, msg: &str| {
        ApiError::Validation(vec![reject(code, field.to_string(), msg)])
    };
    let customer = match (
        root.remove("customer_id"),
        root.remove("customer_external_id"),
    ) {
        (Some(Value::String(id)), None | Some(Value::Null)) if valid_text(&id, 128) => {
            CustomerRef::Id(id)
        }
        (None | Some(Value::Null), Some(Value::String(ext))) if valid_text(&ext, 256) => {
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
                "the customer id must be a non-empty string without control characters",
            ))
        }
    };
    let events = match root.remove("events") {
        Some(Value::Array(events)) => events,
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

fn parse_event(
    i: usize,
    value: Value,
    limits: &IngestSettings,
    now: DateTime<Utc>,
) -> Result<UsageEvent, Rejection> {
    let field = |name: &str| format!("events[{i}].{name}");
    let Value::Object(mut obj) = value else {
        return Err(reject(
            "invalid_event",
            format!("events[{i}]"),
            "each event must be an object",
        ));
    };
    let id = match obj.remove("id") {
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
    let event_type = match obj.remove("event_type") {
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
    let occurred_at = match obj.remove("occurred_at") {
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
    let mut optional_text = |name: &str| -> Result<Option<String>, Rejection> {
        match obj.remove(name) {
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
    let subject = optional_text("subject")?;
    let description = optional_text("description")?;
    let data = match obj.remove("data") {
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
    match obj.remove("costs") {
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
