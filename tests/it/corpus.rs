//! Request smuggling and malformed input over raw TLS sockets (DESIGN §8): each request
//! is refused with a 4xx (or the connection closed) or normalised so that the upstream
//! sees exactly one well-framed request; a smuggled request never reaches it; and the
//! proxy serves the next client. HTTP/1.1 by hand-written bytes; HTTP/2 by hand-built
//! frames (uppercase names, connection-specific fields, pseudo-header order,
//! CONTINUATION flood, rapid reset).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ehrgate::body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::upstream;
use crate::support::{Gate, Setup, EMR};

const SOON: Duration = Duration::from_secs(60);

/// An upstream that records the method, path and body length of every request.
async fn recording() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = upstream::spawn(move |req: http::Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let line = format!("{} {}", req.method(), req.uri().path());
            let len = match req.into_body().collect().await {
                Ok(b) => b.to_bytes().len().to_string(),
                Err(_) => "broken".into(),
            };
            log.lock().unwrap().push(format!("{line} {len}"));
            http::Response::new(Body::full("upstream ok"))
        }
    })
    .await;
    (addr, seen)
}

/// The HTTP/1.1 corpus: (what, raw request). Every request targets `/first`; anything
/// that could be read as a second request targets `/smuggled`.
fn h1_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let h = "Host: emr.localhost\r\n";
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: emr.localhost\r\n\r\n";
    let mut cases: Vec<(&'static str, String)> = vec![
        (
            "CL.TE",
            format!(
                "POST /first HTTP/1.1\r\n{h}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "TE.CL",
            format!(
                "POST /first HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
                smuggled.len()
            ),
        ),
        (
            "duplicate Content-Length",
            format!("POST /first HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "conflicting Content-Length",
            format!("POST /first HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello{smuggled}"),
        ),
        (
            "Content-Length list",
            format!("POST /first HTTP/1.1\r\n{h}Content-Length: 5, 50\r\n\r\nhello{smuggled}"),
        ),
        (
            "negative Content-Length",
            format!("POST /first HTTP/1.1\r\n{h}Content-Length: -1\r\n\r\n{smuggled}"),
        ),
        (
            "signed Content-Length",
            format!("POST /first HTTP/1.1\r\n{h}Content-Length: +5\r\n\r\nhello"),
        ),
        (
            "chunked, identity",
            format!(
                "POST /first HTTP/1.1\r\n{h}Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
        ),
        (
            "unknown coding",
            format!("POST /first HTTP/1.1\r\n{h}Transfer-Encoding: gzip\r\n\r\n{smuggled}"),
        ),
        (
            "chunked twice",
            format!(
                "POST /first HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "TE with a space before the colon",
            format!("POST /first HTTP/1.1\r\n{h}Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "obs-fold",
            format!("GET /first HTTP/1.1\r\n{h}X-Folded: a\r\n b\r\n\r\n"),
        ),
        (
            "bare CR in a value",
            format!("GET /first HTTP/1.1\r\n{h}X-A: a\rb\r\n\r\n"),
        ),
        (
            "NUL in a value",
            format!("GET /first HTTP/1.1\r\n{h}X-A: a\0b\r\n\r\n"),
        ),
        (
            "NUL in a name",
            format!("GET /first HTTP/1.1\r\n{h}X\0A: b\r\n\r\n"),
        ),
        (
            "NUL in the request line",
            format!("GET /fir\0st HTTP/1.1\r\n{h}\r\n"),
        ),
        (
            "bad chunk size",
            format!("POST /first HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\nzz\r\n{smuggled}"),
        ),
        (
            "overflowing chunk size",
            format!(
                "POST /first HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n10000000000000001\r\nx\r\n0\r\n\r\n"
            ),
        ),
        (
            "absolute-form to another host",
            format!("GET http://evil.example/smuggled HTTP/1.1\r\n{h}\r\n"),
        ),
        ("HTTP/0.9", "GET /smuggled\r\n\r\n".to_string()),
        ("HTTP/2 preface on an HTTP/1.1 connection", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into()),
        (
            "huge request line",
            format!("GET /first?{} HTTP/1.1\r\n{h}\r\n", "a".repeat(64 * 1024)),
        ),
        (
            "too many header fields",
            format!(
                "GET /first HTTP/1.1\r\n{h}{}\r\n",
                (0..150).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
            ),
        ),
        (
            "two Host fields",
            format!("GET /first HTTP/1.1\r\n{h}Host: ehr.localhost\r\n\r\n"),
        ),
    ];
    // Bare LF line endings: accepted by many parsers, so only ever one request.
    cases.push((
        "bare LF line endings",
        "GET /first HTTP/1.1\nHost: emr.localhost\n\n".to_string(),
    ));
    cases
        .into_iter()
        .map(|(w, r)| (w, r.into_bytes()))
        .collect()
}

/// Reads what the server sends until it closes the connection (or `SOON` passes).
async fn read_all<S: AsyncReadExt + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(SOON, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection was left open: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http1_smuggling_and_malformed_requests_are_refused_or_normalised() {
    let (addr, seen) = recording().await;
    let gate = Gate::start(Setup::new(addr, addr)).await;
    let client = gate.client();
    for (what, raw) in h1_corpus() {
        let before = seen.lock().unwrap().len();
        let mut tls = client.tls(EMR, &[b"http/1.1"]).await;
        // The request, then an explicit end: what ehrgate answers is all that comes back.
        let _ = tls.write_all(&raw).await;
        let _ = tls
            .write_all(b"GET /last HTTP/1.1\r\nHost: emr.localhost\r\nConnection: close\r\n\r\n")
            .await;
        let answer = read_all(&mut tls).await;
        let statuses: Vec<&str> = answer
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &answer[i + 9..i + 12])
            .collect();
        assert!(
            statuses
                .iter()
                .all(|s| s.starts_with('2') || s.starts_with('4')),
            "{what}: {statuses:?}\n{answer}"
        );
        let reached: Vec<String> = seen.lock().unwrap()[before..].to_vec();
        assert!(
            !reached.iter().any(|r| r.contains("/smuggled")),
            "{what}: a smuggled request reached the upstream: {reached:?}"
        );
        let forwarded_first = reached.iter().filter(|r| r.contains("/first")).count();
        assert!(forwarded_first <= 1, "{what}: {reached:?}");
        // Each request the upstream saw was answered to the client, and no more.
        let answered = statuses.iter().filter(|s| s.starts_with('2')).count();
        assert_eq!(
            answered,
            reached.len(),
            "{what}: {statuses:?} for {reached:?}"
        );
        // Only these may be normalised and forwarded; every other one is refused.
        let normalised = [
            "CL.TE",
            "TE.CL",
            "duplicate Content-Length",
            "chunked twice",
            "bare LF line endings",
        ];
        if !normalised.contains(&what) {
            assert!(
                statuses.first().is_none_or(|s| s.starts_with('4')) && forwarded_first == 0,
                "{what} must be refused: {statuses:?} {reached:?}"
            );
        }
        // The next client is served.
        let next = client.get(EMR, "/next").await;
        assert_eq!(next.status, 200, "{what}: the next client");
    }
}

/// Minimal HTTP/2 framing for requests no well-behaved client library would send.
mod h2raw {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut n: usize) {
        let max = (1usize << prefix_bits) - 1;
        if n < max {
            out.push(first | n as u8);
            return;
        }
        out.push(first | max as u8);
        n -= max;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }

    /// HPACK "literal without indexing, new name", no Huffman coding: any bytes at all.
    pub fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x00);
        int(out, 7, 0, name.len());
        out.extend_from_slice(name.as_bytes());
        int(out, 7, 0, value.len());
        out.extend_from_slice(value.as_bytes());
    }

    pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in fields {
            literal(&mut b, n, v);
        }
        b
    }

    /// The frame types the server sent, in order (payloads skipped).
    pub fn kinds(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i + 9 <= bytes.len() {
            let len =
                (bytes[i] as usize) << 16 | (bytes[i + 1] as usize) << 8 | bytes[i + 2] as usize;
            out.push(bytes[i + 3]);
            i += 9 + len;
        }
        out
    }
}

