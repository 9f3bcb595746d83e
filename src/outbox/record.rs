//! The encoding of a record (the value in `records`): compact binary for charges, JSON for the
//! rest.
//!
//! A charge is written as tag `0x01` and its fields in a fixed order: strings as a LEB128
//! length and UTF-8 bytes, options as a `0`/`1` byte before the value, decimals as the 16
//! bytes of `Decimal::serialize` (exact: scale and mantissa, never a float), the transaction
//! id as its 16 bytes, `accepted_at` as seconds and nanoseconds. Less than half the JSON's
//! size and a fraction of its encoding time; the bytes go through the journal, the memtable,
//! the flush and the compactions, so size is CPU too.
//!
//! A charge whose tenant request was traced (and sampled) is written as tag `0x02`
//! (`CHARGE_V2`): the 25 bytes of its trace context (trace id 16, span id 8, trace flags 1)
//! and then exactly the fields of `0x01`. A charge without one is still written as `0x01`, byte
//! for byte as before, so a record does not grow when tracing is off; both tags are read.
//! A trace context with an all-zero id (never written) decodes as none: it is advisory, never
//! a reason to refuse a charge.
//!
//! Anything starting with `{` is JSON (`StoredRecord`): usage records (`forward = "events"`,
//! which carry the tenant's free-form event, and since `CHARGE_V2` an optional `trace` field:
//! the `traceparent` string) and records written before this encoding. A new field of a charge
//! needs a new tag; the decoder refuses trailing bytes and unknown tags rather than guess.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::OutboxError;
use crate::domain::{
    AccountId, CustomerId, Debit, Delivery, EventId, Fee, TenantId, TraceContext, UsageType,
};

const CHARGE_V1: u8 = 0x01;
/// `CHARGE_V1` preceded by the tenant request's trace context.
const CHARGE_V2: u8 = 0x02;
const JSON: u8 = b'{';

/// The JSON form. Versioned by field presence: new optional fields only.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    delivery: Delivery,
}

