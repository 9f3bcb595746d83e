//! The gateway's endpoint table: which Credyt endpoints a tenant may call, and how a request
//! path is matched against them.
//!
//! Matching is strict, on the path as sent: split on `/`, every segment percent-decoded once.
//! A path with an empty segment (`//`), a `.` or `..` segment, an encoded `/` or `\` (or any
//! control character) in a segment, or a segment that is not valid UTF-8 matches nothing.
//! Literal segments match exactly (case included: Credyt's paths are lowercase). A path that
//! matches no endpoint but lies under one of Credyt's resources is a Credyt endpoint the tenant
//! may not call (denied); any other path is not an endpoint at all.

use std::borrow::Cow;

use crate::domain::percent_decode;

/// A group of endpoints a platform allows a tenant, by name in the tenants file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    CustomersRead,
    CustomersWrite,
    WalletsRead,
    EventsRead,
    ProductsRead,
    UsageSimulate,
    /// `POST /customers/{id}/wallet/adjustments`: moves money (off by default).
    WalletsAdjust,
    /// `POST /customers/{id}/wallet/charges`: moves money (off by default).
    WalletsCharge,
}

impl Group {
    pub const ALL: [Group; 8] = [
        Group::CustomersRead,
        Group::CustomersWrite,
        Group::WalletsRead,
        Group::EventsRead,
        Group::ProductsRead,
        Group::UsageSimulate,
        Group::WalletsAdjust,
        Group::WalletsCharge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Group::CustomersRead => "customers.read",
            Group::CustomersWrite => "customers.write",
            Group::WalletsRead => "wallets.read",
            Group::EventsRead => "events.read",
            Group::ProductsRead => "products.read",
            Group::UsageSimulate => "usage.simulate",
            Group::WalletsAdjust => "wallets.adjust",
            Group::WalletsCharge => "wallets.charge",
        }
    }

    pub fn parse(s: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// Endpoints that move money: never allowed unless a platform names them for a tenant.
    pub fn moves_money(self) -> bool {
        matches!(self, Group::WalletsAdjust | Group::WalletsCharge)
    }

    /// What a tenant without a `gateway.allow` list may call: everything but moving money.
    pub fn default_allowed() -> Vec<Group> {
        Group::ALL
            .into_iter()
            .filter(|g| !g.moves_money())
            .collect()
    }
}

/// An HTTP method the table knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Patch,
}

/// One endpoint a tenant may be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// A bounded name for metrics, logs and spans (e.g. `customers.get`).
    pub operation: &'static str,
    pub method: Method,
    /// Segments; `*` is one id segment.
    pub pattern: &'static [&'static str],
    pub group: Group,
    /// `METHOD /route/{param}`, as the OpenAPI document writes it: the server span's name.
    pub name: &'static str,
}

const fn ep(
    operation: &'static str,
    method: Method,
    pattern: &'static [&'static str],
    group: Group,
    name: &'static str,
) -> Endpoint {
    Endpoint {
        operation,
        method,
        pattern,
        group,
        name,
    }
}

use Group as G;
use Method as M;

/// Every endpoint the gateway can pass through. Order matters where a literal and an id could
/// both match (`wallet/transactions/{id}` before `wallet/{accountId}/...`).
pub const ENDPOINTS: &[Endpoint] = &[
    ep(
        "customers.list",
        M::Get,
        &["customers"],
        G::CustomersRead,
        "GET /customers",
    ),
    ep(
        "customers.create",
        M::Post,
        &["customers"],
        G::CustomersWrite,
        "POST /customers",
    ),
    ep(
        "customers.get",
        M::Get,
        &["customers", "*"],
        G::CustomersRead,
        "GET /customers/{customerId}",
    ),
    ep(
        "customers.update",
        M::Patch,
        &["customers", "*"],
        G::CustomersWrite,
        "PATCH /customers/{customerId}",
    ),
    ep(
        "wallet.get",
        M::Get,
        &["customers", "*", "wallet"],
        G::WalletsRead,
        "GET /customers/{customerId}/wallet",
    ),
    ep(
        "wallet.transaction",
        M::Get,
        &["customers", "*", "wallet", "transactions", "*"],
        G::WalletsRead,
        "GET /customers/{customerId}/wallet/transactions/{transactionId}",
    ),
    ep(
        "wallet.adjust",
        M::Post,
        &["customers", "*", "wallet", "adjustments"],
        G::WalletsAdjust,
        "POST /customers/{customerId}/wallet/adjustments",
    ),
    ep(
        "wallet.charge",
        M::Post,
        &["customers", "*", "wallet", "charges"],
        G::WalletsCharge,
        "POST /customers/{customerId}/wallet/charges",
    ),
    ep(
        "wallet.account",
        M::Get,
        &["customers", "*", "wallet", "*"],
        G::WalletsRead,
        "GET /customers/{customerId}/wallet/{accountId}",
    ),
    ep(
        "wallet.grants",
        M::Get,
        &["customers", "*", "wallet", "*", "grants"],
        G::WalletsRead,
        "GET /customers/{customerId}/wallet/{accountId}/grants",
    ),
    ep(
        "events.list",
        M::Get,
        &["events"],
        G::EventsRead,
        "GET /events",
    ),
    ep(
        "events.get",
        M::Get,
        &["events", "*"],
        G::EventsRead,
        "GET /events/{eventId}",
    ),
    ep(
        "products.list",
        M::Get,
        &["products"],
        G::ProductsRead,
        "GET /products",
    ),
    ep(
        "products.get",
        M::Get,
        &["products", "*"],
        G::ProductsRead,
        "GET /products/{productId}",
    ),
    ep(
        "products.version",
        M::Get,
        &["products", "*", "*"],
        G::ProductsRead,
        "GET /products/{productId}/{version}",
    ),
    ep(
        "usage.simulate",
        M::Post,
        &["products", "*", "*", "simulate-usage"],
        G::UsageSimulate,
        "POST /products/{productId}/{version}/simulate-usage",
    ),
];

