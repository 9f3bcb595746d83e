//! Fault injection and the request log, applied by one middleware around every route.
//!
//! Contract:
//! - Rules match by path prefix and optional method; the first matching rule applies. A rule
//!   adds latency and/or, with the given probabilities, answers 429 (with `Retry-After`), 500,
//!   503 (with `Retry-After`), 422, 409 (problem+json bodies), 401 (empty body, as Credyt
//!   refuses a key), or drops the connection without any HTTP answer.
//! - Latency: `latency_ms`, or with probability `slow_rate` `slow_latency_ms` instead (a slow
//!   tail: "2% of calls take 5 s"). The slow roll is independent of the status roll. The delay
//!   is an async sleep in the middleware: a slow request holds its own connection only, never a
//!   worker, so other requests are answered meanwhile.
//! - `Retry-After` is written as delay-seconds (default) or as an HTTP-date (IMF-fixdate), per
//!   `retry_after_form`.
//! - Dropping works by shutting down the request's TCP socket: at connect time the server keeps
//!   a duplicate of the socket's file descriptor in the connection data (see [`capture_socket`]);
//!   `shutdown(Both)` on it makes the peer read EOF before any response byte.
//! - `/_emulator/*` is never faulted nor logged, so tests can always reach the control API.
//! - The request log is a bounded ring plus counters per `METHOD route-pattern`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// One fault rule as accepted by `PUT /_emulator/faults`.
#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultRule {
    /// Requests whose path starts with this (e.g. `/customers`; `/` matches everything).
    pub path_prefix: String,
    /// Only this method (case-insensitive) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default)]
    pub latency_ms: u64,
    /// Probability (0..1) that a request takes `slow_latency_ms` instead of `latency_ms`,
    /// rolled independently of the status faults.
    #[serde(default)]
    pub slow_rate: f64,
    #[serde(default)]
    pub slow_latency_ms: u64,
    #[serde(default)]
    pub rate_429: f64,
    #[serde(default)]
    pub rate_500: f64,
    #[serde(default)]
    pub rate_503: f64,
    /// A permanent refusal (422 ValidationProblem), as Credyt answers a charge it will never take.
    #[serde(default)]
    pub rate_422: f64,
    /// A 409 Conflict (problem+json), which Credyt answers to a request that races another.
    #[serde(default)]
    pub rate_409: f64,
    /// A 401 with an empty body, as Credyt answers a refused API key.
    #[serde(default)]
    pub rate_401: f64,
    #[serde(default)]
    pub rate_drop: f64,
    /// `Retry-After` seconds on 429/503 answers (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// How `Retry-After` is written (default delay-seconds).
    #[serde(default)]
    pub retry_after_form: RetryAfterForm,
}

/// The two forms of `Retry-After` (RFC 9110 §10.2.3).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RetryAfterForm {
    /// `Retry-After: 1`
    #[default]
    Seconds,
    /// `Retry-After: Sun, 06 Dec 2026 19:50:00 GMT` (IMF-fixdate)
    HttpDate,
}

/// A `Retry-After` to put on an injected answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryAfter {
    pub secs: u64,
    pub form: RetryAfterForm,
}

