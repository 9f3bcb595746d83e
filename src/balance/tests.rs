//! The gate's arithmetic, with Credyt's balance primed (no read is made): holds, releases,
//! settlement, and the races that must err on the side of refusing.

use std::time::Duration;

use rust_decimal_macros::dec;

use super::*;
use crate::config::CredytSettings;

fn gate() -> Arc<Gate> {
    let client = CredytClient::new(&CredytSettings {
        // Never called: every test primes the balance first.
        base_url: "http://127.0.0.1:9".into(),
        api_key: crate::config::Secret::new("k"),
        api_key_file: None,
        timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_millis(100),
        max_idle_per_host: 1,
    })
    .unwrap();
    Arc::new(Gate::new(
        client,
        BalanceSettings {
            ttl: Duration::from_secs(3600),
            unknown_ttl: Duration::from_secs(1),
        },
        BalanceMetrics::default(),
    ))
}

fn key() -> (AccountId, CustomerId) {
    (AccountId::new("acc_1"), CustomerId::new("cust_1"))
}

impl Gate {
    /// Sets Credyt's balance as if just read.
    fn prime(&self, usd: Decimal) {
        let (a, c) = key();
        self.with_entry(&(a, c), |e| {
            let mut available = Assets::default();
            available.add(&Arc::from("USD"), usd);
            e.credyt = Some(Snapshot {
                read_at: Instant::now(),
                stale: false,
                available,
            });
        });
    }

    fn credyt_usd(&self) -> Decimal {
        self.with_entry(&key(), |e| {
            e.credyt
                .as_ref()
                .map_or(Decimal::ZERO, |s| s.available.get("USD"))
        })
    }

    fn is_stale(&self) -> bool {
        self.with_entry(&key(), |e| e.credyt.as_ref().is_none_or(|s| s.stale))
    }
}

fn charge(n: u128, amount: Decimal) -> Charge {
    Charge {
        transaction_id: Uuid::from_u128(n),
        asset: Arc::from("USD"),
        amount,
    }
}

fn policy(min: Decimal) -> GatePolicy {
    GatePolicy {
        min_available: min,
        on_unknown: OnUnknown::Deny,
    }
}

fn debit(n: u128, amount: Decimal) -> Debit {
    let (account, customer) = key();
    Debit {
        transaction_id: Uuid::from_u128(n),
        tenant: crate::domain::TenantId::new("t"),
        account,
        customer,
        event_id: crate::domain::EventId::new(format!("e{n}")),
        subject: None,
        description: None,
        fee: crate::domain::Fee {
            price_id: Arc::from("p"),
            price_name: None,
            usage_type: crate::domain::UsageType::Unit,
            dimensions: Default::default(),
            volume_field: None,
            volume: None,
            unit_price: None,
            volume_rate: None,
            package_size: None,
            amount,
            asset: Arc::from("USD"),
            book: Arc::from("b"),
            book_version: Arc::from("v"),
            pricing_hash: Arc::from("h"),
        },
        accepted_at: chrono::Utc::now(),
        trace: None,
    }
}

async fn judge(g: &Arc<Gate>, min: Decimal, events: &[Vec<Charge>]) -> Judgement {
    let (a, c) = key();
    g.judge(&policy(min), &a, &c, events).await.unwrap()
}

#[tokio::test]
async fn events_are_allowed_until_the_balance_would_fall_below_the_minimum() {
    let g = gate();
    g.prime(dec!(1.00));
    let events: Vec<Vec<Charge>> = (0..5).map(|i| vec![charge(i, dec!(0.30))]).collect();
    let j = judge(&g, dec!(0), &events).await;
    let allowed = j
        .verdicts
        .iter()
        .filter(|v| **v == Verdict::Allowed)
        .count();
    assert_eq!(allowed, 3, "0.90 of 1.00 fits, a fourth 0.30 does not");
    assert_eq!(
        j.verdicts[3],
        Verdict::Refused(Shortfall {
            asset: Arc::from("USD"),
            available: dec!(0.10),
            required: dec!(0.30),
            min_available: dec!(0),
            reserved: true,
        })
    );
    let (a, c) = key();
    assert_eq!(g.held(&a, &c, "USD"), dec!(0.90));
    // A negative minimum is an overdraft allowance.
    drop(j);
    g.prime(dec!(1.00));
    let j = judge(&g, dec!(-0.50), &events).await;
    assert_eq!(
        j.verdicts
            .iter()
            .filter(|v| **v == Verdict::Allowed)
            .count(),
        5
    );
}

