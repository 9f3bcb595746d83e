//! Every metric name of the proxy, in one place. Labels use bounded sets only.

pub const EVENTS_TOTAL: &str = "credyt_proxy_events_total";
pub const REQUESTS_TOTAL: &str = "credyt_proxy_requests_total";
pub const UPSTREAM_REQUESTS_TOTAL: &str = "credyt_proxy_upstream_requests_total";
pub const IDENTITY_LOOKUPS_TOTAL: &str = "credyt_proxy_identity_lookups_total";
pub const OUTBOX_DEPTH: &str = "credyt_proxy_outbox_depth";
