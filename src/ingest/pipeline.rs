//! One pipeline behind both ingest endpoints: authenticate, parse, rate-limit, map identity,
//! price, hand off to the sink, and give every event exactly one outcome.

use std::sync::Arc;

use actix_web::web;
use chrono::Utc;
use tracing::Instrument;

use crate::domain::{transaction_id, CustomerId, Debit, Delivery, ForwardedUsage, UsageEvent};
use crate::identity::{ForwardMode, Tenant};
use crate::outcome::{Outcome, Rejection};
use crate::pricing::period::{PeriodPart, TotalClaim};
use crate::pricing::PricingError;
use crate::telemetry::metrics::{BalanceRefusal, EventOutcome, TenantLabel};
use crate::telemetry::traces;

use super::finish::Finish;
use super::problem::ApiError;
use super::sink::{AcceptedEvent, Submitted};
use super::wire::{parse_request, CustomerRef};
use super::State;
use crate::balance::{Charge, Judgement, Reservation, Verdict};

/// How a request with some invalid events is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `POST /events` (Credyt-compatible): any invalid event fails the whole request, nothing
    /// of it is accepted.
    Atomic,
    /// `POST /v1/events`: each event gets its own outcome.
    Partial,
}

/// The tenant presenting `key`, or 401.
pub fn authenticate(state: &super::AppState, key: Option<&str>) -> Result<Arc<Tenant>, ApiError> {
    let key = key.ok_or(ApiError::Unauthorized)?;
    state
        .tenants
        .current()
        .authenticate(key)
        .cloned()
        .ok_or(ApiError::Unauthorized)
}

/// The field a pricing error concerns, for the ValidationProblem `errors` map.
fn pricing_field(index: usize, err: &PricingError) -> String {
    match err.code() {
        "unknown_event_type" => format!("events[{index}].event_type"),
        _ => format!("events[{index}].data"),
    }
}

/// What a request keeps while its accepted events are made durable: per event, its fees
/// (to become its outcome) or its rejection. Everything else (the parsed events, the
/// identities) is dropped before that wait, while it is still in the cache: with `sync =
/// "always"` hundreds of requests wait at once, and what each keeps is touched again only
/// after all of them ran.
type Plan = Vec<Result<Vec<crate::domain::Fee>, Rejection>>;

/// What `accept` hands on: the accepted events, the plan, and (balance gating on) the hold on
/// the accepted events' debits, in the order of the accepted events.
type Accepted = (Vec<AcceptedEvent>, Plan, Option<Reservation>);

/// An event judged acceptable: its fees and, for period-tiered prices, the parts the outbox
/// rates against the running totals.
type Judged = (UsageEvent, Vec<crate::domain::Fee>, Vec<PeriodPart>);

