//! Forwarding through both hosts: methods, protocols, header rules, own paths, upgrades.

use ehrgate::body::Body;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use tokio_tungstenite::tungstenite::Message;

use crate::support::upstream::Echo;
use crate::support::{Gate, Setup, EHR, EMR};

async fn gate() -> (Gate, Echo, Echo) {
    let emr = Echo::start("emr").await;
    let ehr = Echo::start("ehr").await;
    let gate = Gate::start(Setup::new(emr.addr, ehr.addr)).await;
    (gate, emr, ehr)
}

#[tokio::test]
async fn get_and_post_reach_the_upstream_of_their_host() {
    let (gate, emr, ehr) = gate().await;
    let client = gate.client();

    let r = client.get(EMR, "/oscar/index.jsp?x=1").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["upstream"], "emr");
    assert_eq!(v["path"], "/oscar/index.jsp");
    assert_eq!(v["query"], "x=1");
    assert_eq!(
        v["headers"]["host"][0],
        emr.addr.to_string(),
        "upstream sees its own host"
    );
    assert_eq!(v["headers"]["x-forwarded-host"][0], EMR);

    let mut c = client.h1(EMR).await;
    let req = Request::post("/oscar/form.do")
        .header("host", EMR)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::full("reason=PATCONS"))
        .unwrap();
    let r = c.fetch(req).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["upstream"], "emr");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["body"], "reason=PATCONS");
    // Without an EHR session the viewer host refuses, and the viewer sees nothing.
    let r = client.get(EHR, "/chart").await;
    assert_eq!(r.status, 401);
    assert_eq!((emr.hits(), ehr.hits()), (2, 0));
}

#[tokio::test]
async fn http2_client_reaches_an_http1_upstream() {
    let (gate, _emr, _ehr) = gate().await;
    let mut c = gate.client().h2(EMR).await;
    for i in 0..3 {
        let r = c.get(EMR, &format!("/chart/{i}")).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["version"], "HTTP/1.1");
        assert_eq!(v["path"], format!("/chart/{i}"));
        assert_eq!(
            v["headers"]["x-forwarded-host"][0],
            format!("{EMR}:{}", gate.addr.port())
        );
    }
    // Cookies an HTTP/2 client splits are folded into one field for HTTP/1.1.
    let req = c
        .request(EMR, "/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Body::empty())
        .unwrap();
    let v = c.fetch(req).await.json();
    assert_eq!(v["headers"]["cookie"], serde_json::json!(["a=1; b=2"]));
}

#[tokio::test]
async fn hop_by_hop_and_connection_named_headers_are_removed_both_ways() {
    let (gate, _emr, _ehr) = gate().await;
    let mut c = gate.client().h1(EMR).await;
    let req = Request::get("/hop")
        .header("host", EMR)
        .header("connection", "keep-alive, X-Private-Hop")
        .header("x-private-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "passes")
        .body(Body::empty())
        .unwrap();
    let r = c.fetch(req).await;
    assert_eq!(r.status, 200);
    let headers = r.json()["headers"].clone();
    for gone in [
        "connection",
        "x-private-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the upstream: {headers}"
        );
    }
    assert_eq!(headers["x-end-to-end"][0], "passes");
    // The upstream's own hop-by-hop fields do not reach the client.
    assert!(r.header("x-upstream-hop").is_none());
    assert!(r.header("keep-alive").is_none());
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn forged_forwarding_and_context_headers_are_replaced() {
    let (gate, _emr, _ehr) = gate().await;
    let mut c = gate.client().h1(EMR).await;
    let req = Request::get("/chart")
        .header("host", EMR)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x_forwarded_for", "7.7.7.7")
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "forged-id")
        .header("x-ehr-context", "forged.jws.value")
        .header("X_EHR_Context", "forged.jws.value")
        .body(Body::empty())
        .unwrap();
    let r = c.fetch(req).await;
    let h = r.json()["headers"].clone();
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert!(h.get("x_forwarded_for").is_none());
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(h["x-forwarded-host"], serde_json::json!([EMR]));
    assert!(h.get("forwarded").is_none());
    assert!(
        h.get("x-ehr-context").is_none() && h.get("x_ehr_context").is_none(),
        "{h}"
    );
    let rid = r
        .header("x-request-id")
        .expect("response carries the request id");
    assert_ne!(rid, "forged-id");
    assert_eq!(h["x-request-id"], serde_json::json!([rid]));
}

#[tokio::test]
async fn own_paths_are_never_forwarded() {
    let (gate, emr, ehr) = gate().await;
    let client = gate.client();
    for (host, path) in [
        (EMR, "/.ehrgate/anything"),
        (EHR, "/.ehrgate/"),
        (EHR, "/%2eehrgate/status"),
        (EMR, "/oscar/../.ehrgate/x"),
        (EHR, "/.well-known/ehrgate/unknown"),
    ] {
        let r = client.get(host, path).await;
        assert_eq!(r.status, 404, "{host}{path}: {}", r.text());
        assert!(r.text().contains("not an ehrgate endpoint"));
    }
    assert_eq!((emr.hits(), ehr.hits()), (0, 0));
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let (gate, _emr, _ehr) = gate().await;
    let tls = gate.client().tls(EMR, &[b"http/1.1"]).await;
    let url = format!("wss://{EMR}:{}/ws", gate.addr.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake through ehrgate");
    assert_eq!(resp.status(), 101);
    for text in ["first", "second"] {
        ws.send(Message::text(text)).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[1, 2, 3]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_counts_in_metrics() {
    let (gate, _emr, _ehr) = gate().await;
    let client = gate.client();
    let a = client.get(EMR, "/a").await;
    let b = client.get(EMR, "/b").await;
    let (ra, rb) = (
        a.header("x-request-id").unwrap(),
        b.header("x-request-id").unwrap(),
    );
    assert_ne!(ra, rb);
    let (status, metrics) = gate.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ehrgate_requests_total{origin=\"emr\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("ehrgate_upstream_response_seconds_count{origin=\"emr\"} 2"));
    assert!(metrics.contains("ehrgate_open_connections"));
    assert_eq!(gate.admin_get("/healthz").await.0, 200);
    assert_eq!(gate.admin_get("/readyz").await.0, 200);
    assert_eq!(gate.admin_get("/nope").await.0, 404);
}
