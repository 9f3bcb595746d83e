//! Credyt-shaped identifiers: `<prefix>_` + 26 characters of lowercase Crockford base32
//! (`0-9a-z` without `i l o u`), the first of which is always `4`, as in every real id seen.
//! Contract: ids are random (122 bits of entropy), never reused within a process in practice,
//! and always pass [`is_valid`].

use rand::Rng;

/// Lowercase Crockford base32: the 32 symbols Credyt ids are drawn from.
pub(crate) const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Length of the part after the prefix and underscore.
pub(crate) const BODY_LEN: usize = 26;

/// A fresh id such as `cust_4qh0wajx2n9qtazh2tghzkyan2`.
pub(crate) fn new_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let mut out = String::with_capacity(prefix.len() + 1 + BODY_LEN);
    out.push_str(prefix);
    out.push('_');
    // The leading `4` mirrors the observed ids (a timestamp-ordered prefix upstream).
    out.push('4');
    for _ in 1..BODY_LEN {
        out.push(char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]));
    }
    out
}

/// A random string of `len` Crockford characters (used for webhook secrets).
pub(crate) fn random_body(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// Whether `id` has the exact Credyt shape for `prefix`.
pub(crate) fn is_valid(id: &str, prefix: &str) -> bool {
    let Some(body) = id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
    else {
        return false;
    };
    body.len() == BODY_LEN && body.starts_with('4') && body.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_have_the_credyt_shape() {
        for prefix in ["acc", "cust", "whd", "whe"] {
            for _ in 0..200 {
                let id = new_id(prefix);
                assert!(is_valid(&id, prefix), "{id}");
                let body = &id[prefix.len() + 1..];
                assert_eq!(body.len(), 26);
                assert!(body.starts_with('4'));
                assert!(!body.contains(['i', 'l', 'o', 'u']), "{id}");
                assert!(!body.chars().any(|c| c.is_ascii_uppercase()), "{id}");
            }
        }
    }

    #[test]
    fn ids_are_distinct() {
        let a = new_id("cust");
        let b = new_id("cust");
        assert_ne!(a, b);
    }

    #[test]
    fn validation_rejects_wrong_shapes() {
        assert!(is_valid("cust_4qh0wajx2n9qtazh2tghzkyan2", "cust"));
        assert!(!is_valid("cust_5qh0wajx2n9qtazh2tghzkyan2", "cust"));
        assert!(!is_valid("cust_4qh0wajx2n9qtazh2tghzkyan", "cust"));
        assert!(!is_valid("cust_4qh0wajx2n9qtazh2tghzkyanu", "cust"));
        assert!(!is_valid("acc_4qh0wajx2n9qtazh2tghzkyan2", "cust"));
        assert!(!is_valid("cust_4QH0WAJX2N9QTAZH2TGHZKYAN2", "cust"));
    }
}