#[tokio::test]
async fn an_event_is_judged_on_all_its_fees_together() {
    let g = gate();
    g.prime(dec!(1.00));
    let j = judge(
        &g,
        dec!(0),
        &[vec![charge(1, dec!(0.60)), charge(2, dec!(0.60))]],
    )
    .await;
    assert!(matches!(&j.verdicts[0], Verdict::Refused(s) if s.required == dec!(1.20)));
    let (a, c) = key();
    assert_eq!(
        g.held(&a, &c, "usd"),
        dec!(0),
        "nothing of a refused event is held"
    );
}

#[tokio::test]
async fn dropping_a_judgement_releases_its_holds_and_settling_keeps_only_accepted_ones() {
    let g = gate();
    g.prime(dec!(10));
    let (a, c) = key();
    let j = judge(&g, dec!(0), &[vec![charge(1, dec!(1))]]).await;
    drop(j);
    assert_eq!(g.held(&a, &c, "USD"), dec!(0));
    assert!(
        g.is_stale(),
        "an unsettled hold may have reached credyt: read again"
    );

    g.prime(dec!(10));
    let j = judge(
        &g,
        dec!(0),
        &[vec![charge(1, dec!(1))], vec![charge(2, dec!(2))]],
    )
    .await;
    // The sink accepted the first, found the second a duplicate.
    j.reservation
        .settle([Some(vec![]), None].into_iter(), false);
    assert_eq!(g.held(&a, &c, "USD"), dec!(1));
    // The forwarder reports Credyt's confirmation: the hold ends and the cached balance,
    // read before the charge, loses it.
    g.settled(&debit(1, dec!(1)), true);
    assert_eq!(g.held(&a, &c, "USD"), dec!(0));
    assert_eq!(g.credyt_usd(), dec!(9));
}

#[tokio::test]
async fn a_dead_letter_ends_the_hold_without_touching_the_balance() {
    let g = gate();
    g.prime(dec!(10));
    let (a, c) = key();
    let j = judge(&g, dec!(0), &[vec![charge(1, dec!(4))]]).await;
    j.reservation.settle([Some(vec![])].into_iter(), false);
    g.settled(&debit(1, dec!(4)), false);
    assert_eq!(g.held(&a, &c, "USD"), dec!(0));
    assert_eq!(g.credyt_usd(), dec!(10));
}

#[tokio::test]
async fn with_ack_upstream_an_accepted_hold_ends_as_a_charge_at_once() {
    let g = gate();
    g.prime(dec!(10));
    let (a, c) = key();
    let j = judge(&g, dec!(0), &[vec![charge(1, dec!(4))]]).await;
    j.reservation.settle([Some(vec![])].into_iter(), true);
    assert_eq!(g.held(&a, &c, "USD"), dec!(0));
    assert_eq!(g.credyt_usd(), dec!(6));
}

#[tokio::test]
async fn a_resend_of_a_held_event_is_not_held_twice_and_its_duplicate_releases_nothing() {
    let g = gate();
    g.prime(dec!(1));
    let (a, c) = key();
    let first = judge(&g, dec!(0), &[vec![charge(1, dec!(1))]]).await;
    first.reservation.settle([Some(vec![])].into_iter(), false);
    // Sent again while the first is pending: its debit is held already, so it is allowed
    // (the sink answers it duplicate) and releasing the resend leaves the first's hold.
    let again = judge(&g, dec!(0), &[vec![charge(1, dec!(1))]]).await;
    assert_eq!(again.verdicts, vec![Verdict::Allowed]);
    again.reservation.settle([None].into_iter(), false);
    assert_eq!(g.held(&a, &c, "USD"), dec!(1));
}

