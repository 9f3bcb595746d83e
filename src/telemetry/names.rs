//! Every metric name of the proxy, in one place. Labels use bounded sets only.

/// Usage events by `outcome` (accepted, duplicate, rejected).
pub const EVENTS_TOTAL: &str = "credyt_proxy_events_total";
/// Fees accepted for charging.
pub const FEES_TOTAL: &str = "credyt_proxy_fees_total";
/// End-user identities in the cache.
pub const IDENTITY_CACHED: &str = "credyt_proxy_identity_cached_customers";
/// Undelivered debits in the outbox.
pub const OUTBOX_DEPTH: &str = "credyt_proxy_outbox_depth";
/// Dead letters awaiting an operator.
pub const OUTBOX_DEAD_LETTERS: &str = "credyt_proxy_outbox_dead_letters";
/// fdatasync calls of the outbox.
pub const OUTBOX_SYNCS_TOTAL: &str = "credyt_proxy_outbox_syncs_total";
/// Commit groups of the outbox.
pub const OUTBOX_GROUPS_TOTAL: &str = "credyt_proxy_outbox_groups_total";
/// Append calls of the outbox.
pub const OUTBOX_APPENDS_TOTAL: &str = "credyt_proxy_outbox_appends_total";
/// 1 when a failed write or sync stopped the outbox.
pub const OUTBOX_POISONED: &str = "credyt_proxy_outbox_poisoned";
/// Gauge: segments of the outbox's record log on disk (grows with the backlog; a few when
/// Credyt keeps up).
pub const OUTBOX_LOG_SEGMENTS: &str = "credyt_proxy_outbox_log_segments";
/// Gauge: accepted event ids not yet in the outbox's dedupe index (held in memory until their
/// log frame is durable; see the outbox's index module).
pub const OUTBOX_UNINDEXED_IDS: &str = "credyt_proxy_outbox_unindexed_ids";
/// Gauge: heap bytes of the outbox's dedupe filter (bounded; see the outbox's dedupe module).
pub const OUTBOX_DEDUPE_FILTER_BYTES: &str = "credyt_proxy_outbox_dedupe_filter_bytes";
/// Gauge: age in seconds of the oldest undelivered record (0 when none).
pub const OUTBOX_OLDEST_AGE_SECONDS: &str = "credyt_proxy_outbox_oldest_age_seconds";
/// Gauge: 1 while Credyt refuses the platform key.
pub const UPSTREAM_KEY_REFUSED: &str = "credyt_proxy_upstream_key_refused";
/// Gauge: the forwarder's concurrency limit in force (adaptive within its bounds).
pub const FORWARDER_CONCURRENCY_LIMIT: &str = "credyt_proxy_forwarder_concurrency_limit";
/// Gauge: calls to Credyt in flight.
pub const FORWARDER_IN_FLIGHT: &str = "credyt_proxy_forwarder_in_flight";
/// Gauge: records waiting for their own retry timer.
pub const FORWARDER_WAITING: &str = "credyt_proxy_forwarder_waiting_retries";
/// Gauge: the circuit breaker (0 closed, 1 open, 2 half-open).
pub const FORWARDER_BREAKER: &str = "credyt_proxy_forwarder_breaker_state";
/// Calls that delivered.
pub const FORWARDER_DELIVERED_TOTAL: &str = "credyt_proxy_forwarder_delivered_total";
/// Transient failures (each retried).
pub const FORWARDER_RETRIES_TOTAL: &str = "credyt_proxy_forwarder_retries_total";
/// Records dead-lettered by `reason` (refused, conflict, retries_exhausted).
pub const FORWARDER_DEAD_LETTERED_TOTAL: &str = "credyt_proxy_forwarder_dead_lettered_total";
