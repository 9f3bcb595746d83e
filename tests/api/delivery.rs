//! Delivery to Credyt at a distance (issue 26): the forwarder's continuous pipeline, per-record
//! retries, adaptive concurrency, a refused platform key, permanent answers and the maximum
//! age, against the real emulator with its latency and fault rules.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::proxy::{
    ago, assert_charged_exactly, drained, emu_customer, eventually, metric, scrape, usd_charges,
    Options, World, PLATFORM_KEY,
};

const DEPTH: &str = "credyt_proxy_outbox_depth";
const DEAD: &str = "credyt_proxy_outbox_dead_letters";
const LIMIT: &str = "credyt_proxy_forwarder_concurrency_limit";
const IN_FLIGHT: &str = "credyt_proxy_forwarder_in_flight";
const KEY_REFUSED: &str = "credyt_proxy_upstream_key_refused";

fn durable(outbox_config: &str) -> Options {
    Options {
        ack: "durable",
        outbox_config: format!("sync_interval_ms = 100\n{outbox_config}"),
        ..Default::default()
    }
}

fn events(user: &str, prefix: &str, n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("{prefix}-{i}"), "event_type": "video_promoted", "occurred_at": ago(5)}))
        .collect();
    json!({"customer_external_id": user, "events": events})
}

async fn post_events(w: &World, user: &str, prefix: &str, n: usize) {
    let r = w.post("/events", &w.a.key, &events(user, prefix, n)).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
}

async fn gauge(w: &World, name: &str) -> u64 {
    metric(&w.http, &w.admin_url(), name).await.unwrap_or(0)
}

fn charges_path(customer: &str) -> String {
    format!("/customers/{customer}/wallet/charges")
}

