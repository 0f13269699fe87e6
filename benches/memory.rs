//! Resident memory of the session store with 0, 100,000 and 1,000,000 live EHR sessions
//! (each with its EMR session, marker, and a one-cookie viewer jar), in bytes per session.
//! Run: `cargo bench --bench memory`.

use std::sync::Arc;

use ehrgate::config::Authority;
use ehrgate::session::{EhrSession, EmrSession, MemoryStore, Token, TokenHash};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .expect("VmRSS")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let authority = Arc::new(Authority {
        id: "2.16.840.1.113883.3.239.9:101".into(),
        name: "Maple Family Health Team".into(),
        default: true,
    });
    // 5,000 clinicians; their sessions share the user string, as ehrgate's do per login.
    let users: Vec<Arc<str>> = (0..5000)
        .map(|i| Arc::from(format!("{}", 100_000 + i)))
        .collect();
    println!(
        "{:>10} {:>14} {:>18}",
        "sessions", "RSS (MiB)", "bytes/session"
    );
    for n in [0usize, 100_000, 1_000_000] {
        let before = rss_bytes();
        let store = MemoryStore::new(n + 1);
        for i in 0..n {
            let emr = store
                .insert_emr(EmrSession::new(
                    TokenHash::of(&format!("JSESSIONID-{i:032}")),
                    users[i % users.len()].clone(),
                    0,
                ))
                .unwrap();
            store.add_marker(Token::generate().unwrap().hash(), &emr);
            let s = Arc::new(EhrSession::new(
                emr.key,
                emr.user.clone(),
                authority.clone(),
                Token::generate().unwrap().hash(),
                0,
            ));
            s.jar.lock().unwrap().capture(
                "VSESSION=8f14e45fceea167a5a36dedd4bea2543; Path=/; HttpOnly; Secure",
                0,
            );
            *s.patient.lock().unwrap() = ehrgate::session::OpenedPatient {
                demographic_no: 1001,
                hcn_hmac: Some([0x3f; 32]),
            };
            store.insert_ehr(s);
        }
        let after = rss_bytes();
        let per = if n == 0 {
            0
        } else {
            (after.saturating_sub(before)) / n as u64
        };
        println!("{n:>10} {:>14.1} {per:>18}", after as f64 / 1048576.0);
        assert_eq!(store.counts().ehr, n);
        drop(store);
    }
}
