//! The shared test harness: a test CA made at run time, in-process upstreams on loopback,
//! ehrgate started in-process (or as the real binary), and TLS clients that can choose
//! SNI, ALPN and protocol versions.

#![allow(dead_code)]

pub mod client;
pub mod clinic;
pub mod pki;
pub mod redis;
pub mod replicas;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use ehrgate::app::{self, Running};
use ehrgate::config::Config;
use ehrgate::tls::dev::{generate_signing_key_pem, DevPki};
use tokio::io::AsyncBufReadExt;

pub const EMR: &str = "emr.localhost";
pub const EHR: &str = "ehr.localhost";

/// Key material and a scratch directory for one test.
pub struct Files {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub signing_key: PathBuf,
}

impl Files {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = DevPki::generate(&[EMR, EHR]).expect("test PKI");
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        let signing_key = dir.path().join("signing.pem");
        std::fs::write(&cert, &pki.server_cert_pem).unwrap();
        std::fs::write(&key, &pki.server_key_pem).unwrap();
        std::fs::write(&signing_key, generate_signing_key_pem().unwrap()).unwrap();
        Self {
            dir,
            ca_pem: pki.ca_cert_pem,
            cert,
            key,
            signing_key,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// How to configure the ehrgate under test.
#[derive(Clone)]
pub struct Setup {
    pub emr_upstream: String,
    pub ehr_upstream: String,
    /// Extra lines for the [server] table.
    pub server: String,
    /// Extra tables appended at the end.
    pub tail: String,
    pub emr: String,
    pub ehr: String,
    pub session: String,
    /// The audit log's directory is a file: nothing can be written.
    pub audit_blocked: bool,
    /// Whether the configured authority is marked `default = true`.
    pub default_authority: bool,
    /// Certificate and key files other than the test's own (`tls_cert`, `tls_key`).
    pub tls_files: Option<(PathBuf, PathBuf)>,
}

impl Setup {
    pub fn new(emr: SocketAddr, ehr: SocketAddr) -> Self {
        Self {
            emr_upstream: format!("http://{emr}"),
            ehr_upstream: format!("http://{ehr}"),
            server: String::new(),
            tail: String::new(),
            emr: String::new(),
            ehr: String::new(),
            session: String::new(),
            audit_blocked: false,
            default_authority: true,
            tls_files: None,
        }
    }

    /// Extra lines for the [emr] table.
    pub fn emr(mut self, lines: &str) -> Self {
        self.emr.push_str(lines);
        self.emr.push('\n');
        self
    }

    pub fn ehr(mut self, lines: &str) -> Self {
        self.ehr.push_str(lines);
        self.ehr.push('\n');
        self
    }

    pub fn session(mut self, lines: &str) -> Self {
        self.session.push_str(lines);
        self.session.push('\n');
        self
    }

    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    pub fn toml(&self, files: &Files, listen: &str, admin: &str) -> String {
        format!(
            r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"
tls_cert = {cert:?}
tls_key = {key:?}
{server}

[emr]
host = "{EMR}"
upstream = "{emr}"
{emr_extra}

[ehr]
host = "{EHR}"
upstream = "{ehr}"
{ehr_extra}

[session]
{session_extra}

[[authority]]
id = "2.16.840.1.113883.3.239.9:101"
name = "Maple Family Health Team"
default = {default_authority}

[context]
signing_key = {signing:?}

[audit]
path = {audit:?}
{hash_key}

[log]
filter = "warn"
{tail}
"#,
            cert = self
                .tls_files
                .as_ref()
                .map_or(&files.cert, |t| &t.0)
                .display()
                .to_string(),
            key = self
                .tls_files
                .as_ref()
                .map_or(&files.key, |t| &t.1)
                .display()
                .to_string(),
            signing = files.signing_key.display().to_string(),
            audit = if self.audit_blocked {
                let blocker = files.path("blocked");
                std::fs::write(&blocker, "a file where the audit directory should be").unwrap();
                blocker.join("audit.jsonl").display().to_string()
            } else {
                files.path("audit.jsonl").display().to_string()
            },
            hash_key = if self.audit_blocked {
                "hash_key = \"test-key-test-key-test-key-test-key\""
            } else {
                ""
            },
            default_authority = self.default_authority,
            emr_extra = self.emr,
            ehr_extra = self.ehr,
            session_extra = self.session,
            server = self.server,
            emr = self.emr_upstream,
            ehr = self.ehr_upstream,
            tail = self.tail,
        )
    }
}

/// ehrgate running in this test process.
pub struct Gate {
    pub files: Files,
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Gate {
    pub async fn start(setup: Setup) -> Self {
        let files = Files::new();
        let config = Config::parse(&setup.toml(&files, "127.0.0.1:0", "127.0.0.1:0"))
            .unwrap_or_else(|e| panic!("test config: {e}"));
        let running = app::start(config).await.expect("ehrgate starts");
        Self {
            addr: running.proxy_addr,
            admin: running.admin_addr,
            running: Some(running),
            files,
        }
    }

    pub fn client(&self) -> client::TestClient {
        client::TestClient::new(self.addr, &self.files.ca_pem)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        client::plain_get(self.admin, path).await
    }
}

/// The real `ehrgate` binary, started with a configuration file.
pub struct Child {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub files: Files,
    /// What it logged on standard error so far (also passed on to the test's own).
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Child {
    /// Starts `ehrgate run` and waits for the line that says it is serving.
    pub async fn start(setup: Setup) -> Self {
        let files = Files::new();
        let config_path = files.path("ehrgate.toml");
        std::fs::write(
            &config_path,
            setup.toml(&files, "127.0.0.1:0", "127.0.0.1:0"),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ehrgate"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("ehrgate binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("ehrgate prints its addresses");
        // "ehrgate: serving https on A (admin http on B)"
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[4]
            .parse()
            .unwrap_or_else(|_| panic!("address in {line:?}"));
        let admin = words[8].trim_end_matches(')').parse().unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut errors = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                eprintln!("[ehrgate] {line}");
                kept.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            addr,
            admin,
            files,
            logs,
        }
    }

    /// Waits until a logged line contains every fragment; returns it.
    pub async fn logged(&self, fragments: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| fragments.iter().all(|f| l.contains(f)))
            {
                return line.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {fragments:?}: {:?}",
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub fn client(&self) -> client::TestClient {
        client::TestClient::new(self.addr, &self.files.ca_pem)
    }

    /// Every line it logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("child running")
    }

    /// Peak resident memory of the child (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("field in /proc status")
}

/// Runs `ehrgate check-config` on `text`: (exit code, stdout, stderr).
pub fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    check_config_path(&path)
}

pub fn check_config_path(path: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ehrgate"))
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .output()
        .expect("ehrgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
