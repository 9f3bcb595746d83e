//! `/metrics` as an operator's Prometheus sees it: a scrape taken under load passes `promtool
//! check metrics` with an observation in every histogram; series do not grow with what tenants
//! send; per-tenant labels stop at their cap; the shipped alert rules pass `promtool check
//! rules` and their unit tests; every query of the Grafana dashboard and of the alerts names a
//! metric that a real scrape has.
//!
//! promtool comes from Debian's `prometheus` package (`.ci/run` installs it). Without it these
//! tests fail when `CI=true` and are skipped, saying why, elsewhere.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::proxy::{ago, eventually, metric, repo, scrape, Options, World};

/// `promtool`, if installed. Missing under CI is a failure, not a skip.
fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(PathBuf::from("promtool"));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is missing under CI: .ci/run must install it (apt-get install -y prometheus)"
    );
    eprintln!(
        "skipped: promtool is not installed (apt-get install -y prometheus); CI runs this test"
    );
    None
}

/// Runs promtool with `args` (and `stdin`); panics with its output unless it succeeded.
fn run_promtool(promtool: &PathBuf, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Names of the histogram families of a scrape.
fn histograms(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .map(str::to_string)
        .collect()
}

/// Total observations of histogram `name` over its series.
fn observations(text: &str, name: &str) -> u64 {
    let count = format!("{name}_count");
    text.lines()
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == count).then(|| value.parse::<u64>().ok())?
        })
        .sum()
}

/// Every sample name of a scrape (`_bucket`, `_sum`, `_count`, `_total` included).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The series of a scrape: its sample lines.
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count()
}

/// Every `credyt_proxy_...` name in a query or rule expression.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("credyt_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn event(id: &str, event_type: &str) -> Value {
    json!({"id": id, "event_type": event_type, "occurred_at": ago(5)})
}

const RELAY_SECRET: &str = "whsec_metricsrelaysecret000000000";

/// A durable world whose tenant B (default rate limit) is throttled hard, with the webhook
/// relay on and tenant A's webhook endpoint (the receiver, kept alive by the caller).
async fn loaded_world() -> (World, super::webhooks::Receiver) {
    let w = World::start_with(Options {
        ack: "durable",
        extra_config: format!(
            "[rate_limit]\nper_second = 1\nburst = 3\n\
             [webhooks]\ncredyt_secrets = [\"{RELAY_SECRET}\"]\nlisten = \"127.0.0.1:0\"\ndir = \"webhooks\"\n"
        ),
        ..Default::default()
    })
    .await;
    let receiver = super::webhooks::Receiver::start().await;
    let line = format!(
        "webhook = {{ url = \"{}\", secrets = [\"{}\"] }}\n",
        receiver.url, receiver.secret
    );
    w.edit_tenants(|t| {
        t.replacen(
            "create_customers = true\n",
            &format!("create_customers = true\n{line}"),
            1,
        )
    })
    .await;
    (w, receiver)
}

/// A Credyt webhook for tenant A's account, posted to the relay (unsigned: refused).
async fn post_webhook(w: &World, id: &str, signed: bool) -> u16 {
    let body = serde_json::to_vec(&json!({
        "id": id, "account": w.a.account, "event_type": "balance_threshold_hit",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {"account_id": "default:USD", "available": 4.5, "threshold": 5}
    }))
    .unwrap();
    let mut req = w
        .http
        .post(format!(
            "http://{}/webhooks/credyt",
            w.app.webhook_addr().unwrap()
        ))
        .body(body.clone());
    if signed {
        let sig =
            super::webhooks::credyt_signature(RELAY_SECRET, chrono::Utc::now().timestamp(), &body);
        req = req.header("Credyt-Signature", sig);
    }
    req.send().await.unwrap().status().as_u16()
}

