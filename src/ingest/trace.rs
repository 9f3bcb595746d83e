//! [`TraceRequests`]: the middleware that makes each tenant request a server span, when traces
//! are on.
//!
//! Contract: with an application's trace dispatch, a `POST` to `/events`, `/v1/events` or
//! `/v1/quote` runs (service call and every poll of its future) under that dispatch, inside a
//! server span that continues the caller's W3C trace (`traceparent`, `tracestate`); the span
//! gets the answer's status and, for an error, its problem `code`. The handlers add the
//! tenant, the event count and the outcome counts (`telemetry::traces::record_current`).
//! Anything else, and every request without a dispatch, passes through untouched: the
//! handler's future is not wrapped, moved or boxed again (actix boxed it already), which
//! keeps the request path's cost with traces off what it was.

use std::future::Future;
use std::pin::Pin;

use actix_web::body::MessageBody;
use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::Method;
use futures_util::future::{ready, Either, Ready};
use tracing::instrument::WithSubscriber;
use tracing::{Dispatch, Instrument};

use crate::outcome::Outcome;
use crate::telemetry::traces;

use super::problem::ApiError;

/// Wraps the tenant routes; see the module docs.
#[derive(Clone, Default)]
pub struct TraceRequests {
    dispatch: Option<Dispatch>,
}

impl TraceRequests {
    /// Traces under `dispatch` (an application's `telemetry::traces::Traces`), or nothing.
    pub fn new(dispatch: Option<Dispatch>) -> Self {
        TraceRequests { dispatch }
    }
}

impl<S, B> Transform<S, ServiceRequest> for TraceRequests
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = TraceRequestsService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(TraceRequestsService {
            service,
            dispatch: self.dispatch.clone(),
        }))
    }
}

pub struct TraceRequestsService<S> {
    service: S,
    dispatch: Option<Dispatch>,
}

type Traced<B> = Pin<Box<dyn Future<Output = Result<ServiceResponse<B>, actix_web::Error>>>>;

/// The span name and route of a traced request.
fn route(req: &ServiceRequest) -> Option<(&'static str, &'static str)> {
    if req.method() == Method::POST {
        match req.path() {
            "/events" => return Some(("POST /events", "/events")),
            "/v1/events" => return Some(("POST /v1/events", "/v1/events")),
            "/v1/quote" => return Some(("POST /v1/quote", "/v1/quote")),
            _ => {}
        }
    }
    // A call of the Credyt gateway: its endpoint's route (bounded: the gateway's table).
    match crate::gateway::table::match_path(req.method().as_str(), req.path()) {
        crate::gateway::table::Matched::Endpoint(e, _) => {
            let route = e.name.split_once(' ').map_or(e.name, |(_, r)| r);
            Some((e.name, route))
        }
        _ => None,
    }
}

impl<S, B> Service<ServiceRequest> for TraceRequestsService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = Either<S::Future, Traced<B>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let (Some(dispatch), Some((name, route))) = (&self.dispatch, route(&req)) else {
            return Either::Left(self.service.call(req));
        };
        let span = traces::server_span(Some(dispatch), name, route, req.headers());
        let call = tracing::dispatcher::with_default(dispatch, || {
            let _entered = span.enter();
            self.service.call(req)
        });
        let traced = call
            .instrument(span.clone())
            .with_subscriber(dispatch.clone());
        Either::Right(Box::pin(async move {
            let result = traced.await;
            match &result {
                Ok(res) => {
                    let code = res
                        .response()
                        .error()
                        .and_then(|e| e.as_error::<ApiError>())
                        .map(ApiError::code);
                    traces::record_response(&span, res.status().as_u16(), code);
                }
                Err(e) => {
                    let status = e.as_response_error().status_code().as_u16();
                    traces::record_response(&span, status, None);
                }
            }
            result
        }))
    }
}

/// Records the outcome counts of a request on the current (server) span.
pub(crate) fn record_outcomes(outcomes: &[Outcome]) {
    let mut counts = [0u64; 3];
    for o in outcomes {
        counts[match o {
            Outcome::Accepted { .. } => 0,
            Outcome::Duplicate => 1,
            Outcome::Rejected(_) => 2,
        }] += 1;
    }
    traces::record_current(traces::attr::ACCEPTED, counts[0]);
    traces::record_current(traces::attr::DUPLICATES, counts[1]);
    traces::record_current(traces::attr::REJECTED, counts[2]);
}
