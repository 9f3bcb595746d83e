//! The tenant port's connections: problem+json even for what actix's HTTP/1 codec answers on
//! its own.
//!
//! Contract: every error the tenant port gives is RFC 7807 problem+json with a stable `code`.
//! Two layers make that true below the routes:
//!
//! - [`header_limits`] (middleware) enforces the port's own header limits, below the codec's:
//!   more than [`MAX_HEADER_FIELDS`] fields or [`MAX_HEADER_BYTES`] bytes of them answer 431
//!   `headers_too_large` through the error table.
//! - [`ProblemIo`] wraps each connection. actix-http's codec answers some requests itself,
//!   before any service sees them, with a bare status and an empty body: 431 when the head has
//!   more than 96 fields or exceeds 128 KiB (compile-time constants of actix-http, not
//!   settings), 400 when it is not HTTP/1.1, 408 when it does not arrive in time, 500 on a
//!   broken stream. The wrapper follows the responses the connection writes (their heads and
//!   `Content-Length`) and replaces such a bodiless error response with the same status and the
//!   problem+json body of the error table. The application never answers these statuses
//!   without a body, so nothing else is touched. A response it cannot frame (chunked, or a head
//!   it cannot read) turns it into a plain pass-through for the rest of the connection.
//!
//! Responses to `HEAD` get an empty body (`Content-Length: 0`) so that every response's length
//! is what its head says, which is what the wrapper relies on.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::problem::{ApiError, PROBLEM_JSON};

/// The most header fields a request may have (actix-http's codec stops at 96).
pub const MAX_HEADER_FIELDS: usize = 64;
/// The most bytes of header fields a request may have, names and values (as `name: value\r\n`).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

fn headers_too_large() -> ApiError {
    ApiError::HeadersTooLarge {
        max_fields: MAX_HEADER_FIELDS,
        max_bytes: MAX_HEADER_BYTES,
    }
}

/// Middleware of the tenant port: the header limits, and empty bodies for `HEAD`.
pub async fn header_limits(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let mut fields = 0usize;
    let mut bytes = 0usize;
    for (name, value) in req.headers() {
        fields += 1;
        bytes += name.as_str().len() + value.len() + 4;
    }
    if fields > MAX_HEADER_FIELDS || bytes > MAX_HEADER_BYTES {
        return Ok(req.error_response(headers_too_large()));
    }
    let head = req.method() == Method::HEAD;
    let res = next.call(req).await?;
    if head {
        return Ok(res.map_body(|_, _| BoxBody::new(())));
    }
    Ok(res.map_into_boxed_body())
}

/// Where the wrapper is in the stream of responses it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// At (or inside) a response head.
    Head,
    /// Inside a body: this many bytes to go.
    Body(u64),
    /// Lost track: everything passes unchanged.
    Passthrough,
}

/// Heads longer than this are not ours to read (the application's are a few hundred bytes).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A connection whose codec-made bodiless error responses become problem+json (module docs).
pub struct ProblemIo<T> {
    io: T,
    framing: Framing,
    /// The response head being collected.
    head: BytesMut,
    /// Bytes taken from the writer, not yet written to the connection.
    out: BytesMut,
}