/// Credyt's resources: a path under one of these that matches no endpoint above is a Credyt
/// endpoint a tenant may not call (403), not an unknown path (404).
pub const CREDYT_RESOURCES: &[&str] = &[
    "accounts",
    "assets",
    "billing-portal",
    "customers",
    "events",
    "products",
    "top-ups",
    "vendors",
    "webhooks",
];

/// Credyt's sub-resource words that no endpoint of the table passes on
/// (`/products/{id}/subscribers`, `/customers/{id}/stats`, ...): never taken for an id.
const CREDYT_WORDS: &[&str] = &[
    "self",
    "stats",
    "subscribers",
    "subscriptions",
    "sessions",
    "test",
    "rates",
    "quote",
    "events",
];

/// Whether `segment` is a literal of some endpoint's pattern, or another word of Credyt's.
fn is_reserved(segment: &str) -> bool {
    CREDYT_WORDS.contains(&segment)
        || ENDPOINTS
            .iter()
            .flat_map(|e| e.pattern.iter())
            .any(|p| *p != "*" && *p == segment)
}

/// How a request path relates to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matched {
    /// An endpoint of the table, with the path's decoded id segments in order.
    Endpoint(&'static Endpoint, Vec<String>),
    /// Under a Credyt resource (or a path trick that could be), but no endpoint of the table.
    Denied,
    /// Not a Credyt path.
    NotCredyt,
}

/// Matches `method` and the raw (still percent-encoded) `path`.
pub fn match_path(method: &str, path: &str) -> Matched {
    let Some(rest) = path.strip_prefix('/') else {
        return Matched::Denied;
    };
    let mut segments = Vec::new();
    for raw in rest.split('/') {
        match decode_segment(raw) {
            Some(s) => segments.push(s),
            None => return denied_or_not(rest),
        }
    }
    let method = match method {
        "GET" => M::Get,
        "POST" => M::Post,
        "PATCH" => M::Patch,
        _ => return denied_or_not(rest),
    };
    for e in ENDPOINTS {
        if e.method != method || e.pattern.len() != segments.len() {
            continue;
        }
        let mut ids = Vec::new();
        let fits = e.pattern.iter().zip(&segments).all(|(p, s)| {
            if *p == "*" {
                // An id is never one of the table's own words: `wallet/adjustments` is the
                // adjustments endpoint (POST only), not a wallet account named so.
                ids.push(s.to_string());
                !is_reserved(s)
            } else {
                p == s
            }
        });
        if fits {
            return Matched::Endpoint(e, ids);
        }
    }
    denied_or_not(rest)
}

/// The methods the table has for `path` (whatever the method asked), as an `Allow` value:
/// `None` when no endpoint has this path. `also_post`: the path is also served for `POST`
/// elsewhere (`/events`).
pub fn allow_for(path: &str, also_post: bool) -> Option<&'static str> {
    let mut methods = [false; 3];
    for (i, m) in ["GET", "PATCH", "POST"].iter().enumerate() {
        methods[i] = matches!(match_path(m, path), Matched::Endpoint(..));
    }
    methods[2] |= also_post;
    match methods {
        [true, false, false] => Some("GET"),
        [false, true, false] => Some("PATCH"),
        [false, false, true] => Some("POST"),
        [true, true, false] => Some("GET, PATCH"),
        [true, false, true] => Some("GET, POST"),
        [false, true, true] => Some("PATCH, POST"),
        [true, true, true] => Some("GET, PATCH, POST"),
        [false, false, false] => None,
    }
}

/// A path that is not an endpoint: denied when its first segment, however spelled (case,
/// encoding), names a Credyt resource; otherwise not a Credyt path at all.
fn denied_or_not(rest: &str) -> Matched {
    // The first segment that says anything (`//customers`, `/./customers` say `customers`).
    let first = rest
        .split('/')
        .map(|seg| {
            percent_decode(seg)
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_default()
        })
        .map(|seg| {
            seg.trim_matches(|c: char| c == '.' || c == '/' || c == '\\')
                .to_string()
        })
        .find(|seg| !seg.is_empty())
        .unwrap_or_default();
    if CREDYT_RESOURCES.contains(&first.as_str()) {
        Matched::Denied
    } else {
        Matched::NotCredyt
    }
}

