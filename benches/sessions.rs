//! The session work on every viewer request and at each lifecycle step: lookup by cookie
//! among 1,000,000 live sessions (one thread, and both cores at once), ticket issue and
//! redeem, the vault's cookie merge and capture, context signing, and sign-out.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ehrgate::config::Authority;
use ehrgate::context::{Claims, ContextSigner, PatientClaims};
use ehrgate::session::decide;
use ehrgate::session::{
    CookieJar, EhrSession, EmrSession, LaunchTicket, MemoryStore, PatientContext, Token, TokenHash,
};
use std::hint::black_box;

const SESSIONS: usize = 1_000_000;

fn authority() -> Arc<Authority> {
    Arc::new(Authority {
        id: "2.16.840.1.113883.3.239.9:101".into(),
        name: "Maple Family Health Team".into(),
        default: true,
    })
}

/// A store with `n` EMR sessions, each with an EHR session; returns the EHR cookie values.
fn populated(n: usize) -> (Arc<MemoryStore>, Vec<String>) {
    let store = Arc::new(MemoryStore::new(n + 10));
    let auth = authority();
    let mut cookies = Vec::with_capacity(n);
    for i in 0..n {
        let emr = store
            .insert_emr(EmrSession::new(
                TokenHash::of(&format!("JSESSIONID-{i}")),
                format!("{}", 100_000 + i % 5000),
                0,
            ))
            .unwrap();
        let token = Token::generate().unwrap();
        let s = Arc::new(EhrSession::new(
            emr.key,
            emr.user.clone(),
            auth.clone(),
            token.hash(),
            0,
        ));
        s.jar.lock().unwrap().capture(
            "VSESSION=8f14e45fceea167a5a36dedd4bea2543; Path=/; HttpOnly",
            0,
        );
        store.insert_ehr(s);
        cookies.push(token.as_str().to_string());
    }
    (store, cookies)
}

fn lookup(c: &mut Criterion) {
    let started = Instant::now();
    let (store, cookies) = populated(SESSIONS);
    eprintln!("populated {SESSIONS} sessions in {:?}", started.elapsed());
    // A request's cookie is in cache (just parsed); the session it names is anywhere in
    // the store. So every cookie, as a fixed-size array, laid out in a shuffled order
    // (7919 is prime to 1,000,000): reading the next one is cheap, the session is not.
    let probe: Vec<[u8; 43]> = (0..SESSIONS)
        .map(|k| {
            cookies[(k * 7919) % SESSIONS]
                .as_bytes()
                .try_into()
                .expect("43-char token")
        })
        .collect();
    drop(cookies);
    let n = probe.len();
    fn text(c: &[u8; 43]) -> &str {
        std::str::from_utf8(c).unwrap()
    }
    let mut i = 0usize;
    c.bench_function("session/sha256_of_cookie", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            black_box(TokenHash::of(text(&probe[i])))
        })
    });
    c.bench_function("session/lookup_by_cookie_1M/1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            black_box(store.ehr(&TokenHash::of(text(&probe[i]))))
        })
    });
    // Both cores: one more thread looking up the whole time this one is measured.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (store, probe, stop) = (store.clone(), probe.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut j = SESSIONS / 2;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                j = (j + 1) % probe.len();
                let c = std::str::from_utf8(&probe[j]).unwrap();
                black_box(store.ehr(&TokenHash::of(c)));
            }
        })
    };
    c.bench_function("session/lookup_by_cookie_1M/2_threads", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            black_box(store.ehr(&TokenHash::of(text(&probe[i]))))
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    other.join().unwrap();
}

fn patient() -> PatientContext {
    PatientContext {
        demographic_no: "1001".into(),
        hcn: "9876543217".into(),
        hcn_version: "AB".into(),
        birth_date: "1958-03-14".into(),
        gender: "F".into(),
        family: "Tremblay".into(),
        given: "Marie".into(),
        mrp_provider: "999998".into(),
    }
}

fn tickets(c: &mut Criterion) {
    let store = MemoryStore::new(10_000_000);
    let emr = TokenHash::of("JSESSIONID");
    let (auth, p) = (authority(), patient());
    let user: Arc<str> = Arc::from("999998");
    c.bench_function("ticket/issue_and_redeem", |b| {
        b.iter(|| {
            let t = Token::generate().unwrap();
            store
                .put_ticket(
                    t.hash(),
                    LaunchTicket {
                        emr,
                        user: user.clone(),
                        authority: auth.clone(),
                        patient: p.clone(),
                        mrp: true,
                        expires: 60_000,
                        binding: None,
                        confirm_nonce: None,
                        redeem_code: None,
                    },
                )
                .unwrap();
            let got = store.take_ticket(&TokenHash::of(t.as_str()));
            black_box(decide::redeem(got.as_ref(), 1, true))
        })
    });
}

