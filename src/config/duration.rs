//! Durations as the configuration writes them: `"500ms"`, `"90s"`, `"30m"`, `"12h"`,
//! `"1d"`, or several parts such as `"1h30m"`.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A configured duration; serialises back to the same compact form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    pub const fn mins(m: u64) -> Self {
        Self(Duration::from_secs(m * 60))
    }

    pub const fn hours(h: u64) -> Self {
        Self(Duration::from_secs(h * 3600))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

/// The longest duration accepted: far beyond any sensible limit, and short enough that
/// adding it to the current time never overflows.
pub const MAX: Duration = Duration::from_secs(366 * 86_400);

/// Parses `"90s"`-style text. The message on error says what is accepted.
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {text:?}: write a whole number followed by ms, s, m, h or d \
             (for example \"90s\", \"30m\", \"1h30m\")"
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    if total > MAX {
        return Err(format!(
            "duration {text:?} is longer than a year; no limit of ehrgate needs that much"
        ));
    }
    Ok(total)
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.is_zero() {
            return write!(f, "{}ms", d.as_millis());
        }
        let mut secs = d.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map(ConfigDuration).map_err(de::Error::custom)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse(" 2d "), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn refuses_what_is_ambiguous() {
        for bad in [
            "",
            "90",
            "s",
            "1.5h",
            "30 m",
            "-1s",
            "10y",
            "99999999999999999999d",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
        for too_long in ["367d", "99999999999999h", "366d1ms"] {
            let err = parse(too_long).unwrap_err();
            assert!(err.contains("longer than a year"), "{too_long}: {err}");
        }
        assert_eq!(parse("366d"), Ok(MAX));
    }

    #[test]
    fn displays_in_the_same_form() {
        for text in ["30m", "12h", "1h30m", "500ms", "1d2h"] {
            let d = ConfigDuration(parse(text).unwrap());
            assert_eq!(d.to_string(), text);
        }
        // Other spellings print in largest units, and read back to the same value.
        let d = ConfigDuration(parse("90s").unwrap());
        assert_eq!(d.to_string(), "1m30s");
        assert_eq!(parse(&d.to_string()).unwrap(), d.get());
    }
}
