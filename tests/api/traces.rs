//! Acceptance tests of traces (issue 28): the real proxy exports OTLP/HTTP to a real receiver
//! started here on 127.0.0.1:0, which decodes each export with `opentelemetry-proto`.
//!
//! Each proxy of these tests exports through a trace pipeline of its own (see
//! `telemetry::traces`: per application, not the process-wide subscriber), so they run in
//! parallel with each other and with every other test of this binary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{json, Value};

use super::proxy::{ago, eventually, Options, World};

/// One span as the receiver got it (ids in lowercase hex).
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// 1 internal, 2 server, 3 client.
    kind: i32,
    attributes: Vec<(String, String)>,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

impl Received {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf).
struct Receiver {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    server: actix_web::dev::ServerHandle,
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

async fn export(
    spans: web::Data<Mutex<Vec<Received>>>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    assert_eq!(
        req.headers().get("content-type").unwrap(),
        "application/x-protobuf"
    );
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut got = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Received {
                    service: service.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    spans.lock().unwrap().extend(got);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = web::Data::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let data = spans.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 << 20))
                .route("/v1/traces", web::post().to(export))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            addr,
            spans: spans.into_inner(),
            server: handle,
        }
    }

    /// The `[telemetry]` table pointing a proxy here (base URL: the proxy appends
    /// `/v1/traces`), with a short batch delay.
    fn config(&self) -> String {
        format!(
            "[telemetry]\nendpoint = \"http://{}\"\nservice_name = \"proxy-under-test\"\n\
             traces_schedule_delay_ms = 50\n",
            self.addr
        )
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `find` finds something in what was received.
    async fn wait<T>(&self, what: &str, find: impl Fn(&[Received]) -> Option<T>) -> T {
        eventually(Duration::from_secs(15), what, || {
            let found = find(&self.spans());
            async move { found }
        })
        .await
    }

    async fn stop(self) {
        self.server.stop(true).await;
    }
}

/// A caller's W3C trace context: (traceparent, trace id, span id).
fn caller() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

fn body(user: &str, id: &str) -> Value {
    json!({"customer_external_id": user, "events": [
        {"id": id, "event_type": "video_promoted", "occurred_at": ago(5)}
    ]})
}

/// POSTs `body` to `path` of the proxy with tenant A's key and `traceparent`.
async fn post_traced(w: &World, path: &str, traceparent: &str, body: &Value) -> u16 {
    w.http
        .post(format!("{}{path}", w.proxy_url()))
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("traceparent", traceparent)
        .header("tracestate", "caller=1")
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CHARGE: &str = "POST /customers/{id}/wallet/charges";

/// The server span of the request in trace `trace_id`.
fn server_span(spans: &[Received], trace_id: &str) -> Option<Received> {
    spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.kind == SERVER)
        .cloned()
}

/// The forwarder's charge spans linked to `server`.
fn charges_linked_to(spans: &[Received], server: &Received) -> Vec<Received> {
    spans
        .iter()
        .filter(|s| {
            s.kind == CLIENT
                && s.name == CHARGE
                && s.links
                    .iter()
                    .any(|(t, sp)| *t == server.trace_id && *sp == server.span_id)
        })
        .cloned()
        .collect()
}

/// The `traceparent` of each charge the emulator logged.
async fn charge_traceparents(w: &World) -> Vec<String> {
    w.requests()
        .await
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"].as_str().unwrap().ends_with("/charges"))
        .filter_map(|r| r["traceparent"].as_str().map(str::to_string))
        .collect()
}

