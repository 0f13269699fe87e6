//! The lifecycle decisions, as plain functions: may this launch proceed, which authority,
//! is this HCN plausible, is a session over, does a request come from another site, does
//! an EMR response end its session. Unit-tested without sockets.

use http::header::{ORIGIN, REFERER};
use http::HeaderMap;

use super::{EhrSession, EmrSession, LaunchTicket, Millis, TokenHash};
use crate::config::Authority;

/// Why a session ended: the `detail` of its audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// A request to one of `emr.logout_paths`.
    EmrLogoutPath,
    /// The EMR answered with its session cookie expired.
    EmrCookieExpired,
    /// No EMR request for `emr.idle_timeout`.
    EmrIdle,
    /// `POST /admin/logout`.
    Admin,
    /// The clinician pressed Disconnect.
    Disconnect,
    /// A launch for another authority replaced the session.
    AuthorityChange,
    /// No viewer request for `session.idle_timeout`.
    EhrIdle,
    /// `session.max_lifetime` reached.
    EhrLifetime,
    /// The EMR session it belonged to is gone.
    EmrGone,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::EmrLogoutPath => "emr_logout_path",
            EndReason::EmrCookieExpired => "emr_cookie_expired",
            EndReason::EmrIdle => "emr_idle_timeout",
            EndReason::Admin => "admin",
            EndReason::Disconnect => "disconnect",
            EndReason::AuthorityChange => "authority_change",
            EndReason::EhrIdle => "ehr_idle_timeout",
            EndReason::EhrLifetime => "ehr_max_lifetime",
            EndReason::EmrGone => "emr_session_gone",
        }
    }

    /// Whether this reason ends the EMR session too (and so all of its EHR side).
    pub fn ends_emr(self) -> bool {
        matches!(
            self,
            EndReason::EmrLogoutPath
                | EndReason::EmrCookieExpired
                | EndReason::EmrIdle
                | EndReason::Admin
        )
    }
}

/// Why no authority could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityError {
    /// The `uao` given is not configured.
    Unknown(String),
    /// Several authorities, none given, none marked default.
    NoneChosen,
}

/// The authority a launch acts for: the one asked for (it must be configured), else the
/// only one, else the default one.
pub fn resolve_authority<'a>(
    authorities: &'a [Authority],
    requested: Option<&str>,
) -> Result<&'a Authority, AuthorityError> {
    match requested.map(str::trim).filter(|r| !r.is_empty()) {
        Some(id) => authorities
            .iter()
            .find(|a| a.id == id)
            .ok_or_else(|| AuthorityError::Unknown(id.to_string())),
        None if authorities.len() == 1 => Ok(&authorities[0]),
        None => authorities
            .iter()
            .find(|a| a.default)
            .ok_or(AuthorityError::NoneChosen),
    }
}

