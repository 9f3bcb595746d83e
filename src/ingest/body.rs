//! Reading a request body: its media type, its content coding, and the size limit.
//!
//! Contract: the body must be `application/json` (415 `unsupported_media_type` otherwise). It
//! may be sent as is (no `Content-Encoding`, or `identity`) or gzip-compressed
//! (`Content-Encoding: gzip`, for large batches); any other coding answers 415
//! `unsupported_encoding` with `Accept-Encoding: gzip, identity`, never a guess. The limit
//! (`server.max_body_bytes`) applies to the JSON the pipeline parses, i.e. *after*
//! decompression, and to the bytes on the wire as well: a gzip body is inflated as it arrives,
//! chunk by chunk, into a buffer that refuses to grow past the limit, so a decompression bomb
//! costs at most `limit` bytes of memory and of inflating before it gets 413. A gzip stream
//! that is corrupt or truncated answers 400 `invalid_encoding`.

use std::io::Write;

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use flate2::write::MultiGzDecoder;
use futures_util::StreamExt;

use super::problem::ApiError;

/// The content codings the tenant port accepts, for `Accept-Encoding` on a 415.
pub const ACCEPTED_ENCODINGS: &str = "gzip, identity";

/// How the body is coded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
}

fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let essence = v.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

/// The body's coding from every `Content-Encoding` header (a list, applied in order);
/// `identity` entries are no-ops, one `gzip` is supported, anything else is refused.
fn coding(req: &HttpRequest) -> Result<Coding, ApiError> {
    let mut coding = Coding::Identity;
    for value in req.headers().get_all(header::CONTENT_ENCODING) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::UnsupportedEncoding("(not ascii)".into()))?;
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name.eq_ignore_ascii_case("identity") {
                continue;
            }
            if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                if coding == Coding::Gzip {
                    // Compressed twice: legal, but no client does it for JSON.
                    return Err(ApiError::UnsupportedEncoding("gzip, gzip".into()));
                }
                coding = Coding::Gzip;
                continue;
            }
            // Named in the answer: bounded, it is the client's text.
            return Err(ApiError::UnsupportedEncoding(
                name.chars().take(64).collect(),
            ));
        }
    }
    Ok(coding)
}

/// A buffer that takes at most `limit` bytes, then refuses (and remembers it did).
struct Bounded {
    buf: web::BytesMut,
    limit: usize,
    overflowed: bool,
}

impl Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("body larger than the limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Inflates a gzip body as its chunks arrive, into at most `limit` bytes.
struct Inflater {
    decoder: MultiGzDecoder<Bounded>,
    limit: usize,
}

impl Inflater {
    fn new(limit: usize, capacity: usize) -> Inflater {
        Inflater {
            decoder: MultiGzDecoder::new(Bounded {
                buf: web::BytesMut::with_capacity(capacity.min(limit)),
                limit,
                overflowed: false,
            }),
            limit,
        }
    }

    fn error(&self, e: &std::io::Error) -> ApiError {
        if self.decoder.get_ref().overflowed {
            ApiError::PayloadTooLarge { limit: self.limit }
        } else {
            ApiError::BadEncoding(e.to_string())
        }
    }

    fn push(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        self.decoder.write_all(chunk).map_err(|e| self.error(&e))
    }

    fn finish(mut self) -> Result<web::BytesMut, ApiError> {
        self.decoder.try_finish().map_err(|e| self.error(&e))?;
        self.decoder
            .finish()
            .map(|b| b.buf)
            .map_err(|e| ApiError::BadEncoding(e.to_string()))
    }
}

/// Reads the body within `limit` (after decompression), checking type and coding first.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    if !is_json(req) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let coding = coding(req)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // The bytes on the wire are bounded too: compressed JSON is smaller than the JSON.
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = match coding {
        Coding::Identity => Decoded::Plain(web::BytesMut::with_capacity(
            declared.unwrap_or(1024).min(limit),
        )),
        // JSON compresses ~10x; start there and let the buffer grow up to the limit.
        Coding::Gzip => Decoded::Gzip(Box::new(Inflater::new(
            limit,
            declared.unwrap_or(1024).saturating_mul(10),
        ))),
    };
    let mut received = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadJson(format!("body could not be read: {e}")))?;
        received += chunk.len();
        if received > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        match &mut body {
            Decoded::Plain(buf) => buf.extend_from_slice(&chunk),
            Decoded::Gzip(inflater) => inflater.push(&chunk)?,
        }
    }
    match body {
        Decoded::Plain(buf) => Ok(buf),
        Decoded::Gzip(inflater) => inflater.finish(),
    }
}