impl RetryAfter {
    /// The header value at `now`. An HTTP-date has whole seconds only, so it is rounded up: a
    /// client that waits until that date never comes back before `secs` have passed.
    pub fn header_value(&self, now: SystemTime) -> String {
        match self.form {
            RetryAfterForm::Seconds => self.secs.to_string(),
            RetryAfterForm::HttpDate => {
                let at = now + Duration::from_secs(self.secs);
                let since_epoch = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let whole = since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0);
                let at = SystemTime::UNIX_EPOCH + Duration::from_secs(whole);
                actix_web::http::header::HttpDate::from(at).to_string()
            }
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
pub(crate) struct FaultSet {
    pub rules: Vec<FaultRule>,
}

impl FaultSet {
    /// Field errors for rates outside 0..=1 or summing above 1.
    pub fn validate(&self) -> super::error::Errors {
        let mut errors = super::error::Errors::default();
        for (i, r) in self.rules.iter().enumerate() {
            let rates = [
                ("rate_429", r.rate_429),
                ("rate_500", r.rate_500),
                ("rate_503", r.rate_503),
                ("rate_422", r.rate_422),
                ("rate_409", r.rate_409),
                ("rate_401", r.rate_401),
                ("rate_drop", r.rate_drop),
            ];
            for (name, v) in rates {
                if !(0.0..=1.0).contains(&v) {
                    errors.add(format!("rules[{i}].{name}"), "must be between 0 and 1.");
                }
            }
            if rates.iter().map(|(_, v)| v).sum::<f64>() > 1.0 + 1e-9 {
                errors.add(format!("rules[{i}]"), "rates must sum to at most 1.");
            }
            // The slow roll is separate from the status roll: not part of the sum.
            if !(0.0..=1.0).contains(&r.slow_rate) {
                errors.add(format!("rules[{i}].slow_rate"), "must be between 0 and 1.");
            } else if r.slow_rate > 0.0 && r.slow_latency_ms == 0 {
                errors.add(
                    format!("rules[{i}].slow_latency_ms"),
                    "must be set when slow_rate is above 0.",
                );
            }
            if !r.path_prefix.starts_with('/') {
                errors.add(format!("rules[{i}].path_prefix"), "must start with '/'.");
            }
        }
        errors
    }
}

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Pass,
    Status {
        status: u16,
        retry_after: Option<RetryAfter>,
    },
    Drop,
}

#[derive(Default)]
pub(crate) struct Faults {
    set: RwLock<FaultSet>,
}

impl Faults {
    pub fn replace(&self, set: FaultSet) {
        *self.set.write() = set;
    }

    pub fn current(&self) -> FaultSet {
        self.set.read().clone()
    }

    /// Latency to add and the action for `method path`.
    pub fn decide(&self, method: &str, path: &str) -> (Duration, Action) {
        self.decide_with(method, path, &mut rand::thread_rng())
    }

    /// [`Faults::decide`] with the caller's random source (seeded in tests).
    pub fn decide_with(&self, method: &str, path: &str, rng: &mut impl Rng) -> (Duration, Action) {
        let set = self.set.read();
        let Some(rule) = set.rules.iter().find(|r| {
            path.starts_with(&r.path_prefix)
                && r.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
        }) else {
            return (Duration::ZERO, Action::Pass);
        };
        let roll: f64 = rng.gen();
        // A second, independent roll for the slow tail (drawn only when the rule has one, so
        // rules without it consume the random source exactly as before).
        let slow = rule.slow_rate > 0.0 && rng.gen::<f64>() < rule.slow_rate;
        let latency = Duration::from_millis(if slow {
            rule.slow_latency_ms
        } else {
            rule.latency_ms
        });
        let retry_after = Some(RetryAfter {
            secs: rule.retry_after_secs.unwrap_or(1),
            form: rule.retry_after_form,
        });
        if roll < rule.rate_drop {
            return (latency, Action::Drop);
        }
        // Each status takes the next slice of [0, 1) after the drops.
        let statuses = [
            (rule.rate_429, 429, retry_after),
            (rule.rate_500, 500, None),
            (rule.rate_503, 503, retry_after),
            (rule.rate_422, 422, None),
            (rule.rate_409, 409, None),
            (rule.rate_401, 401, None),
        ];
        let mut edge = rule.rate_drop;
        for (rate, status, retry_after) in statuses {
            edge += rate;
            if roll < edge {
                return (
                    latency,
                    Action::Status {
                        status,
                        retry_after,
                    },
                );
            }
        }
        (latency, Action::Pass)
    }
}

/// One logged request.
#[derive(Serialize, Clone)]
pub(crate) struct RequestRecord {
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The HTTP status, or 0 when the connection was dropped by a fault.
    pub status: u16,
    /// `METHOD route-pattern`, the counter key.
    pub kind: String,
    pub time: DateTime<Utc>,
    /// The request's W3C `traceparent` header, when it carried one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

pub(crate) struct RequestLog {
    capacity: usize,
    inner: Mutex<RequestLogInner>,
}

#[derive(Default)]
struct RequestLogInner {
    ring: VecDeque<RequestRecord>,
    counters: BTreeMap<String, u64>,
    total: u64,
}

impl RequestLog {
    pub fn new(capacity: usize) -> Self {
        RequestLog {
            capacity,
            inner: Mutex::new(RequestLogInner::default()),
        }
    }

