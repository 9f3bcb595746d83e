//! The OpenAPI document of both ports (`docs/openapi.json`, issue 34), checked against the code
//! and against a running proxy.
//!
//! - The document names exactly the routes the code registers: the `routes` functions of
//!   `src/ingest/mod.rs` (tenant port) and `src/admin.rs` (admin port) are read for their
//!   `.route("/p", web::get()...)` and `web::resource("/p").route(web::post()...)` calls and
//!   compared with the document's operations, per port; a running proxy answers every
//!   documented operation (not its 404/405 default) and no other method on a documented path.
//! - Every problem `code` and every rejection code the code can give is documented, and none
//!   that it cannot.
//! - The document is valid OpenAPI 3.1 (`openapi-spec-validator`), and the admin port serves it
//!   byte for byte.
//! - schemathesis fuzzes both ports against it: no 5xx, and status codes, content types,
//!   headers and bodies as documented.
//!
//! The Python tools live in virtualenvs under `target/` (`venv.rs`): a machine without
//! `python3` fails these tests loudly.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::{HttpResponse, ResponseError};
use credyt_proxy::admin::AdminError;
use credyt_proxy::identity::IdentityError;
use credyt_proxy::ingest::problem::ApiError;
use credyt_proxy::outbox::OutboxError;
use credyt_proxy::ratelimit::{RateLimited, TenantQuota};
use credyt_proxy::upstream::UpstreamError;
use serde_json::{json, Value};

use super::proxy::{ago, emu_clear_faults, emu_customer, emu_faults, metric, repo, World};
use super::proxy::{eventually, scrape, Options};
use super::venv;

/// The validator, pinned.
const VALIDATOR: &str = "openapi-spec-validator==0.9.0";
/// The fuzzer, pinned.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// The admin token of the test worlds.
const TOKEN: &str = "openapi-admin-token-0123456789";
/// The path items' methods OpenAPI knows.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Port {
    Tenant,
    Admin,
}

/// One operation: its port, its method (upper case) and its path.
type Operation = (Port, String, String);