#[tokio::test]
async fn retain_releases_the_holds_of_events_left_out() {
    let g = gate();
    g.prime(dec!(10));
    let (a, c) = key();
    let mut j = judge(
        &g,
        dec!(0),
        &[vec![charge(1, dec!(1))], vec![charge(2, dec!(2))]],
    )
    .await;
    j.reservation.retain(&[false, true]);
    assert_eq!(g.held(&a, &c, "USD"), dec!(2));
    j.reservation.settle([Some(vec![])].into_iter(), false);
    assert_eq!(g.held(&a, &c, "USD"), dec!(2));
}

#[test]
fn a_charge_confirmed_while_the_balance_is_read_is_taken_off_the_read() {
    let g = gate();
    let k = key();
    let notify = Arc::new(Notify::new());
    g.with_entry(&k, |e| e.reading = Some(Arc::clone(&notify)));
    // Credyt confirms a 3.00 charge while the read is in flight; the read may have been
    // answered before it, so it lands with the charge taken off.
    g.settled(&debit(7, dec!(3)), true);
    let read = Read {
        gate: &g,
        key: &k,
        notify,
        landed: false,
    };
    read.land(Ok(vec![crate::upstream::wire::WalletAccount {
        name: "default".into(),
        asset: "USD".into(),
        available: dec!(10),
    }]));
    assert_eq!(g.credyt_usd(), dec!(7));
    assert!(!g.is_stale());
}

#[test]
fn an_invalidation_during_a_read_lands_the_read_stale() {
    let g = gate();
    let k = key();
    g.prime(dec!(1));
    let notify = Arc::new(Notify::new());
    g.with_entry(&k, |e| e.reading = Some(Arc::clone(&notify)));
    g.invalidate(&k.0, &k.1);
    let read = Read {
        gate: &g,
        key: &k,
        notify,
        landed: false,
    };
    read.land(Ok(vec![]));
    assert!(
        g.is_stale(),
        "the read may predate the top-up the webhook announced"
    );
    assert_eq!(
        g.credyt_usd(),
        dec!(0),
        "no wallet account: nothing available"
    );
}

#[test]
fn only_the_default_wallet_account_counts() {
    let g = gate();
    let k = key();
    let notify = Arc::new(Notify::new());
    g.with_entry(&k, |e| e.reading = Some(Arc::clone(&notify)));
    let read = Read {
        gate: &g,
        key: &k,
        notify,
        landed: false,
    };
    read.land(Ok(vec![
        crate::upstream::wire::WalletAccount {
            name: "promo".into(),
            asset: "USD".into(),
            available: dec!(100),
        },
        crate::upstream::wire::WalletAccount {
            name: "default".into(),
            asset: "usd".into(),
            available: dec!(2.5),
        },
    ]));
    assert_eq!(g.credyt_usd(), dec!(2.5));
}

#[test]
fn sweeping_keeps_customers_with_holds_and_drops_idle_ones() {
    let g = gate();
    g.track(&debit(1, dec!(1)));
    g.with_entry(
        &(AccountId::new("acc_1"), CustomerId::new("cust_idle")),
        |e| e.used = Instant::now() - Duration::from_secs(3 * 3600),
    );
    g.with_entry(&key(), |e| {
        e.used = Instant::now() - Duration::from_secs(3 * 3600)
    });
    g.sweep();
    assert_eq!(g.entries.load(Ordering::Relaxed), 1);
    let (a, c) = key();
    assert_eq!(g.held(&a, &c, "USD"), dec!(1));
}

#[tokio::test]
async fn a_hold_takes_the_amount_the_sink_rated() {
    let g = gate();
    g.prime(dec!(10));
    let (a, c) = key();
    // Judged at an estimate of 3.00; the outbox rated the charge (fee 0) at 1.25.
    let mut j = judge(
        &g,
        dec!(0),
        &[vec![charge(1, dec!(3))], vec![charge(2, dec!(4))]],
    )
    .await;
    j.reservation.set_rated_fees(vec![
        vec![(0, Uuid::from_u128(1))],
        vec![(0, Uuid::from_u128(2))],
    ]);
    assert_eq!(g.held(&a, &c, "USD"), dec!(7));
    // The second charge was rated to nothing: it was dropped, and so is its hold.
    j.reservation.settle(
        [Some(vec![(0, dec!(1.25))]), Some(vec![(0, dec!(0))])].into_iter(),
        false,
    );
    assert_eq!(g.held(&a, &c, "USD"), dec!(1.25));
}