/// One round of mixed traffic: every endpoint and status class, identity hits and misses of
/// every kind, a rate-limited tenant, accepted charges for the forwarder.
async fn one_round(w: &World, round: usize, b_customer: &str, a_customer: &str) {
    let user = format!("load-user-{}", round % 25);
    let events: Vec<Value> = (0..1 + round % 7)
        .map(|i| event(&format!("load-{round}-{i}"), "video_promoted"))
        .collect();
    let a = &w.a.key;
    let resp = w
        .post(
            "/events",
            a,
            &json!({"customer_external_id": user, "events": events}),
        )
        .await;
    assert_eq!(resp.status(), 204, "{}", resp.text().await.unwrap());
    let resp = w
        .post(
            "/v1/events",
            a,
            &json!({"customer_id": a_customer, "events": [
                event(&format!("v1-{round}"), "video_promoted"),
                event(&format!("v1-bad-{round}"), "no_such_type"),
            ]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let resp = w
        .post("/v1/quote", a, &event("quote", "video_promoted"))
        .await;
    assert_eq!(resp.status(), 200);
    // B: looked up by external id, throttled after its burst.
    let resp = w
        .post(
            "/events",
            &w.b.key,
            &json!({"customer_id": b_customer, "events": [event(&format!("b-{round}"), "video_promoted")]}),
        )
        .await;
    assert!([204, 429].contains(&resp.status().as_u16()));
    let resp = w.post("/events", "not-a-key", &json!({})).await;
    assert_eq!(resp.status(), 401);
    let resp = w
        .http
        .get(format!("{}/no/such/route-{round}", w.proxy_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = w
        .http
        .get(format!("{}/healthz", w.proxy_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Credyt's webhooks through the relay: one accepted, now and then one refused.
    assert_eq!(
        post_webhook(w, &format!("whe_load_{round}"), true).await,
        200
    );
    if round.is_multiple_of(10) {
        assert_eq!(
            post_webhook(w, &format!("whe_bad_{round}"), false).await,
            401
        );
    }
}

/// Scrapes while rounds of traffic run (16 at a time), until a scrape shows an observation in
/// every histogram; returns that scrape. Bounded: at most 2,000 rounds and 60 s.
async fn scrape_under_load(w: &World) -> String {
    let b_customer = w.customer(&w.b.account, "b-user", "1000").await;
    let a_customer = w.customer(&w.a.account, "a-direct", "1000").await;
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let load = stream::iter(0..2000)
        .take_while(|_| std::future::ready(!stop.load(Ordering::Relaxed)))
        .for_each_concurrent(16, |round| {
            let (b, a, done) = (&b_customer, &a_customer, &done);
            async move {
                one_round(w, round, b, a).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    let scraper = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if done.load(Ordering::Relaxed) < 50 {
                continue;
            }
            last = scrape(w).await;
            let names = histograms(&last);
            if !names.is_empty() && names.iter().all(|h| observations(&last, h) > 0) {
                stop.store(true, Ordering::Relaxed);
                return (last, true);
            }
        }
        stop.store(true, Ordering::Relaxed);
        (last, false)
    };
    let ((text, complete), ()) = tokio::join!(scraper, load);
    let empty: Vec<String> = histograms(&text)
        .into_iter()
        .filter(|h| observations(&text, h) == 0)
        .collect();
    assert!(
        complete,
        "histograms without observations under load: {empty:?}\n{text}"
    );
    text
}

#[actix_web::test]
async fn a_scrape_under_load_passes_promtool_and_every_histogram_has_observations() {
    let (w, _receiver) = loaded_world().await;
    let text = scrape_under_load(&w).await;
    // The new families are all there, with their bounded labels.
    for needle in [
        "credyt_proxy_http_request_duration_seconds_bucket{endpoint=\"/events\",status_class=\"2xx\"",
        "credyt_proxy_http_request_duration_seconds_count{endpoint=\"/events\",status_class=\"4xx\"}",
        "credyt_proxy_http_request_duration_seconds_count{endpoint=\"other\",status_class=\"4xx\"}",
        "credyt_proxy_http_request_duration_seconds_count{endpoint=\"/v1/quote\",status_class=\"2xx\"}",
        "credyt_proxy_upstream_call_duration_seconds_count{operation=\"charge\",status_class=\"2xx\"}",
        "credyt_proxy_upstream_calls_total{operation=\"find_account\",status_class=\"2xx\"}",
        "credyt_proxy_upstream_calls_total{operation=\"create_customer\",status_class=\"2xx\"}",
        "credyt_proxy_upstream_calls_total{operation=\"customer_exists\",status_class=\"2xx\"}",
        "credyt_proxy_upstream_calls_total{operation=\"account_context\",status_class=\"2xx\"}",
        "credyt_proxy_identity_cache_hits_total{kind=\"customer\"}",
        "credyt_proxy_identity_lookup_duration_seconds_count{kind=\"account\"}",
        "credyt_proxy_events_total{outcome=\"rejected\"}",
        "credyt_proxy_forwarder_breaker_state 0",
        "credyt_proxy_otel_spans_dropped_total 0",
        "credyt_proxy_ready 1",
        "credyt_proxy_build_info{version=",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let limited = text
        .lines()
        .find_map(|l| l.strip_prefix("credyt_proxy_ratelimited_events_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(limited.is_some_and(|n| n > 0), "{text}");
    let hits = text
        .lines()
        .find_map(|l| l.strip_prefix("credyt_proxy_identity_cache_hits_total{kind=\"customer\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(hits.is_some_and(|n| n > 0), "{text}");
    // The exposition as Prometheus lints it.
    if let Some(promtool) = promtool() {
        let lint = run_promtool(&promtool, &["check", "metrics"], Some(&text));
        assert!(lint.trim().is_empty(), "promtool check metrics: {lint}");
    }
    w.stop().await;
}

#[actix_web::test]
async fn metrics_answer_openmetrics_when_asked_for_it() {
    let w = World::start_with(Options {
        ack: "durable",
        ..Default::default()
    })
    .await;
    let resp = w
        .http
        .get(format!("{}/metrics", w.admin_url()))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE credyt_proxy_events counter"),
        "{text}"
    );
    assert!(text.contains("credyt_proxy_events_total{outcome=\"accepted\"} 0"));
    w.stop().await;
}

/// 10,000 distinct end users, event types and unknown paths add no series: no label takes its
/// value from a request.
#[actix_web::test]
async fn series_do_not_grow_with_end_users_event_types_or_paths() {
    let w = World::start_with(Options {
        ack: "durable",
        ..Default::default()
    })
    .await;
    let admin = w.admin_url();
    let a = w.a.key.clone();
    let send = |i: usize| {
        let (w, a) = (&w, &a);
        async move {
            // A new end user (identity miss, lookup and creation) with a new event type
            // (rejected: not in the price book), and a new unknown path.
            let resp = w
                .post(
                    "/v1/events",
                    a,
                    &json!({"customer_external_id": format!("card-user-{i}"),
                            "events": [event(&format!("card-{i}"), &format!("card_type_{i}"))]}),
                )
                .await;
            assert_eq!(resp.status(), 200);
            let resp = w
                .http
                .post(format!("{}/bogus/{i}/path", w.proxy_url()))
                .header("X-CREDYT-API-KEY", a.as_str())
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 404);
        }
    };
    // Warm up every kind of series this traffic can make, and let the forwarder settle.
    let resp = w
        .post(
            "/events",
            &a,
            &json!({"customer_external_id": "warm", "events": [event("warm-1", "video_promoted")]}),
        )
        .await;
    assert_eq!(resp.status(), 204);
    send(usize::MAX).await;
    eventually(Duration::from_secs(10), "the warm-up delivered", || async {
        (metric(&w.http, &admin, "credyt_proxy_outbox_depth").await? == 0).then_some(())
    })
    .await;
    let before = scrape(&w).await;
    stream::iter(0..10_000).for_each_concurrent(32, &send).await;
    let after = scrape(&w).await;
    assert_eq!(
        series(&before),
        series(&after),
        "series grew with request input:\nbefore:\n{before}\nafter:\n{after}"
    );
    assert!(
        !after.contains("card-user-") && !after.contains("card_type_") && !after.contains("bogus")
    );
    // The traffic was counted, under bounded labels.
    let rejected = after
        .lines()
        .find_map(|l| l.strip_prefix("credyt_proxy_events_total{outcome=\"rejected\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(rejected.is_some_and(|n| n > 10_000), "{after}");
    assert!(after.contains(
        "credyt_proxy_http_request_duration_seconds_count{endpoint=\"other\",status_class=\"4xx\"} 10001"
    ), "{after}");
    w.stop().await;
}

/// With per-tenant metrics on, tenants get their id as label up to the cap; later ones share
/// `other`; request input never becomes a tenant label.
#[actix_web::test]
async fn per_tenant_labels_come_from_the_tenants_file_and_stop_at_the_cap() {
    let w = World::start_with(Options {
        ack: "durable",
        extra_config: "[telemetry]\nper_tenant_metrics = true\nmax_tenant_labels = 1\n".into(),
        ..Default::default()
    })
    .await;
    let b_customer = w.customer(&w.b.account, "b-user", "10").await;
    let resp = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": "u", "events": [event("t-a", "video_promoted")]}),
        )
        .await;
    assert_eq!(resp.status(), 204);
    let resp = w
        .post(
            "/events",
            &w.b.key,
            &json!({"customer_id": b_customer, "events": [event("t-b", "video_promoted")]}),
        )
        .await;
    assert_eq!(resp.status(), 204);
    let text = scrape(&w).await;
    for needle in [
        "credyt_proxy_events_total{outcome=\"accepted\",tenant=\"tenant-a\"} 1",
        "credyt_proxy_events_total{outcome=\"accepted\",tenant=\"other\"} 1",
        "credyt_proxy_fees_total{tenant=\"tenant-a\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(!text.contains("tenant=\"tenant-b\""), "{text}");
    w.stop().await;
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

#[actix_web::test]
async fn the_dashboard_and_the_alerts_query_only_metrics_a_real_scrape_has() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/credyt-proxy.json"))
        .expect("the dashboard is JSON");
    // The shape Grafana imports.
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let kind = panel["type"].as_str().unwrap();
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if kind == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert!(t["refId"].is_string(), "{title}: refId");
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: expr"));
            assert!(!metric_names_in(expr).is_empty(), "{title}: {expr}");
            queries.push((title.to_string(), expr.to_string()));
        }
    }
    assert!(queries.len() >= 12, "{} queries", queries.len());
    let rules = read("deploy/prometheus/alerts.yml");
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            queries.push(("alerts.yml".into(), expr.trim().to_string()));
        }
    }

    let (w, _receiver) = loaded_world().await;
    let text = scrape_under_load(&w).await;
    w.stop().await;
    let names = sample_names(&text);
    for (title, expr) in &queries {
        for name in metric_names_in(expr) {
            assert!(
                names.contains(&name),
                "{title}: `{name}` is not in a scrape ({expr})"
            );
        }
    }
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let checked = run_promtool(
        &promtool,
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        None,
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run_promtool(
        &promtool,
        &["test", "rules", "deploy/prometheus/alerts_test.yml"],
        None,
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test of its own and a runbook section.
    let rules = read("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts_test.yml");
    let runbooks = read("docs/operations.md");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
        assert!(
            runbooks.contains(&format!("### {alert}")),
            "{alert} has no runbook in docs/operations.md"
        );
    }
}

/// Every metric of a scrape is in the reference table of docs/operations.md.
#[actix_web::test]
async fn every_metric_is_documented_in_the_operations_reference() {
    let (w, _receiver) = loaded_world().await;
    let text = scrape_under_load(&w).await;
    w.stop().await;
    let doc = read("docs/operations.md");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        let shown = if kind == "counter" && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        assert!(
            doc.contains(&format!("`{shown}`")),
            "`{shown}` ({kind}) is not in docs/operations.md"
        );
    }
}