fn document() -> Value {
    let text = std::fs::read_to_string(repo().join("docs").join("openapi.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The port a path item is served on: the document's own server (the tenant port) unless the
/// item names the admin port's.
fn port_of(doc: &Value, path: &str, item: &Value) -> Port {
    let Some(servers) = item.get("servers") else {
        return Port::Tenant;
    };
    let url = servers[0]["url"].as_str().unwrap();
    assert!(url.ends_with(":9090"), "{path}: servers {servers}");
    assert_ne!(url, doc["servers"][0]["url"], "{path}");
    Port::Admin
}

/// Every operation of the document.
fn documented(doc: &Value) -> BTreeSet<Operation> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let port = port_of(doc, path, item);
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((port, method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// The code of `fn <name>(` up to the end of its body (a line `}` at its own indentation),
/// without whitespace: what the small parsers below read.
fn function(src: &str, signature: &str) -> String {
    let start = src
        .find(signature)
        .unwrap_or_else(|| panic!("no `{signature}` in the source"));
    let indent = src[..start].rsplit('\n').next().unwrap_or("").len();
    let end_marker = format!("\n{}}}\n", " ".repeat(indent));
    let end = src[start..]
        .find(&end_marker)
        .map_or(src.len(), |e| start + e);
    src[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// The string literal at the start of `s` (which starts right after its opening quote).
fn literal(s: &str) -> &str {
    &s[..s.find('"').unwrap()]
}

/// `src` up to its tests, without whitespace (so that a pattern does not depend on layout).
fn code_without_tests_or_whitespace(src: &str) -> String {
    src.split("#[cfg(test)]")
        .next()
        .unwrap()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// Each string literal that follows `prefix` in `src`'s code before its tests (whitespace
/// removed), with the text from that literal on.
fn literals_after(src: &str, prefix: &str) -> Vec<(String, String)> {
    let code = code_without_tests_or_whitespace(src);
    code.match_indices(prefix)
        .map(|(at, _)| {
            let rest = &code[at + prefix.len()..];
            (literal(rest).to_string(), rest.to_string())
        })
        .collect()
}

/// (METHOD, path) of every route a `routes` function registers: `.route("/p", web::get()...)`
/// and `web::resource("/p")...route(web::post()...)`. Panics on a form it does not know (a
/// scope, a method-less route, a service that is not a resource, a routing macro), so that a
/// route cannot hide from it.
fn registered(src: &str) -> BTreeSet<(String, String)> {
    for attribute in [
        "#[get(",
        "#[post(",
        "#[put(",
        "#[delete(",
        "#[patch(",
        "#[route(",
    ] {
        assert!(
            !src.contains(attribute),
            "`{attribute}`: teach tests/api/openapi.rs to read routing macros"
        );
    }
    let code = function(src, "pub fn routes(");
    for unknown in ["web::scope(", "web::route()", "web::method("] {
        assert!(
            !code.contains(unknown),
            "`{unknown}` in a routes function: teach tests/api/openapi.rs to read it"
        );
    }
    assert_eq!(
        code.matches(".service(").count(),
        code.matches("web::resource(").count(),
        "a service that is not a web::resource in a routes function: teach \
         tests/api/openapi.rs to read it"
    );
    let mut routes = BTreeSet::new();
    // `route("/p",web::get()`: a path of its own.
    for (at, _) in code.match_indices("route(\"") {
        let rest = &code[at + "route(\"".len()..];
        let path = literal(rest);
        let after = &rest[path.len()..];
        let method = after
            .strip_prefix("\",web::")
            .unwrap_or_else(|| panic!("route {path}: no web::<method>() after it: {after:.40}"));
        routes.insert((literal_ident(method).to_uppercase(), path.to_string()));
    }
    // `web::resource("/p")` and its `.route(web::post()` calls, up to the next resource.
    let resources: Vec<usize> = code
        .match_indices("web::resource(\"")
        .map(|(at, _)| at)
        .collect();
    for (i, at) in resources.iter().enumerate() {
        let rest = &code[at + "web::resource(\"".len()..];
        let path = literal(rest);
        let end = resources.get(i + 1).map_or(code.len(), |next| *next);
        let segment = &code[*at..end];
        let mut methods = 0;
        for (m, _) in segment.match_indices(".route(web::") {
            let method = &segment[m + ".route(web::".len()..];
            routes.insert((literal_ident(method).to_uppercase(), path.to_string()));
            methods += 1;
        }
        assert!(methods > 0, "resource {path} without a method route");
    }
    routes
}

/// The identifier at the start of `s` (`get` of `get().to(...)`).
fn literal_ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

fn source(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// The operations of one port, as (METHOD, path).
fn of_port(ops: &BTreeSet<Operation>, port: Port) -> BTreeSet<(String, String)> {
    ops.iter()
        .filter(|(p, _, _)| *p == port)
        .map(|(_, m, path)| (m.clone(), path.clone()))
        .collect()
}

/// Asserts that the code's routes and the document's operations of a port are the same set,
/// naming what is missing on each side.
fn assert_same_routes(
    port: Port,
    code: &BTreeSet<(String, String)>,
    doc: &BTreeSet<(String, String)>,
) {
    let undocumented: Vec<_> = code.difference(doc).collect();
    let unserved: Vec<_> = doc.difference(code).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "{port:?} port: routes without an operation in docs/openapi.json: {undocumented:?}; \
         operations in docs/openapi.json the code does not register: {unserved:?}"
    );
}

/// (METHOD, path) of every endpoint of the Credyt gateway's table, its id segments as `*`.
fn gateway_routes() -> BTreeSet<(String, String)> {
    use credyt_proxy::gateway::table::{Method, ENDPOINTS};
    ENDPOINTS
        .iter()
        .map(|e| {
            let method = match e.method {
                Method::Get => "GET",
                Method::Post => "POST",
                Method::Patch => "PATCH",
            };
            (method.to_string(), format!("/{}", e.pattern.join("/")))
        })
        .collect()
}

/// A documented path with its parameters (`{customerId}`) as `*`, as the gateway's table
/// writes them.
fn with_wildcards(ops: BTreeSet<(String, String)>) -> BTreeSet<(String, String)> {
    ops.into_iter()
        .map(|(m, p)| {
            let p = p
                .split('/')
                .map(|seg| {
                    if seg.starts_with('{') && seg.ends_with('}') {
                        "*"
                    } else {
                        seg
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            (m, p)
        })
        .collect()
}

#[test]
fn openapi_documents_exactly_the_routes_both_ports_register() {
    let doc = documented(&document());
    let mut tenant = registered(&source("src/ingest/mod.rs"));
    // The tenant port's default service passes the gateway's endpoints through.
    tenant.extend(gateway_routes());
    let admin = registered(&source("src/admin.rs"));
    assert!(
        tenant.len() >= 4 && admin.len() >= 6,
        "{tenant:?} {admin:?}"
    );
    assert_same_routes(
        Port::Tenant,
        &tenant,
        &with_wildcards(of_port(&doc, Port::Tenant)),
    );
    assert_same_routes(Port::Admin, &admin, &of_port(&doc, Port::Admin));
    // The servers register nothing besides those two functions.
    let app = source("src/app.rs");
    for form in [".route(", "web::resource(", "web::scope("] {
        assert!(
            !app.contains(form),
            "src/app.rs registers a route (`{form}`): move it into a routes function"
        );
    }
}

#[test]
fn openapi_route_reader_sees_a_route_added_to_either_port() {
    // What makes the comparison above able to fail: a route added to the code (in either form)
    // is read, so it is missing from the document.
    let ingest = source("src/ingest/mod.rs");
    let before = registered(&ingest);
    let anchor = ".route(\"/v1/quote\", web::post().to(post_quote))";
    assert!(ingest.contains(anchor), "the anchor moved: {anchor}");
    let added = ingest.replacen(
        anchor,
        &format!("{anchor}\n        .route(\"/v1/extra\", web::put().to(post_quote))"),
        1,
    );
    let after = registered(&added);
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        [&("PUT".to_string(), "/v1/extra".to_string())]
    );
    let doc = documented(&document());
    let result = std::panic::catch_unwind(|| {
        assert_same_routes(Port::Tenant, &after, &of_port(&doc, Port::Tenant))
    });
    assert!(result.is_err(), "an undocumented route went unnoticed");

    let admin = source("src/admin.rs");
    let before = registered(&admin);
    let anchor = ".route(web::get().to(list_dead_letters))";
    assert!(admin.contains(anchor), "the anchor moved: {anchor}");
    let added = admin.replacen(
        anchor,
        &format!("{anchor}\n            .route(web::delete().to(list_dead_letters))"),
        1,
    );
    let after = registered(&added);
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        [&("DELETE".to_string(), "/admin/dead-letters".to_string())]
    );
    // And an operation the code does not serve is noticed the other way round.
    let mut fewer = registered(&admin);
    fewer.remove(&("GET".to_string(), "/openapi.json".to_string()));
    let result = std::panic::catch_unwind(|| {
        assert_same_routes(Port::Admin, &fewer, &of_port(&doc, Port::Admin))
    });
    assert!(
        result.is_err(),
        "a documented but unserved route went unnoticed"
    );
}

/// Every string literal right after `=>` in `fn code(&self)` of `path`: the codes it gives.
fn code_fn_codes(path: &str) -> BTreeSet<String> {
    let code = function(&source(path), "pub fn code(&self)");
    let codes: BTreeSet<String> = code
        .match_indices("=>\"")
        .map(|(at, _)| literal(&code[at + 3..]).to_string())
        .collect();
    assert!(!codes.is_empty(), "no codes read from {path}");
    codes
}

/// The codes `wire.rs` rejects a request or an event with: the literal first argument of
/// `reject(`, `whole(` and of the `(code, message)` pairs of `parse_time`.
fn wire_codes() -> BTreeSet<String> {
    let code = code_without_tests_or_whitespace(&source("src/ingest/wire.rs"));
    let snake = |s: &str| s.contains('_') && s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    code.match_indices("(\"")
        .map(|(at, _)| literal(&code[at + 2..]))
        .filter(|lit| code.contains(&format!("(\"{lit}\",")) && snake(lit))
        .map(str::to_string)
        .collect()
}

/// The codes of the document's problem answers per port: (port -> codes), from each
/// operation's responses (`code` as `const` or `enum`).
fn documented_problem_codes(doc: &Value) -> BTreeMap<Port, BTreeSet<String>> {
    let resolve = |v: &Value| -> Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling {r}"))
                .clone(),
            None => v.clone(),
        }
    };
    let mut codes: BTreeMap<Port, BTreeSet<String>> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let port = port_of(doc, path, item);
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            for (status, response) in op["responses"].as_object().unwrap() {
                // The gateway's `default`: Credyt's own answers, passed through, not the proxy's.
                if status == "default" {
                    continue;
                }
                let response = resolve(response);
                let Some(schema) = response.pointer("/content/application~1problem+json/schema")
                else {
                    continue;
                };
                let mut found = 0;
                for part in schema["allOf"].as_array().unwrap() {
                    let code = &part["properties"]["code"];
                    let values: Vec<&Value> = match (code.get("const"), code.get("enum")) {
                        (Some(c), _) => vec![c],
                        (_, Some(e)) => e.as_array().unwrap().iter().collect(),
                        _ => continue,
                    };
                    for v in values {
                        codes
                            .entry(port)
                            .or_default()
                            .insert(v.as_str().unwrap().to_string());
                        found += 1;
                    }
                }
                assert!(
                    found > 0,
                    "{method} {path} {status}: a problem without its codes"
                );
            }
        }
    }
    codes
}

fn enum_of(doc: &Value, schema: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][schema]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no enum in {schema}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn openapi_documents_every_problem_and_rejection_code_the_code_gives() {
    let doc = document();
    let documented = documented_problem_codes(&doc);
    // The answers of the ports' default services (a path or a method the document does not
    // have) are not operations of the document.
    let defaults = ["not_found", "method_not_allowed"];
    let outbox = code_fn_codes("src/outbox/error.rs");
    let mut tenant = code_fn_codes("src/ingest/problem.rs");
    tenant.extend(code_fn_codes("src/identity/mod.rs"));
    tenant.extend(outbox.iter().cloned());
    let mut admin = code_fn_codes("src/admin.rs");
    admin.extend(outbox.iter().cloned());
    // The webhook relay's own answers (its listener is Credyt's, not a tenant's): documented
    // in docs/webhooks.md rather than here.
    let relay_doc = std::fs::read_to_string(super::proxy::repo().join("docs/webhooks.md")).unwrap();
    for code in [
        "missing_signature",
        "malformed_signature",
        "stale_signature",
        "invalid_signature",
        "invalid_webhook",
    ] {
        assert!(
            tenant.remove(code),
            "{code} is no longer a code of the relay"
        );
        assert!(
            relay_doc.contains(&format!("`{code}`")),
            "docs/webhooks.md does not document {code}"
        );
    }
    for (port, mut code) in [(Port::Tenant, tenant), (Port::Admin, admin)] {
        for d in defaults {
            assert!(code.remove(d), "{port:?}: no default code {d}");
        }
        let doc_codes = &documented[&port];
        let undocumented: Vec<_> = code.difference(doc_codes).collect();
        let unknown: Vec<_> = doc_codes.difference(&code).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "{port:?} port: problem codes the code gives but no response documents: \
             {undocumented:?}; documented codes the code never gives: {unknown:?}"
        );
    }

    // Rejection codes: the request's (422 `validation_failed`) and each event's (`/v1/events`
    // results, and the `errors` of a ValidationProblem).
    let mut rejections = wire_codes();
    rejections.extend(code_fn_codes("src/pricing/engine.rs"));
    // The pipeline's own (balance gating): each `code: "..."` literal of a rejection it builds.
    rejections.extend(
        literals_after(&source("src/ingest/pipeline.rs"), "code:\"")
            .into_iter()
            .map(|(code, _)| code),
    );
    assert!(rejections.len() > 20, "{rejections:?}");
    let mut doc_rejections = enum_of(&doc, "EventRejectionCode");
    doc_rejections.extend(enum_of(&doc, "RequestRejectionCode"));
    assert_eq!(
        rejections, doc_rejections,
        "rejection codes of src/ingest/wire.rs and src/pricing/engine.rs vs \
         EventRejectionCode + RequestRejectionCode"
    );
    // `POST /v1/balance/check`'s own: the code of each `invalid(field, code, ...)`.
    let check: BTreeSet<String> = literals_after(&source("src/ingest/mod.rs"), "invalid(\"")
        .into_iter()
        .filter_map(|(field, rest)| {
            let code = rest[field.len()..].strip_prefix("\",\"")?;
            Some(literal(code).to_string())
        })
        .collect();
    assert_eq!(check, enum_of(&doc, "BalanceCheckRejectionCode"));
}

/// The response `status` of `method path` in the document, its `$ref` resolved.
fn documented_response(doc: &Value, method: &str, path: &str, status: u16) -> Option<Value> {
    let response = doc["paths"][path][method]["responses"].get(status.to_string())?;
    Some(match response.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap().clone(),
        None => response.clone(),
    })
}

/// Asserts that `resp` (an error answer) is documented for `method path`: its status, its
/// code among that response's codes, the content type, and every header the document
/// requires there.
fn assert_documented_error(doc: &Value, method: &str, path: &str, resp: HttpResponse) {
    let status = resp.status().as_u16();
    let what = format!("{method} {path} {status}");
    let response = documented_response(doc, method, path, status)
        .unwrap_or_else(|| panic!("{what}: not documented"));
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/problem+json",
        "{what}"
    );
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        let header = match header.get("$ref").and_then(Value::as_str) {
            Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap(),
            None => header,
        };
        if header["required"] == true {
            assert!(
                resp.headers().contains_key(name.as_str()),
                "{what}: no {name} header"
            );
        }
    }
    let schema = response
        .pointer("/content/application~1problem+json/schema")
        .unwrap_or_else(|| panic!("{what}: not a problem"));
    let codes: Vec<&Value> = schema["allOf"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|part| part["properties"].get("code"))
        .flat_map(|c| match c.get("const") {
            Some(one) => vec![one],
            None => c["enum"].as_array().unwrap().iter().collect(),
        })
        .collect();
    let body = resp.into_body().try_into_bytes().unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        codes.contains(&&body["code"]),
        "{what}: {} is not among {codes:?}",
        body["code"]
    );
    assert_eq!(body["status"], status, "{what}");
}