fn vault(c: &mut Criterion) {
    let mut jar = CookieJar::default();
    jar.capture(
        "VSESSION=8f14e45fceea167a5a36dedd4bea2543; Path=/; HttpOnly; Secure",
        0,
    );
    jar.capture("pref=compact; Path=/chart", 0);
    c.bench_function("vault/merge_cookie_header", |b| {
        b.iter(|| black_box(jar.header_for(black_box("/chart/labs"), 1)))
    });
    c.bench_function("vault/capture_set_cookie", |b| {
        b.iter_batched(
            || jar.clone(),
            |mut j| {
                j.capture(
                    black_box(
                        "VSESSION=c9f0f895fb98ab9159f51fd0297e236d; Path=/; HttpOnly; Secure",
                    ),
                    1,
                );
                j
            },
            BatchSize::SmallInput,
        )
    });
}

fn signing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    std::fs::write(
        &path,
        ehrgate::tls::dev::generate_signing_key_pem().unwrap(),
    )
    .unwrap();
    let signer = ContextSigner::load(std::slice::from_ref(&path)).unwrap();
    let p = patient();
    c.bench_function("context/sign_es256", |b| {
        b.iter(|| {
            let claims = Claims {
                iss: "ehrgate",
                aud: "https://ehr.clinic.example",
                sub: "999998",
                uao: "2.16.840.1.113883.3.239.9:101",
                uao_name: "Maple Family Health Team",
                patient: PatientClaims {
                    demographic_no: &p.demographic_no,
                    hcn: &p.hcn,
                    hcn_version: &p.hcn_version,
                    birth_date: &p.birth_date,
                    gender: &p.gender,
                    family: &p.family,
                    given: &p.given,
                },
                mrp: true,
                iat: 1_800_000_000,
                exp: 1_800_000_060,
                jti: "bench".into(),
            };
            black_box(signer.sign(&claims).unwrap())
        })
    });
}

/// The local part of signing out one EMR session: out of the map, its EHR session out
/// and closed (what makes the next viewer request fail). The upstream logout call and the
/// audit line are I/O, measured by the load script.
fn sign_out(c: &mut Criterion) {
    let auth = authority();
    c.bench_function("sign_out/one_emr_session", |b| {
        b.iter_batched(
            || {
                let (store, _) = populated(0);
                let emr = store
                    .insert_emr(EmrSession::new(TokenHash::of("J"), "999998", 0))
                    .unwrap();
                let s = Arc::new(EhrSession::new(
                    emr.key,
                    "999998".into(),
                    auth.clone(),
                    TokenHash::of("E"),
                    0,
                ));
                let watcher = s.close_signal();
                store.insert_ehr(s);
                (store, emr.key, watcher)
            },
            |(store, key, watcher)| {
                let emr = store.remove_emr(&key).unwrap();
                emr.end();
                let ehr = store.remove_ehr_of_emr(&key).unwrap();
                ehr.close();
                (store, watcher)
            },
            BatchSize::SmallInput,
        )
    });
    let mut group = c.benchmark_group("sign_out");
    group.sample_size(20);
    group.bench_function("10k_sessions_of_one_user", |b| {
        b.iter_batched(
            || {
                let store = MemoryStore::new(20_000);
                for i in 0..10_000 {
                    let emr = store
                        .insert_emr(EmrSession::new(
                            TokenHash::of(&format!("J{i}")),
                            "999998",
                            0,
                        ))
                        .unwrap();
                    let id = TokenHash::of(&format!("E{i}"));
                    store.insert_ehr(Arc::new(EhrSession::new(
                        emr.key,
                        "999998".into(),
                        auth.clone(),
                        id,
                        0,
                    )));
                }
                store
            },
            |store| {
                for key in store.emr_keys_of_user("999998") {
                    if let Some(emr) = store.remove_emr(&key) {
                        emr.end();
                    }
                    if let Some(ehr) = store.remove_ehr_of_emr(&key) {
                        ehr.close();
                    }
                }
                store
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, lookup, tickets, vault, signing, sign_out);
criterion_main!(benches);
