//! Criterion benchmark: pricing one event on the hot path (dimensional + tiered prices).

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::{TimeZone, Utc};
use credyt_proxy::domain::{DataValue, EventId, UsageEvent};
use credyt_proxy::pricing::load::{build, SourceFile};
use criterion::{criterion_group, criterion_main, Criterion};
use rust_decimal::Decimal;

const BOOK: &str = r#"
[[versions]]
effective_from = 2026-01-01T00:00:00Z

[[versions.prices]]
id = "tokens"
event_type = "llm_call"
usage_type = "unit_and_volume"
volume_field = "tokens"
asset = "USD"
pricing_model = "tiered"
package_size = 1_000_000
unit_price = 0.001
dimensions = ["model", "region"]
tiers = [
  { up_to = 10_000, volume_rate = 2.50 },
  { up_to = 100_000, volume_rate = 2.00 },
  { volume_rate = 1.50 },
]
rows = [
  { dimensions = { model = "*", region = "*" } },
  { dimensions = { model = "gpt-4o", region = "*" }, unit_price = 0.002 },
  { dimensions = { model = "gpt-4o", region = "eu" }, unit_price = 0.003 },
  { dimensions = { model = "mini", region = "*" }, unit_price = 0.0005 },
]

[[versions.prices]]
id = "image"
event_type = "llm_call"
usage_type = "unit"
asset = "credits"
dimensions = ["model"]
rows = [
  { dimensions = { model = "gpt-4o" }, unit_price = 0.25 },
  { dimensions = { model = "*" }, unit_price = 0.10 },
]
"#;

fn bench(c: &mut Criterion) {
    let files = vec![
        SourceFile {
            name: "assignments.toml".into(),
            text: "default = \"standard\"\n".into(),
        },
        SourceFile {
            name: "assets.toml".into(),
            text: "[credits]\nprecision = 2\n".into(),
        },
        SourceFile {
            name: "standard.toml".into(),
            text: BOOK.into(),
        },
    ];
    let set = build(&files).unwrap_or_else(|e| panic!("{e}"));
    let mut data = BTreeMap::new();
    data.insert("model".to_owned(), DataValue::String("gpt-4o".into()));
    data.insert("region".to_owned(), DataValue::String("eu".into()));
    data.insert(
        "tokens".to_owned(),
        DataValue::Number(Decimal::from(123_456)),
    );
    let event = UsageEvent {
        id: EventId::from("evt-1"),
        event_type: "llm_call".into(),
        occurred_at: Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap(),
        subject: None,
        description: None,
        data,
    };
    let fees = set.price("acme", &event).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fees.len(), 2);
    c.bench_function("price one event (dimensional, tiered)", |b| {
        b.iter(|| set.price(black_box("acme"), black_box(&event)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
