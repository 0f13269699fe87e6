//! The clinician's whole flow (DESIGN §1) in a real browser: headless Chromium driven by
//! `tests/browser/flow.mjs` against `ehrgate demo` started here, then the audit log
//! checked. Needs `scripts/install-test-deps.sh` (run by the README's test command);
//! without Chromium it fails with that advice rather than skipping.

use std::path::Path;

use ehrgate::demo::{self, data, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clinicians_flow_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "Chromium is not installed: run scripts/install-test-deps.sh (Debian packages chromium, chromium-driver)"
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed: run scripts/install-test-deps.sh"
    );

    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let demo = demo::start(DemoOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_dir: dir.path().join("certs"),
        audit_path: audit.clone(),
    })
    .await
    .expect("demo starts");

    let shots = root.join("target/browser-screenshots");
    let out = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/flow.mjs"))
        .env("EMR_URL", demo.emr_url())
        .env("EHR_URL", demo.ehr_url())
        .env("SERVER_CERT", &demo.files.server_cert)
        .env(
            "TOTP_SECRET",
            String::from_utf8_lossy(data::TOTP_SECRET).as_ref(),
        )
        .env("EMR_USER", data::EMR_USER)
        .env("EMR_PASSWORD", data::EMR_PASSWORD)
        .env("EMR_PIN", data::EMR_PIN)
        .env("ONEID_USER", data::ONEID_USER)
        .env("ONEID_PASSWORD", data::ONEID_PASSWORD)
        .env("SHOTS", &shots)
        .output()
        .await
        .expect("node runs (install it with scripts/install-test-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser flow failed (screenshots in {}):\n{stdout}\n{stderr}",
        shots.display()
    );
    assert!(stdout.contains("all steps passed"), "{stdout}");

    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |event: &str| records.iter().filter(|r| r["event"] == event).count();
    assert_eq!(count("launch"), 3, "{records:#?}");
    assert_eq!(count("enter"), 3);
    assert_eq!(count("override"), 1);
    assert_eq!(count("disconnect"), 1);
    assert_eq!(count("emr_logout"), 1);
    assert_eq!(
        count("ehr_logout"),
        2,
        "Disconnect and EMR logout each ended one"
    );
    let o = records.iter().find(|r| r["event"] == "override").unwrap();
    assert_eq!(o["reason"], "PROFJUDG");
    assert_eq!(o["demographic_no"], "1002");
    assert_eq!(o["user"], data::PROVIDER_NO);

    demo.running.shutdown();
    demo.running.wait().await;
}
