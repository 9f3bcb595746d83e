//! Pricing: golden cases, validation of broken books, hot reload (incl. a ConfigMap swap).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credyt_proxy::pricing::{check_dir, quote_json, Pricing, PricingSet};
use rust_decimal::Decimal;
use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

const DECIMAL_FIELDS: [&str; 5] = [
    "amount",
    "volume",
    "unit_price",
    "volume_rate",
    "package_size",
];

fn as_decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => Decimal::from_str_exact(&n.to_string()).ok(),
        Value::String(s) => Decimal::from_str_exact(s).ok(),
        _ => None,
    }
}

/// Compares the fields the case lists (decimals by value, the rest as JSON); returns the diff.
fn diff_fees(expected: &[Value], actual: &[Value]) -> Vec<String> {
    let mut diffs = Vec::new();
    if expected.len() != actual.len() {
        diffs.push(format!(
            "fee count: expected {}, got {}",
            expected.len(),
            actual.len()
        ));
    }
    for (i, (e, a)) in expected.iter().zip(actual.iter()).enumerate() {
        let Some(e) = e.as_object() else {
            diffs.push(format!("fees[{i}]: expected entry is not an object"));
            continue;
        };
        // A fee omits what it does not have (`dimensions` when empty, options when null).
        let no_dimensions = Value::Object(Default::default());
        for (k, ev) in e {
            let absent = if k == "dimensions" {
                &no_dimensions
            } else {
                &Value::Null
            };
            let av = a.get(k).unwrap_or(absent);
            let same = if DECIMAL_FIELDS.contains(&k.as_str()) && !ev.is_null() {
                as_decimal(ev).is_some() && as_decimal(ev) == as_decimal(av)
            } else {
                ev == av
            };
            if !same {
                diffs.push(format!("fees[{i}].{k}: expected {ev}, got {av}"));
            }
        }
    }
    diffs
}