/// Runs one request through the pipeline. Takes the body, to let go of it once parsed.
pub async fn process(
    state: &State,
    tenant: &Tenant,
    body: web::BytesMut,
    mode: Mode,
) -> Result<Vec<Outcome>, ApiError> {
    let tenant_label = state.metrics.events.tenant_label(tenant.id.as_str());
    let (accepted, plan, reservation) = accept(state, tenant, &tenant_label, body, mode).await?;
    // From here on the request is being accepted: the hand-off and the counting finish even if
    // the client goes away (see the finish module).
    let sink = state.sink.clone();
    let metrics = state.metrics.clone();
    let stage = if accepted.is_empty() || !traces::active() {
        tracing::Span::none()
    } else {
        let records = accepted.iter().map(|e| e.deliveries.len()).sum();
        let name = match sink {
            super::sink::Sink::Durable(_) => "outbox commit",
            super::sink::Sink::Upstream(_) => "upstream delivery",
        };
        traces::stage_span(name, accepted.len(), records)
    };
    // Traced, the work keeps its dispatch also if it has to finish as a task of its own.
    Finish::new(
        async move {
            let charged_now = matches!(sink, super::sink::Sink::Upstream(_));
            let submitted = if accepted.is_empty() {
                Vec::new()
            } else if stage.is_disabled() {
                sink.submit(accepted).await?
            } else {
                // Boxed: the untraced future stays the size it was (it is moved on every request).
                let submitted = Box::pin(sink.submit(accepted))
                    .instrument(stage.clone())
                    .await;
                if let Err(e) = &submitted {
                    traces::record_error(&stage, e.code());
                }
                submitted?
            };
            // The holds follow the sink's answers (a failure above dropped, and so released, them).
            if let Some(r) = reservation {
                r.settle(
                    submitted.iter().map(|s| match s {
                        Submitted::Accepted(rated) => {
                            Some(rated.iter().map(|r| (r.fee, r.amount)).collect())
                        }
                        Submitted::Duplicate => None,
                    }),
                    charged_now,
                );
            }
            // The sink answers once per submitted event, in order; an accepted event's fees move
            // from the plan into its outcome (no copy).
            let mut submitted = submitted.into_iter();
            let mut outcomes = Vec::with_capacity(plan.len());
            for p in plan {
                outcomes.push(match p {
                    Err(rejection) => Outcome::Rejected(rejection),
                    Ok(mut fees) => match submitted.next() {
                        Some(Submitted::Accepted(rated)) => {
                            // Period-tiered fees as the outbox rated them at their totals.
                            for r in rated {
                                if let Some(fee) = fees.get_mut(r.fee) {
                                    fee.amount = r.amount;
                                    fee.unit_price = r.unit_price;
                                    fee.volume_rate = r.volume_rate;
                                }
                            }
                            Outcome::Accepted { fees }
                        }
                        Some(Submitted::Duplicate) => Outcome::Duplicate,
                        None => {
                            return Err(ApiError::Unavailable("the sink lost track of an event"))
                        }
                    },
                });
            }
            count(&metrics.events, &tenant_label, &outcomes);
            Ok(outcomes)
        },
        traces::current_dispatch(),
    )
    .await
    .unwrap_or(Err(ApiError::Unavailable(
        "the request's outcome was already taken",
    )))
}

/// Counts a request's outcomes: one add per kind of outcome, not one per event.
fn count(
    events: &crate::telemetry::metrics::EventMetrics,
    tenant: &TenantLabel,
    outcomes: &[Outcome],
) {
    let (mut accepted, mut duplicate, mut rejected, mut fees) = (0, 0, 0, 0);
    for o in outcomes {
        match o {
            Outcome::Accepted { fees: f } => {
                accepted += 1;
                fees += f.len() as u64;
            }
            Outcome::Duplicate => duplicate += 1,
            Outcome::Rejected(_) => rejected += 1,
        }
    }
    for (outcome, n, fees) in [
        (EventOutcome::Accepted, accepted, fees),
        (EventOutcome::Duplicate, duplicate, 0),
        (EventOutcome::Rejected, rejected, 0),
    ] {
        if n > 0 {
            events.record(tenant, outcome, n, fees);
        }
    }
}

