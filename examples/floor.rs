//! The floor: the cheapest server that does what every proxy request must do at least once,
//! read the same request body and parse it as JSON, then answer. No authentication, pricing,
//! storage or upstream call. The load-test kit measures it (and nginx in front of it) beside the
//! proxy, with the same load tool at the same concurrency, so the proxy's figures can be read as
//! ratios to it.
//!
//! `cargo run --release --example floor -- 127.0.0.1:18090 [workers]`
//!
//! Any `POST` parses its body as a JSON tree (the same `serde_json::Value` the proxy reads,
//! numbers kept as literal text) and answers `204`; a body that is not JSON gets `400`, so a
//! wrong request shape in the kit shows up as errors, not as a flattering figure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use actix_web::{web, App, HttpResponse, HttpServer};

async fn parse(body: web::Bytes) -> HttpResponse {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v.is_object() => HttpResponse::NoContent().finish(),
        _ => HttpResponse::BadRequest()
            .content_type("application/problem+json")
            .body(r#"{"status":400,"code":"invalid_json"}"#),
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18090".to_string());
    let workers: usize = args
        .next()
        .map(|w| w.parse().expect("workers"))
        .unwrap_or(1);
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(|| {
            App::new()
                .app_data(web::PayloadConfig::new(1024 * 1024))
                .default_service(web::post().to(parse))
        })
        .workers(workers)
        .backlog(4096)
        .bind(&listen)?;
        eprintln!("floor listening on {listen} ({workers} worker)");
        server.run().await
    })
}
