//! The hot path of one `POST /events`, piece by piece, and whole without the network.
//!
//! Run with `cargo bench --bench hot_path`; figures are in `benches/README.md`.
//!
//! Pieces: body parse (1 and 100 events), tenant authentication (SHA-256 of the key + map),
//! rate-limit check, identity hit (warm moka cache), pricing one event, one outbox append
//! (`sync = interval`, one appender: page-cache write + group-commit hand-off), and one whole
//! request through the real routes (`actix_web::test`, `ingest::routes`, durable sink, warm
//! identity cache; identity misses go to an in-process Credyt emulator, warmed before timing).
//! The whole request again with traces on (`whole_request_1_event_traced_*`: sampled at 100%
//! and 1%, exported over OTLP/HTTP to a receiver on a thread of its own that answers 200).
//! Period tiers against the same tiers per event (`price_1_event_{tiered,period}`,
//! `whole_request_1_event_{tiered,period}`): a book written for the bench, the same outbox.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The binary's allocator (see `src/main.rs`), so these figures match what it runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::net::TcpListener;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{test, web, App};
use credyt_proxy::balance::Gate;
use credyt_proxy::config::traces::{SamplerSetting, TraceSettings};
use credyt_proxy::config::Settings;
use credyt_proxy::domain::AccountId;
use credyt_proxy::emulator::{EmulatorConfig, Seed, SeedAccount};
use credyt_proxy::identity::{Identity, Tenants};
use credyt_proxy::ingest::sink::Sink;
use credyt_proxy::ingest::wire::parse_request;
use credyt_proxy::ingest::{self, AppState};
use credyt_proxy::outbox::{Outbox, OutboxSettings, SyncPolicy};
use credyt_proxy::pricing::Pricing;
use credyt_proxy::ratelimit::{TenantLimiter, TenantQuota};
use credyt_proxy::telemetry::metrics::Metrics;
use credyt_proxy::telemetry::traces::Traces;
use credyt_proxy::upstream::CredytClient;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const KEY: &str = "cpk_bench_key_not_a_secret";
/// A second tenant on the same account, with balance gating on (an overdraft allowance so
/// large that nothing is refused: every event takes the whole judging path).
const GATED_KEY: &str = "cpk_bench_gated_key_not_a_secret";
const ACCOUNT: &str = "acc_4benchbenchbenchbenchbench";
const PLATFORM_KEY: &str = "bench-platform-key";

fn body(n: usize, tag: &str, seq: u64) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":"{tag}-{seq}-{i}","event_type":"video_promoted","occurred_at":"{now}"}}"#
            )
        })
        .collect();
    format!(
        r#"{{"customer_external_id":"u1","events":[{}]}}"#,
        events.join(",")
    )
    .into_bytes()
}

fn quota() -> TenantQuota {
    TenantQuota {
        per_second: NonZeroU32::new(u32::MAX).unwrap(),
        burst: NonZeroU32::new(u32::MAX).unwrap(),
    }
}

struct Fixture {
    state: Arc<AppState>,
    _emulator: credyt_proxy::emulator::RunningEmulator,
    _dir: tempfile::TempDir,
}