/// Parses, rate-limits, judges and prices the events, maps the identities, and builds the
/// accepted events' deliveries: everything before the hand-off to the sink.
async fn accept(
    state: &State,
    tenant: &Tenant,
    tenant_label: &TenantLabel,
    body: web::BytesMut,
    mode: Mode,
) -> Result<Accepted, ApiError> {
    let now = Utc::now();
    let parsed = parse_request(&body, &state.settings.ingest, now)?;
    drop(body);
    let n = parsed.events.len();
    traces::record_current(traces::attr::EVENTS, n);
    state.metrics.http.observe_events(n);
    if let Err(limited) = tenant.limiter.check(u32::try_from(n).unwrap_or(u32::MAX)) {
        state.metrics.events.ratelimited(tenant_label, n as u64);
        return Err(limited.into());
    }

    // Judge every event before any I/O, so an invalid /events batch costs no lookup.
    let pricing = state.pricing.current();
    let durable = matches!(state.sink, super::sink::Sink::Durable(_));
    let mut judged: Vec<Result<Judged, Rejection>> = Vec::with_capacity(parsed.events.len());
    for (i, event) in parsed.events.into_iter().enumerate() {
        judged.push(event.and_then(|event| match tenant.forward {
            ForwardMode::Events => Ok((event, Vec::new(), Vec::new())),
            ForwardMode::Charges => match pricing.price_parts(tenant.id.as_str(), &event) {
                // Running totals live in the outbox only (a reload may bring period tiers
                // into a proxy that started without them).
                Ok((_, parts)) if !durable && !parts.is_empty() => {
                    let e = PricingError::PeriodNeedsOutbox {
                        price_id: parts[0].price.id.to_string(),
                    };
                    Err(Rejection {
                        code: e.code(),
                        field: pricing_field(i, &e),
                        message: e.to_string(),
                    })
                }
                Ok((fees, parts)) => Ok((event, fees, parts)),
                Err(e) => Err(Rejection {
                    code: e.code(),
                    field: pricing_field(i, &e),
                    message: e.to_string(),
                }),
            },
        }));
    }
    drop(pricing);
    if mode == Mode::Atomic {
        let rejections: Vec<Rejection> = judged
            .iter()
            .filter_map(|j| j.as_ref().err().cloned())
            .collect();
        if !rejections.is_empty() {
            state.metrics.events.record(
                tenant_label,
                EventOutcome::Rejected,
                rejections.len() as u64,
                0,
            );
            return Err(ApiError::Validation(rejections));
        }
    }

    let account = state.identity.account(tenant).await?;
    let customer: CustomerId = match parsed.customer {
        CustomerRef::Id(id) => {
            state
                .identity
                .check_customer(&account, &CustomerId::new(id.as_str()))
                .await?
        }
        CustomerRef::ExternalId(ext) => {
            state
                .identity
                .customer_by_external_id(&account, &ext, tenant.create_customers)
                .await?
        }
    };

    // A durable record keeps the request's trace context, for its delivery to link back to
    // (with `ack = "upstream"` the charges are children of this request's span already).
    let trace = match state.sink {
        super::sink::Sink::Durable(_) => traces::current_context(),
        super::sink::Sink::Upstream(_) => None,
    };
    let mut accepted = Vec::new();
    let mut plan = Vec::with_capacity(judged.len());
    for j in judged {
        let (event, fees, parts) = match j {
            Ok(ok) => ok,
            Err(rejection) => {
                plan.push(Err(rejection));
                continue;
            }
        };
        let event_id = event.id.clone();
        let mut totals = Vec::with_capacity(parts.len());
        let deliveries = match tenant.forward {
            ForwardMode::Events => vec![Delivery::Usage(ForwardedUsage {
                tenant: tenant.id.clone(),
                account: account.clone(),
                customer: customer.clone(),
                event,
                accepted_at: now,
                trace,
            })],
            ForwardMode::Charges => fees
                .iter()
                .enumerate()
                // A period-tiered fee gets its amount in the commit: its charge is kept until
                // then (and dropped there if it comes to zero).
                .filter(|(i, fee)| !fee.amount.is_zero() || parts.iter().any(|p| p.fee == *i))
                .enumerate()
                .map(|(delivery, (i, fee))| {
                    if let Some(part) = parts.iter().find(|p| p.fee == i) {
                        totals.push(TotalClaim {
                            key: part.key(tenant.id.as_str(), customer.as_str()),
                            delivery,
                            part: part.clone(),
                        });
                    }
                    Delivery::Charge(Debit {
                        transaction_id: transaction_id(&tenant.id, &event.id, &fee.price_id),
                        tenant: tenant.id.clone(),
                        account: account.clone(),
                        customer: customer.clone(),
                        event_id: event.id.clone(),
                        subject: event.subject.clone(),
                        description: event.description.clone(),
                        fee: fee.clone(),
                        accepted_at: now,
                        trace,
                    })
                })
                .collect(),
        };
        accepted.push(AcceptedEvent {
            tenant: tenant.id.clone(),
            event_id,
            deliveries,
            totals,
        });
        plan.push(Ok(fees));
    }
    let reservation = match &tenant.gate {
        Some(policy) if !accepted.is_empty() => Some(
            gate(
                state,
                tenant_label,
                policy,
                (&account, &customer),
                mode,
                &mut accepted,
                &mut plan,
            )
            .await?,
        ),
        _ => None,
    };
    Ok((accepted, plan, reservation))
}

