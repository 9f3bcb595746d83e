//! The tenant gateway's one call: a tenant's request passed through to Credyt as it is, on the
//! tenant's own account (see `crate::gateway` for what may be passed).
//!
//! Contract: the request sent is built afresh: the method, the path (already matched and
//! re-encoded by the gateway), the query, `Content-Type` and the body; the platform key in
//! `X-CREDYT-API-KEY` and the tenant's account in `X-CREDYT-ACCOUNT`, nothing else of the
//! tenant's headers. Any status is an answer (returned as it is, never retried, redirects not
//! followed); only a transport failure is an error.

use reqwest::header::{HeaderValue, CONTENT_TYPE};

use super::{traces, CredytClient, UpstreamError, ACCOUNT, API_KEY};
use crate::domain::AccountId;
use crate::telemetry::metrics::Operation;
use crate::telemetry::traces::Call;

/// One gateway request, as the gateway matched it.
pub struct PassThrough<'a> {
    pub method: reqwest::Method,
    /// The endpoint's bounded name (e.g. `customers.get`): the span's name.
    pub operation: &'static str,
    /// Encoded path, starting with `/` (under the base URL's path).
    pub path: &'a str,
    /// The query string to send, without `?` (already cleaned by the gateway).
    pub query: Option<&'a str>,
    pub account: &'a AccountId,
    pub tenant: &'a str,
    /// `Content-Type` and body, for a request with a body.
    pub body: Option<(HeaderValue, bytes::Bytes)>,
}

impl CredytClient {
    /// Sends one gateway request; Credyt's answer, whatever its status.
    pub async fn passthrough(
        &self,
        call: PassThrough<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let inner = &self.inner;
        let mut url = inner.base.clone();
        url.set_path(&format!("{}{}", inner.base_path, call.path));
        url.set_query(call.query.filter(|q| !q.is_empty()));
        let method = call.method.clone();
        let mut req = inner
            .passthrough
            .request(call.method, url)
            .header(API_KEY, inner.key.value())
            .header(ACCOUNT, call.account.as_str())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some((content_type, body)) = call.body {
            req = req.header(CONTENT_TYPE, content_type).body(body);
        }
        let span_call = Call {
            name: call.operation,
            method: method_name(&method),
            operation: Operation::Gateway.as_str(),
        };
        let tenant = call.tenant;
        let fut = async move {
            let req = if traces::active() {
                let mut headers = reqwest::header::HeaderMap::new();
                traces::inject(&mut headers);
                req.headers(headers)
            } else {
                req
            };
            let started = std::time::Instant::now();
            let result = req.send().await.map_err(UpstreamError::Transport);
            if let Some(metrics) = &inner.metrics {
                let status = result.as_ref().ok().map(|r| r.status().as_u16());
                metrics.observe(Operation::Gateway, status, started.elapsed());
            }
            if let Ok(resp) = &result {
                traces::record_current(traces::attr::STATUS, resp.status().as_u16());
            }
            result
        };
        super::traced(span_call, Some(tenant), 0, std::iter::empty(), fut).await
    }
}

fn method_name(m: &reqwest::Method) -> &'static str {
    match *m {
        reqwest::Method::GET => "GET",
        reqwest::Method::POST => "POST",
        reqwest::Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}
