//! `Credyt-Signature` verification (API.md §8.3).
//!
//! `Credyt-Signature: t=<unix seconds>,v0=<hex>[,v0=<hex>...]`, where each `v0` is the lowercase
//! hex HMAC-SHA256 of `"<t>.<raw body>"` keyed with the destination's whole secret string
//! (`whsec_` included). A request passes when `|now - t|` is within the tolerance and any `v0`
//! matches any configured secret (several secrets: rotation). The body is the raw bytes as
//! received, before any parsing; every comparison is constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Credyt-Signature header is missing")]
    Missing,
    #[error("the Credyt-Signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "the signature timestamp is {age} s away from now, beyond the tolerance of {tolerance} s"
    )]
    Stale { age: i64, tolerance: u64 },
    #[error("no signature matches the body")]
    Mismatch,
}

/// Checks `header` against the raw `body` at time `now` (unix seconds).
pub fn verify(
    header: Option<&[u8]>,
    body: &[u8],
    secrets: &[&[u8]],
    tolerance_secs: u64,
    now: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| SignatureError::Malformed("not utf-8"))?;
    let mut t: Option<&str> = None;
    let mut signatures: Vec<[u8; 32]> = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            return Err(SignatureError::Malformed("an item is not key=value"));
        };
        match key {
            "t" if t.is_none() => t = Some(value),
            "t" => return Err(SignatureError::Malformed("t appears twice")),
            "v0" => {
                let mut sig = [0u8; 32];
                // Another length or non-hex can never match: skip it, as an unknown scheme.
                if hex::decode_to_slice(value, &mut sig).is_ok() {
                    signatures.push(sig);
                }
            }
            // Other schemes may be added by Credyt; they are not ours to judge.
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed("no t="))?;
    let ts: i64 = t
        .parse()
        .map_err(|_| SignatureError::Malformed("t is not unix seconds"))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v0 signature"));
    }
    let age = now.saturating_sub(ts);
    if age.unsigned_abs() > tolerance_secs {
        return Err(SignatureError::Stale {
            age,
            tolerance: tolerance_secs,
        });
    }
    let mut matched = subtle::Choice::from(0);
    for secret in secrets {
        let expected = expected(secret, t, body);
        for sig in &signatures {
            matched |= expected.ct_eq(sig);
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn expected(secret: &[u8], t: &str, body: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return [0; 32];
    };
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SECRET: &[u8] = b"whsec_4emulatortestsecret0000000";
    const T: i64 = 1_767_225_600;

    /// API.md §8.3's test vector: the compact form of `webhook-subscription-activated.json`.
    fn vector_body() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/credyt/examples/webhook-subscription-activated.json"
        );
        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        serde_json::to_vec(&value).unwrap()
    }

    fn header(sigs: &[&str]) -> String {
        let mut h = format!("t={T}");
        for s in sigs {
            h.push_str(",v0=");
            h.push_str(s);
        }
        h
    }

    const VECTOR: &str = "c43474218af66f2ad9627b952dcd71b1225204aebf6db8a5559d3ac0f1d47c01";

    #[test]
    fn the_documented_test_vector_verifies() {
        let body = vector_body();
        assert_eq!(body.len(), 267);
        let h = header(&[VECTOR]);
        assert_eq!(verify(Some(h.as_bytes()), &body, &[SECRET], 300, T), Ok(()));
    }

    #[test]
    fn any_v0_against_any_secret_passes_and_nothing_else_does() {
        let body = vector_body();
        let other = [0u8; 32];
        let h = header(&[&hex::encode(other), VECTOR]);
        let secrets: [&[u8]; 2] = [b"whsec_old", SECRET];
        assert_eq!(verify(Some(h.as_bytes()), &body, &secrets, 300, T), Ok(()));
        assert_eq!(
            verify(Some(h.as_bytes()), &body, &[b"whsec_old"], 300, T),
            Err(SignatureError::Mismatch)
        );
        let mut changed = body.clone();
        changed[10] ^= 1;
        assert_eq!(
            verify(
                Some(header(&[VECTOR]).as_bytes()),
                &changed,
                &[SECRET],
                300,
                T
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_stale_either_way() {
        let body = vector_body();
        let h = header(&[VECTOR]);
        assert!(verify(Some(h.as_bytes()), &body, &[SECRET], 300, T + 300).is_ok());
        assert!(matches!(
            verify(Some(h.as_bytes()), &body, &[SECRET], 300, T + 301),
            Err(SignatureError::Stale { age: 301, .. })
        ));
        assert!(matches!(
            verify(Some(h.as_bytes()), &body, &[SECRET], 300, T - 301),
            Err(SignatureError::Stale { .. })
        ));
    }

    #[test]
    fn malformed_and_missing_headers_are_told_apart() {
        let body = b"{}";
        assert_eq!(
            verify(None, body, &[SECRET], 300, T),
            Err(SignatureError::Missing)
        );
        for bad in [
            "",
            "v0=00",
            "t=abc,v0=00",
            "t=1,t=2,v0=00",
            "nonsense",
            "t=1",
        ] {
            assert!(
                matches!(
                    verify(Some(bad.as_bytes()), body, &[SECRET], 300, 1),
                    Err(SignatureError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }
}
