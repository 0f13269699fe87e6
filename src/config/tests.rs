use super::*;

const MINIMAL: &str = r#"
[emr]
host = "emr.clinic.example"
upstream = "http://127.0.0.1:8080"

[ehr]
host = "ehr.clinic.example"
upstream = "https://viewer.example"

[[authority]]
id = "2.16.840.1.113883.3.239.9:101"
name = "Maple Family Health Team"
default = true
"#;

fn err(text: &str) -> ConfigError {
    Config::parse(text).expect_err("config should be refused")
}

#[test]
fn minimal_config_takes_the_design_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8443");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.emr.session_cookie, "JSESSIONID");
    assert_eq!(c.emr.launch_path, "/oscar/clinicalConnectEHRViewer.do");
    assert_eq!(c.emr.patient_fields.hcn, "/hin");
    assert_eq!(c.emr.idle_timeout.get().as_secs(), 7200);
    assert_eq!(c.ehr.cookie_mode, CookieMode::Vault);
    assert_eq!(c.ehr.context_header, "X-EHR-Context");
    assert!(c.ehr.inject_session_script);
    assert_eq!(c.session.max_sessions, 1_000_000);
    assert_eq!(c.session.ticket_ttl.get().as_secs(), 60);
    assert_eq!(c.context.issuer, "ehrgate");
    assert_eq!(c.authorities.len(), 1);
}

#[test]
fn the_shipped_example_is_valid() {
    let text = include_str!("../../config/ehrgate.toml");
    Config::parse(text).unwrap();
}

#[test]
fn unknown_key_is_named_with_its_table_and_line() {
    let e = err(&MINIMAL.replace("[ehr]\n", "[ehr]\ncookie_mod = \"vault\"\n"));
    assert_eq!(e.key, "ehr.cookie_mod");
    assert!(e.message.contains("unknown key `cookie_mod`"), "{e}");
    assert!(e.message.contains("line 7"), "{e}");
}

#[test]
fn bad_duration_names_the_key() {
    let e = err(&format!(
        "{MINIMAL}\n[session]\nidle_timeout = \"30 minutes\"\n"
    ));
    assert_eq!(e.key, "session.idle_timeout");
    assert!(e.message.contains("invalid duration"), "{e}");
}

#[test]
fn zero_duration_is_refused() {
    let e = err(&format!("{MINIMAL}\n[session]\nticket_ttl = \"0s\"\n"));
    assert_eq!(e.key, "session.ticket_ttl");
}

#[test]
fn unknown_upstream_scheme_is_refused() {
    let e = err(&MINIMAL.replace("http://127.0.0.1:8080", "ftp://127.0.0.1:8080"));
    assert_eq!(e.key, "emr.upstream");
    assert!(e.message.contains("unknown scheme \"ftp\""), "{e}");
    let e = err(&MINIMAL.replace("http://127.0.0.1:8080", "127.0.0.1:8080"));
    assert_eq!(e.key, "emr.upstream");
    let e = err(&MINIMAL.replace("https://viewer.example", "https://viewer.example/cc"));
    assert_eq!(e.key, "ehr.upstream");
    assert!(e.message.contains("has a path"), "{e}");
}

#[test]
fn duplicate_hosts_are_refused() {
    let e = err(&MINIMAL.replace("ehr.clinic.example", "EMR.clinic.example"));
    assert_eq!(e.key, "ehr.host");
    assert!(e.message.contains("distinct host names"), "{e}");
}

#[test]
fn host_with_scheme_or_port_is_refused() {
    let e = err(&MINIMAL.replace("\"emr.clinic.example\"", "\"https://emr.clinic.example\""));
    assert_eq!(e.key, "emr.host");
    let e = err(&MINIMAL.replace("\"emr.clinic.example\"", "\"emr.clinic.example:8443\""));
    assert_eq!(e.key, "emr.host");
}

#[test]
fn no_authority_is_refused() {
    let text = MINIMAL.split("[[authority]]").next().unwrap();
    let e = err(text);
    assert_eq!(e.key, "authority");
    assert!(e.message.contains("at least one [[authority]]"), "{e}");
}

#[test]
fn authorities_must_be_distinct_and_have_one_default_at_most() {
    let twice = format!(
        "{MINIMAL}\n[[authority]]\nid = \"2.16.840.1.113883.3.239.9:101\"\nname = \"Again\"\n"
    );
    assert_eq!(err(&twice).key, "authority[1].id");
    let two_defaults =
        format!("{MINIMAL}\n[[authority]]\nid = \"x:2\"\nname = \"Other\"\ndefault = true\n");
    assert!(err(&two_defaults)
        .message
        .contains("more than one authority"));
}

#[test]
fn missing_required_table_is_named() {
    let text = MINIMAL.replace(
        "[ehr]\nhost = \"ehr.clinic.example\"\nupstream = \"https://viewer.example\"\n",
        "",
    );
    let e = err(&text);
    assert!(e.message.contains("missing field `ehr`"), "{e}");
}

#[test]
fn paths_pointers_and_header_names_are_checked() {
    let e = err(&MINIMAL.replace("[emr]\n", "[emr]\nlaunch_path = \"oscar/x.do\"\n"));
    assert_eq!(e.key, "emr.launch_path");
    let e = err(&MINIMAL.replace("[emr]\n", "[emr]\npatient_path = \"/oscar/demo\"\n"));
    assert_eq!(e.key, "emr.patient_path");
    let e = err(&MINIMAL.replace("[emr]\n", "[emr]\nwhoami_user_field = \"providerNo\"\n"));
    assert_eq!(e.key, "emr.whoami_user_field");
    let e = err(&MINIMAL.replace("[ehr]\n", "[ehr]\ncontext_header = \"X EHR\"\n"));
    assert_eq!(e.key, "ehr.context_header");
    let e = err(&MINIMAL.replace("[ehr]\n", "[ehr]\ncookie_mode = \"jar\"\n"));
    assert_eq!(e.key, "ehr.cookie_mode");
}

#[test]
fn effective_config_redacts_the_hash_key() {
    let c = Config::parse(&format!(
        "{MINIMAL}\n[audit]\nhash_key = \"s3cret-key-material\"\n"
    ))
    .unwrap();
    let shown = c.to_effective_toml();
    assert!(!shown.contains("s3cret"));
    assert!(shown.contains("<redacted>"));
    // What is printed parses back to the same configuration.
    let again = Config::parse(&shown.replace("<redacted>", "x")).unwrap();
    assert_eq!(again.server.listen, c.server.listen);
}

#[test]
fn a_redis_password_is_never_shown() {
    for (url, shown) in [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (
            "redis://ehrgate:pw@h:6379/0",
            "redis://ehrgate:***@h:6379/0",
        ),
        ("rediss://:pw@h/0", "rediss://:***@h/0"),
        ("redis://pw@h/0", "redis://***@h/0"),
        // An unencoded '/' or '@' in the password hides all of it still.
        ("redis://u:a/b@c@h:6379/0", "redis://u:***@h:6379/0"),
    ] {
        let u = RedisUrl::new(url);
        assert_eq!(u.redacted(), shown);
        assert_eq!(format!("{u:?}"), format!("{shown:?}"));
    }
}