/// Assembles the request-path state from its public parts (there is no public constructor of
/// `AppState` outside `Application::build`, which also binds ports and starts the forwarder).
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let emulator = credyt_proxy::emulator::start(
        EmulatorConfig {
            platform_keys: vec![PLATFORM_KEY.into()],
            ..Default::default()
        },
        listener,
    )
    .await
    .unwrap();
    emulator
        .apply_seed(&Seed {
            accounts: vec![SeedAccount {
                id: Some(ACCOUNT.into()),
                name: "bench".into(),
                external_id: Some("bench".into()),
                metadata: None,
                customers: vec![],
            }],
            ..Default::default()
        })
        .unwrap();
    let tenants_file = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants_file,
        format!(
            "[[tenants]]\nid = \"bench\"\nkey_hashes = [\"{}\"]\naccount = \"{ACCOUNT}\"\n\
             create_customers = true\nrate_limit = {{ per_second = 1000000000, burst = 1000000000 }}\n\
             [[tenants]]\nid = \"bench-gated\"\nkey_hashes = [\"{}\"]\naccount = \"{ACCOUNT}\"\n\
             create_customers = true\nrate_limit = {{ per_second = 1000000000, burst = 1000000000 }}\n\
             gate = {{ mode = \"balance\", min_available = \"-1000000000000\" }}\n",
            credyt_proxy::identity::tenants::key_hash(KEY),
            credyt_proxy::identity::tenants::key_hash(GATED_KEY)
        ),
    )
    .unwrap();
    let pricing_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pricing");
    let settings = Settings::from_toml(
        &format!(
            "[credyt]\nbase_url = \"{}\"\napi_key = \"{PLATFORM_KEY}\"\n[tenants]\nfile = \"{}\"\n\
             [pricing]\ndir = \"{pricing_dir}\"\n[balance]\nttl_ms = 3600000\n",
            emulator.url(),
            tenants_file.display()
        ),
        dir.path(),
        Some(Default::default()),
    )
    .unwrap();
    let settings = Arc::new(settings);
    let tenants = Arc::new(Tenants::load(&settings.tenants.file, quota()).unwrap());
    let pricing = Arc::new(Pricing::load(&settings.pricing.dir).unwrap());
    // Instrumented as `Application::build` does it (the figures include the metrics).
    let metrics = Metrics::new(&settings.telemetry);
    let client =
        CredytClient::with_metrics(&settings.credyt, Some(metrics.upstream.clone())).unwrap();
    let identity = Arc::new(
        Identity::new(client.clone(), &settings.identity).with_metrics(metrics.identity.clone()),
    );
    let gate = Arc::new(Gate::new(
        client,
        settings.balance.clone(),
        metrics.balance.clone(),
    ));
    let outbox = Outbox::open(OutboxSettings {
        sync: SyncPolicy::Interval(Duration::from_millis(500)),
        max_pending: usize::MAX,
        // as the proxy runs `interval` (segments are preallocated with `always` only)
        log_preallocate: false,
        metrics: Some(metrics.outbox.clone()),
        ..OutboxSettings::new(dir.path().join("outbox"))
    })
    .unwrap();
    let state = Arc::new(AppState {
        settings,
        tenants,
        identity,
        pricing,
        sink: Sink::Durable(outbox.clone()),
        outbox: Some(outbox),
        metrics: Arc::new(metrics),
        gate,
    });
    Fixture {
        state,
        _emulator: emulator,
        _dir: dir,
    }
}