#[test]
fn golden_cases() {
    let set = PricingSet::load_dir(&repo("tests/golden/pricing/books"))
        .unwrap_or_else(|e| panic!("golden books invalid:\n{e}"));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo("tests/golden/pricing/cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 40, "golden cases missing");
    let mut failures = Vec::new();
    for path in &paths {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let case: Value = serde_json::from_str(&text).unwrap();
        let tenant = case["tenant"].as_str().unwrap_or("demo");
        // The event is handed over as its own JSON text, so numbers keep their literals.
        let event_text = serde_json::to_string(&case["event"]).unwrap();
        let result = quote_json(&set, tenant, &event_text);
        let diffs = match (result, case.get("expected_error")) {
            (Ok(q), None) => {
                let mut d = diff_fees(
                    case["expected"].as_array().unwrap(),
                    q["fees"].as_array().unwrap(),
                );
                if q["pricing_hash"] != Value::String(set.hash().into()) {
                    d.push("pricing_hash not stamped".into());
                }
                d
            }
            (Ok(q), Some(code)) => vec![format!("expected error {code}, got fees {}", q["fees"])],
            (Err(e), Some(code)) if code.as_str() == Some(e.code()) => vec![],
            (Err(e), expected) => vec![format!(
                "expected {}, got error {} ({e})",
                expected.map_or("fees".to_string(), |c| format!("error {c}")),
                e.code()
            )],
        };
        if !diffs.is_empty() {
            failures.push(format!("golden case `{name}`:\n  {}", diffs.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden cases failed:\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n")
    );
}

#[test]
fn shipped_pricing_dir_passes_check_and_prices_credyt_examples() {
    let summary =
        check_dir(&repo("pricing")).unwrap_or_else(|e| panic!("shipped pricing/ is invalid:\n{e}"));
    assert!(summary.contains("book standard"), "{summary}");
    let set = PricingSet::load_dir(&repo("pricing")).unwrap();
    assert_eq!(set.hash().len(), 64);
    let q = quote_json(
        &set,
        "demo",
        r#"{"id":"e1","event_type":"response_completed","occurred_at":"2026-06-01T00:00:00Z",
            "data":{"input_tokens":1000000,"output_tokens":1000000}}"#,
    )
    .unwrap();
    assert_eq!(q["totals"]["USD"], "11.25");
    let q = quote_json(
        &set,
        "demo",
        r#"{"id":"e2","event_type":"video_promoted","occurred_at":"2026-06-01T00:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(q["fees"][0]["amount"], "0.50");
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn broken_dir_reports_every_mistake_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "assets.toml", "[credits]\nprecision = 40\n");
    write(
        d,
        "assignments.toml",
        "default = \"standard\"\n[tenants]\nacme = \"nope\"\n",
    );
    write(
        d,
        "standard.toml",
        r#"[[versions]]
effective_from = 2026-01-01T00:00:00Z

[[versions.prices]]
id = "a"
event_type = "e"
usage_type = "volume"
volume_field = "q"
asset = "USD"
pricing_model = "stepwise"
volume_rate = 1

[[versions.prices]]
id = "b"
event_type = "e"
usage_type = "volume"
volume_field = "q"
asset = "USD"
pricing_model = "tiered"
tiers = [
  { up_to = 100, volume_rate = 0.1 },
  { up_to = 50, volume_rate = 0.05 },
  { volume_rate = 0.01 },
]

[[versions.prices]]
id = "c"
event_type = "e"
usage_type = "volume"
volume_field = "q"
asset = "USD"
pricing_model = "bulk"
tiers = [
  { volume_rate = 0.1 },
  { up_to = 10, volume_rate = 0.05 },
]

[[versions.prices]]
id = "d"
event_type = "e"
usage_type = "unit"
asset = "USD"
unit_price = -0.5

[[versions.prices]]
id = "e"
event_type = "e"
usage_type = "volume"
asset = "USD"
volume_rate = 0.00000000000000000000000000001

[[versions.prices]]
id = "f"
event_type = "e"
usage_type = "volume"
volume_field = "q"
asset = "gold"
volume_rate = 1

[[versions.prices]]
id = "a"
event_type = "other"
usage_type = "unit"
asset = "USD"
unit_price = 1

[[versions.prices]]
id = "g"
event_type = "img"
usage_type = "unit"
asset = "USD"
dimensions = ["model", "region"]
rows = [
  { dimensions = { model = "x", region = "*" }, unit_price = 1 },
  { dimensions = { model = "*", region = "eu" }, unit_price = 2 },
]

[[versions.prices]]
id = "h"
event_type = "e"
usage_type = "volume"
volume_field = "q"
asset = "USD"
volume_rate = inf
volme_rate = 1
"#,
    );
    let errors = PricingSet::load_dir(d).unwrap_err();
    let text = errors.to_string();
    let expect = [
        ("assets.toml:2: credits.precision", "precision_overflow"),
        ("assignments.toml:3: tenants.acme", "unknown_book"),
        (
            "standard.toml:10: versions[0].prices[0].pricing_model",
            "unknown_model",
        ),
        (
            "standard.toml:22: versions[0].prices[1].tiers[1].up_to",
            "tiers_unordered",
        ),
        (
            "standard.toml:34: versions[0].prices[2].tiers[0]",
            "open_tier_not_last",
        ),
        (
            "standard.toml:35: versions[0].prices[2].tiers[1].up_to",
            "last_tier_bounded",
        ),
        (
            "standard.toml:43: versions[0].prices[3].unit_price",
            "negative_price",
        ),
        (
            "standard.toml:45: versions[0].prices[4].volume_field",
            "missing_volume_field",
        ),
        (
            "standard.toml:50: versions[0].prices[4].volume_rate",
            "precision_overflow",
        ),
        (
            "standard.toml:57: versions[0].prices[5].asset",
            "unknown_asset",
        ),
        (
            "standard.toml:61: versions[0].prices[6].id",
            "duplicate_price_id",
        ),
        ("versions[0].prices[7].rows[1]", "ambiguous_dimensions"),
        (
            "standard.toml:84: versions[0].prices[8].volume_rate",
            "invalid_decimal",
        ),
        (
            "standard.toml:85: versions[0].prices[8].volme_rate",
            "unknown_key",
        ),
    ];
    let mut missing = Vec::new();
    for (location, code) in expect {
        if !errors
            .errors()
            .iter()
            .any(|e| e.to_string().contains(location) && e.code() == code)
        {
            missing.push(format!("{location} [{code}]"));
        }
    }
    assert!(
        missing.is_empty(),
        "not reported: {missing:#?}\nreported:\n{text}"
    );
    assert_eq!(errors.code(), "invalid_pricing");
    // check_dir reports the same list.
    assert_eq!(check_dir(d).unwrap_err(), errors);
}

#[test]
fn broken_references_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "assignments.toml", "default = \"ghost\"\n");
    write(
        d,
        "a.toml",
        "extends = \"b\"\n[[versions]]\neffective_from = 2026-01-01T00:00:00Z\nprices = []\n",
    );
    write(
        d,
        "b.toml",
        "extends = \"a\"\n[[versions]]\neffective_from = 2026-01-01T00:00:00Z\nprices = []\n",
    );
    write(
        d,
        "d.toml",
        "[[versions]]\neffective_from = \"2026-01-01\"\nprices = []\n",
    );
    write(d, "c.toml", "[[versions]\n");
    let errors = PricingSet::load_dir(d).unwrap_err();
    let codes: Vec<&str> = errors.errors().iter().map(|e| e.code()).collect();
    for code in [
        "unknown_book",
        "extends_cycle",
        "invalid_date",
        "toml_syntax",
    ] {
        assert!(codes.contains(&code), "{code} missing from:\n{errors}");
    }
}

const BOOK_V1: &str = r#"[[versions]]
effective_from = 2026-01-01T00:00:00Z

[[versions.prices]]
id = "ticket"
event_type = "ticket_resolved"
usage_type = "unit"
asset = "USD"
unit_price = 0.99
"#;

const EVENT: &str =
    r#"{"id":"e","event_type":"ticket_resolved","occurred_at":"2026-05-01T00:00:00Z"}"#;

fn amount(p: &Pricing) -> String {
    let q = quote_json(&p.current(), "demo", EVENT).unwrap();
    q["fees"][0]["amount"].as_str().unwrap().to_owned()
}

async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "not within 2 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_keeps_last_good_and_swaps_good_edits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "assignments.toml", "default = \"standard\"\n");
    write(d, "standard.toml", BOOK_V1);
    let pricing = Arc::new(Pricing::load(d).unwrap());
    let watcher = pricing.spawn_watcher(Duration::from_millis(50));
    assert_eq!(amount(&pricing), "0.99");
    let (v1, h1) = (
        pricing.current().version().to_owned(),
        pricing.current().hash().to_owned(),
    );

    // A broken edit: old prices keep serving, the error is reported.
    write(d, "standard.toml", &BOOK_V1.replace("0.99", "-1"));
    wait_for(|| pricing.last_error().is_some(), "error reported").await;
    let err = pricing.last_error().unwrap();
    assert!(
        err.contains("standard.toml:9") && err.contains("negative_price"),
        "{err}"
    );
    assert_eq!(amount(&pricing), "0.99");
    assert_eq!(pricing.current().hash(), h1);
    assert!(pricing.reload_now().is_err());

    // A good edit: live within 2 s, new version and hash on quotes, error cleared.
    write(d, "standard.toml", &BOOK_V1.replace("0.99", "1.25"));
    wait_for(|| amount(&pricing) == "1.25", "good edit live").await;
    assert!(pricing.last_error().is_none());
    let q = quote_json(&pricing.current(), "demo", EVENT).unwrap();
    assert_ne!(q["pricing_hash"], Value::String(h1.clone()));
    assert_ne!(q["pricing_version"], Value::String(v1));
    assert!(!pricing.reload_now().unwrap());
    watcher.abort();
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_follows_a_configmap_data_symlink_swap() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Kubernetes layout: name -> ..data/name, ..data -> ..<timestamp>/
    let gen1 = d.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir(&gen1).unwrap();
    write(&gen1, "assignments.toml", "default = \"standard\"\n");
    write(&gen1, "standard.toml", BOOK_V1);
    symlink(gen1.file_name().unwrap(), d.join("..data")).unwrap();
    for f in ["assignments.toml", "standard.toml"] {
        symlink(Path::new("..data").join(f), d.join(f)).unwrap();
    }
    let pricing = Arc::new(Pricing::load(d).unwrap());
    let watcher = pricing.spawn_watcher(Duration::from_millis(50));
    assert_eq!(amount(&pricing), "0.99");
    let h1 = pricing.current().hash().to_owned();

    // Atomic swap: write a new generation, point a temp link at it, rename over ..data.
    let gen2 = d.join("..2026_01_02_00_00_00.000000002");
    std::fs::create_dir(&gen2).unwrap();
    write(&gen2, "assignments.toml", "default = \"standard\"\n");
    write(&gen2, "standard.toml", &BOOK_V1.replace("0.99", "2.00"));
    symlink(gen2.file_name().unwrap(), d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(&gen1).unwrap();

    wait_for(|| amount(&pricing) == "2.00", "configmap swap live").await;
    assert_ne!(pricing.current().hash(), h1);
    assert!(pricing.last_error().is_none());
    watcher.abort();
}

