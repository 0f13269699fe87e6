//! A real Redis server for one test: Debian's `redis-server` (installed by
//! `scripts/install-test-deps.sh`), started on its own loopback port with its own
//! directory, never the system's service. Its append-only file survives a stop and
//! start, as a production Redis with persistence does.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `requirepass`, when set.
    password: Option<String>,
    /// Served over TLS only (`rediss://`), with a certificate from this CA (PEM path).
    tls_ca: Option<std::path::PathBuf>,
}

/// Only turns a hang into a failure.
const READY_WITHIN: Duration = Duration::from_secs(60);

impl Redis {
    pub fn start() -> Self {
        Self::start_with(None, false)
    }

    /// With a password, and over TLS only with a certificate for 127.0.0.1 from `ca`.
    pub fn start_with(password: Option<&str>, tls: bool) -> Self {
        let bin = which("redis-server").unwrap_or_else(|| {
            panic!("redis-server is not installed: run scripts/install-test-deps.sh (Debian package redis-server)")
        });
        let dir = tempfile::tempdir().unwrap();
        let tls_ca = tls.then(|| {
            let ca = super::pki::TestCa::new("redis test CA");
            let (cert, key) = ca.server_pem(&[super::pki::LOOPBACK]);
            std::fs::write(dir.path().join("redis.crt"), cert).unwrap();
            std::fs::write(dir.path().join("redis.key"), key).unwrap();
            std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
            dir.path().join("ca.pem")
        });
        let mut r = Self {
            port: 0,
            dir,
            child: None,
            password: password.map(str::to_string),
            tls_ca,
        };
        // A free loopback port: the kernel picks it, the server takes it over (tried again
        // in the rare case another process took it in between).
        for _ in 0..20 {
            r.port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if r.spawn(&bin) {
                return r;
            }
        }
        panic!("redis-server did not start on any loopback port");
    }

    /// Starts the server on `self.port`; true once it answers PING.
    fn spawn(&mut self, bin: &PathBuf) -> bool {
        let mut cmd = Command::new(bin);
        let d = self.dir.path();
        if self.tls_ca.is_some() {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()]);
            cmd.arg("--tls-cert-file").arg(d.join("redis.crt"));
            cmd.arg("--tls-key-file").arg(d.join("redis.key"));
            cmd.arg("--tls-ca-cert-file").arg(d.join("ca.pem"));
            cmd.args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args([
                "--bind",
                "127.0.0.1",
                "--dir",
                &self.dir.path().display().to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + READY_WITHIN;
        while std::time::Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                // It exited: the port was taken.
                self.child = None;
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server never answered PING");
    }

    fn ping(&self) -> bool {
        let Ok(client) = self.client() else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = match &self.password {
            Some(p) => format!("default:{p}@"),
            None => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}/0", self.port)
    }

    /// The CA file a `rediss://` client must trust (`session.redis_ca`).
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.tls_ca.as_deref()
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls_ca {
            None => redis::Client::open(self.url()),
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            ),
        }
    }

    /// Stops the server (as an outage does); its data stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with the data it had.
    pub fn restart(&mut self) {
        self.stop();
        let bin = which("redis-server").unwrap();
        assert!(self.spawn(&bin), "redis-server restarts on its port");
    }

    /// A connection for the test's own look at what is stored.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Every key and every value stored, as bytes (hash fields and values, list and set
    /// members, sorted-set members): what someone reading the store would see.
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
        let mut conn = self.conn();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        keys.into_iter()
            .map(|k| {
                let kind: String = redis::cmd("TYPE").arg(&k).query(&mut conn).unwrap();
                let values: Vec<Vec<u8>> = match kind.as_str() {
                    "string" => vec![redis::cmd("GET").arg(&k).query(&mut conn).unwrap()],
                    "hash" => redis::cmd("HGETALL").arg(&k).query(&mut conn).unwrap(),
                    "list" => redis::cmd("LRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .query(&mut conn)
                        .unwrap(),
                    "set" => redis::cmd("SMEMBERS").arg(&k).query(&mut conn).unwrap(),
                    "zset" => redis::cmd("ZRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .query(&mut conn)
                        .unwrap(),
                    other => panic!("unexpected key type {other}"),
                };
                (k, values)
            })
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/bin", "/usr/sbin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}