/// One of each kind of outbox error.
fn outbox_errors() -> Vec<OutboxError> {
    let json_error = || serde_json::from_str::<Value>("x").unwrap_err();
    vec![
        OutboxError::Full {
            pending: 1,
            max_pending: 1,
        },
        OutboxError::InFlight,
        OutboxError::Poisoned,
        OutboxError::Closed,
        OutboxError::Storage(fjall::Error::Poisoned),
        OutboxError::Io(std::io::Error::other("disk")),
        OutboxError::Corrupt {
            partition: "p",
            source: json_error(),
        },
        OutboxError::Malformed {
            partition: "p",
            what: "w",
        },
        OutboxError::Encode(json_error()),
        OutboxError::UnknownSeq { seq: 1 },
        OutboxError::Locked { dir: "d".into() },
        OutboxError::Format {
            dir: "d".into(),
            found: "0".into(),
            expected: "1",
        },
    ]
}

#[actix_web::test]
async fn openapi_documents_each_error_under_its_status_with_its_headers() {
    // Every error of the tenant port's table, answered as the code answers it (status, code,
    // headers), is one the document gives for `POST /events` and `POST /v1/events`.
    let doc = document();
    let upstream = |status: u16| UpstreamError::Status {
        status: reqwest::StatusCode::from_u16(status).unwrap(),
        retry_after: Some(Duration::from_secs(2)),
        body: String::new(),
    };
    let quota = TenantQuota {
        per_second: NonZeroU32::new(1).unwrap(),
        burst: NonZeroU32::new(1).unwrap(),
    };
    let mut tenant = vec![
        ApiError::Unauthorized,
        ApiError::BadJson("x".into()),
        ApiError::UnsupportedMediaType,
        ApiError::UnsupportedEncoding("br".into()),
        ApiError::BadEncoding("x".into()),
        ApiError::PayloadTooLarge { limit: 1 },
        ApiError::Validation(Vec::new()),
        ApiError::RateLimited(RateLimited {
            retry_after: Duration::from_millis(1500),
            quota,
        }),
        ApiError::ExceedsBurst {
            events: 2,
            burst: 1,
        },
        ApiError::Identity(IdentityError::UnknownAccount("a".into())),
        ApiError::Identity(IdentityError::UnknownCustomer("c".into())),
        ApiError::Identity(IdentityError::Upstream(Arc::new(upstream(503)))),
        ApiError::Identity(IdentityError::Upstream(Arc::new(upstream(400)))),
        ApiError::Upstream(upstream(503)),
        ApiError::Upstream(upstream(429)),
        ApiError::Upstream(UpstreamError::Decode("x".into())),
        ApiError::Unavailable("x"),
        ApiError::HeadersTooLarge {
            max_fields: 1,
            max_bytes: 1,
        },
        ApiError::MalformedRequest,
        ApiError::RequestTimeout,
        ApiError::Internal,
    ];
    tenant.extend(outbox_errors().into_iter().map(ApiError::Outbox));
    for path in ["/events", "/v1/events"] {
        for e in &tenant {
            assert_documented_error(&doc, "post", path, e.error_response());
        }
    }
    // The admin port's, for both dead-letter operations.
    let cancelled = tokio::spawn(std::future::pending::<()>());
    cancelled.abort();
    let mut admin = vec![
        AdminError::Blocking(cancelled.await.unwrap_err()),
        AdminError::Disabled,
        AdminError::Unauthorized,
        AdminError::NoOutbox,
        AdminError::BadRequest("x".into()),
    ];
    admin.extend(outbox_errors().into_iter().map(AdminError::Outbox));
    for (method, path) in [
        ("get", "/admin/dead-letters"),
        ("post", "/admin/dead-letters/replay"),
    ] {
        for e in &admin {
            assert_documented_error(&doc, method, path, e.error_response());
        }
    }
}