/// The period-tiers test world: tenant A on `tests/golden/pricing/periods/books`, durable,
/// accepting events back to 2026-01 (the sequences' fixed dates).
async fn period_world() -> super::proxy::World {
    use super::proxy::{Ingest, Options, World};
    World::start_with(Options {
        ack: "durable",
        ingest: Ingest {
            pricing_dir: Some(repo("tests/golden/pricing/periods/books")),
            config: "past_window_secs = 3153600000".into(),
        },
        ..Default::default()
    })
    .await
}

/// Golden sequences of period-tiered prices (`tests/golden/pricing/periods/*.json`), through
/// the whole proxy (`/v1/events` and `/v1/quote`, durable outbox, emulator): each step's
/// outcome and fees, each quote's running total and bands, and at the end what Credyt charged.
#[actix_web::test]
async fn period_golden_sequences() {
    let w = period_world().await;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo("tests/golden/pricing/periods"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 4, "period sequences missing");
    let mut failures = Vec::new();
    let mut charged = Vec::new();
    for path in &paths {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let case: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let customer = w.customer(&w.a.account, &name, "1000").await;
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let mut diffs = Vec::new();
            if let Some(event) = step.get("event") {
                let resp = w
                    .post(
                        "/v1/events",
                        &w.a.key,
                        &serde_json::json!({"customer_id": customer, "events": [event]}),
                    )
                    .await;
                assert_eq!(resp.status(), 200, "{name} step {i}");
                let body: Value = resp.json().await.unwrap();
                let result = &body["results"][0];
                if result["status"] != step["status"] {
                    diffs.push(format!("status: expected {}, got {result}", step["status"]));
                } else if let Some(expected) = step.get("expected") {
                    diffs.extend(diff_fees(
                        expected.as_array().unwrap(),
                        result["fees"].as_array().unwrap(),
                    ));
                }
            } else {
                let as_if = step
                    .get("as_if_total")
                    .and_then(Value::as_str)
                    .map_or(String::new(), |t| format!("&total={t}"));
                let resp = w
                    .post(
                        &format!("/v1/quote?customer_id={customer}{as_if}"),
                        &w.a.key,
                        &step["quote"],
                    )
                    .await;
                assert_eq!(resp.status(), 200, "{name} step {i}");
                let q: Value = resp.json().await.unwrap();
                let used = &q["running_totals"][0];
                if as_decimal(&used["total"]) != as_decimal(&step["expected_total"]) {
                    diffs.push(format!(
                        "running total: expected {}, got {}",
                        step["expected_total"], used["total"]
                    ));
                }
                if used["source"] != step["expected_source"] {
                    diffs.push(format!("total source: got {}", used["source"]));
                }
                if let Some(n) = step.get("expected_bands").and_then(Value::as_u64) {
                    if used["bands"].as_array().map(Vec::len) != Some(n as usize) {
                        diffs.push(format!("bands: expected {n}, got {}", used["bands"]));
                    }
                }
                diffs.extend(diff_fees(
                    step["expected"].as_array().unwrap(),
                    q["fees"].as_array().unwrap(),
                ));
            }
            if !diffs.is_empty() {
                failures.push(format!("`{name}` step {i}:\n  {}", diffs.join("\n  ")));
            }
        }
        charged.push((name, customer, case["charged"].clone()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Credyt charged each accepted non-zero fee once, at the amount answered.
    for (name, customer, want) in charged {
        let count = want["count"].as_u64().unwrap();
        let usd = as_decimal(&want["usd"]).unwrap();
        super::proxy::eventually(Duration::from_secs(20), "the charges", || {
            let w = &w;
            let customer = customer.clone();
            async move {
                let got = super::proxy::usd_charges(&w.state().await, &customer);
                (got.0 >= count).then_some(got)
            }
        })
        .await;
        let got = super::proxy::usd_charges(&w.state().await, &customer);
        assert_eq!(got, (count, usd), "{name}: charges at Credyt");
    }
    w.stop().await;
}

/// A reload that brings period tiers into a proxy with `ack = "upstream"` (which has no outbox
/// for running totals): their events are rejected with `period_needs_outbox`, never priced as
/// if each were the first of its period.
#[actix_web::test]
async fn period_tiers_reloaded_under_upstream_ack_are_rejected() {
    use super::proxy::{Ingest, Options, World};
    let pricing = tempfile::tempdir().unwrap();
    let books = repo("tests/golden/pricing/periods/books");
    let book = std::fs::read_to_string(books.join("periods.toml")).unwrap();
    std::fs::copy(
        books.join("assignments.toml"),
        pricing.path().join("assignments.toml"),
    )
    .unwrap();
    // Started without `tiering` (per-event tiers): accepted under upstream.
    let per_event: String = book
        .lines()
        .filter(|l| !l.starts_with("tiering"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(pricing.path().join("periods.toml"), &per_event).unwrap();
    let w = World::start_with(Options {
        ingest: Ingest {
            pricing_dir: Some(pricing.path().to_path_buf()),
            config: "past_window_secs = 3153600000".into(),
        },
        ..Default::default()
    })
    .await;
    let event = |id: &str| {
        serde_json::json!({"customer_external_id": "reload-user", "events": [{
            "id": id, "event_type": "tokens_used", "occurred_at": super::proxy::ago(5),
            "data": {"tokens": 1000}}]})
    };
    let r: Value = w
        .post("/v1/events", &w.a.key, &event("r1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["results"][0]["status"], "accepted", "{r}");
    std::fs::write(pricing.path().join("periods.toml"), &book).unwrap();
    let handle = w.app.state().pricing.clone();
    super::proxy::eventually(Duration::from_secs(10), "the pricing reload", || {
        let handle = handle.clone();
        async move { handle.current().has_period_tiers().then_some(()) }
    })
    .await;
    let r: Value = w
        .post("/v1/events", &w.a.key, &event("r2"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["results"][0]["status"], "rejected", "{r}");
    assert_eq!(r["results"][0]["code"], "period_needs_outbox", "{r}");
    w.stop().await;
}