impl<T> ProblemIo<T> {
    pub fn new(io: T) -> ProblemIo<T> {
        ProblemIo {
            io,
            framing: Framing::Head,
            head: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// Takes `data` from the writer into `out`, rewriting what needs it.
    fn take(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.framing {
                Framing::Passthrough => {
                    self.out.extend_from_slice(data);
                    return;
                }
                Framing::Body(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    let left = left - n as u64;
                    self.framing = if left == 0 {
                        Framing::Head
                    } else {
                        Framing::Body(left)
                    };
                }
                Framing::Head => {
                    let saved = self.head.len();
                    self.head.extend_from_slice(data);
                    let from = saved.saturating_sub(3);
                    let Some(end) = find_head_end(&self.head[from..]).map(|i| from + i) else {
                        if self.head.len() > MAX_RESPONSE_HEAD {
                            self.give_up();
                        }
                        return;
                    };
                    self.head.truncate(end);
                    // The end lies in what was just added (an earlier one would have ended the head).
                    data = &data[end.saturating_sub(saved)..];
                    let head = std::mem::take(&mut self.head);
                    self.framing = self.write_head(&head);
                }
            }
        }
    }

    /// Stops reading responses; what was collected goes out as it was.
    fn give_up(&mut self) {
        let head = std::mem::take(&mut self.head);
        self.out.extend_from_slice(&head);
        self.framing = Framing::Passthrough;
    }

    /// Writes one complete response head to `out` (rewritten if it is a codec-made error) and
    /// says what follows it.
    fn write_head(&mut self, head: &[u8]) -> Framing {
        let Some(parsed) = ResponseHead::parse(head) else {
            self.out.extend_from_slice(head);
            return Framing::Passthrough;
        };
        if parsed.chunked {
            self.out.extend_from_slice(head);
            return Framing::Passthrough;
        }
        let codec_error = match parsed.status {
            _ if parsed.content_length != 0 || parsed.has_content_type => None,
            431 => Some(headers_too_large()),
            400 => Some(ApiError::MalformedRequest),
            408 => Some(ApiError::RequestTimeout),
            500 => Some(ApiError::Internal),
            _ => None,
        };
        let Some(error) = codec_error else {
            self.out.extend_from_slice(head);
            return match parsed.content_length {
                0 => Framing::Head,
                n => Framing::Body(n),
            };
        };
        let body = error.problem_json();
        // The status line and the codec's other headers (date, connection) stay as they were.
        for line in head[..head.len() - 2].split_inclusive(|b| *b == b'\n') {
            if !line_is(line, b"content-length") {
                self.out.extend_from_slice(line);
            }
        }
        self.out
            .extend_from_slice(format!("content-type: {PROBLEM_JSON}\r\n").as_bytes());
        self.out
            .extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        self.out.extend_from_slice(&body);
        tracing::debug!(
            status = parsed.status,
            code = error.code(),
            "protocol error answered as problem+json"
        );
        Framing::Head
    }

    /// Writes `out` to the connection until it is empty or the connection is not ready.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        T: AsyncWrite + Unpin,
    {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// The index just past the `\r\n\r\n` that ends a head, if `buf` has it.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether header `line` (`name: value\r\n`) is named `name` (lowercase).
fn line_is(line: &[u8], name: &[u8]) -> bool {
    line.len() > name.len()
        && line[name.len()] == b':'
        && line[..name.len()].eq_ignore_ascii_case(name)
}

/// What the wrapper needs of a response head.
#[derive(Debug, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    content_length: u64,
    chunked: bool,
    has_content_type: bool,
}

impl ResponseHead {
    /// Reads `HTTP/1.x NNN reason\r\n(name: value\r\n)*\r\n`; `None` if it is not that.
    fn parse(head: &[u8]) -> Option<ResponseHead> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.strip_suffix("\r\n\r\n")?.split("\r\n");
        let status_line = lines.next()?;
        let rest = status_line.strip_prefix("HTTP/1.")?;
        let status = rest.get(2..5)?.parse::<u16>().ok()?;
        let mut parsed = ResponseHead {
            status,
            content_length: 0,
            chunked: false,
            has_content_type: false,
        };
        for line in lines {
            let (name, value) = line.split_once(':')?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                parsed.content_length = value.parse().ok()?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                parsed.chunked = true;
            } else if name.eq_ignore_ascii_case("content-type") {
                parsed.has_content_type = true;
            }
        }
        Some(parsed)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        // What was taken before goes out first: at most one writer's buffer waits here.
        ready!(me.poll_drain(cx))?;
        me.take(data);
        // Start writing now; what the connection does not take yet waits for the next call
        // (the writer flushes after writing).
        match me.poll_drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(data.len())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.framing == Framing::Head && !me.head.is_empty() {
            // A head cut short by the end of the connection: send what there is.
            me.give_up();
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(chunks: &[&[u8]]) -> Vec<u8> {
        let mut io = ProblemIo::new(());
        for c in chunks {
            io.take(c);
        }
        io.out.to_vec()
    }

    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: application/json\r\n\r\n{\"a\"}";
    const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n";
    const BARE_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\ndate: x\r\n\r\n";

    #[test]
    fn application_responses_pass_unchanged_however_they_are_cut() {
        let stream = [OK, NO_CONTENT, OK].concat();
        for size in [1, 2, 3, 5, 17, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            assert_eq!(through(&chunks), stream, "chunks of {size}");
        }
    }

    #[test]
    fn a_bare_431_after_other_responses_becomes_problem_json() {
        let stream = [OK, NO_CONTENT, BARE_431].concat();
        for size in [1, 4, 9, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            let out = through(&chunks);
            let prefix = [OK, NO_CONTENT].concat();
            assert_eq!(&out[..prefix.len()], &prefix[..]);
            let text = String::from_utf8(out[prefix.len()..].to_vec()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
            assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
            assert!(head.contains("\r\ncontent-type: application/problem+json\r\n"));
            assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
            assert!(!head.contains("content-length: 0"), "{head}");
            let problem: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(problem["code"], "headers_too_large");
            assert_eq!(problem["status"], 431);
        }
    }

    #[test]
    fn a_body_that_looks_like_a_bare_error_is_left_alone() {
        let body = BARE_431;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        let stream = [head.as_bytes(), body, NO_CONTENT].concat();
        assert_eq!(through(&[&stream]), stream);
        // An application 400 with a body is its own.
        let app_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(through(&[app_400]), app_400);
    }

    #[test]
    fn what_it_cannot_frame_passes_through() {
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let stream = [&chunked[..], BARE_431].concat();
        assert_eq!(through(&[&stream]), stream);
        let junk = b"not http at all\r\n\r\nHTTP/1.1 431 x\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(through(&[junk]), junk);
    }
}
