//! Per-request work that is not I/O: routing a host, spotting own paths, and the header
//! rules applied to every forwarded request.

use criterion::{criterion_group, criterion_main, Criterion};
use ehrgate::proxy::headers::{self, Severity, TrustedHeaders};
use ehrgate::proxy::route;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::hint::black_box;

/// The headers a browser sends with an ordinary viewer request.
fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "ehr.clinic.example"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-CA,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        (
            "cookie",
            "__Host-ehrgate=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
        ("referer", "https://ehr.clinic.example/chart"),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "navigate"),
        ("upgrade-insecure-requests", "1"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    c.bench_function("route/classify", |b| {
        b.iter(|| {
            route::classify(
                black_box(Some("ehr.clinic.example:8443")),
                black_box(Some("ehr.clinic.example")),
                "emr.clinic.example",
                "ehr.clinic.example",
            )
        })
    });
    c.bench_function("path/canonical_and_is_own_path", |b| {
        b.iter(|| {
            let p = ehrgate::proxy::path::canonical(black_box("/cc/patient/chart/labs.html"));
            p.is_ok_and(|p| route::is_own_path(&p))
        })
    });

    let mut trusted = TrustedHeaders::new();
    trusted.add("X-EHR-Context", Severity::Forgery);
    let template = browser_headers();
    let request_id = HeaderValue::from_static("5cb70788-1");
    let client_ip = HeaderValue::from_static("10.1.2.3");
    c.bench_function("headers/filter_and_forward", |b| {
        b.iter_batched(
            || template.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h, false);
                trusted.strip(&mut h);
                headers::fold_cookies(&mut h);
                headers::set_forwarded(&mut h, &client_ip, "ehr.clinic.example", &request_id);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
