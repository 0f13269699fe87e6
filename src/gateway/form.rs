//! `application/x-www-form-urlencoded` (query strings and form bodies), decoded.

use std::borrow::Cow;

/// Decodes `+` and `%XX`; invalid escapes are kept as they are, invalid UTF-8 replaced.
pub fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The first value of `name`, decoded.
pub fn value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k) == name).then(|| decode(v))
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_values() {
        assert_eq!(
            value("demographicNo=1001&uao=2.16.840%3A101", "uao").unwrap(),
            "2.16.840:101"
        );
        assert_eq!(
            value("reason=Patient+consent%21", "reason").unwrap(),
            "Patient consent!"
        );
        assert_eq!(value("a=1&a=2", "a").unwrap(), "1");
        assert_eq!(value("flag", "flag").unwrap(), "");
        assert!(value("a=1", "b").is_none());
        assert_eq!(decode("%zz%4"), "%zz%4");
        assert_eq!(decode("%41%42"), "AB");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn encode(v: &str) -> String {
        v.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn launch_parameters_read_back_whatever_they_hold(
            demographic in "\\PC{0,20}",
            uao in "\\PC{0,30}",
            noise in proptest::collection::vec(("[a-z]{1,6}", "\\PC{0,10}"), 0..4),
        ) {
            let mut parts: Vec<String> = noise
                .iter()
                .filter(|(k, _)| k != "demographicNo" && k != "uao")
                .map(|(k, v)| format!("{k}={}", encode(v)))
                .collect();
            parts.insert(0, format!("demographicNo={}", encode(&demographic)));
            parts.push(format!("uao={}", encode(&uao)));
            let query = parts.join("&");
            prop_assert_eq!(value(&query, "demographicNo").map(String::from), Some(demographic));
            prop_assert_eq!(value(&query, "uao").map(String::from), Some(uao));
        }

        #[test]
        fn any_query_is_read_without_panic(q in "\\PC{0,80}", name in "[a-zA-Z%+]{0,8}") {
            let _ = value(&q, &name);
            let _ = decode(&q);
        }
    }
}