    pub fn push(&self, record: RequestRecord) {
        let mut inner = self.inner.lock();
        inner.total += 1;
        // Look up before inserting so the hot path does not allocate a key per request.
        match inner.counters.get_mut(&record.kind) {
            Some(count) => *count += 1,
            None => {
                inner.counters.insert(record.kind.clone(), 1);
            }
        }
        if self.capacity == 0 {
            return;
        }
        if inner.ring.len() >= self.capacity {
            inner.ring.pop_front();
        }
        inner.ring.push_back(record);
    }

    /// The newest `limit` records (oldest first), the counters and the total.
    pub fn snapshot(&self, limit: usize) -> (Vec<RequestRecord>, BTreeMap<String, u64>, u64) {
        let inner = self.inner.lock();
        let skip = inner.ring.len().saturating_sub(limit);
        (
            inner.ring.iter().skip(skip).cloned().collect(),
            inner.counters.clone(),
            inner.total,
        )
    }

    pub fn clear(&self) {
        *self.inner.lock() = RequestLogInner::default();
    }
}

/// The counter key for a request: the matched route pattern, with a marker for
/// `GET /customers?external_id=` lookups (external id without other filters, the 303/404
/// form) so tests can count them apart from listings.
pub(crate) fn request_kind(method: &str, pattern: Option<&str>, query: &str) -> String {
    let pattern = pattern.unwrap_or("<unmatched>");
    let lookup = query_has(query, "external_id")
        && !["customer_id", "email", "name", "status"]
            .iter()
            .any(|k| query_has(query, k));
    if pattern == "/customers" && method == "GET" && lookup {
        return "GET /customers?external_id".to_owned();
    }
    format!("{method} {pattern}")
}

/// The route pattern a path falls under, for the request log's `kind`: a direct match on the
/// path's segments (asking the router again would re-run its regular expressions on every
/// request, which was most of the emulator's CPU under load). Mirrors `routes::configure`.
pub(crate) fn route_pattern(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        ["accounts"] => "/accounts",
        ["accounts", "self"] => "/accounts/self",
        ["accounts", _] => "/accounts/{account_id}",
        ["customers"] => "/customers",
        ["customers", _] => "/customers/{customer_id}",
        ["customers", _, "wallet"] => "/customers/{customer_id}/wallet",
        ["customers", _, "wallet", "adjustments"] => "/customers/{customer_id}/wallet/adjustments",
        ["customers", _, "wallet", "charges"] => "/customers/{customer_id}/wallet/charges",
        ["customers", _, "wallet", "transactions", _] => {
            "/customers/{customer_id}/wallet/transactions/{transaction_id}"
        }
        ["customers", _, "wallet", _] => "/customers/{customer_id}/wallet/{account_id}",
        ["events"] => "/events",
        ["events", _] => "/events/{event_id}",
        ["top-ups"] => "/top-ups",
        ["billing-portal", "sessions"] => "/billing-portal/sessions",
        ["webhooks"] => "/webhooks",
        ["webhooks", _] => "/webhooks/{webhook_id}",
        _ => return None,
    })
}

fn query_has(query: &str, key: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair.split('=').next() == Some(key))
}

/// A duplicate of the connection's socket, kept in the connection data to drop it on demand.
#[cfg(unix)]
pub(crate) struct ConnKiller(std::net::TcpStream);

#[cfg(unix)]
impl ConnKiller {
    pub fn kill(&self) -> bool {
        self.0.shutdown(std::net::Shutdown::Both).is_ok()
    }
}