/// `target/<venv>/bin/<tool>`, beside the venv's python.
fn tool(python: &std::path::Path, name: &str) -> PathBuf {
    python.with_file_name(name)
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn openapi_document_is_valid_openapi_3_1() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let python = venv::python("openapi-validator-venv", VALIDATOR);
    let path = repo().join("docs").join("openapi.json");
    let out = Command::new(tool(&python, "openapi-spec-validator"))
        .args(["--schema", "3.1", "--validation-errors", "all"])
        .arg(&path)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "openapi-spec-validator: {text}");
    assert!(text.contains(": OK"), "{text}");

    // And it fails on a broken document (a response without its description).
    let mut broken = doc.clone();
    broken["paths"]["/healthz"]["get"]["responses"]["200"] = json!({});
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("openapi.json");
    std::fs::write(&bad, serde_json::to_vec(&broken).unwrap()).unwrap();
    let out = Command::new(tool(&python, "openapi-spec-validator"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
}

/// A world with the outbox (so the dead-letter endpoints work) and the admin token.
async fn world() -> World {
    World::start_with(Options {
        ack: "durable",
        extra_config: format!("[admin]\ntoken = \"{TOKEN}\"\n"),
        ..Default::default()
    })
    .await
}

/// What a probe got: the status, the problem code (if any) and the `Allow` header (if any).
#[derive(Debug)]
struct Answer {
    status: u16,
    code: Option<String>,
    allow: Option<String>,
}

impl Answer {
    /// Whether it is a default answer: the path or the method is not served.
    fn is_default(&self) -> bool {
        (self.status == 404 && self.code.as_deref() == Some("not_found")) || self.status == 405
    }
}

/// Sends `method path` without a body.
async fn probe(w: &World, port: Port, method: &str, path: &str) -> Answer {
    let base = match port {
        Port::Tenant => w.proxy_url(),
        Port::Admin => w.admin_url(),
    };
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = w
        .http
        .request(method, format!("{base}{path}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let allow = resp
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Option<Value> = resp.json().await.ok();
    Answer {
        status,
        code: body.and_then(|b| b["code"].as_str().map(str::to_string)),
        allow,
    }
}

#[actix_web::test]
async fn openapi_every_documented_operation_is_served_and_no_other_method() {
    let w = world().await;
    let ops = documented(&document());
    // The probe tells the default answers apart: an unknown path on either port.
    for port in [Port::Tenant, Port::Admin] {
        let answer = probe(&w, port, "GET", "/no-such-path").await;
        assert!(answer.is_default(), "{port:?}: {answer:?}");
    }
    let mut paths: BTreeMap<(Port, String), BTreeSet<String>> = BTreeMap::new();
    for (port, method, path) in &ops {
        let answer = probe(&w, *port, method, path).await;
        assert!(
            !answer.is_default(),
            "{port:?} {method} {path} is documented but answers {answer:?}"
        );
        paths
            .entry((*port, path.clone()))
            .or_default()
            .insert(method.clone());
    }
    // Any other method on a documented path: 405 `method_not_allowed` naming the documented
    // methods in `Allow` (RFC 9110 15.5.6).
    for ((port, path), methods) in &paths {
        let allow = methods.iter().cloned().collect::<Vec<_>>().join(", ");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if methods.contains(method) {
                continue;
            }
            let answer = probe(&w, *port, method, path).await;
            assert!(
                answer.status == 405
                    && answer.code.as_deref() == Some("method_not_allowed")
                    && answer.allow.as_deref() == Some(allow.as_str()),
                "{port:?} {method} {path}: {answer:?}, not a 405 with Allow: {allow} \
                 (served but not documented?)"
            );
        }
    }
    w.stop().await;
}

#[actix_web::test]
async fn openapi_json_is_served_on_the_admin_port_byte_for_byte() {
    let w = world().await;
    // No token needed, although one is configured.
    let resp = w
        .http
        .get(format!("{}/openapi.json", w.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.bytes().await.unwrap();
    let committed = std::fs::read(repo().join("docs").join("openapi.json")).unwrap();
    assert!(
        body[..] == committed[..],
        "GET /openapi.json differs from docs/openapi.json (rebuild?)"
    );
    assert_eq!(credyt_proxy::admin::OPENAPI_JSON.as_bytes(), &committed[..]);
    // Not on the tenant port.
    let resp = w
        .http
        .get(format!("{}/openapi.json", w.proxy_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    w.stop().await;
}

/// One schemathesis run: the operations of a port, with or without credentials.
struct Pass {
    port: Port,
    url: String,
    /// The credentials, as a header line; `None` for a run that checks the 401 answers.
    header: Option<String>,
    /// Test cases per operation and phase.
    max_examples: u32,
    phases: &'static str,
}

/// The checks of every run: no 5xx, and each answer as documented (status, content type,
/// headers, body), 405 with `Allow` for an undocumented method, 401 without credentials.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      unsupported_method,allow_header_conformance,ignored_auth";

/// Runs schemathesis against the operations of `paths` as `pass` says.
fn schemathesis(st: &std::path::Path, pass: &Pass, paths: &[String]) -> Output {
    let escaped: Vec<String> = paths.iter().map(|p| p.replace('.', "\\.")).collect();
    let include = format!("^({})$", escaped.join("|"));
    let dir = tempfile::tempdir().unwrap();
    let hooks = repo().join("tests").join("openapi").join("hooks.py");
    let mut cmd = Command::new(st);
    cmd.current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", hooks)
        .arg("run")
        .arg(repo().join("docs").join("openapi.json"))
        .args(["--url", &pass.url])
        .args(["--include-path-regex", &include])
        .args(["--checks", CHECKS])
        .args(["--phases", pass.phases])
        .arg("--max-examples")
        .arg(pass.max_examples.to_string())
        .args([
            "--seed",
            "34",
            "--generation-database",
            "none",
            "--no-color",
        ])
        // One worker: CPython 3.11's `ast` module keeps its recursion depth per interpreter, not
        // per thread, and Hypothesis parses sources (to describe lambdas) from every worker,
        // which fails now and then with "AST constructor recursion depth mismatch" (CPython
        // issue 106905).
        .args(["--request-timeout", "10", "--workers", "1"])
        .args(["--output-truncate", "false"]);
    if let Some(header) = &pass.header {
        cmd.args(["--header", header]);
    }
    cmd.output().unwrap()
}

/// The sum of the samples of a Prometheus text whose series starts with `series`.
fn total(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_web::test]
async fn openapi_schemathesis_finds_no_discrepancy_on_either_port() {
    let st = tool(&venv::python("schemathesis-venv", SCHEMATHESIS), "st");
    let w = world().await;
    let doc = document();
    let ops = documented(&doc);
    let paths = |port| -> Vec<String> {
        of_port(&ops, port)
            .into_iter()
            .map(|(_, p)| p)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };

    // A dead letter for the admin listing to show: Credyt refuses one charge for good.
    let customer = "openapi-user";
    emu_customer(&w.http, &w.emulator, &w.a.account, customer).await;
    emu_faults(
        &w.http,
        &w.emulator,
        json!([{"path_prefix": "/customers/", "method": "POST", "rate_422": 1.0}]),
    )
    .await;
    let event = json!({"id": "dead-1", "event_type": "video_promoted", "occurred_at": ago(5)});
    let r = w
        .post(
            "/events",
            &w.a.key,
            &json!({"customer_external_id": customer, "events": [event]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let admin = w.admin_url();
    eventually(Duration::from_secs(10), "a dead letter", || async {
        (metric(&w.http, &admin, "credyt_proxy_outbox_dead_letters").await? >= 1).then_some(())
    })
    .await;
    emu_clear_faults(&w.http, &w.emulator).await;

    let all = "examples,coverage,fuzzing";
    let passes = [
        Pass {
            port: Port::Admin,
            url: w.admin_url(),
            header: Some(format!("Authorization: Bearer {TOKEN}")),
            max_examples: 30,
            phases: all,
        },
        Pass {
            port: Port::Tenant,
            url: w.proxy_url(),
            header: Some(format!("X-CREDYT-API-KEY: {}", w.a.key)),
            max_examples: 30,
            phases: all,
        },
        // Without credentials: the 401 answers (with their challenge) as documented.
        Pass {
            port: Port::Admin,
            url: w.admin_url(),
            header: None,
            max_examples: 5,
            phases: "examples,fuzzing",
        },
        Pass {
            port: Port::Tenant,
            url: w.proxy_url(),
            header: None,
            max_examples: 5,
            phases: "examples,fuzzing",
        },
    ];
    // Every pass runs, then their failures are reported together.
    let mut failures = Vec::new();
    let before = scrape(&w).await;
    for pass in passes {
        let paths = paths(pass.port);
        let st = st.clone();
        let (pass, out) = tokio::task::spawn_blocking(move || {
            let out = schemathesis(&st, &pass, &paths);
            (pass, out)
        })
        .await
        .unwrap();
        let text = output_text(&out);
        let what = format!(
            "schemathesis, {:?} port, {}",
            pass.port,
            if pass.header.is_some() {
                "with credentials"
            } else {
                "without credentials"
            }
        );
        println!("{what}: {text}");
        // It tested every operation of the port.
        let n = of_port(&ops, pass.port).len();
        let all_tested =
            text.contains(&format!("Selected: {n}/")) && text.contains(&format!("Tested: {n}\n"));
        if !out.status.success() || !all_tested {
            failures.push(format!("{what} ({n} operations): {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The examples (their time made the present by tests/openapi/hooks.py) reached accepted
    // events, duplicates and quotes: the document's schemas of those answers were checked too.
    let after = scrape(&w).await;
    let quotes = "credyt_proxy_http_request_duration_seconds_count{endpoint=\"/v1/quote\",status_class=\"2xx\"";
    for (sample, what) in [
        (
            "credyt_proxy_events_total{outcome=\"accepted\"",
            "accepted events",
        ),
        (
            "credyt_proxy_events_total{outcome=\"duplicate\"",
            "duplicates",
        ),
        (quotes, "quotes"),
    ] {
        assert!(
            total(&after, sample) > total(&before, sample),
            "schemathesis sent no request that got {what}: {after}"
        );
    }
    w.stop().await;
}