pub(crate) fn encode(delivery: &Delivery) -> Result<Vec<u8>, OutboxError> {
    let mut out = Vec::with_capacity(256);
    encode_into(delivery, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `delivery` to `out` (the record log's frame, without a copy in
/// between). On error `out` may hold part of it: the caller truncates.
pub(crate) fn encode_into(delivery: &Delivery, out: &mut Vec<u8>) -> Result<(), OutboxError> {
    match delivery {
        Delivery::Charge(debit) => {
            let mut w = Writer(out);
            match &debit.trace {
                None => w.0.push(CHARGE_V1),
                Some(cx) => {
                    w.0.push(CHARGE_V2);
                    w.0.extend_from_slice(&cx.trace_id);
                    w.0.extend_from_slice(&cx.span_id);
                    w.0.push(cx.flags);
                }
            }
            w.debit(debit);
            Ok(())
        }
        Delivery::Usage(_) | Delivery::Webhook(_) => {
            #[derive(Serialize)]
            struct Ref<'a> {
                delivery: &'a Delivery,
            }
            serde_json::to_writer(out, &Ref { delivery }).map_err(OutboxError::Encode)
        }
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Delivery, OutboxError> {
    let malformed = |what| OutboxError::Malformed {
        partition: "records",
        what,
    };
    match bytes.first() {
        Some(&tag @ (CHARGE_V1 | CHARGE_V2)) => {
            let mut r = Reader(&bytes[1..]);
            let trace = if tag == CHARGE_V2 {
                r.trace().ok_or_else(|| malformed("truncated charge"))?
            } else {
                None
            };
            let mut debit = r.debit().ok_or_else(|| malformed("truncated charge"))?;
            if !r.0.is_empty() {
                return Err(malformed("trailing bytes after a charge"));
            }
            debit.trace = trace;
            Ok(Delivery::Charge(debit))
        }
        Some(&JSON) => serde_json::from_slice::<StoredRecord>(bytes)
            .map(|r| r.delivery)
            .map_err(|source| OutboxError::Corrupt {
                partition: "records",
                source,
            }),
        Some(_) => Err(malformed("unknown record tag")),
        None => Err(malformed("empty record")),
    }
}

fn usage_type_tag(t: UsageType) -> u8 {
    match t {
        UsageType::Unit => 0,
        UsageType::Volume => 1,
        UsageType::UnitAndVolume => 2,
    }
}

fn usage_type_of(tag: u8) -> Option<UsageType> {
    match tag {
        0 => Some(UsageType::Unit),
        1 => Some(UsageType::Volume),
        2 => Some(UsageType::UnitAndVolume),
        _ => None,
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn len(&mut self, mut n: u64) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn str(&mut self, s: &str) {
        self.len(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt<T: ?Sized>(&mut self, v: Option<&T>, put: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                put(self, v);
            }
        }
    }

    fn dec(&mut self, d: &Decimal) {
        self.0.extend_from_slice(&d.serialize());
    }

    fn debit(&mut self, d: &Debit) {
        self.0.extend_from_slice(d.transaction_id.as_bytes());
        self.str(d.tenant.as_str());
        self.str(d.account.as_str());
        self.str(d.customer.as_str());
        self.str(d.event_id.as_str());
        self.opt(d.subject.as_deref(), Self::str);
        self.opt(d.description.as_deref(), Self::str);
        let f = &d.fee;
        self.str(&f.price_id);
        self.opt(f.price_name.as_deref(), Self::str);
        self.0.push(usage_type_tag(f.usage_type));
        self.len(f.dimensions.len() as u64);
        for (k, v) in &f.dimensions {
            self.str(k);
            self.str(v);
        }
        self.opt(f.volume_field.as_deref(), Self::str);
        for d in [&f.volume, &f.unit_price, &f.volume_rate, &f.package_size] {
            self.opt(d.as_ref(), Self::dec);
        }
        self.dec(&f.amount);
        self.str(&f.asset);
        self.str(&f.book);
        self.str(&f.book_version);
        self.str(&f.pricing_hash);
        self.0
            .extend_from_slice(&d.accepted_at.timestamp().to_be_bytes());
        self.0
            .extend_from_slice(&d.accepted_at.timestamp_subsec_nanos().to_be_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|[b]| b)
    }

    fn len(&mut self) -> Option<usize> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(n).ok();
            }
        }
        None
    }

    fn text(&mut self) -> Option<&'a str> {
        let n = self.len()?;
        if n > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        std::str::from_utf8(s).ok()
    }

    fn str(&mut self) -> Option<String> {
        self.text().map(str::to_owned)
    }

    fn opt<T>(&mut self, get: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.byte()? {
            0 => Some(None),
            1 => get(self).map(Some),
            _ => None,
        }
    }

    fn dec(&mut self) -> Option<Decimal> {
        let b = self.bytes::<16>()?;
        // Flags bytes with bits outside sign and scale (or a scale above 28) are not a Decimal
        // that `serialize` produced: refuse rather than read a different number.
        let scale = b[2];
        if b[0] != 0 || b[1] != 0 || scale > 28 || b[3] & 0x7f != 0 {
            return None;
        }
        Some(Decimal::deserialize(b))
    }

    /// The 25 bytes of a trace context: `None` inside when either id is all zeros.
    fn trace(&mut self) -> Option<Option<TraceContext>> {
        let cx = TraceContext {
            trace_id: self.bytes::<16>()?,
            span_id: self.bytes::<8>()?,
            flags: self.byte()?,
        };
        Some(cx.is_valid().then_some(cx))
    }

    fn debit(&mut self) -> Option<Debit> {
        let transaction_id = Uuid::from_bytes(self.bytes::<16>()?);
        let tenant = TenantId::new(self.text()?);
        let account = AccountId::new(self.text()?);
        let customer = CustomerId::new(self.text()?);
        let event_id = EventId::new(self.text()?);
        let subject = self.opt(Self::str)?;
        let description = self.opt(Self::str)?;
        let price_id = self.str()?;
        let price_name = self.opt(Self::str)?;
        let usage_type = usage_type_of(self.byte()?)?;
        let n = self.len()?;
        let mut dimensions = BTreeMap::new();
        for _ in 0..n {
            let k = self.str()?;
            let v = self.str()?;
            dimensions.insert(k, v);
        }
        let volume_field = self.opt(Self::str)?;
        let volume = self.opt(Self::dec)?;
        let unit_price = self.opt(Self::dec)?;
        let volume_rate = self.opt(Self::dec)?;
        let package_size = self.opt(Self::dec)?;
        let amount = self.dec()?;
        let asset = self.str()?;
        let book = self.str()?;
        let book_version = self.str()?;
        let pricing_hash = self.str()?;
        let secs = i64::from_be_bytes(self.bytes::<8>()?);
        let nanos = u32::from_be_bytes(self.bytes::<4>()?);
        let accepted_at: DateTime<Utc> = DateTime::from_timestamp(secs, nanos)?;
        Some(Debit {
            transaction_id,
            tenant,
            account,
            customer,
            event_id,
            subject,
            description,
            fee: Fee {
                price_id: price_id.into(),
                price_name: price_name.map(Into::into),
                usage_type,
                dimensions,
                volume_field: volume_field.map(Into::into),
                volume,
                unit_price,
                volume_rate,
                package_size,
                amount,
                asset: asset.into(),
                book: book.into(),
                book_version: book_version.into(),
                pricing_hash: pricing_hash.into(),
            },
            accepted_at,
            trace: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::transaction_id;

    fn decimal() -> impl Strategy<Value = Decimal> {
        (any::<i64>(), 0u32..=28).prop_map(|(m, scale)| Decimal::new(m, scale))
    }

    fn debit() -> impl Strategy<Value = Debit> {
        let text = "\\PC{0,12}";
        (
            (text, text, text, text, proptest::option::of(text)),
            (
                proptest::option::of(text),
                prop::collection::btree_map(text, text, 0..3),
                0u8..3,
            ),
            (
                proptest::option::of(decimal()),
                proptest::option::of(decimal()),
                decimal(),
            ),
            (0i64..4_000_000_000, 0u32..1_000_000_000),
            proptest::option::of(trace()),
        )
            .prop_map(
                |(
                    (tenant, event, customer, price, subject),
                    (name, dims, ut),
                    (vol, rate, amount),
                    (secs, nanos),
                    trace,
                )| {
                    let tenant = TenantId::new(tenant);
                    let event_id = EventId::new(event);
                    Debit {
                        transaction_id: transaction_id(&tenant, &event_id, &price),
                        tenant,
                        account: AccountId::from("acc_1"),
                        customer: CustomerId::new(customer),
                        event_id,
                        subject,
                        description: name.clone(),
                        fee: Fee {
                            price_id: price.into(),
                            price_name: name.map(Into::into),
                            usage_type: usage_type_of(ut).unwrap(),
                            dimensions: dims,
                            volume_field: Some("tokens".into()),
                            volume: vol,
                            unit_price: rate,
                            volume_rate: rate,
                            package_size: vol,
                            amount,
                            asset: "USD".into(),
                            book: "standard".into(),
                            book_version: "2026-01-01".into(),
                            pricing_hash: "h".into(),
                        },
                        accepted_at: DateTime::from_timestamp(secs, nanos).unwrap(),
                        trace,
                    }
                },
            )
    }

    /// Valid contexts only: an all-zero id is never written (and reads back as none).
    fn trace() -> impl Strategy<Value = TraceContext> {
        (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>())
            .prop_map(|(trace_id, span_id, flags)| TraceContext {
                trace_id,
                span_id,
                flags,
            })
            .prop_filter("valid", TraceContext::is_valid)
    }

    /// A fixed charge for the golden encodings below.
    fn golden_debit(trace: Option<TraceContext>) -> Delivery {
        let mut d = match crate::outbox::tests::debit("tenant-a", "evt-1", "p0") {
            Delivery::Charge(d) => d,
            Delivery::Usage(_) | Delivery::Webhook(_) => unreachable!(),
        };
        d.accepted_at = DateTime::from_timestamp(1_790_000_000, 123_456_789).unwrap();
        d.trace = trace;
        Delivery::Charge(d)
    }

    const GOLDEN_TRACE: TraceContext = TraceContext {
        trace_id: [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36,
        ],
        span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
        flags: 0x01,
    };

    /// The `0x01` form as every earlier version wrote it (pinned: outboxes written before must
    /// keep opening), and what a charge without a trace context is still written as.
    const GOLDEN_V1: &str = include_str!("../../tests/golden/records/charge_v1.hex");
    /// The `0x02` form: the trace context, then the `0x01` fields.
    const GOLDEN_V2: &str = include_str!("../../tests/golden/records/charge_v2.hex");

    #[test]
    fn golden_encodings_of_both_charge_forms() {
        let v1 = encode(&golden_debit(None)).unwrap();
        let v2 = encode(&golden_debit(Some(GOLDEN_TRACE))).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/records");
            std::fs::write(format!("{dir}/charge_v1.hex"), hex::encode(&v1) + "\n").unwrap();
            std::fs::write(format!("{dir}/charge_v2.hex"), hex::encode(&v2) + "\n").unwrap();
            return;
        }
        assert_eq!(hex::encode(&v1), GOLDEN_V1.trim());
        assert_eq!(hex::encode(&v2), GOLDEN_V2.trim());
        assert_eq!(
            decode(&hex::decode(GOLDEN_V1.trim()).unwrap()).unwrap(),
            golden_debit(None)
        );
        assert_eq!(
            decode(&hex::decode(GOLDEN_V2.trim()).unwrap()).unwrap(),
            golden_debit(Some(GOLDEN_TRACE))
        );
        // The context costs 25 bytes when present, nothing when absent.
        assert_eq!(v2.len(), v1.len() + 25);
        assert_eq!(v2[0], CHARGE_V2);
        assert_eq!(&v2[26..], &v1[1..]);
    }

    #[test]
    fn an_all_zero_trace_context_reads_as_none() {
        let mut bytes = encode(&golden_debit(Some(GOLDEN_TRACE))).unwrap();
        bytes[1..17].fill(0);
        assert_eq!(decode(&bytes).unwrap(), golden_debit(None));
    }

    #[test]
    fn a_usage_record_carries_its_trace_context_only_when_it_has_one() {
        let usage = |trace| {
            Delivery::Usage(crate::domain::ForwardedUsage {
                tenant: TenantId::from("t"),
                account: AccountId::from("acc_1"),
                customer: CustomerId::from("cust_1"),
                event: serde_json::from_value(serde_json::json!({
                    "id": "e1", "event_type": "x", "occurred_at": "2026-01-01T00:00:00Z"
                }))
                .unwrap(),
                accepted_at: DateTime::from_timestamp(1_790_000_000, 0).unwrap(),
                trace,
            })
        };
        let plain = encode(&usage(None)).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("trace"));
        assert_eq!(decode(&plain).unwrap(), usage(None));
        let traced = encode(&usage(Some(GOLDEN_TRACE))).unwrap();
        assert!(String::from_utf8_lossy(&traced)
            .contains(r#""trace":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01""#));
        assert_eq!(decode(&traced).unwrap(), usage(Some(GOLDEN_TRACE)));
    }

    proptest! {
        #[test]
        fn charges_round_trip_exactly(d in debit()) {
            let d = Delivery::Charge(d);
            let bytes = encode(&d).unwrap();
            let traced = matches!(&d, Delivery::Charge(c) if c.trace.is_some());
            prop_assert_eq!(bytes[0], if traced { CHARGE_V2 } else { CHARGE_V1 });
            let back = decode(&bytes).unwrap();
            // Exact decimals: same value and same scale (0.50 stays 0.50, not 0.5).
            if let (Delivery::Charge(a), Delivery::Charge(b)) = (&d, &back) {
                prop_assert_eq!(a.fee.amount.scale(), b.fee.amount.scale());
            }
            prop_assert_eq!(back, d);
        }

        #[test]
        fn every_truncation_is_refused(d in debit()) {
            let bytes = encode(&Delivery::Charge(d)).unwrap();
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err(), "prefix of {} bytes decoded", cut);
            }
        }
    }

    #[test]
    fn a_json_record_of_the_earlier_format_still_decodes() {
        let d = crate::outbox::tests::debit("t", "e1", "p0");
        let json = serde_json::to_vec(&serde_json::json!({ "delivery": d })).unwrap();
        assert_eq!(json[0], b'{');
        assert_eq!(decode(&json).unwrap(), d);
    }

    #[test]
    fn trailing_bytes_and_unknown_tags_are_refused() {
        let d = crate::outbox::tests::debit("t", "e1", "p0");
        let mut bytes = encode(&d).unwrap();
        bytes.push(0);
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err.code(), "outbox_corrupt");
        assert!(err.to_string().contains("trailing"), "{err}");
        assert!(decode(&[0x7f, 1, 2]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn a_charge_is_less_than_half_its_json() {
        let d = crate::outbox::tests::debit("tenant-3", "evt-0123456789abcdef", "p0");
        let binary = encode(&d).unwrap().len();
        let json = serde_json::to_vec(&serde_json::json!({ "delivery": d }))
            .unwrap()
            .len();
        assert!(
            binary * 2 < json,
            "binary {binary} bytes, json {json} bytes"
        );
    }
}