/// Opens an HTTP/2 connection by hand: preface and empty SETTINGS sent.
async fn h2_raw(gate: &Gate) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = gate.client().tls(EMR, &[b"h2"]).await;
    tls.write_all(h2raw::PREFACE).await.unwrap();
    tls.write_all(&h2raw::frame(h2raw::SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    tls
}

#[tokio::test]
async fn http2_malformed_requests_are_reset_and_never_forwarded() {
    use h2raw::*;
    let (addr, seen) = recording().await;
    let gate = Gate::start(Setup::new(addr, addr)).await;
    let base = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", EMR),
    ];
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "uppercase name",
            vec![(":path", "/smuggled"), ("X-Upper", "v")],
        ),
        (
            "connection-specific field",
            vec![(":path", "/smuggled"), ("connection", "keep-alive")],
        ),
        (
            "transfer-encoding",
            vec![(":path", "/smuggled"), ("transfer-encoding", "chunked")],
        ),
        (
            "te other than trailers",
            vec![(":path", "/smuggled"), ("te", "gzip")],
        ),
        (
            "pseudo-header after a regular one",
            vec![("x-a", "b"), (":path", "/smuggled")],
        ),
        ("no :path", vec![("x-a", "b")]),
        (
            "two :path",
            vec![(":path", "/smuggled"), (":path", "/other")],
        ),
        (
            "unknown pseudo-header",
            vec![(":path", "/smuggled"), (":evil", "x")],
        ),
        (
            "newline in a value",
            vec![(":path", "/smuggled"), ("x-a", "a\r\nx-b: c")],
        ),
    ];
    for (what, extra) in cases {
        let mut tls = h2_raw(&gate).await;
        let mut fields: Vec<(&str, &str)> = base.to_vec();
        fields.extend(extra);
        let headers = frame(HEADERS, END_HEADERS | END_STREAM, 1, &block(&fields));
        tls.write_all(&headers).await.unwrap();
        // A well-formed request on stream 3 shows the connection still serves, or not.
        let mut ok = base.to_vec();
        ok.push((":path", "/after"));
        let _ = tls
            .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &block(&ok)))
            .await;
        let _ = tls
            .write_all(&frame(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]))
            .await;
        let mut got = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + SOON;
        // Until the stream is reset or the connection goes away.
        loop {
            let kinds = kinds(&got);
            if kinds.contains(&RST_STREAM) || kinds.contains(&GOAWAY) {
                break;
            }
            match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!("{what}: neither reset nor closed"),
            }
        }
        let reached = seen.lock().unwrap().clone();
        assert!(
            !reached.iter().any(|r| r.contains("smuggled")),
            "{what}: reached the upstream: {reached:?}"
        );
        assert!(
            gate.client().get(EMR, "/next").await.status == 200,
            "{what}: next client"
        );
    }
}

