//! Pagination tokens for ListVolumes: the last key returned plus a keyed
//! hash, so a token this process did not issue is recognised (ABORTED).
//! Tokens survive deletions between pages because they name a position in
//! key order, not an offset.

use std::hash::{BuildHasher, RandomState};

/// Issues and checks tokens with a per-process random key.
#[derive(Debug, Default)]
pub struct TokenSigner {
    key: RandomState,
}

impl TokenSigner {
    fn mac(&self, position: &str) -> u64 {
        self.key.hash_one(position)
    }

    /// A token meaning "continue after `position`".
    pub fn issue(&self, position: &str) -> String {
        format!("{position}.{:016x}", self.mac(position))
    }

    /// The position a token names, or None when it was not issued here.
    pub fn verify<'a>(&self, token: &'a str) -> Option<&'a str> {
        let (pos, mac) = token.rsplit_once('.')?;
        let mac = u64::from_str_radix(mac, 16).ok()?;
        (mac == self.mac(pos)).then_some(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_own_tokens_only() {
        let a = TokenSigner::default();
        let b = TokenSigner::default();
        let t = a.issue("abc");
        assert_eq!(a.verify(&t), Some("abc"));
        assert_eq!(b.verify(&t), None);
        assert_eq!(a.verify("invalid-token"), None);
        assert_eq!(a.verify("abc.0000000000000000"), None);
    }
}
