//! Secret tokens (session ids, launch tickets, cookie markers) and their stored form.
//!
//! A token is 256 bits from the operating system's CSPRNG, shown to the browser as
//! base64url. ehrgate keeps only its SHA-256 ([`TokenHash`]): a copy of the store gives
//! nobody a usable cookie. Hashes found by lookup are compared again in constant time.

use std::fmt;

use aws_lc_rs::digest;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// A secret the browser holds. Never logged; `Debug` shows nothing of it.
pub struct Token(String);

impl Token {
    /// A fresh random token. Fails only if the system RNG fails, which callers turn
    /// into a refusal (never a weak token).
    pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` has the shape of a token ehrgate makes (43 base64url characters).
    pub fn is_well_formed(text: &str) -> bool {
        text.len() == 43
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// SHA-256 of a token or of a cookie value: what the store is keyed by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

/// Hashes a [`TokenHash`] for a map by taking 8 of its bytes: it is already a uniform
/// SHA-256 output, so hashing it again (SipHash) would only cost time.
#[derive(Default, Clone, Copy)]
pub struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length prefix (8 bytes) then the 32 bytes.
        if bytes.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[..8]);
            self.0 ^= u64::from_ne_bytes(b);
        }
    }

    fn write_usize(&mut self, _: usize) {}
}

/// The `BuildHasher` for maps keyed by [`TokenHash`].
pub type TokenHashBuilder = std::hash::BuildHasherDefault<TokenHasher>;

impl TokenHash {
    pub fn of(value: &str) -> Self {
        let d = digest::digest(&digest::SHA256, value.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// Constant-time equality, for confirming a lookup.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.0, &other.0).is_ok()
    }

    /// The hash in hex: how a shared store names it (never the token itself).
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(char::from(HEX[(b >> 4) as usize]));
            out.push(char::from(HEX[(b & 15) as usize]));
        }
        out
    }

    /// The hash from [`TokenHash::to_hex`].
    pub fn from_hex(hex: &[u8]) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(Self(out))
    }

    /// A short, non-reversible label for logs (first 6 hex digits of the hash).
    pub fn label(&self) -> String {
        self.0[..3].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}..)", self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_256_bit_and_hash_stably() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(URL_SAFE_NO_PAD.decode(a.as_str()).unwrap().len(), 32);
        assert_eq!(a.hash(), TokenHash::of(a.as_str()));
        assert!(a.hash().ct_eq(&TokenHash::of(a.as_str())));
        assert!(!a.hash().ct_eq(&b.hash()));
        assert_eq!(format!("{a:?}"), "Token(..)");
        assert!(!format!("{:?}", a.hash()).contains(a.as_str()));
        let hex = a.hash().to_hex();
        assert_eq!(TokenHash::from_hex(hex.as_bytes()), Some(a.hash()));
        assert_eq!(TokenHash::from_hex(b"zz"), None);
    }
}