/// Balance gating ([`crate::balance`]): judges the accepted events' debits against the end
/// user's balance and holds the allowed ones'. A refused event that was accepted before (a
/// resend) is left to the sink, which answers it `duplicate`. Otherwise, on `/events` one
/// refusal refuses the request (402, nothing held); on `/v1/events` the event becomes a
/// rejection and leaves `accepted`.
async fn gate(
    state: &State,
    tenant_label: &TenantLabel,
    policy: &crate::balance::GatePolicy,
    (account, customer): (&crate::domain::AccountId, &CustomerId),
    mode: Mode,
    accepted: &mut Vec<AcceptedEvent>,
    plan: &mut Plan,
) -> Result<Reservation, ApiError> {
    // A charge per delivery (a gated tenant forwards charges only, so indexes line up).
    let mut charges: Vec<Vec<Charge>> = accepted
        .iter()
        .map(|e| {
            e.deliveries
                .iter()
                .filter_map(|d| match d {
                    Delivery::Charge(debit) => Some(Charge::of(debit)),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let period_fees = rate_period_charges(state, accepted, &mut charges)?;
    let Judgement {
        verdicts,
        mut reservation,
    } = state
        .gate
        .judge(policy, account, customer, &charges)
        .await
        .map_err(ApiError::BalanceUnavailable)?;
    reservation.set_rated_fees(period_fees);
    if verdicts.iter().all(|v| *v == Verdict::Allowed) {
        return Ok(reservation);
    }
    // The plan index of each accepted event (accepted events are the plan's `Ok`s, in order).
    let at: Vec<usize> = plan
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.is_ok().then_some(i))
        .collect();
    let mut keep = Vec::with_capacity(verdicts.len());
    for (k, verdict) in verdicts.into_iter().enumerate() {
        let Verdict::Refused(shortfall) = verdict else {
            keep.push(true);
            continue;
        };
        let event = &accepted[k];
        if state.sink.was_accepted(&event.tenant, &event.event_id)? {
            keep.push(true);
            continue;
        }
        state.gate.metrics().refused(
            if shortfall.reserved {
                BalanceRefusal::Reserved
            } else {
                BalanceRefusal::Insufficient
            },
            1,
        );
        let index = at[k];
        match mode {
            Mode::Atomic => {
                state
                    .metrics
                    .events
                    .record(tenant_label, EventOutcome::Rejected, 1, 0);
                return Err(ApiError::InsufficientBalance {
                    index,
                    event_id: event.event_id.as_str().to_string(),
                    shortfall,
                });
            }
            Mode::Partial => {
                plan[index] = Err(Rejection {
                    code: "insufficient_balance",
                    field: format!("events[{index}]"),
                    message: format!(
                        "the end user's available {} balance is {}; this event needs {} and at least {} must remain",
                        shortfall.asset, shortfall.available, shortfall.required, shortfall.min_available
                    ),
                });
                keep.push(false);
            }
        }
    }
    reservation.retain(&keep);
    let mut k = 0;
    accepted.retain(|_| {
        let kept = keep[k];
        k += 1;
        kept
    });
    Ok(reservation)
}

/// A period-tiered charge is priced at a running total of zero until the outbox rates it at
/// the customer's total: for judging, rate it now at the total the outbox holds (plus what
/// this request's earlier events add), which is what the commit charges unless another
/// request of the same customer commits in between. Returns, per event, (fee index,
/// transaction id) of its period-tiered charges, for the hold to take the rated amount.
fn rate_period_charges(
    state: &State,
    accepted: &[AcceptedEvent],
    charges: &mut [Vec<Charge>],
) -> Result<Vec<Vec<(usize, uuid::Uuid)>>, ApiError> {
    let super::sink::Sink::Durable(outbox) = &state.sink else {
        return Ok(Vec::new());
    };
    if accepted.iter().all(|e| e.totals.is_empty()) {
        return Ok(Vec::new());
    }
    let mut running: std::collections::HashMap<&str, rust_decimal::Decimal> =
        std::collections::HashMap::new();
    let mut fees = Vec::with_capacity(accepted.len());
    for (event, charges) in accepted.iter().zip(charges.iter_mut()) {
        let mut of_event = Vec::with_capacity(event.totals.len());
        for claim in &event.totals {
            let total = match running.get(&*claim.key) {
                Some(t) => *t,
                None => outbox.running_total(&claim.key).map_err(ApiError::Outbox)?,
            };
            if let (Ok(rated), Some(charge)) =
                (claim.part.rate(total), charges.get_mut(claim.delivery))
            {
                charge.amount = rated.amount;
                of_event.push((claim.part.fee, charge.transaction_id));
            }
            if let Ok(after) = claim.part.after(total) {
                running.insert(&claim.key, after);
            }
        }
        fees.push(of_event);
    }
    Ok(fees)
}
