//! The demo ONE ID: username and password, then a 6-digit TOTP code (RFC 6238, HMAC-SHA1,
//! 30-second steps) as the second factor. It marks the demo viewer's session as logged
//! in; a real ONE ID is a separate federation service, which ehrgate only carries.

use aws_lc_rs::hmac;

/// The RFC 6238 code for `unix` seconds.
pub fn totp(secret: &[u8], unix: u64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &(unix / 30).to_be_bytes());
    let h = tag.as_ref();
    let offset = (h[h.len() - 1] & 0x0f) as usize;
    let code = u32::from_be_bytes([
        h[offset] & 0x7f,
        h[offset + 1],
        h[offset + 2],
        h[offset + 3],
    ]);
    format!("{:06}", code % 1_000_000)
}

/// Accepts the code of this step or the previous one (a code typed as it turns over).
pub fn check(secret: &[u8], unix: u64, code: &str) -> bool {
    let code = code.trim();
    code.len() == 6
        && (aws_lc_rs::constant_time::verify_slices_are_equal(
            totp(secret, unix).as_bytes(),
            code.as_bytes(),
        )
        .is_ok()
            || aws_lc_rs::constant_time::verify_slices_are_equal(
                totp(secret, unix.saturating_sub(30)).as_bytes(),
                code.as_bytes(),
            )
            .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6238_vectors() {
        // RFC 6238 Appendix B, SHA1 secret; the 8-digit codes' last six digits.
        let secret = b"12345678901234567890";
        assert_eq!(totp(secret, 59), "287082");
        assert_eq!(totp(secret, 1_111_111_109), "081804");
        assert_eq!(totp(secret, 2_000_000_000), "279037");
    }

    #[test]
    fn accepts_this_and_the_previous_step_only() {
        let s = b"k";
        let now = 1_800_000_015;
        assert!(check(s, now, &totp(s, now)));
        assert!(check(s, now, &totp(s, now - 30)));
        assert!(!check(s, now, &totp(s, now - 60)));
        assert!(!check(s, now, "12345"));
    }
}
