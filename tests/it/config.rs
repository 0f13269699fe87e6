//! `ehrgate check-config` on good and bad files: exit 2 and one clear line naming the key.

use ehrgate::tls::dev::{generate_signing_key_pem, DevPki};

use crate::support::{check_config, check_config_path, Files, Setup};

fn valid(files: &Files) -> String {
    let a = "127.0.0.1:1".parse().unwrap();
    Setup::new(a, a).toml(files, "127.0.0.1:0", "127.0.0.1:0")
}

/// Asserts exit code 2 and a single stderr line containing every fragment.
fn refused(text: &str, fragments: &[&str]) {
    let (code, stdout, stderr) = check_config(text);
    assert_eq!(code, 2, "stderr: {stderr}");
    assert!(stdout.is_empty(), "nothing printed on stdout: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    for f in fragments {
        assert!(lines[0].contains(f), "{f:?} not in {:?}", lines[0]);
    }
}

#[test]
fn valid_config_prints_the_effective_config() {
    let files = Files::new();
    let (code, stdout, stderr) = check_config(&valid(&files));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("[server]") && stdout.contains("header_read_timeout = \"15s\""),
        "{stdout}"
    );
    assert!(stderr.contains("configuration is valid"));
}

#[test]
fn the_shipped_example_parses_and_names_its_missing_certificate() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ehrgate.toml");
    let (code, _, stderr) = check_config_path(&path);
    // The example points at the clinic's own certificate, absent here.
    assert_eq!(code, 2);
    assert!(
        stderr.contains("server.tls_cert: cannot read certs/server.crt"),
        "{stderr}"
    );
}

/// The shipped example, with the certificate, key and signing key it names generated
/// where it expects them, is valid: its `https://` viewer verified against the system's
/// roots.
#[test]
fn the_shipped_example_is_valid_once_its_files_exist() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ehrgate.toml");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let pki = DevPki::generate(&["emr.clinic.example", "ehr.clinic.example"]).unwrap();
    std::fs::write(certs.join("server.crt"), &pki.server_cert_pem).unwrap();
    std::fs::write(certs.join("server.key"), &pki.server_key_pem).unwrap();
    std::fs::write(
        certs.join("context-signing.pem"),
        generate_signing_key_pem().unwrap(),
    )
    .unwrap();
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(
        text.contains("upstream = \"https://"),
        "the example has an https upstream"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ehrgate"))
        .args(["check-config", "--config"])
        .arg(&shipped)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");
}

/// Values that once reached an `expect` or an overflow at start-up or on the first
/// request are refused by `check-config` with the key named, never a panic.
#[test]
fn values_that_could_not_run_are_refused_at_load() {
    let files = Files::new();
    let base = valid(&files);
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "[ehr]\n",
            "[ehr]\nlaunch_path = \"/launch\\u007F\"\n",
            &["ehr.launch_path", "absolute path"],
        ),
        (
            "[emr]\n",
            "[emr]\nlaunch_path = \"/oscar/\\u0001\"\n",
            &["emr.launch_path"],
        ),
        (
            "[server]\n",
            "[server]\nidle_timeout = \"99999999999h\"\n",
            &["server.idle_timeout", "longer than a year"],
        ),
        (
            "[session]\n",
            "[session]\nmax_lifetime = \"400d\"\n",
            &["session.max_lifetime", "longer than a year"],
        ),
        (
            "[server]\n",
            "[server]\nmax_connections = 18446744073709551615\n",
            &["server.max_connections"],
        ),
        (
            "[server]\n",
            "[server]\nworkers = 100000\n",
            &["server.workers", "at most 256"],
        ),
        (
            "[server]\n",
            "[server]\nmax_form_bytes = 99999999999\n",
            &["server.max_form_bytes", "at most"],
        ),
        (
            "[emr]\n",
            "[emr]\nlogout_paths = [\"/oscar//logout.jsp\"]\n",
            &[
                "emr.logout_paths[0]",
                "not in canonical form",
                "/oscar/logout.jsp",
            ],
        ),
        (
            "[ehr]\n",
            "[ehr]\noverride_path = \"/a%2Fb\"\n",
            &["ehr.override_path", "may hold only"],
        ),
        (
            "filter = \"warn\"",
            "filter = \"ehrgate=loudest\"",
            &["log.filter", "not a log filter"],
        ),
        (
            "[emr]\n",
            "[emr]\nupstream_http2 = true\n",
            &["emr.upstream_http2", "https:// upstream only"],
        ),
    ];
    for (at, with, fragments) in cases {
        assert!(base.contains(at), "{at}");
        let text = base.replacen(at, with, 1);
        let (code, stdout, stderr) = check_config(&text);
        assert_eq!(code, 2, "{with}: {stderr}");
        assert!(stdout.is_empty());
        assert!(!stderr.contains("panicked"), "{with}: {stderr}");
        for f in *fragments {
            assert!(stderr.contains(f), "{with}: {f:?} not in {stderr}");
        }
    }
}

#[test]
fn signing_keys_may_be_a_list_and_an_empty_one_is_refused() {
    let files = Files::new();
    let text = valid(&files);
    let one = format!(
        "signing_key = {:?}",
        files.signing_key.display().to_string()
    );
    let second = files.path("next.pem");
    std::fs::write(&second, generate_signing_key_pem().unwrap()).unwrap();
    let list = format!(
        "signing_key = [{:?}, {:?}]",
        files.signing_key.display().to_string(),
        second.display().to_string()
    );
    let (code, stdout, stderr) = check_config(&text.replace(&one, &list));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("next.pem"), "{stdout}");
    refused(
        &text.replace(&one, "signing_key = []"),
        &["context.signing_key", "at least one"],
    );
    let twice = format!(
        "signing_key = [{:?}, {:?}]",
        files.signing_key.display().to_string(),
        files.signing_key.display().to_string()
    );
    refused(
        &text.replace(&one, &twice),
        &["context.signing_key", "listed twice"],
    );
}