#[actix_web::test]
async fn a_traced_request_continues_the_callers_trace_and_its_delivery_links_back() {
    let receiver = Receiver::start().await;
    let w = World::start_with(Options {
        ack: "durable",
        extra_config: receiver.config(),
        ..Default::default()
    })
    .await;
    assert!(w.app.traces().is_some());
    let (traceparent, trace_id, caller_span) = caller();
    let status = post_traced(&w, "/v1/events", &traceparent, &body("traced-1", "t-1")).await;
    assert_eq!(status, 200);

    // The server span continues the caller's trace, with bounded attributes only.
    let server = receiver
        .wait("the server span", |s| server_span(s, &trace_id))
        .await;
    assert_eq!(server.parent_span_id, caller_span);
    assert_eq!(server.name, "POST /v1/events");
    assert_eq!(server.service, "proxy-under-test");
    assert_eq!(server.attr("credyt_proxy.tenant"), Some("tenant-a"));
    assert_eq!(server.attr("http.route"), Some("/v1/events"));
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    assert_eq!(server.attr("credyt_proxy.events"), Some("1"));
    assert_eq!(server.attr("credyt_proxy.accepted"), Some("1"));
    assert_eq!(server.attr("credyt_proxy.rejected"), Some("0"));
    for (k, v) in &server.attributes {
        assert!(
            !v.contains(&w.a.key) && !v.contains("traced-1") && !v.contains("t-1"),
            "{k}={v}: no keys, end users or event ids in attributes"
        );
    }

    // Its children: the identity lookups that went to Credyt (a new end user: looked up,
    // then created) and the commit wait.
    let spans = receiver
        .wait("the commit span", |s| {
            s.iter()
                .any(|c| c.parent_span_id == server.span_id && c.name == "outbox commit")
                .then(|| s.to_vec())
        })
        .await;
    let children: Vec<&Received> = spans
        .iter()
        .filter(|c| c.trace_id == trace_id && c.parent_span_id == server.span_id)
        .collect();
    let commit = children.iter().find(|c| c.name == "outbox commit").unwrap();
    assert_eq!(commit.attr("credyt_proxy.records"), Some("1"));
    let lookup = children
        .iter()
        .find(|c| c.name == "GET /customers")
        .expect("the identity lookup is a child client span");
    assert_eq!(lookup.kind, CLIENT);
    assert_eq!(
        lookup.attr("credyt_proxy.upstream.operation"),
        Some("find_customer")
    );
    assert_eq!(lookup.attr("http.response.status_code"), Some("404"));
    assert!(children.iter().any(|c| c.name == "POST /customers"));

    // The forwarder's call to Credyt: a client span linked to the server span, whose
    // traceparent the charge carried.
    let charge = receiver
        .wait("the charge span linked to the request", |s| {
            charges_linked_to(s, &server).into_iter().next()
        })
        .await;
    assert_ne!(
        charge.trace_id, trace_id,
        "a delivery is a trace of its own"
    );
    assert_eq!(charge.parent_span_id, "");
    assert_eq!(
        charge.attr("credyt_proxy.upstream.operation"),
        Some("charge")
    );
    assert_eq!(charge.attr("credyt_proxy.tenant"), Some("tenant-a"));
    assert_eq!(charge.attr("http.response.status_code"), Some("201"));
    let sent = charge_traceparents(&w).await;
    assert_eq!(
        sent,
        vec![format!("00-{}-{}-01", charge.trace_id, charge.span_id)]
    );

    // A refused request and a quote are server spans too: the status and the problem code,
    // and a 4xx is not the server's error.
    let (traceparent, refused_trace, _) = caller();
    let refused = w
        .http
        .post(format!("{}/events", w.proxy_url()))
        .header("X-CREDYT-API-KEY", "cpk_not_a_tenant")
        .header("traceparent", &traceparent)
        .json(&body("x", "x-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let (traceparent, quote_trace, _) = caller();
    let quote = json!({"id": "q", "event_type": "video_promoted", "occurred_at": ago(5)});
    assert_eq!(
        post_traced(&w, "/v1/quote", &traceparent, &quote).await,
        200
    );
    let (refused, quote) = receiver
        .wait("the refused request and the quote", |s| {
            Some((
                server_span(s, &refused_trace)?,
                server_span(s, &quote_trace)?,
            ))
        })
        .await;
    assert_eq!(refused.attr("http.response.status_code"), Some("401"));
    assert_eq!(refused.attr("error.type"), Some("unauthorized"));
    assert_eq!(refused.attr("credyt_proxy.tenant"), None);
    assert_eq!(quote.name, "POST /v1/quote");
    assert_eq!(quote.attr("credyt_proxy.tenant"), Some("tenant-a"));
    assert_eq!(quote.attr("http.response.status_code"), Some("200"));
    w.stop().await;
    receiver.stop().await;
}

#[actix_web::test]
async fn the_link_survives_a_restart_between_ack_and_delivery() {
    let receiver = Receiver::start().await;
    let w = World::start_with(Options {
        ack: "durable",
        outbox_config: "forwarder = false".into(),
        extra_config: receiver.config(),
        ..Default::default()
    })
    .await;
    let (traceparent, trace_id, _) = caller();
    let status = post_traced(&w, "/events", &traceparent, &body("restart-1", "r-1")).await;
    assert_eq!(status, 204);
    let server = receiver
        .wait("the server span", |s| server_span(s, &trace_id))
        .await;
    assert_eq!(server.name, "POST /events");
    assert_eq!(server.attr("http.response.status_code"), Some("204"));
    assert!(charge_traceparents(&w).await.is_empty());

    // A new process on the same outbox, the forwarder on: the record carried the context.
    let w = w.restart("").await;
    let charge = receiver
        .wait("the charge span linked to the request", |s| {
            charges_linked_to(s, &server).into_iter().next()
        })
        .await;
    let sent = charge_traceparents(&w).await;
    assert_eq!(
        sent,
        vec![format!("00-{}-{}-01", charge.trace_id, charge.span_id)]
    );
    w.stop().await;
    receiver.stop().await;
}

#[actix_web::test]
async fn a_coalesced_charge_links_to_every_request_it_carries() {
    let receiver = Receiver::start().await;
    // Records are taken at most once per window; the first refill happens at start, so both
    // requests below land in the next one.
    let w = World::start_with(Options {
        ack: "durable",
        outbox_config: "coalesce_window_ms = 3000".into(),
        extra_config: receiver.config(),
        ..Default::default()
    })
    .await;
    let (tp1, trace1, _) = caller();
    let (tp2, trace2, _) = caller();
    let (b1, b2) = (body("coalesced", "c-1"), body("coalesced", "c-2"));
    let (s1, s2) = tokio::join!(
        post_traced(&w, "/events", &tp1, &b1),
        post_traced(&w, "/events", &tp2, &b2),
    );
    assert_eq!((s1, s2), (204, 204));
    let (server1, server2) = receiver
        .wait("both server spans", |s| {
            Some((server_span(s, &trace1)?, server_span(s, &trace2)?))
        })
        .await;
    let charge = receiver
        .wait("one charge linked to both requests", |s| {
            charges_linked_to(s, &server1)
                .into_iter()
                .find(|c| !charges_linked_to(std::slice::from_ref(c), &server2).is_empty())
        })
        .await;
    assert_eq!(
        charge.attr("credyt_proxy.upstream.operation"),
        Some("charge_coalesced")
    );
    assert_eq!(charge.attr("credyt_proxy.records"), Some("2"));
    assert_eq!(charge.links.len(), 2);
    w.stop().await;
    receiver.stop().await;
}

#[actix_web::test]
async fn with_ack_upstream_the_charges_are_children_of_the_request() {
    let receiver = Receiver::start().await;
    let w = World::start_with(Options {
        ack: "upstream",
        extra_config: receiver.config(),
        ..Default::default()
    })
    .await;
    let (traceparent, trace_id, _) = caller();
    let status = post_traced(&w, "/events", &traceparent, &body("upstream-1", "u-1")).await;
    assert_eq!(status, 204);
    let (server, delivery, charge) = receiver
        .wait("the request's charge", |s| {
            let server = server_span(s, &trace_id)?;
            let delivery = s
                .iter()
                .find(|d| d.parent_span_id == server.span_id && d.name == "upstream delivery")?
                .clone();
            let charge = s
                .iter()
                .find(|c| c.parent_span_id == delivery.span_id && c.name == CHARGE)?
                .clone();
            Some((server, delivery, charge))
        })
        .await;
    assert_eq!(delivery.trace_id, server.trace_id);
    assert_eq!(charge.trace_id, trace_id);
    assert!(charge.links.is_empty(), "its parent is the request already");
    assert_eq!(
        charge_traceparents(&w).await,
        vec![format!("00-{trace_id}-{}-01", charge.span_id)]
    );
    w.stop().await;
    receiver.stop().await;
}

#[actix_web::test]
async fn a_request_the_caller_did_not_sample_is_not_exported_nor_linked() {
    let receiver = Receiver::start().await;
    let w = World::start_with(Options {
        ack: "durable",
        extra_config: receiver.config(),
        ..Default::default()
    })
    .await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let unsampled = format!("00-{trace_id}-00f067aa0ba902b7-00");
    assert_eq!(
        post_traced(&w, "/events", &unsampled, &body("unsampled", "n-1")).await,
        204
    );
    // A sampled request after it, to know the exports got this far.
    let (traceparent, sampled, _) = caller();
    assert_eq!(
        post_traced(&w, "/events", &traceparent, &body("unsampled", "n-2")).await,
        204
    );
    let server = receiver
        .wait("the sampled request", |s| server_span(s, &sampled))
        .await;
    receiver
        .wait("its charge", |s| {
            charges_linked_to(s, &server).into_iter().next()
        })
        .await;
    // The unsampled request's charge went out too: it carried no trace context (the caller
    // did not sample the request), so its delivery is a root span without links, sampled by
    // the configured sampler on its own.
    let unlinked = receiver
        .wait("the other charge, unlinked", |s| {
            s.iter()
                .find(|c| c.name == CHARGE && c.links.is_empty())
                .cloned()
        })
        .await;
    assert_ne!(unlinked.trace_id, trace_id);
    assert!(receiver
        .spans()
        .iter()
        .all(|s| s.trace_id != trace_id && s.links.iter().all(|(t, _)| *t != trace_id)));
    w.stop().await;
    receiver.stop().await;
}

/// No endpoint: no trace pipeline at all (no exporter, no processor, no queue), no span
/// anywhere, and nothing propagated to Credyt.
#[actix_web::test]
async fn with_no_endpoint_no_exporter_runs_and_nothing_is_propagated() {
    let w = World::start_with(Options {
        ack: "durable",
        ..Default::default()
    })
    .await;
    assert!(w.app.traces().is_none());
    assert!(!credyt_proxy::telemetry::traces::active());
    let (traceparent, _, _) = caller();
    assert_eq!(
        post_traced(&w, "/events", &traceparent, &body("untraced", "x-1")).await,
        204
    );
    eventually(Duration::from_secs(10), "the charge", || async {
        w.requests()
            .await
            .iter()
            .find(|r| r["path"].as_str().unwrap().ends_with("/charges"))
            .cloned()
    })
    .await;
    assert!(w
        .requests()
        .await
        .iter()
        .all(|r| r.get("traceparent").is_none()));
    w.stop().await;
}

#[actix_web::test]
async fn a_gateway_call_is_a_client_span_of_the_tenant_request() {
    let receiver = Receiver::start().await;
    let w = World::start_with(Options {
        extra_config: receiver.config(),
        ..Default::default()
    })
    .await;
    let (traceparent, trace_id, _) = caller();
    let resp = w
        .http
        .get(format!("{}/customers", w.proxy_url()))
        .header("X-CREDYT-API-KEY", &w.a.key)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (server, client) = receiver
        .wait("the gateway's client span", |s| {
            let server = server_span(s, &trace_id)?;
            let client = s
                .iter()
                .find(|c| c.parent_span_id == server.span_id && c.name == "customers.list")?
                .clone();
            Some((server, client))
        })
        .await;
    assert_eq!(client.kind, CLIENT);
    assert_eq!(client.trace_id, server.trace_id);
    // Credyt got the client span's context.
    let sent: Vec<String> = w
        .requests()
        .await
        .iter()
        .filter(|r| r["method"] == "GET" && r["path"] == "/customers")
        .filter_map(|r| r["traceparent"].as_str().map(str::to_string))
        .collect();
    assert_eq!(sent, vec![format!("00-{trace_id}-{}-01", client.span_id)]);
    w.stop().await;
    receiver.stop().await;
}