fn pieces(c: &mut Criterion) {
    let sys = actix_web::rt::System::new();
    let fx = sys.block_on(fixture());
    let state = fx.state.clone();
    let limits = state.settings.ingest.clone();
    let now = chrono::Utc::now();

    let mut g = c.benchmark_group("hot_path");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    let one = body(1, "p", 0);
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_1_event", |b| {
        b.iter(|| parse_request(black_box(&one), &limits, now).unwrap())
    });
    let hundred = body(100, "p", 0);
    g.throughput(Throughput::Elements(100));
    g.bench_function("parse_100_events", |b| {
        b.iter(|| parse_request(black_box(&hundred), &limits, now).unwrap())
    });
    g.throughput(Throughput::Elements(1));

    let table = state.tenants.current();
    g.bench_function("authenticate", |b| {
        b.iter(|| table.authenticate(black_box(KEY)).unwrap().id.clone())
    });

    let limiter = TenantLimiter::new(quota());
    g.bench_function("rate_limit_check", |b| {
        b.iter(|| limiter.check(black_box(1)).unwrap())
    });

    let account = AccountId::new(ACCOUNT);
    let identity = state.identity.clone();
    sys.block_on(identity.customer_by_external_id(&account, "u1", true))
        .unwrap();
    g.bench_function("identity_hit", |b| {
        b.iter(|| {
            sys.block_on(identity.customer_by_external_id(&account, black_box("u1"), true))
                .unwrap()
        })
    });

    let event = parse_request(&one, &limits, now)
        .unwrap()
        .events
        .remove(0)
        .unwrap();
    let pricing = state.pricing.current();
    g.bench_function("price_1_event", |b| {
        b.iter(|| {
            pricing
                .price(black_box("bench"), black_box(&event))
                .unwrap()
        })
    });

    // One whole request through the real routes, no network: fresh event id per iteration.
    // As `Application::build` assembles it: the trace middleware is there, without a dispatch.
    let app = sys.block_on(test::init_service(
        App::new()
            .app_data(web::Data::from(state.clone()))
            .wrap(ingest::TraceRequests::new(None))
            .configure(ingest::routes),
    ));
    let seq = AtomicU64::new(0);
    let request_as = |key: &str, n: usize| {
        let b = body(n, "w", seq.fetch_add(1, Ordering::Relaxed));
        test::TestRequest::post()
            .uri("/events")
            .insert_header(("content-type", "application/json"))
            .insert_header(("x-credyt-api-key", key))
            .set_payload(b)
            .to_request()
    };
    let request = |n: usize| request_as(KEY, n);
    // warm: identity miss + customer creation on the emulator
    let resp = sys.block_on(test::call_service(&app, request(1)));
    assert_eq!(resp.status(), 204);
    g.bench_function("whole_request_1_event", |b| {
        b.iter(|| {
            let resp = sys.block_on(test::call_service(&app, request(1)));
            assert_eq!(resp.status(), 204);
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("whole_request_100_events", |b| {
        b.iter(|| {
            let resp = sys.block_on(test::call_service(&app, request(100)));
            assert_eq!(resp.status(), 204);
        })
    });
    g.throughput(Throughput::Elements(1));

    // The same requests by a tenant with balance gating on, its end user's balance cached
    // (read once from the emulator here, then kept for `balance.ttl_ms`). Nothing confirms the
    // holds (no forwarder runs), so each accepted debit stays held, as while Credyt lags.
    let resp = sys.block_on(test::call_service(&app, request_as(GATED_KEY, 1)));
    assert_eq!(resp.status(), 204);
    g.bench_function("whole_request_1_event_gated", |b| {
        b.iter(|| {
            let resp = sys.block_on(test::call_service(&app, request_as(GATED_KEY, 1)));
            assert_eq!(resp.status(), 204);
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("whole_request_100_events_gated", |b| {
        b.iter(|| {
            let resp = sys.block_on(test::call_service(&app, request_as(GATED_KEY, 100)));
            assert_eq!(resp.status(), 204);
        })
    });
    g.throughput(Throughput::Elements(1));

    // The same request with traces on: a server span and its `outbox commit` child per
    // request, exported to a local OTLP receiver (which answers 200 without decoding).
    let receiver = otlp_receiver();
    for (label, ratio) in [("100pct", 1.0), ("1pct", 0.01)] {
        let traces = Traces::start(
            &TraceSettings {
                endpoint: format!("http://{receiver}/v1/traces"),
                service_name: "bench".into(),
                resource_attributes: Vec::new(),
                sampler: SamplerSetting::ParentBasedTraceIdRatio(ratio),
                max_queue_size: 2048,
                max_export_batch_size: 512,
                schedule_delay: Duration::from_secs(5),
                export_timeout: Duration::from_secs(10),
            },
            &credyt_proxy::config::LogSettings {
                format: credyt_proxy::config::LogFormat::Pretty,
                filter: "off".into(),
            },
        )
        .unwrap();
        let traced_app = sys.block_on(test::init_service(
            App::new()
                .app_data(web::Data::from(state.clone()))
                .wrap(ingest::TraceRequests::new(Some(traces.dispatch().clone())))
                .configure(ingest::routes),
        ));
        g.bench_function(format!("whole_request_1_event_traced_{label}"), |b| {
            b.iter(|| {
                let resp = sys.block_on(test::call_service(&traced_app, request(1)));
                assert_eq!(resp.status(), 204);
            })
        });
        let stats = traces.stats().clone();
        traces.shutdown();
        eprintln!(
            "traces {label}: queued={} exported={} dropped={} failed_batches={}",
            stats.queued.load(Ordering::Relaxed),
            stats.exported.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed),
            stats.failed_batches.load(Ordering::Relaxed),
        );
    }

    // One outbox append (a whole accepted event with its debit), one appender, interval sync.
    let outbox = state.outbox.clone().unwrap();
    let accepted = {
        let resp = sys.block_on(test::call_service(&app, request(1)));
        assert_eq!(resp.status(), 204);
        // Reuse the shape the pipeline builds: take one pending record from the queue.
        outbox.next_batch(1)
    };
    let delivery = accepted[0].delivery.clone();
    outbox.release(&[accepted[0].seq]);
    g.bench_function("outbox_append_1_event", |b| {
        b.iter(|| {
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let e = credyt_proxy::outbox::AcceptedEvent {
                tenant: "bench".into(),
                event_id: credyt_proxy::domain::EventId::new(format!("a-{n}")),
                deliveries: vec![delivery.clone()],
                totals: Vec::new(),
            };
            sys.block_on(outbox.append(vec![e])).unwrap()
        })
    });
    period_tiers(&mut g, &sys, &fx, &seq);
    g.finish();
    let stats = outbox.stats();
    eprintln!(
        "outbox: appends={} groups={} syncs={} depth={}",
        stats.appends,
        stats.groups,
        stats.syncs,
        outbox.depth()
    );
}

/// A book of two prices with the same tiers, one per event and one over a month
/// (`tiering`), for the A/B of period tiers on the request path.
const PERIOD_BOOK: &str = r#"
[[versions]]
effective_from = 2020-01-01T00:00:00Z

[[versions.prices]]
id = "tokens_tiered"
event_type = "tokens_tiered"
usage_type = "volume"
volume_field = "tokens"
asset = "USD"
pricing_model = "tiered"
package_size = 1_000_000
tiers = [{ up_to = 1_000_000, volume_rate = 2.00 }, { volume_rate = 1.50 }]

[[versions.prices]]
id = "tokens_period"
event_type = "tokens_period"
usage_type = "volume"
volume_field = "tokens"
asset = "USD"
pricing_model = "tiered"
tiering = { period = "monthly" }
package_size = 1_000_000
tiers = [{ up_to = 1_000_000, volume_rate = 2.00 }, { volume_rate = 1.50 }]
"#;

fn tokens_body(event_type: &str, seq: u64) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!(
        r#"{{"customer_external_id":"u1","events":[{{"id":"{event_type}-{seq}","event_type":"{event_type}","occurred_at":"{now}","data":{{"tokens":1000}}}}]}}"#
    )
    .into_bytes()
}

/// Period tiers against the same tiers per event: pricing one event, and one whole request
/// (the period one is rated in the outbox commit against the customer's running total, which
/// grows with every iteration).
fn period_tiers(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    sys: &actix_web::rt::SystemRunner,
    fx: &Fixture,
    seq: &AtomicU64,
) {
    let dir = fx._dir.path().join("period-pricing");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("assignments.toml"), "default = \"book\"\n").unwrap();
    std::fs::write(dir.join("book.toml"), PERIOD_BOOK).unwrap();
    let pricing = Arc::new(Pricing::load(&dir).unwrap());
    let s = &fx.state;
    let state = Arc::new(AppState {
        settings: s.settings.clone(),
        tenants: s.tenants.clone(),
        identity: s.identity.clone(),
        pricing: pricing.clone(),
        sink: s.sink.clone(),
        outbox: s.outbox.clone(),
        metrics: s.metrics.clone(),
        gate: s.gate.clone(),
    });
    let limits = s.settings.ingest.clone();
    let now = chrono::Utc::now();
    let set = pricing.current();
    for kind in ["tiered", "period"] {
        let event_type = format!("tokens_{kind}");
        let event = parse_request(&tokens_body(&event_type, 0), &limits, now)
            .unwrap()
            .events
            .remove(0)
            .unwrap();
        g.bench_function(format!("price_1_event_{kind}"), |b| {
            b.iter(|| {
                set.price_parts(black_box("bench"), black_box(&event))
                    .unwrap()
            })
        });
    }
    let app = sys.block_on(test::init_service(
        App::new()
            .app_data(web::Data::from(state))
            .wrap(ingest::TraceRequests::new(None))
            .configure(ingest::routes),
    ));
    for kind in ["tiered", "period"] {
        let event_type = format!("tokens_{kind}");
        let request = || {
            test::TestRequest::post()
                .uri("/events")
                .insert_header(("content-type", "application/json"))
                .insert_header(("x-credyt-api-key", KEY))
                .set_payload(tokens_body(
                    &event_type,
                    seq.fetch_add(1, Ordering::Relaxed),
                ))
                .to_request()
        };
        let resp = sys.block_on(test::call_service(&app, request()));
        assert_eq!(resp.status(), 204);
        g.bench_function(format!("whole_request_1_event_{kind}"), |b| {
            b.iter(|| {
                let resp = sys.block_on(test::call_service(&app, request()));
                assert_eq!(resp.status(), 204);
            })
        });
    }
}

/// An OTLP/HTTP receiver on a thread (and actix system) of its own: reads each export and
/// answers 200.
fn otlp_receiver() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            actix_web::HttpServer::new(|| {
                App::new()
                    .app_data(web::PayloadConfig::new(64 << 20))
                    .default_service(web::to(|body: web::Bytes| async move {
                        black_box(body.len());
                        actix_web::HttpResponse::Ok()
                            .content_type("application/x-protobuf")
                            .finish()
                    }))
            })
            .workers(1)
            .disable_signals()
            .listen(listener)
            .unwrap()
            .run()
            .await
            .unwrap();
        });
    });
    addr
}

criterion_group!(benches, pieces);
criterion_main!(benches);