/// An Ontario health card number as the launch accepts it: ten digits whose last is the
/// Luhn check digit of the first nine.
pub fn valid_ontario_hcn(hcn: &str) -> bool {
    let b = hcn.as_bytes();
    if b.len() != 10 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &c)| {
            let d = u32::from(c - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A demographic number as the EMR issues them: 1 to 10 digits.
pub fn valid_demographic_no(s: &str) -> bool {
    (1..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// `YYYY-MM-DD` from the EMR's separate fields, if they make a real date.
pub fn birth_date(year: &str, month: &str, day: &str) -> Option<String> {
    let (y, m, d): (i32, u8, u8) = (
        year.trim().parse().ok()?,
        month.trim().parse().ok()?,
        day.trim().parse().ok()?,
    );
    let month = time::Month::try_from(m).ok()?;
    let date = time::Date::from_calendar_date(y, month, d).ok()?;
    (1850..=2200)
        .contains(&y)
        .then(|| format!("{:04}-{:02}-{:02}", date.year(), m, date.day()))
}

/// Whether an EMR session has gone unseen past the EMR's idle timeout.
pub fn emr_idle(s: &EmrSession, now: Millis, idle_ms: Millis) -> bool {
    now.saturating_sub(s.last_seen()) >= idle_ms
}

/// Whether an EHR session is over by its own limits, and why.
pub fn ehr_expired(
    s: &EhrSession,
    now: Millis,
    idle_ms: Millis,
    lifetime_ms: Millis,
) -> Option<EndReason> {
    if now.saturating_sub(s.created) >= lifetime_ms {
        Some(EndReason::EhrLifetime)
    } else if now.saturating_sub(s.last_seen()) >= idle_ms {
        Some(EndReason::EhrIdle)
    } else {
        None
    }
}

/// A launch for another authority than the live EHR session's ends that session first.
pub fn must_end_for_authority(existing: Option<&EhrSession>, authority: &Authority) -> bool {
    existing.is_some_and(|s| s.authority.id != authority.id)
}

/// Why a ticket cannot be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedeemError {
    UnknownOrUsed,
    Expired,
    EmrSessionEnded,
    /// Another browser than the one that launched it (DESIGN §6).
    OtherBrowser,
}

/// What enter does with a ticket: a ticket is redeemed only by the browser that launched
/// it (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnterStep {
    /// First visit, or a return without a valid code: bind the ticket to this browser
    /// (again) with a fresh nonce, and send the browser to the EMR host to confirm that
    /// its EMR session is the ticket's.
    Bind,
    /// Bound to this browser and confirmed with the code it brings: redeem it.
    Redeem,
}

/// The step enter takes for `ticket`, visited by a browser holding `binding` (the hash
/// of its binding cookie, if any) and bringing `code` (the hash of the code confirm gave
/// it, if any).
pub fn enter_step(
    ticket: Option<&LaunchTicket>,
    now: Millis,
    emr_live: bool,
    binding: Option<&TokenHash>,
    code: Option<&TokenHash>,
) -> Result<EnterStep, RedeemError> {
    redeem(ticket, now, emr_live)?;
    let t = ticket.ok_or(RedeemError::UnknownOrUsed)?;
    let Some(bound) = &t.binding else {
        return Ok(EnterStep::Bind);
    };
    if !binding.is_some_and(|mine| bound.ct_eq(mine)) {
        return Err(RedeemError::OtherBrowser);
    }
    let confirmed = matches!((&t.redeem_code, code), (Some(c), Some(given)) if c.ct_eq(given));
    Ok(if confirmed {
        EnterStep::Redeem
    } else {
        EnterStep::Bind
    })
}

/// May the EMR host confirm `ticket` for a browser whose EMR marker names `marker_emr`
/// and that brings `nonce`? Only a ticket bound at enter, only with the nonce enter gave
/// the bound browser, and only for the ticket's own EMR session.
pub fn confirm(
    ticket: Option<&LaunchTicket>,
    now: Millis,
    emr_live: bool,
    marker_emr: Option<&TokenHash>,
    nonce: Option<&TokenHash>,
) -> Result<(), RedeemError> {
    redeem(ticket, now, emr_live)?;
    let t = ticket.ok_or(RedeemError::UnknownOrUsed)?;
    let nonce_ok = matches!((&t.confirm_nonce, nonce), (Some(n), Some(given)) if n.ct_eq(given));
    if t.binding.is_some() && nonce_ok && marker_emr.is_some_and(|m| m.ct_eq(&t.emr)) {
        Ok(())
    } else {
        Err(RedeemError::OtherBrowser)
    }
}

/// May this ticket be redeemed now?
pub fn redeem(
    ticket: Option<&LaunchTicket>,
    now: Millis,
    emr_live: bool,
) -> Result<(), RedeemError> {
    let t = ticket.ok_or(RedeemError::UnknownOrUsed)?;
    if now >= t.expires {
        Err(RedeemError::Expired)
    } else if !emr_live {
        Err(RedeemError::EmrSessionEnded)
    } else {
        Ok(())
    }
}

/// DESIGN §8: launch and Disconnect accept only same-origin requests. With
/// `Sec-Fetch-Site` present it must be `same-origin` (or `none`: an address typed or
/// opened from a bookmark); `same-site` is refused, since the viewer host is a sibling
/// site. Without it, an `Origin` or `Referer` on the EMR host is required. An `Origin` or
/// `Referer` naming another host is refused in every case. Returns what gave the request
/// away.
pub fn same_origin_refusal(headers: &HeaderMap, emr_host: &str) -> Option<&'static str> {
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    if let Some(site) = site {
        if !site.eq_ignore_ascii_case(b"same-origin") && !site.eq_ignore_ascii_case(b"none") {
            return Some("Sec-Fetch-Site is neither same-origin nor none");
        }
    }
    let foreign = |value: &str| url_host(value).is_none_or(|h| !h.eq_ignore_ascii_case(emr_host));
    let origin = headers.get(ORIGIN);
    let referer = headers.get(REFERER);
    if origin.is_some_and(|o| o.to_str().map_or(true, foreign)) {
        return Some("Origin is not the EMR");
    }
    if referer.is_some_and(|r| r.to_str().map_or(true, foreign)) {
        return Some("Referer is not the EMR");
    }
    if site.is_none() && origin.is_none() && referer.is_none() {
        return Some("no Sec-Fetch-Site, Origin or Referer");
    }
    None
}

/// The host of an absolute URL (`https://host:port/path` → `host`).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    Some(crate::proxy::route::host_name(authority))
}

