//! The floor of ehrgate's own stack, for `benches/profile.sh TARGET=floor` (issue 13): the
//! least a TLS reverse proxy built on the same packages (tokio on one thread, rustls with
//! aws-lc through tokio-rustls, hyper's HTTP/1.1 server and client, mimalloc) does per
//! request, with none of ehrgate's work: no routing, no header rules, no session, no
//! vault, no audit, no timeouts, no limits. It is a measuring stick, not a product.
//!
//! Each client connection gets one upstream connection of its own, opened before its
//! first request (the cheapest pairing there is: no pool look-up), driven by a task of
//! its own as hyper's examples do. (One task polling both connections measured slower:
//! user 5.7 against 5.1 µs/request, system time higher too, since each request is then
//! written upstream the moment it is read, one wake-up of the upstream per request.)
//! Requests go upstream with `X-Forwarded-For` and `X-Forwarded-Proto` added, as the
//! reference nginx does; answers come back unchanged.
//!
//! ```text
//! stack_floor LISTEN UPSTREAM CERT KEY   # e.g. 127.0.0.1:19453 127.0.0.1:18084 server.crt server.key
//! ```
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;

use http::header::{HeaderName, HeaderValue};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, cert, key] = args.as_slice() else {
        return Err("usage: stack_floor LISTEN UPSTREAM CERT KEY".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    let tls =
        ehrgate::tls::server_config(Path::new(cert), Path::new(key)).map_err(|e| e.to_string())?;
    let acceptor = TlsAcceptor::from(tls.config);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(listen).await?;
        println!("serving on {listen}");
        loop {
            let (tcp, peer) = listener.accept().await?;
            let acceptor = acceptor.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(tcp, peer, acceptor, upstream).await {
                    eprintln!("connection from {peer}: {e}");
                }
            });
        }
    })
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
) -> Result<(), Box<dyn std::error::Error>> {
    tcp.set_nodelay(true)?;
    let tls = acceptor.accept(tcp).await?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::task::spawn_local(conn);
    let sender: Rc<RefCell<SendRequest<Incoming>>> = Rc::new(RefCell::new(sender));
    let forwarded_for = HeaderValue::from_str(&peer.ip().to_string())?;
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let headers = req.headers_mut();
        headers.insert(X_FORWARDED_FOR.clone(), forwarded_for.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        sender.borrow_mut().send_request(req)
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .await?;
    Ok(())
}