#[test]
fn missing_file() {
    let (code, _, stderr) = check_config_path(std::path::Path::new("/nonexistent/ehrgate.toml"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read configuration file"),
        "{stderr}"
    );
}

#[test]
fn unknown_key() {
    let files = Files::new();
    let text = valid(&files).replace("[server]\n", "[server]\nlisten_port = 8443\n");
    refused(
        &text,
        &["server.listen_port", "unknown key `listen_port`", "line"],
    );
}

#[test]
fn bad_duration() {
    let files = Files::new();
    let text = valid(&files).replace(
        "[session]\n",
        "[session]\nidle_timeout = \"half an hour\"\n",
    );
    refused(&text, &["session.idle_timeout", "invalid duration"]);
}

#[test]
fn unreadable_certificate() {
    let files = Files::new();
    let text = valid(&files).replace(&files.cert.display().to_string(), "/nonexistent/server.crt");
    refused(
        &text,
        &["server.tls_cert", "cannot read /nonexistent/server.crt"],
    );
}

#[test]
fn mismatched_certificate_and_key() {
    let files = Files::new();
    let other = Files::new();
    let text = valid(&files).replace(
        &files.key.display().to_string(),
        &other.key.display().to_string(),
    );
    refused(
        &text,
        &["server.tls_key", "does not belong to the certificate"],
    );
}

#[test]
fn unknown_upstream_scheme() {
    let files = Files::new();
    let text = valid(&files).replace(
        "upstream = \"http://127.0.0.1:1\"",
        "upstream = \"ws://127.0.0.1:1\"",
    );
    refused(&text, &["emr.upstream", "unknown scheme \"ws\""]);
}

#[test]
fn unreadable_upstream_ca() {
    let files = Files::new();
    let text = valid(&files).replacen(
        "upstream = \"http://127.0.0.1:1\"",
        "upstream = \"https://127.0.0.1:1\"\nupstream_ca = \"/nonexistent/ca.pem\"",
        1,
    );
    refused(
        &text,
        &["emr.upstream_ca", "cannot read /nonexistent/ca.pem"],
    );
}

#[test]
fn duplicate_hosts() {
    let files = Files::new();
    let text = valid(&files).replace("host = \"ehr.localhost\"", "host = \"emr.localhost\"");
    refused(&text, &["ehr.host", "distinct host names"]);
}

#[test]
fn no_authority() {
    let files = Files::new();
    let text = valid(&files);
    let start = text.find("[[authority]]").unwrap();
    let end = text.find("[context]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    refused(&text, &["authority", "at least one [[authority]]"]);
}

#[test]
fn missing_signing_key() {
    let files = Files::new();
    let text = valid(&files).replace(
        &files.signing_key.display().to_string(),
        "/nonexistent/signing.pem",
    );
    refused(
        &text,
        &[
            "context.signing_key",
            "cannot read /nonexistent/signing.pem",
            "openssl genpkey",
        ],
    );
}

/// `session.store = "redis"`: the key file must exist and hold 32 bytes; the URL must be
/// a Redis URL; its password never appears in check-config's output or errors.
#[test]
fn the_redis_store_needs_its_key_and_never_prints_the_password() {
    let files = Files::new();
    let key = files.path("store.key");
    let session = |lines: &str| {
        let a = "127.0.0.1:1".parse().unwrap();
        Setup::new(a, a)
            .session(lines)
            .toml(&files, "127.0.0.1:0", "127.0.0.1:0")
    };
    let url = "redis_url = \"redis://ehrgate:s3cret-pw@127.0.0.1:6379/0\"";
    let with_key = format!(
        "store = \"redis\"\n{url}\nstore_key = {:?}",
        key.display().to_string()
    );

    refused(
        &session(&format!("store = \"redis\"\n{url}")),
        &["session.store_key", "32 random bytes"],
    );
    refused(&session(&with_key), &["session.store_key", "cannot read"]);
    std::fs::write(&key, [7u8; 16]).unwrap();
    refused(
        &session(&with_key),
        &["session.store_key", "16 bytes", "exactly 32"],
    );
    refused(
        &session(&format!(
            "store = \"redis\"\nstore_key = {:?}",
            key.display().to_string()
        )),
        &["session.redis_url", "required"],
    );
    refused(
        &session(&format!(
            "store = \"redis\"\nredis_url = \"http://u:s3cret-pw@h/\"\nstore_key = {:?}",
            key.display().to_string()
        )),
        &["session.redis_url", "redis://"],
    );
    std::fs::write(&key, [7u8; 32]).unwrap();
    refused(
        &session(&with_key.replace("6379/0", "6379/0#insecure")),
        &["session.redis_url", "#insecure"],
    );
    let (code, stdout, stderr) = check_config(&session(&with_key));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("store = \"redis\""), "{stdout}");
    assert!(
        stdout.contains("redis://ehrgate:***@127.0.0.1:6379/0"),
        "{stdout}"
    );
    for out in [&stdout, &stderr] {
        assert!(
            !out.contains("s3cret-pw"),
            "the password was printed: {out}"
        );
    }
    // A rediss:// CA that cannot be read is named.
    let text = session(&format!(
        "{with_key}\nredis_ca = {:?}",
        files.path("absent-ca.pem").display().to_string()
    ))
    .replace("redis://", "rediss://");
    refused(&text, &["session.redis_ca", "cannot read"]);
}