/// `HttpServer::on_connect` hook: keeps a duplicate fd of each plain TCP connection.
pub(crate) fn capture_socket(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            match tcp.as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    ext.insert(ConnKiller(std::net::TcpStream::from(fd)));
                }
                Err(error) => tracing::warn!(%error, "cannot keep socket for drop faults"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (conn, ext);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_patterns_follow_the_routes() {
        assert_eq!(
            route_pattern("/customers/cust_1/wallet/charges"),
            Some("/customers/{customer_id}/wallet/charges")
        );
        assert_eq!(
            route_pattern("/customers/cust_1/wallet/default%3AUSD"),
            Some("/customers/{customer_id}/wallet/{account_id}")
        );
        assert_eq!(route_pattern("/accounts/self"), Some("/accounts/self"));
        assert_eq!(route_pattern("/customers"), Some("/customers"));
        assert_eq!(route_pattern("/nope/x"), None);
    }

    fn rule(prefix: &str) -> FaultRule {
        FaultRule {
            path_prefix: prefix.into(),
            ..FaultRule::default()
        }
    }

    #[test]
    fn first_matching_rule_applies_by_prefix_and_method() {
        let faults = Faults::default();
        let mut r = rule("/customers");
        r.method = Some("post".into());
        r.rate_503 = 1.0;
        let mut all = rule("/");
        all.latency_ms = 7;
        faults.replace(FaultSet {
            rules: vec![r, all],
        });
        assert_eq!(
            faults.decide("POST", "/customers/x/wallet/charges").1,
            Action::Status {
                status: 503,
                retry_after: Some(RetryAfter {
                    secs: 1,
                    form: RetryAfterForm::Seconds
                })
            }
        );
        let (latency, action) = faults.decide("GET", "/customers/x");
        assert_eq!(action, Action::Pass);
        assert_eq!(latency, Duration::from_millis(7));
    }

    #[test]
    fn rates_are_validated() {
        let mut r = rule("/");
        r.rate_429 = 0.7;
        r.rate_500 = 0.7;
        let set = FaultSet { rules: vec![r] };
        assert!(set.validate().into_result().is_err());
    }

    #[test]
    fn new_rates_count_in_the_sum_and_slow_rate_is_checked_apart() {
        // 409 and 401 are status slices like the others: together above 1 is refused.
        let mut r = rule("/");
        r.rate_409 = 0.6;
        r.rate_401 = 0.5;
        let errors = format!("{:?}", FaultSet { rules: vec![r] }.validate().into_result());
        assert!(errors.contains("rates must sum to at most 1"), "{errors}");

        let mut r = rule("/");
        r.rate_401 = 1.5;
        let errors = format!("{:?}", FaultSet { rules: vec![r] }.validate().into_result());
        assert!(errors.contains("rules[0].rate_401"), "{errors}");

        // slow_rate is not a status share: 1.0 of slow beside 1.0 of 429 is fine.
        let mut r = rule("/");
        r.rate_429 = 1.0;
        r.slow_rate = 1.0;
        r.slow_latency_ms = 5_000;
        assert!(FaultSet { rules: vec![r] }.validate().into_result().is_ok());

        let mut r = rule("/");
        r.slow_rate = 1.2;
        r.slow_latency_ms = 5_000;
        let errors = format!("{:?}", FaultSet { rules: vec![r] }.validate().into_result());
        assert!(errors.contains("rules[0].slow_rate"), "{errors}");

        let mut r = rule("/");
        r.slow_rate = 0.02;
        let errors = format!("{:?}", FaultSet { rules: vec![r] }.validate().into_result());
        assert!(errors.contains("rules[0].slow_latency_ms"), "{errors}");
    }

    #[test]
    fn slow_rate_picks_the_slow_latency_independently_of_the_status() {
        use rand::SeedableRng;
        let faults = Faults::default();
        let mut r = rule("/");
        r.latency_ms = 50;
        r.slow_rate = 0.25;
        r.slow_latency_ms = 5_000;
        r.rate_429 = 0.5;
        faults.replace(FaultSet { rules: vec![r] });
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 40_000;
        // [slow][429]
        let mut cells = [[0u32; 2]; 2];
        for _ in 0..n {
            let (latency, action) =
                faults.decide_with("POST", "/customers/c/wallet/charges", &mut rng);
            let slow = match latency.as_millis() {
                50 => 0,
                5_000 => 1,
                other => panic!("latency {other} ms"),
            };
            let limited = match action {
                Action::Pass => 0,
                Action::Status { status: 429, .. } => 1,
                other => panic!("{other:?}"),
            };
            cells[slow][limited] += 1;
        }
        // Independent rolls: every cell near its product of shares (0.25 x 0.5 = 0.125 for
        // the slow ones, 0.75 x 0.5 = 0.375 for the others); 40k draws give about +-0.005.
        let share = |c: u32| f64::from(c) / f64::from(n);
        for (cell, expected) in [
            (cells[0][0], 0.375),
            (cells[0][1], 0.375),
            (cells[1][0], 0.125),
            (cells[1][1], 0.125),
        ] {
            assert!((share(cell) - expected).abs() < 0.015, "{cells:?}");
        }
    }

    #[test]
    fn status_slices_include_409_and_401() {
        let faults = Faults::default();
        let mut r = rule("/");
        r.rate_409 = 1.0;
        faults.replace(FaultSet { rules: vec![r] });
        assert_eq!(
            faults.decide("POST", "/customers/c/wallet/charges").1,
            Action::Status {
                status: 409,
                retry_after: None
            }
        );
        let mut r = rule("/");
        r.rate_401 = 1.0;
        faults.replace(FaultSet { rules: vec![r] });
        assert_eq!(
            faults.decide("GET", "/accounts/self").1,
            Action::Status {
                status: 401,
                retry_after: None
            }
        );
    }

    #[test]
    fn retry_after_is_written_as_seconds_or_http_date() {
        // 2026-12-06T19:49:58.250Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_586_598_250);
        let seconds = RetryAfter {
            secs: 2,
            form: RetryAfterForm::Seconds,
        };
        assert_eq!(seconds.header_value(now), "2");
        // now + 2 s = 19:50:00.250, rounded up to the next whole second.
        let date = RetryAfter {
            secs: 2,
            form: RetryAfterForm::HttpDate,
        };
        assert_eq!(date.header_value(now), "Sun, 06 Dec 2026 19:50:01 GMT");
        // On a whole second nothing is added.
        let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_586_598);
        assert_eq!(date.header_value(whole), "Sun, 06 Dec 2026 19:50:00 GMT");
        // The form is chosen per rule and travels with the decision.
        let faults = Faults::default();
        let mut r = rule("/");
        r.rate_503 = 1.0;
        r.retry_after_secs = Some(3);
        r.retry_after_form = RetryAfterForm::HttpDate;
        faults.replace(FaultSet { rules: vec![r] });
        assert_eq!(
            faults.decide("GET", "/accounts/self").1,
            Action::Status {
                status: 503,
                retry_after: Some(RetryAfter {
                    secs: 3,
                    form: RetryAfterForm::HttpDate
                })
            }
        );
    }

    #[test]
    fn fault_rules_parse_the_new_fields() {
        let set: FaultSet = serde_json::from_str(
            r#"{"rules":[{"path_prefix":"/","latency_ms":50,"slow_rate":0.02,"slow_latency_ms":5000,
                "rate_409":0.1,"rate_401":0.1,"retry_after_form":"http-date"}]}"#,
        )
        .unwrap();
        let r = &set.rules[0];
        assert_eq!((r.slow_rate, r.slow_latency_ms), (0.02, 5_000));
        assert_eq!((r.rate_409, r.rate_401), (0.1, 0.1));
        assert_eq!(r.retry_after_form, RetryAfterForm::HttpDate);
        let default: FaultRule = serde_json::from_str(r#"{"path_prefix":"/"}"#).unwrap();
        assert_eq!(default.retry_after_form, RetryAfterForm::Seconds);
        assert!(serde_json::from_str::<FaultRule>(
            r#"{"path_prefix":"/","retry_after_form":"date"}"#
        )
        .is_err());
    }

    #[test]
    fn kinds_separate_customer_lookups() {
        assert_eq!(
            request_kind("GET", Some("/customers"), "external_id=x"),
            "GET /customers?external_id"
        );
        assert_eq!(
            request_kind("GET", Some("/customers"), "limit=2"),
            "GET /customers"
        );
        assert_eq!(
            request_kind("POST", Some("/customers/{customer_id}/wallet/charges"), ""),
            "POST /customers/{customer_id}/wallet/charges"
        );
    }
}