/// One segment, decoded; `None` for what must never match: empty, `.`, `..`, or holding a
/// `/`, `\`, a control character or invalid UTF-8 once decoded.
fn decode_segment(raw: &str) -> Option<Cow<'_, str>> {
    let s = percent_decode(raw)?;
    let bad = s.is_empty()
        || s == "."
        || s == ".."
        || s.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    (!bad).then_some(s)
}

/// Encodes one id segment for the path sent upstream.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: &str, path: &str) -> Option<&'static str> {
        match match_path(method, path) {
            Matched::Endpoint(e, _) => Some(e.operation),
            _ => None,
        }
    }

    #[test]
    fn the_allowed_endpoints_match_with_their_ids() {
        assert_eq!(op("GET", "/customers"), Some("customers.list"));
        assert_eq!(op("PATCH", "/customers/cust_1"), Some("customers.update"));
        assert_eq!(
            op("GET", "/customers/cust_1/wallet/default%3AUSD"),
            Some("wallet.account")
        );
        assert_eq!(
            op("GET", "/customers/cust_1/wallet/transactions/t1"),
            Some("wallet.transaction")
        );
        assert_eq!(
            op("GET", "/customers/c/wallet/default:USD/grants"),
            Some("wallet.grants")
        );
        assert_eq!(
            op("POST", "/products/p/2/simulate-usage"),
            Some("usage.simulate")
        );
        assert_eq!(
            match_path("GET", "/customers/cust_1/wallet/default%3AUSD"),
            Matched::Endpoint(
                &ENDPOINTS[8],
                vec!["cust_1".to_string(), "default:USD".to_string()]
            )
        );
    }

    #[test]
    fn platform_endpoints_and_path_tricks_are_denied() {
        for (method, path) in [
            ("GET", "/accounts"),
            ("POST", "/accounts"),
            ("GET", "/accounts/self"),
            ("POST", "/webhooks"),
            ("POST", "/top-ups"),
            ("GET", "/assets"),
            ("GET", "/vendors"),
            ("POST", "/billing-portal/sessions"),
            ("DELETE", "/customers/cust_1"),
            ("PUT", "/customers/cust_1"),
            ("GET", "/customers/cust_1/stats"),
            ("GET", "/customers/cust_1/wallet/adjustments"),
            ("GET", "/customers/cust_1/wallet/charges"),
            ("GET", "/products/p1/subscribers"),
            ("GET", "/customers/stats"),
            ("POST", "/products"),
            ("GET", "/Customers"),
            ("GET", "/CUSTOMERS/cust_1"),
            ("GET", "//customers"),
            ("GET", "/customers//wallet"),
            ("GET", "/customers/../accounts"),
            ("GET", "/customers/%2E%2E/accounts"),
            ("GET", "/customers/a%2Fb/wallet"),
            ("GET", "/customers/a%5Cb"),
            ("GET", "/customers/%00"),
            ("GET", "/customers/%zz"),
            ("GET", "/customers/%C3"),
            ("GET", "/%61ccounts"),
            ("GET", "/customers/"),
            ("GET", "/./customers"),
            ("GET", "/%2E/accounts"),
        ] {
            assert_eq!(match_path(method, path), Matched::Denied, "{method} {path}");
        }
    }

    #[test]
    fn other_paths_are_not_credyt_paths() {
        assert_eq!(match_path("GET", "/no/such/route"), Matched::NotCredyt);
        assert_eq!(match_path("GET", "/favicon.ico"), Matched::NotCredyt);
        assert_eq!(match_path("GET", "/"), Matched::NotCredyt);
    }

    #[test]
    fn money_is_off_by_default_and_groups_round_trip() {
        let default = Group::default_allowed();
        assert!(!default.contains(&Group::WalletsAdjust));
        assert!(!default.contains(&Group::WalletsCharge));
        for g in Group::ALL {
            assert_eq!(Group::parse(g.as_str()), Some(g));
        }
    }

    #[test]
    fn each_name_is_its_method_and_pattern() {
        for e in ENDPOINTS {
            let (method, route) = e.name.split_once(' ').unwrap();
            let m = match e.method {
                Method::Get => "GET",
                Method::Post => "POST",
                Method::Patch => "PATCH",
            };
            assert_eq!(method, m, "{}", e.name);
            let segments: Vec<&str> = route
                .trim_start_matches('/')
                .split('/')
                .map(|s| if s.starts_with('{') { "*" } else { s })
                .collect();
            assert_eq!(segments, e.pattern, "{}", e.name);
        }
    }

    #[test]
    fn segments_are_encoded_for_upstream() {
        assert_eq!(encode_segment("default:USD"), "default:USD");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
