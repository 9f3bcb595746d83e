//! Every metric name of the proxy, in one place. Labels use bounded sets only.

/// Usage events by `outcome` (accepted, duplicate, rejected).
pub const EVENTS_TOTAL: &str = "credyt_proxy_events_total";
/// Fees accepted for charging.
pub const FEES_TOTAL: &str = "credyt_proxy_fees_total";
/// End-user identities in the cache.
pub const IDENTITY_CACHED: &str = "credyt_proxy_identity_cached_customers";
