//! credyt-proxy: a usage-metering sidecar in front of Credyt for Platforms (C4P).
//!
//! # One usage event's path
//!
//! A tenant (a platform's customer) posts `POST /events` (Credyt-compatible, for the official
//! SDK) or `POST /v1/events` (per-event results) on the tenant port.
//!
//! 1. [`ingest`] reads the body as JSON (415 otherwise), plain or gzip (415 for another
//!    `Content-Encoding`), within the size limit measured after decompression (413), and takes
//!    the tenant key from `X-CREDYT-API-KEY` or `Authorization: Bearer`. Header limits (431)
//!    and what the HTTP/1 codec refuses by itself are problem+json too ([`ingest::conn`]).
//! 2. [`identity::tenants`] authenticates the key against the hot-reloaded tenants file (401).
//! 3. [`ingest::wire`] parses the request into [`domain`] values: every event is validated on
//!    its own (id, type, RFC 3339 time within the window, exact numbers) and duplicate ids in
//!    one request are refused. Request-level problems answer 400/422 at once.
//! 4. [`ratelimit`] takes one cell per event from the tenant's own limiter (429 with
//!    `Retry-After`, `RateLimit`, `RateLimit-Policy`; 422 `exceeds_burst` for a request that
//!    could never pass, being larger than the burst).
//! 5. [`pricing`] prices each valid event with the tenant's price book: one [`domain::Fee`] per
//!    matching price, rounded once, stamped with the book version and content hash. Pure, no
//!    I/O, over an `Arc` snapshot. A price that tiers over a period ([`pricing::period`]) leaves
//!    a part to be rated against the customer's running total by the outbox's commit (7). On `/events` any invalid or unpriceable event fails the whole
//!    request with a 422 ValidationProblem naming `events[i].field`; nothing is accepted.
//! 6. [`identity`] maps the tenant to its connected account and the end user to its Credyt
//!    customer through moka caches (the only I/O on the request path besides the append, and
//!    only on a miss), keyed so that a tenants-file reload applies to the next request. The
//!    `X-CREDYT-ACCOUNT` sent upstream comes from here only.
//! 7. The pipeline builds immutable [`domain::Debit`] records (amount, asset, deterministic
//!    `transaction_id` = UUIDv5(tenant, event id, price id)).
//! 8. For a tenant with balance gating on, [`balance`] judges each event against the end
//!    user's available balance (Credyt's, cached, less the debits the proxy holds that Credyt
//!    has not confirmed) and holds the debits of the ones it allows, atomically per customer:
//!    `/events` refuses the whole request with 402 `insufficient_balance`, `/v1/events` that
//!    event only. The holds end when the forwarder reports Credyt's answer.
//! 9. The debits go to the sink ([`ingest::sink`]):
//!    - `ack = "durable"` (default): one atomic, group-committed append to the [`outbox`]
//!      claims the event ids, rates the period-tiered fees of the new events against their
//!      running totals (moving the totals in the same write) and stores the debits; the answer
//!      waits for it to be durable per the sync policy (503 `Retry-After` if it cannot be). The [`upstream::forwarder`] then
//!      delivers each record to Credyt (`POST /customers/{id}/wallet/charges`), retrying with
//!      backoff behind a circuit breaker until Credyt confirms, or dead-lettering a permanent
//!      refusal; optionally coalescing a hot customer's fees.
//!    - `ack = "upstream"`: the charges are sent now and the answer waits for Credyt (502/503
//!      when it does not confirm; a retry with the same ids is safe).
//! 10. Every event gets exactly one [`outcome::Outcome`]: accepted (with its fees), duplicate, or
//!     rejected with a stable code; `/events` answers 204, `/v1/events` 200 with the results.
//!
//! With traces configured ([`telemetry::traces`], off by default), the request is a server
//! span continuing the caller's `traceparent`; its identity lookups, commit wait and (upstream
//! mode) charges are child spans; a record keeps the request's trace context, and the
//! forwarder's call that delivers it is a client span linked back to the request.
//!
//! Around that path, two more ways through the proxy:
//! - [`gateway`]: any other Credyt path on the tenant port. A tenant calls the Credyt endpoints
//!   its group list allows (customers, wallets, events, products) with its own key; the proxy
//!   sends each with the platform key on the tenant's own account (never an account the
//!   request names) and passes Credyt's answer back; everything else is 403.
//! - [`webhooks`]: Credyt's webhooks for connected accounts arrive on the relay's own listener,
//!   are verified, de-duplicated and recorded in the relay's own [`outbox`] before Credyt gets
//!   its 200, and are delivered to the tenant owning the account, Standard Webhooks signed.
//!
//! Errors of every stage are typed and mapped to HTTP in one table ([`ingest::problem`]):
//! RFC 7807 problem+json with a stable `code`. The operator port ([`admin`]) serves `/livez`,
//! `/readyz`, `/metrics` (every metric defined in [`telemetry::metrics`]; each stage only
//! increments or observes typed handles) and, behind the admin token, the outbox's dead letters (list, replay);
//! [`shutdown`] drains on SIGTERM/SIGINT. The [`emulator`] is an
//! independent, stateful fake of the Credyt API used by tests, the sandbox and load tests; it
//! shares no code with the proxy's client ([`upstream`]).

pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod config;
pub mod domain;
pub mod emulator;
pub mod gateway;
pub mod identity;
pub mod ingest;
pub mod outbox;
pub mod outcome;
pub mod pricing;
pub mod ratelimit;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
pub mod webhooks;