/// Whether a `Set-Cookie` value expires the cookie `name` (Max-Age ≤ 0, an Expires in the
/// past, or an emptied value), as an EMR does at logout.
pub fn set_cookie_expires(set_cookie: &str, name: &str, now_unix: i64) -> bool {
    let Ok(c) = cookie::Cookie::parse(set_cookie) else {
        return false;
    };
    if c.name() != name {
        return false;
    }
    if c.max_age().is_some_and(|a| a.whole_seconds() <= 0) {
        return true;
    }
    if let Some(at) = c.expires_datetime() {
        if at.unix_timestamp() <= now_unix {
            return true;
        }
    }
    c.value().is_empty()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::session::PatientContext;
    use std::sync::Arc;

    pub(crate) fn patient() -> PatientContext {
        PatientContext {
            demographic_no: "1001".into(),
            hcn: "9876543217".into(),
            hcn_version: "AB".into(),
            birth_date: "1970-01-31".into(),
            gender: "F".into(),
            family: "Testpatient".into(),
            given: "Alice".into(),
            mrp_provider: "999998".into(),
        }
    }

    fn auth(id: &str, default: bool) -> Authority {
        Authority {
            id: id.into(),
            name: format!("Org {id}"),
            default,
        }
    }

    #[test]
    fn authority_is_the_given_one_the_only_one_or_the_default() {
        let one = [auth("a", false)];
        assert_eq!(resolve_authority(&one, None).unwrap().id, "a");
        assert_eq!(resolve_authority(&one, Some("")).unwrap().id, "a");
        let several = [auth("a", false), auth("b", true)];
        assert_eq!(resolve_authority(&several, None).unwrap().id, "b");
        assert_eq!(resolve_authority(&several, Some("a")).unwrap().id, "a");
        assert_eq!(
            resolve_authority(&several, Some("zzz")),
            Err(AuthorityError::Unknown("zzz".into()))
        );
        let no_default = [auth("a", false), auth("b", false)];
        assert_eq!(
            resolve_authority(&no_default, None),
            Err(AuthorityError::NoneChosen)
        );
    }

    #[test]
    fn ontario_hcn_check() {
        assert!(valid_ontario_hcn("9876543217"));
        assert!(valid_ontario_hcn("1234567897"));
        assert!(!valid_ontario_hcn("9876543210"), "wrong check digit");
        assert!(!valid_ontario_hcn("987654321"), "nine digits");
        assert!(!valid_ontario_hcn("98765432171"), "eleven digits");
        assert!(!valid_ontario_hcn("98765A3217"));
        assert!(!valid_ontario_hcn(""));
    }

    #[test]
    fn demographic_numbers_and_birth_dates() {
        assert!(valid_demographic_no("1"));
        assert!(valid_demographic_no("1234567890"));
        for bad in ["", "12345678901", "12a", "-1", "1 "] {
            assert!(!valid_demographic_no(bad), "{bad:?}");
        }
        assert_eq!(birth_date("1970", "1", "31").as_deref(), Some("1970-01-31"));
        assert_eq!(
            birth_date("2000", "02", "29").as_deref(),
            Some("2000-02-29")
        );
        assert_eq!(birth_date("1999", "02", "29"), None);
        assert_eq!(birth_date("1970", "13", "1"), None);
        assert_eq!(birth_date("x", "1", "1"), None);
    }

    #[test]
    fn session_expiry() {
        let a = auth("a", true);
        let s = EhrSession::new(
            TokenHash::of("e"),
            "u".into(),
            std::sync::Arc::new(a),
            TokenHash::of("i"),
            1000,
        );
        assert_eq!(ehr_expired(&s, 1500, 1000, 10_000), None);
        assert_eq!(
            ehr_expired(&s, 2000, 1000, 10_000),
            Some(EndReason::EhrIdle)
        );
        s.touch(9_500);
        assert_eq!(ehr_expired(&s, 10_000, 1000, 10_000), None);
        assert_eq!(
            ehr_expired(&s, 11_000, 1000, 10_000),
            Some(EndReason::EhrLifetime)
        );

        let e = EmrSession::new(TokenHash::of("j"), "u", 0);
        assert!(!emr_idle(&e, 500, 1000));
        assert!(emr_idle(&e, 1000, 1000));
        e.touch(900);
        assert!(!emr_idle(&e, 1000, 1000));
    }

    #[test]
    fn authority_change_ends_the_live_session() {
        let s = EhrSession::new(
            TokenHash::of("e"),
            "u".into(),
            std::sync::Arc::new(auth("a", true)),
            TokenHash::of("i"),
            0,
        );
        assert!(!must_end_for_authority(Some(&s), &auth("a", true)));
        assert!(must_end_for_authority(Some(&s), &auth("b", false)));
        assert!(!must_end_for_authority(None, &auth("b", false)));
    }

    #[test]
    fn tickets_redeem_once_in_time_for_a_live_emr_session() {
        let t = LaunchTicket {
            emr: TokenHash::of("j"),
            user: "u".into(),
            authority: std::sync::Arc::new(auth("a", true)),
            patient: patient(),
            mrp: true,
            expires: 100,
            binding: None,
            confirm_nonce: None,
            redeem_code: None,
        };
        assert_eq!(redeem(Some(&t), 50, true), Ok(()));
        assert_eq!(redeem(Some(&t), 100, true), Err(RedeemError::Expired));
        assert_eq!(
            redeem(Some(&t), 50, false),
            Err(RedeemError::EmrSessionEnded)
        );
        assert_eq!(redeem(None, 50, true), Err(RedeemError::UnknownOrUsed));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            m
        };
        let emr = "emr.clinic.example";
        let cross_site = same_origin_refusal;
        assert!(cross_site(&h(&[]), emr).is_some(), "no evidence at all");
        assert!(cross_site(&h(&[("sec-fetch-site", "same-site")]), emr).is_some());
        assert!(cross_site(
            &h(&[
                ("sec-fetch-site", "same-origin"),
                ("origin", "https://ehr.clinic.example")
            ]),
            emr
        )
        .is_some());
        assert_eq!(
            cross_site(&h(&[("sec-fetch-site", "same-origin")]), emr),
            None
        );
        assert_eq!(cross_site(&h(&[("sec-fetch-site", "none")]), emr), None);
        assert!(cross_site(&h(&[("sec-fetch-site", "cross-site")]), emr).is_some());
        assert_eq!(
            cross_site(&h(&[("origin", "https://emr.clinic.example:8443")]), emr),
            None
        );
        assert!(cross_site(&h(&[("origin", "https://evil.example")]), emr).is_some());
        assert!(cross_site(&h(&[("origin", "null")]), emr).is_some());
        assert_eq!(
            cross_site(
                &h(&[(
                    "referer",
                    "https://emr.clinic.example/oscar/demographic/x.jsp?a=1"
                )]),
                emr
            ),
            None
        );
        assert!(cross_site(
            &h(&[("referer", "https://emr.clinic.example.evil.example/")]),
            emr
        )
        .is_some());
        assert!(cross_site(&h(&[("referer", "https://user@evil.example/")]), emr).is_some());
    }

    #[test]
    fn emr_responses_that_expire_its_session_cookie() {
        let now = 1_800_000_000;
        assert!(set_cookie_expires(
            "JSESSIONID=; Max-Age=0; Path=/oscar",
            "JSESSIONID",
            now
        ));
        assert!(set_cookie_expires(
            "JSESSIONID=x; Expires=Thu, 01 Jan 1970 00:00:10 GMT; Path=/oscar",
            "JSESSIONID",
            now
        ));
        assert!(set_cookie_expires(
            "JSESSIONID=; Path=/oscar",
            "JSESSIONID",
            now
        ));
        assert!(!set_cookie_expires(
            "JSESSIONID=ABC123; Path=/oscar; HttpOnly",
            "JSESSIONID",
            now
        ));
        assert!(!set_cookie_expires("OTHER=; Max-Age=0", "JSESSIONID", now));
        assert!(!set_cookie_expires("garbage", "JSESSIONID", now));
    }

    #[test]
    fn a_ticket_is_bound_confirmed_then_redeemed_by_one_browser() {
        let emr = TokenHash::of("emr");
        let mine = TokenHash::of("my binding");
        let theirs = TokenHash::of("their binding");
        let nonce = TokenHash::of("nonce");
        let code = TokenHash::of("code");
        let mut t = LaunchTicket {
            emr,
            user: "u".into(),
            authority: Arc::new(auth("a", true)),
            patient: patient(),
            mrp: true,
            expires: 100,
            binding: None,
            confirm_nonce: None,
            redeem_code: None,
        };
        assert_eq!(
            enter_step(Some(&t), 50, true, None, None),
            Ok(EnterStep::Bind)
        );
        assert_eq!(
            enter_step(Some(&t), 50, true, Some(&theirs), Some(&code)),
            Ok(EnterStep::Bind)
        );
        // Confirm before any enter: refused.
        let refused = Err(RedeemError::OtherBrowser);
        assert_eq!(
            confirm(Some(&t), 50, true, Some(&emr), Some(&nonce)),
            refused
        );
        t.binding = Some(mine);
        t.confirm_nonce = Some(nonce);
        // The bound browser, back without a code: bound again (a fresh nonce).
        assert_eq!(
            enter_step(Some(&t), 50, true, Some(&mine), None),
            Ok(EnterStep::Bind)
        );
        for other in [None, Some(&theirs)] {
            assert_eq!(
                enter_step(Some(&t), 50, true, other, Some(&code)),
                Err(RedeemError::OtherBrowser)
            );
        }
        // Only the ticket's own EMR session, and only with the bound browser's nonce.
        let stranger = TokenHash::of("another emr session");
        assert_eq!(
            confirm(Some(&t), 50, true, Some(&stranger), Some(&nonce)),
            refused
        );
        assert_eq!(confirm(Some(&t), 50, true, None, Some(&nonce)), refused);
        assert_eq!(confirm(Some(&t), 50, true, Some(&emr), None), refused);
        assert_eq!(
            confirm(Some(&t), 50, true, Some(&emr), Some(&code)),
            refused
        );
        assert_eq!(
            confirm(Some(&t), 50, true, Some(&emr), Some(&nonce)),
            Ok(())
        );
        t.confirm_nonce = None;
        t.redeem_code = Some(code);
        assert_eq!(
            enter_step(Some(&t), 50, true, Some(&mine), Some(&code)),
            Ok(EnterStep::Redeem)
        );
        // The code alone, in another browser, is nothing.
        assert_eq!(
            enter_step(Some(&t), 50, true, Some(&theirs), Some(&code)),
            Err(RedeemError::OtherBrowser)
        );
        assert_eq!(
            enter_step(Some(&t), 50, true, Some(&mine), Some(&nonce)),
            Ok(EnterStep::Bind)
        );
        // Time and the EMR session still rule.
        assert_eq!(
            enter_step(Some(&t), 100, true, Some(&mine), Some(&code)),
            Err(RedeemError::Expired)
        );
        assert_eq!(
            enter_step(Some(&t), 50, false, Some(&mine), Some(&code)),
            Err(RedeemError::EmrSessionEnded)
        );
        assert_eq!(
            confirm(None, 50, true, Some(&emr), Some(&nonce)),
            Err(RedeemError::UnknownOrUsed)
        );
    }
}
