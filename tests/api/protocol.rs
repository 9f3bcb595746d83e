//! The tenant port below the routes, over raw TCP: what the HTTP/1 codec refuses by itself is
//! answered with problem+json too, and the responses around it are untouched.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proxy::World;

/// One response read off `conn`: status, lowercase header lines, body (by Content-Length).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn problem(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "status {} headers {:?}",
            self.status,
            self.headers
        );
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one response; `buf` keeps what was read past it.
async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Response {
    let deadline = Duration::from_secs(10);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(deadline, conn.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.trim_end().split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(deadline, conn.read(&mut chunk))
            .await
            .expect("a body in time")
            .unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Response {
        status,
        headers,
        body,
    }
}

/// A request head with `extra` header lines, for a GET of `/healthz`.
fn get_healthz(w: &World, extra: &str) -> String {
    format!(
        "GET /healthz HTTP/1.1\r\nhost: {}\r\n{extra}\r\n",
        w.app.tenant_addr()
    )
}

/// A valid `POST /events` with a bad key: a 401 problem with a body, then the connection stays.
fn post_unauthorized(w: &World) -> String {
    let body = "{}";
    format!(
        "POST /events HTTP/1.1\r\nhost: {}\r\nx-credyt-api-key: nope\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        w.app.tenant_addr(),
        body.len()
    )
}

#[actix_web::test]
async fn two_hundred_headers_get_a_431_problem_even_from_the_codec() {
    let w = World::start().await;
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut conn = TcpStream::connect(w.app.tenant_addr()).await.unwrap();
    conn.write_all(get_healthz(&w, &many).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!(r.status, 431);
    let problem = r.problem();
    assert_eq!(problem["code"], "headers_too_large");
    assert_eq!(problem["status"], 431);
    w.stop().await;
}

#[actix_web::test]
async fn a_64_kib_header_gets_a_431_problem() {
    let w = World::start().await;
    let big = format!("x-big: {}\r\n", "a".repeat(64 * 1024));
    let mut conn = TcpStream::connect(w.app.tenant_addr()).await.unwrap();
    conn.write_all(get_healthz(&w, &big).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.problem()["code"], "headers_too_large");
    // Just below the limits passes: 60 fields of 200 bytes.
    let fine: String = (0..60)
        .map(|i| format!("x-h{i}: {}\r\n", "b".repeat(200)))
        .collect();
    let mut conn = TcpStream::connect(w.app.tenant_addr()).await.unwrap();
    conn.write_all(get_healthz(&w, &fine).as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut conn, &mut Vec::new()).await;
    assert_eq!(r.status, 200);
    w.stop().await;
}

#[actix_web::test]
async fn on_a_kept_alive_connection_only_the_codecs_answer_is_rewritten() {
    let w = World::start().await;
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut conn = TcpStream::connect(w.app.tenant_addr()).await.unwrap();
    // Pipelined: an application problem, an empty 200, a HEAD (no body follows its head), a
    // 404 problem, then a head the codec refuses.
    let head = format!(
        "HEAD /healthz HTTP/1.1\r\nhost: {}\r\n\r\n",
        w.app.tenant_addr()
    );
    let missing = format!(
        "GET /nowhere HTTP/1.1\r\nhost: {}\r\n\r\n",
        w.app.tenant_addr()
    );
    let all = [
        post_unauthorized(&w),
        get_healthz(&w, ""),
        head,
        missing,
        get_healthz(&w, &many),
    ]
    .concat();
    conn.write_all(all.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.problem()["code"], "unauthorized");
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!(r.header("content-length"), Some("0"), "{:?}", r.headers);
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.problem()["code"], "not_found");
    let r = read_response(&mut conn, &mut buf).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.problem()["code"], "headers_too_large");
    w.stop().await;
}

#[actix_web::test]
async fn a_request_that_is_not_http_gets_a_400_problem() {
    let w = World::start().await;
    let mut conn = TcpStream::connect(w.app.tenant_addr()).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut conn, &mut Vec::new()).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.problem()["code"], "malformed_request");
    w.stop().await;
}