/// The emulator's logged calls to `path`: (status, time).
async fn calls_to(w: &World, path: &str) -> Vec<(u64, chrono::DateTime<chrono::Utc>)> {
    w.requests()
        .await
        .iter()
        .filter(|r| r["path"] == path)
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["time"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// One customer whose charges all take 8 s holds the slots of its own calls only: other
/// customers' charges, accepted while those calls are in flight, are delivered before any of
/// them returns.
#[actix_web::test]
async fn a_slow_customer_does_not_hold_other_customers() {
    let w = World::start_with(Options {
        credyt_config: format!("api_key = \"{PLATFORM_KEY}\"\ntimeout_ms = 30000"),
        ..durable("")
    })
    .await;
    let slow = emu_customer(&w.http, &w.emulator, &w.a.account, "slow").await;
    let mut fast = Vec::new();
    for i in 0..20 {
        fast.push(emu_customer(&w.http, &w.emulator, &w.a.account, &format!("fast-{i}")).await);
    }
    w.set_faults(Some(json!({"rules": [
        {"path_prefix": charges_path(&slow), "latency_ms": 8000}
    ]})))
    .await;
    post_events(&w, "slow", "slow", 3).await;
    eventually(
        Duration::from_secs(5),
        "the slow charges in flight",
        || async { (gauge(&w, IN_FLIGHT).await >= 3).then_some(()) },
    )
    .await;
    for i in 0..20 {
        post_events(&w, &format!("fast-{i}"), &format!("fast-{i}"), 1).await;
    }
    // The 8 s calls are the clock: every other charge lands while they are still out.
    eventually(
        Duration::from_secs(6),
        "the other customers' charges",
        || async {
            let state = w.state().await;
            fast.iter()
                .all(|c| usd_charges(&state, c).0 == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        usd_charges(&w.state().await, &slow).0,
        0,
        "the slow calls returned already"
    );

    drained(&w, Duration::from_secs(30)).await;
    let mut expected: BTreeMap<String, u64> = fast.into_iter().map(|c| (c, 1)).collect();
    expected.insert(slow, 3);
    assert_charged_exactly(&w, &expected).await;
    w.stop().await;
}

/// A 429 delays its own record by its `Retry-After` (delay-seconds, then an HTTP-date), while
/// other customers' charges keep flowing; the record is charged once after the wait.
#[actix_web::test]
async fn retry_after_holds_only_its_own_record_in_both_forms() {
    let w = World::start_with(durable("")).await;
    let mut expected = BTreeMap::new();
    for (form, min_gap_ms) in [("seconds", 2800), ("http-date", 2000)] {
        let limited = emu_customer(
            &w.http,
            &w.emulator,
            &w.a.account,
            &format!("limited-{form}"),
        )
        .await;
        w.set_faults(Some(json!({"rules": [{
            "path_prefix": charges_path(&limited),
            "rate_429": 1.0,
            "retry_after_secs": 3,
            "retry_after_form": form,
        }]})))
        .await;
        post_events(&w, &format!("limited-{form}"), &format!("l-{form}"), 1).await;
        let path = charges_path(&limited);
        eventually(Duration::from_secs(5), "the first 429", || async {
            (!calls_to(&w, &path).await.is_empty()).then_some(())
        })
        .await;
        w.set_faults(None).await;
        // Others are delivered while the limited record waits.
        let mut free = Vec::new();
        for i in 0..5 {
            let user = format!("free-{form}-{i}");
            free.push(emu_customer(&w.http, &w.emulator, &w.a.account, &user).await);
            post_events(&w, &user, &user, 1).await;
        }
        eventually(
            Duration::from_secs(5),
            "the free customers' charges",
            || async {
                let state = w.state().await;
                free.iter()
                    .all(|c| usd_charges(&state, c).0 == 1)
                    .then_some(())
            },
        )
        .await;
        eventually(Duration::from_secs(10), "the limited charge", || async {
            (usd_charges(&w.state().await, &limited).0 == 1).then_some(())
        })
        .await;
        let calls = calls_to(&w, &path).await;
        assert_eq!(calls.len(), 2, "{form}: one 429, one retry: {calls:?}");
        assert_eq!((calls[0].0, calls[1].0), (429, 201), "{form}");
        let gap = (calls[1].1 - calls[0].1).num_milliseconds();
        assert!(gap >= min_gap_ms, "{form}: retried after {gap} ms");
        expected.insert(limited, 1);
        expected.extend(free.into_iter().map(|c| (c, 1)));
    }
    drained(&w, Duration::from_secs(10)).await;
    assert_charged_exactly(&w, &expected).await;
    w.stop().await;
}

/// The concurrency limit climbs above its start while a backlog drains from a fast upstream,
/// and falls to its minimum when Credyt answers half the calls with 429; nothing is lost.
#[actix_web::test]
async fn concurrency_rises_under_a_fast_upstream_and_falls_under_429s() {
    let w = World::start_with(durable("forwarder_concurrency_min = 4")).await;
    let users: Vec<String> = (0..50).map(|i| format!("cc-{i}")).collect();
    let mut customers = Vec::new();
    for u in &users {
        customers.push(emu_customer(&w.http, &w.emulator, &w.a.account, u).await);
    }
    w.set_faults(Some(json!({"rules": [
        {"path_prefix": "/customers/", "method": "POST", "latency_ms": 20}
    ]})))
    .await;
    let mut highest = 0;
    for round in 0..2 {
        for u in &users {
            post_events(&w, u, &format!("r{round}-{u}"), 40).await;
        }
        highest = highest.max(gauge(&w, LIMIT).await);
    }
    let rose = eventually(Duration::from_secs(20), "the limit to rise", || async {
        let limit = gauge(&w, LIMIT).await;
        (limit > 32 || highest > 32).then_some(limit.max(highest))
    })
    .await;
    drained(&w, Duration::from_secs(60)).await;

    w.set_faults(Some(json!({"rules": [{
        "path_prefix": "/customers/", "method": "POST", "latency_ms": 20,
        "rate_429": 0.5, "retry_after_secs": 0
    }]})))
    .await;
    for u in &users {
        post_events(&w, u, &format!("r2-{u}"), 40).await;
    }
    eventually(
        Duration::from_secs(20),
        "the limit to fall to its minimum",
        || async { (gauge(&w, LIMIT).await == 4).then_some(()) },
    )
    .await;
    w.set_faults(None).await;
    drained(&w, Duration::from_secs(60)).await;
    eprintln!("concurrency: rose to {rose}, fell to 4");
    let expected = customers.into_iter().map(|c| (c, 120)).collect();
    assert_charged_exactly(&w, &expected).await;
    w.stop().await;
}

/// Started with a key Credyt refuses, the proxy stays alive but not ready and reports it; once
/// the key file holds the right key it is ready and delivers, without a restart.
#[actix_web::test]
async fn a_refused_key_at_start_is_not_ready_until_the_key_file_is_fixed() {
    let w = World::start_with(Options {
        credyt_config: "api_key_file = \"platform.key\"\ntimeout_ms = 5000".into(),
        files: vec![("platform.key", "not-the-platform-key\n".into())],
        ..durable("")
    })
    .await;
    let ready = || async {
        w.http
            .get(format!("{}/readyz", w.admin_url()))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 503);
    assert_eq!(gauge(&w, KEY_REFUSED).await, 1);
    std::fs::write(w.dir().join("platform.key"), format!("{PLATFORM_KEY}\n")).unwrap();
    eventually(
        Duration::from_secs(10),
        "ready with the new key",
        || async { (ready().await == 200).then_some(()) },
    )
    .await;
    assert_eq!(gauge(&w, KEY_REFUSED).await, 0);
    let c = emu_customer(&w.http, &w.emulator, &w.a.account, "k-1").await;
    post_events(&w, "k-1", "k", 3).await;
    drained(&w, Duration::from_secs(10)).await;
    assert_charged_exactly(&w, &BTreeMap::from([(c, 3)])).await;
    w.stop().await;
}

/// A key file changed while its key is accepted (a rotated Secret) is read and checked within
/// seconds, with no traffic to trigger it: a wrong new key shows as refused and not ready;
/// the right one puts the proxy back in service.
#[actix_web::test]
async fn a_key_file_changed_while_the_key_is_accepted_is_checked_without_traffic() {
    let w = World::start_with(Options {
        credyt_config: "api_key_file = \"platform.key\"\ntimeout_ms = 5000".into(),
        files: vec![("platform.key", format!("{PLATFORM_KEY}\n"))],
        ..durable("")
    })
    .await;
    assert_eq!(gauge(&w, KEY_REFUSED).await, 0);
    std::fs::write(w.dir().join("platform.key"), "a-revoked-key\n").unwrap();
    eventually(
        Duration::from_secs(15),
        "the new key to be checked and refused",
        || async { (gauge(&w, KEY_REFUSED).await == 1).then_some(()) },
    )
    .await;
    std::fs::write(w.dir().join("platform.key"), format!("{PLATFORM_KEY}\n")).unwrap();
    eventually(Duration::from_secs(15), "the right key back", || async {
        (gauge(&w, KEY_REFUSED).await == 0).then_some(())
    })
    .await;
    w.stop().await;
}

/// Credyt starts refusing the platform key (401 everywhere) while tenants keep posting: the
/// proxy keeps accepting (identities are cached), pauses delivery with every record pending and
/// no dead letter, reports not ready, and delivers everything once the key works again.
#[actix_web::test]
async fn a_refused_key_pauses_delivery_without_dead_letters_and_resumes() {
    let w = World::start_with(durable("")).await;
    let c = emu_customer(&w.http, &w.emulator, &w.a.account, "rk").await;
    post_events(&w, "rk", "before", 5).await;
    drained(&w, Duration::from_secs(10)).await;

    w.set_faults(Some(
        json!({"rules": [{"path_prefix": "/", "rate_401": 1.0}]}),
    ))
    .await;
    for i in 0..5 {
        post_events(&w, "rk", &format!("during-{i}"), 2).await;
    }
    eventually(
        Duration::from_secs(10),
        "the key to be found refused",
        || async { (gauge(&w, KEY_REFUSED).await == 1).then_some(()) },
    )
    .await;
    let readyz = w
        .http
        .get(format!("{}/readyz", w.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    // Paused: a second later still nothing dead-lettered, every record pending.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gauge(&w, DEAD).await, 0);
    assert_eq!(gauge(&w, DEPTH).await, 10);
    let charges = calls_to(&w, &charges_path(&c)).await;
    let refused = charges.iter().filter(|(s, _)| *s == 401).count();
    assert!(
        refused <= 10,
        "{refused} charges sent while the key was refused"
    );

    w.set_faults(None).await;
    drained(&w, Duration::from_secs(20)).await;
    assert_eq!(gauge(&w, KEY_REFUSED).await, 0);
    assert_eq!(gauge(&w, DEAD).await, 0);
    assert_charged_exactly(&w, &BTreeMap::from([(c, 15)])).await;
    w.stop().await;
}

/// A 409 (the transaction id was used with another body) is a dead letter at once, with code
/// `conflict`: one call, no retry.
#[actix_web::test]
async fn a_409_conflict_is_a_dead_letter_at_once() {
    let w = World::start_with(durable("")).await;
    let c = emu_customer(&w.http, &w.emulator, &w.a.account, "cf").await;
    w.set_faults(Some(json!({"rules": [
        {"path_prefix": charges_path(&c), "rate_409": 1.0}
    ]})))
    .await;
    post_events(&w, "cf", "cf", 1).await;
    eventually(Duration::from_secs(10), "the dead letter", || async {
        (gauge(&w, DEAD).await == 1).then_some(())
    })
    .await;
    let dead = w.app.outbox().unwrap().dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].code, credyt_proxy::outbox::DeadCode::Conflict);
    assert_eq!(dead[0].upstream_status, Some(409));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls_to(&w, &charges_path(&c)).await.len(), 1, "retried");
    assert_eq!(gauge(&w, DEPTH).await, 0);
    w.stop().await;
}

/// A record that keeps failing transiently past `retry_max_age_ms` (and was tried at least
/// three times) becomes a dead letter `retries_exhausted`, counted by reason; never dropped.
#[actix_web::test]
async fn a_record_older_than_the_max_age_becomes_retries_exhausted() {
    let w = World::start_with(durable("retry_max_age_ms = 1500")).await;
    let c = emu_customer(&w.http, &w.emulator, &w.a.account, "old").await;
    w.set_faults(Some(json!({"rules": [
        {"path_prefix": charges_path(&c), "rate_429": 1.0, "retry_after_secs": 0}
    ]})))
    .await;
    post_events(&w, "old", "old", 1).await;
    eventually(Duration::from_secs(20), "the dead letter", || async {
        (gauge(&w, DEAD).await == 1).then_some(())
    })
    .await;
    let dead = w.app.outbox().unwrap().dead_letters().unwrap();
    assert_eq!(
        dead[0].code,
        credyt_proxy::outbox::DeadCode::RetriesExhausted
    );
    assert_eq!(dead[0].upstream_status, Some(429));
    let attempts = calls_to(&w, &charges_path(&c)).await.len();
    assert!(attempts >= 3, "{attempts} attempts");
    let metrics = scrape(&w).await;
    assert!(
        metrics
            .contains("credyt_proxy_forwarder_dead_lettered_total{reason=\"retries_exhausted\"} 1"),
        "{metrics}"
    );
    assert_eq!(gauge(&w, DEPTH).await, 0);
    assert_eq!(usd_charges(&w.state().await, &c).0, 0);
    w.stop().await;
}
