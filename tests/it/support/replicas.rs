//! Several ehrgate replicas behind one (imagined) load balancer: each its own listener,
//! its own store connections and live handles, sharing one real Redis, one certificate,
//! one signing key and one `store_key`, in front of one fake EMR and viewer. A browser
//! is pointed at any replica between requests ([`Replicas::via`]), keeping its cookies.

use std::net::SocketAddr;

use ehrgate::app::{self, Running};
use ehrgate::config::Config;
use serde_json::Value;

use super::clinic::{Browser, FakeEmr, FakeViewer};
use super::redis::Redis;
use super::{Files, Setup, EHR};

pub struct Replica {
    pub running: Running,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

pub struct Replicas {
    pub redis: Redis,
    pub files: Files,
    pub emr: FakeEmr,
    pub viewer: FakeViewer,
    pub gates: Vec<Replica>,
}

impl Replicas {
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, |s| s).await
    }

    pub async fn start_with(n: usize, f: impl Fn(Setup) -> Setup) -> Self {
        Self::start_on(Redis::start(), n, f).await
    }

    /// On a Redis the test set up itself (TLS, a password).
    pub async fn start_on(redis: Redis, n: usize, f: impl Fn(Setup) -> Setup) -> Self {
        let files = Files::new();
        let key = files.path("store.key");
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).unwrap();
        std::fs::write(&key, bytes).unwrap();
        let emr = FakeEmr::start().await;
        let viewer = FakeViewer::start().await;
        let mut session = format!(
            "store = \"redis\"\nredis_url = \"{}\"\nstore_key = {:?}\nredis_key_prefix = \"test:\"",
            redis.url(),
            key.display().to_string()
        );
        if let Some(ca) = redis.ca_path() {
            session.push_str(&format!("\nredis_ca = {:?}", ca.display().to_string()));
        }
        let setup = f(Setup::new(emr.addr, viewer.addr).session(&session));
        let text = setup.toml(&files, "127.0.0.1:0", "127.0.0.1:0");
        let mut gates = Vec::new();
        // One after another: the first creates the audit hash key the others reuse.
        for _ in 0..n {
            let config = Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}"));
            let running = app::start(config).await.expect("replica starts");
            gates.push(Replica {
                addr: running.proxy_addr,
                admin: running.admin_addr,
                running,
            });
        }
        let jwks = super::client::TestClient::new(gates[0].addr, &files.ca_pem)
            .get(EHR, "/.well-known/ehrgate/jwks.json")
            .await
            .json();
        *viewer.state.jwks.lock().unwrap() = Some(jwks);
        Self {
            redis,
            files,
            emr,
            viewer,
            gates,
        }
    }

    /// A browser logged in to the EMR as `provider`, talking to replica 0.
    pub fn browser(&self, provider: &str) -> Browser {
        let b = Browser::new(super::client::TestClient::new(
            self.gates[0].addr,
            &self.files.ca_pem,
        ));
        b.set_cookie(super::EMR, "JSESSIONID", &self.emr.login(provider));
        b
    }

    /// The same browser (same cookies), its next requests going to replica `i`.
    pub fn via(&self, browser: &Browser, i: usize) -> Browser {
        Browser {
            client: super::client::TestClient::new(self.gates[i].addr, &self.files.ca_pem),
            cookies: browser.cookies.clone(),
        }
    }

    pub async fn admin_get(&self, i: usize, path: &str) -> (u16, String) {
        super::client::plain_get(self.gates[i].admin, path).await
    }

    /// The audit records every replica wrote (one log, shared, as on one host).
    pub fn audit_events(&self, event: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.files.path("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["event"] == event)
            .collect()
    }
}