/// The body being received, decoded as it arrives.
enum Decoded {
    Plain(web::BytesMut),
    /// Boxed: the inflater is much larger than a buffer, and only gzip bodies need it.
    Gzip(Box<Inflater>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn inflate(body: &[u8], limit: usize, chunk: usize) -> Result<web::BytesMut, ApiError> {
        let mut inflater = Inflater::new(limit, 16);
        for c in body.chunks(chunk) {
            inflater.push(c)?;
        }
        inflater.finish()
    }

    #[test]
    fn gzip_inflates_whatever_the_chunking() {
        let json = br#"{"customer_id":"cust_1","events":[]}"#.repeat(100);
        let body = gzip(&json);
        for chunk in [1, 7, 64, body.len()] {
            assert_eq!(&inflate(&body, json.len(), chunk).unwrap()[..], &json[..]);
        }
        // Two members (a concatenation of gzip files) are one body.
        let two = [gzip(b"{\"a\":"), gzip(b"1}")].concat();
        assert_eq!(&inflate(&two, 100, 5).unwrap()[..], b"{\"a\":1}");
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 64 MiB of zeros, ~64 KiB compressed.
        let bomb = {
            let mut e = GzEncoder::new(Vec::new(), Compression::best());
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..64 {
                e.write_all(&zeros).unwrap();
            }
            e.finish().unwrap()
        };
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        let mut inflater = Inflater::new(1 << 20, 16);
        let mut refused = None;
        for c in bomb.chunks(8192) {
            if let Err(e) = inflater.push(c) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(
            refused,
            Some(ApiError::PayloadTooLarge { limit }) if limit == 1 << 20
        ));
        assert!(inflater.decoder.get_ref().buf.len() <= 1 << 20);
        // Exactly at the limit is fine.
        let json = vec![b' '; 1000];
        assert_eq!(inflate(&gzip(&json), 1000, 100).unwrap().len(), 1000);
        assert!(matches!(
            inflate(&gzip(&json), 999, 100),
            Err(ApiError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn corrupt_or_truncated_gzip_is_a_bad_encoding() {
        let body = gzip(br#"{"events":[]}"#);
        let truncated = &body[..body.len() - 4];
        assert!(matches!(
            inflate(truncated, 1000, 3),
            Err(ApiError::BadEncoding(_))
        ));
        assert!(matches!(
            inflate(b"{\"plain\":1}", 1000, 3),
            Err(ApiError::BadEncoding(_))
        ));
        assert!(matches!(
            inflate(b"", 1000, 3),
            Err(ApiError::BadEncoding(_))
        ));
    }

    #[test]
    fn codings_are_accepted_or_refused_by_name() {
        let req = |values: &[&str]| {
            let mut t = actix_web::test::TestRequest::default();
            for v in values {
                t = t.append_header((header::CONTENT_ENCODING, *v));
            }
            t.to_http_request()
        };
        assert_eq!(coding(&req(&[])).unwrap(), Coding::Identity);
        assert_eq!(coding(&req(&["identity"])).unwrap(), Coding::Identity);
        assert_eq!(coding(&req(&["GZIP"])).unwrap(), Coding::Gzip);
        assert_eq!(coding(&req(&["identity, gzip"])).unwrap(), Coding::Gzip);
        for refused in [&["br"][..], &["gzip", "gzip"], &["zstd"], &["deflate"]] {
            assert!(
                matches!(coding(&req(refused)), Err(ApiError::UnsupportedEncoding(_))),
                "{refused:?}"
            );
        }
    }
}