#[tokio::test]
async fn http2_continuation_flood_and_rapid_reset_leave_others_served() {
    use h2raw::*;
    let (addr, seen) = recording().await;
    let gate = Gate::start(Setup::new(addr, addr)).await;

    // CONTINUATION flood: one header block that never ends, 16 KiB at a time.
    let mut flood = h2_raw(&gate).await;
    let first = block(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", EMR),
        (":path", "/flood"),
    ]);
    flood
        .write_all(&frame(HEADERS, END_STREAM, 1, &first))
        .await
        .unwrap();
    let junk = block(&[("x-junk", &"j".repeat(16 * 1024 - 16))]);
    let mut sent = 0usize;
    for _ in 0..4096 {
        if flood
            .write_all(&frame(CONTINUATION, 0, 1, &junk))
            .await
            .is_err()
        {
            break;
        }
        sent += junk.len();
    }
    let answer = tokio::time::timeout(SOON, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = flood.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if kinds(&got).contains(&GOAWAY) {
                break;
            }
        }
        got
    })
    .await
    .expect("the flood is ended, not absorbed");
    assert!(
        kinds(&answer).contains(&GOAWAY) || sent < 4096 * junk.len(),
        "no GOAWAY and all {sent} bytes accepted"
    );
    assert_eq!(gate.client().get(EMR, "/during").await.status, 200);

    // Rapid reset: open and cancel streams as fast as possible.
    let mut rapid = h2_raw(&gate).await;
    let mut burst = Vec::new();
    for i in 0..5000u32 {
        let id = 1 + 2 * i;
        let path = block(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", EMR),
            (":path", "/rapid"),
        ]);
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &path));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = rapid.write_all(&burst).await;
    let ended = tokio::time::timeout(SOON, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = rapid.read(&mut buf).await {
            if n == 0 || kinds(&got).contains(&GOAWAY) {
                return true;
            }
            got.extend_from_slice(&buf[..n]);
        }
        true
    })
    .await;
    assert_eq!(ended, Ok(true), "rapid reset: GOAWAY or close, not a hang");
    assert_eq!(gate.client().get(EMR, "/after").await.status, 200);
    let rapid_reached = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.contains("/rapid"))
        .count();
    // Cancelled streams may have begun upstream; far from all of them did.
    assert!(
        rapid_reached < 5000,
        "{rapid_reached} of 5,000 cancelled streams forwarded"
    );
    assert!(!seen.lock().unwrap().iter().any(|r| r.contains("/flood")));
}
