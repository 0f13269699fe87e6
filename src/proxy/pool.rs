//! Keep-alive connections to one upstream, kept per worker thread.
//!
//! An HTTP/1.1 connection is not a task of its own: the request that uses it drives it
//! (while waiting for the response header, then while its response body is read), so a
//! request and its upstream connection run in the same task, with no channel hop and no
//! wake of another task or thread in between. When the response body has been read to
//! its end the connection goes back to the idle list of the thread that opened it (its
//! socket belongs to that thread's reactor), bounded in number and in idle time. A
//! response body dropped before its end closes the connection: it is never reused in an
//! unknown state.
//!
//! An HTTP/2 connection (only where the upstream chose `h2` in ALPN, and only when the
//! configuration offers it) is driven by a task of its own, as multiplexing needs, and
//! shared by the requests of its thread, at most [`H2_STREAMS`] at a time: more
//! requests open another connection, so a client holding many streams (or not reading
//! them) cannot take every stream the upstream allows, and its receive windows are
//! sized so that its streams cannot use up the connection's window either.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::{Body, Lease};

/// Idle lists per upstream; a thread uses the one its index falls on.
const SLOTS: usize = 32;

/// Streams one HTTP/2 upstream connection carries at once; the connection's receive
/// window is this many stream windows.
pub const H2_STREAMS: usize = 32;

/// HTTP/2 connections kept per upstream and thread.
pub const H2_KEPT: usize = 16;

/// The socket under an upstream connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The connection's state machine (hyper's upgradeable HTTP/1.1 connection).
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// An HTTP/1.1 upstream connection: the handle requests are sent on, and the connection
/// state machine, polled by whoever is using the connection.
pub struct H1 {
    sender: http1::SendRequest<Body>,
    /// `None` once the connection has ended (closed, failed, or handed to a tunnel).
    driver: Option<Driver>,
    /// The thread whose reactor the socket is registered with.
    home: usize,
}

impl H1 {
    pub async fn handshake(io: Stream, max_buf_size: usize) -> hyper::Result<Self> {
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(max_buf_size)
            .handshake(TokioIo::new(io))
            .await?;
        Ok(Self {
            sender,
            driver: Some(Box::pin(conn.with_upgrades())),
            home: thread_index(),
        })
    }

    /// Lets the connection read and write what it can.
    fn poll_drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver {
            if driver.as_mut().poll(cx).is_ready() {
                // Closed or failed: whatever was waiting on it has been told.
                self.driver = None;
            }
        }
    }

    fn is_usable(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Sends `req` and drives the connection until its response header arrives. A
    /// request the connection never took comes back in the error (the caller may send
    /// it on another connection).
    pub async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        let response = self.sender.try_send_request(req);
        let mut response = std::pin::pin!(response);
        // Let the other requests this event-loop turn has woken reach this point first,
        // so that their upstream writes go out together: measured on a loaded core,
        // writing each as it comes woke the upstream's process (and the kernel's
        // wake-up of another core) once per request, about 1.5 µs more system time
        // per request than the yield's own cost (BENCHMARKS.md, issue 13).
        tokio::task::yield_now().await;
        poll_fn(|cx| {
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            self.poll_drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }

    /// Hands the connection to a task of its own (a protocol switch: the connection
    /// must go on to give up its socket to the tunnel).
    pub fn detach(mut self) {
        if let Some(driver) = self.driver.take() {
            tokio::spawn(async move {
                let _ = driver.await;
            });
        }
    }
}

/// An HTTP/2 connection shared by the requests of one thread.
pub struct H2 {
    sender: http2::SendRequest<Body>,
    /// Streams open on it (held by [`H2Stream`]s).
    streams: Arc<AtomicUsize>,
    home: usize,
    /// When a stream last ended, in milliseconds since `born`.
    last_used: Arc<AtomicU64>,
    born: Instant,
}

impl H2 {
    pub fn new(sender: http2::SendRequest<Body>) -> Self {
        Self {
            sender,
            streams: Arc::default(),
            home: thread_index(),
            last_used: Arc::default(),
            born: Instant::now(),
        }
    }

    fn stream(&mut self) -> H2Stream {
        self.streams.fetch_add(1, Ordering::Relaxed);
        H2Stream {
            sender: self.sender.clone(),
            streams: self.streams.clone(),
            last_used: self.last_used.clone(),
            born: self.born,
        }
    }

    fn idle_since(&self, now: Instant) -> Option<Duration> {
        let last = self.born + Duration::from_millis(self.last_used.load(Ordering::Relaxed));
        (self.streams.load(Ordering::Relaxed) == 0).then(|| now.saturating_duration_since(last))
    }
}

/// One stream's hold on an HTTP/2 connection: taken before the request is sent, given
/// up when its response body ends or is dropped.
pub struct H2Stream {
    sender: http2::SendRequest<Body>,
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
    born: Instant,
}

impl H2Stream {
    pub fn sender(&mut self) -> &mut http2::SendRequest<Body> {
        &mut self.sender
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Idle from the end of its last stream, not the start.
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used.store(ms, Ordering::Relaxed);
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease for H2Stream {
    fn poll_drive(&mut self, _cx: &mut Context<'_>) {
        // The connection's own task drives it.
    }

    fn release(self: Box<Self>) {}
}

/// The idle connections of one upstream.
pub struct Pool {
    slots: Box<[Mutex<Slot>]>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct Slot {
    idle: VecDeque<Idle>,
    h2: Vec<H2>,
    /// A task is closing this slot's connections as they pass `idle_timeout`.
    reaping: bool,
}

struct Idle {
    conn: H1,
    since: Instant,
}

impl Pool {
    /// At most `max_idle` idle connections per thread, none kept longer than
    /// `idle_timeout`.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..SLOTS).map(|_| Mutex::default()).collect(),
            max_idle,
            idle_timeout,
        })
    }

    fn slot(&self, thread: usize) -> std::sync::MutexGuard<'_, Slot> {
        // A panic elsewhere while holding the lock leaves a list of connections that is
        // still consistent.
        self.slots[thread % SLOTS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection of this thread that is still open.
    pub fn checkout(&self) -> Option<H1> {
        let me = thread_index();
        let now = Instant::now();
        let mut slot = self.slot(me);
        slot.evict(now, self.idle_timeout);
        while let Some(at) = slot.idle.iter().rposition(|i| i.conn.home == me) {
            let idle = slot.idle.remove(at).expect("found");
            if idle.conn.is_usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Takes back a connection whose exchange has ended. One that is ready for the next
    /// request is kept; one still finishing (its request body still going out, say) is
    /// driven to the end by a small task first; a closed one is dropped.
    pub fn put(self: &Arc<Self>, mut conn: H1) {
        if !conn.is_usable() {
            return;
        }
        if conn.sender.is_ready() {
            return self.keep(conn);
        }
        let pool = self.clone();
        let limit = self.idle_timeout;
        tokio::spawn(async move {
            let ready = poll_fn(|cx| {
                conn.poll_drive(cx);
                if conn.driver.is_none() {
                    return Poll::Ready(false);
                }
                conn.sender.poll_ready(cx).map(|r| r.is_ok())
            });
            if let Ok(true) = tokio::time::timeout(limit, ready).await {
                pool.keep(conn);
            }
        });
    }

    fn keep(self: &Arc<Self>, conn: H1) {
        let now = Instant::now();
        let home = conn.home;
        let mut slot = self.slot(home);
        slot.evict(now, self.idle_timeout);
        slot.idle.push_back(Idle { conn, since: now });
        while slot.idle.len() > self.max_idle {
            slot.idle.pop_front();
        }
        self.watch(&mut slot, home);
    }

    /// Starts the task that closes `thread`'s idle connections, unless it runs.
    fn watch(self: &Arc<Self>, slot: &mut Slot, thread: usize) {
        if !slot.reaping {
            slot.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self), thread));
        }
    }

    /// A stream on one of this thread's live HTTP/2 connections that has room for it.
    pub fn h2(&self) -> Option<H2Stream> {
        let me = thread_index();
        let mut slot = self.slot(me);
        slot.h2.retain(|c| !c.sender.is_closed());
        slot.h2
            .iter_mut()
            .find(|c| c.home == me && c.streams.load(Ordering::Relaxed) < H2_STREAMS)
            .map(H2::stream)
    }

    /// Keeps a new HTTP/2 connection for this thread's requests (unless it has
    /// [`H2_KEPT`] already: then it serves this one request and closes), and returns a
    /// stream on it.
    pub fn add_h2(self: &Arc<Self>, mut conn: H2) -> H2Stream {
        let stream = conn.stream();
        let mut slot = self.slot(conn.home);
        slot.h2.retain(|c| !c.sender.is_closed());
        let home = conn.home;
        if slot.h2.iter().filter(|c| c.home == home).count() < H2_KEPT {
            slot.h2.push(conn);
            self.watch(&mut slot, home);
        }
        stream
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.lock().unwrap().idle.len())
            .sum()
    }
}

impl Slot {
    /// Drops connections idle for `limit` or longer (the oldest are at the front).
    fn evict(&mut self, now: Instant, limit: Duration) {
        while self
            .idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= limit)
        {
            self.idle.pop_front();
        }
        self.h2
            .retain(|c| !c.sender.is_closed() && c.idle_since(now).is_none_or(|idle| idle < limit));
    }

    /// When the next connection may pass the idle limit, if any is kept.
    fn next_expiry(&self, now: Instant, limit: Duration) -> Option<Instant> {
        let h1 = self.idle.front().map(|i| i.since + limit);
        let h2 = self.h2.iter().map(|c| match c.idle_since(now) {
            Some(idle) => now + limit.saturating_sub(idle),
            // Busy: look again one limit later.
            None => now + limit,
        });
        h1.into_iter().chain(h2).min()
    }
}

/// Closes the idle connections of `thread`'s slot as they pass the idle limit, even
/// when no request comes to notice; ends when the slot is empty or the pool is gone (a
/// reload replaced it).
async fn reap(pool: std::sync::Weak<Pool>, thread: usize) {
    // However the task ends (its runtime may stop first), the next kept connection
    // starts another.
    let mut guard = Reaping(Some(pool.clone()), thread);
    loop {
        let deadline = {
            let Some(pool) = pool.upgrade() else { return };
            let mut slot = pool.slot(thread);
            let now = Instant::now();
            slot.evict(now, pool.idle_timeout);
            match slot.next_expiry(now, pool.idle_timeout) {
                Some(at) => at,
                None => {
                    // Under the lock: a connection kept from now on starts a new task.
                    slot.reaping = false;
                    guard.0 = None;
                    return;
                }
            }
        };
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Marks a slot as having no reaper when its reaper is dropped before it finished.
struct Reaping(Option<std::sync::Weak<Pool>>, usize);

impl Drop for Reaping {
    fn drop(&mut self) {
        if let Some(pool) = self.0.as_ref().and_then(std::sync::Weak::upgrade) {
            pool.slot(self.1).reaping = false;
        }
    }
}

/// A response body's hold on its connection: it drives the connection while the body is
/// read, and returns it to the pool when the body has ended cleanly.
pub struct Held {
    conn: H1,
    pool: Arc<Pool>,
}

impl Held {
    pub fn new(conn: H1, pool: Arc<Pool>) -> Self {
        Self { conn, pool }
    }
}

impl Lease for Held {
    fn poll_drive(&mut self, cx: &mut Context<'_>) {
        self.conn.poll_drive(cx);
    }

    fn release(self: Box<Self>) {
        self.pool.put(self.conn);
    }
}

/// This thread's index: stable for its life, never reused by another thread.
pub fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A minimal keep-alive upstream: answers every request on a connection with a
    /// fixed body; counts the connections it accepted.
    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn connect(addr: std::net::SocketAddr) -> H1 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        H1::handshake(Stream::Plain(tcp), 64 * 1024).await.unwrap()
    }

    fn get() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header("host", "upstream")
            .body(Body::empty())
            .unwrap()
    }

    /// Sends one request through the pool the way `Upstream::send` does.
    async fn exchange(pool: &Arc<Pool>, addr: std::net::SocketAddr) -> Body {
        let mut conn = match pool.checkout() {
            Some(c) => c,
            None => connect(addr).await,
        };
        let resp = conn.send(get()).await.map_err(|e| e.into_error()).unwrap();
        let lease: Box<dyn Lease> = Box::new(Held::new(conn, pool.clone()));
        Body::from_upstream(resp.into_body(), Duration::from_secs(5), Some(lease))
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_is_read() {
        let (addr, accepted) = upstream().await;
        let pool = Pool::new(8, Duration::from_secs(60));
        for _ in 0..5 {
            let body = exchange(&pool, addr).await.collect().await.unwrap();
            assert_eq!(body.to_bytes(), "hello");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted) = upstream().await;
        let pool = Pool::new(8, Duration::from_secs(60));
        drop(exchange(&pool, addr).await);
        assert_eq!(pool.idle_count(), 0);
        let body = exchange(&pool, addr).await.collect().await.unwrap();
        assert_eq!(body.to_bytes(), "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_and_expire() {
        let (addr, _) = upstream().await;
        let pool = Pool::new(2, Duration::from_secs(60));
        let bodies = [
            exchange(&pool, addr).await,
            exchange(&pool, addr).await,
            exchange(&pool, addr).await,
        ];
        for b in bodies {
            b.collect().await.unwrap();
        }
        assert_eq!(
            pool.idle_count(),
            2,
            "the oldest idle connection was dropped"
        );

        let pool = Pool::new(8, Duration::from_millis(0));
        exchange(&pool, addr).await.collect().await.unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            pool.checkout().is_none(),
            "an expired connection is not used"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_without_a_request_to_notice() {
        let (addr, _) = upstream().await;
        let pool = Pool::new(8, Duration::from_millis(300));
        exchange(&pool, addr).await.collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        // No request comes: the reaper closes it once past the limit.
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.idle_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "still open long after its idle limit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pool.slot(thread_index()).reaping, "the reaper ended");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out_twice() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // Answers one request, then closes the idle connection when told to.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = close_rx.await;
            drop(s);
            let _ = closed_tx.send(());
        });
        let pool = Pool::new(8, Duration::from_secs(60));
        exchange(&pool, addr).await.collect().await.unwrap();
        close_tx.send(()).unwrap();
        closed_rx.await.unwrap();
        let mut conn = pool.checkout().expect("kept after a clean end");
        // The upstream has closed it: the request is not taken, and comes back.
        let mut err = conn.send(get()).await.expect_err("closed");
        assert!(err.take_message().is_some(), "the request can go elsewhere");
        assert!(!conn.is_usable());
    }
}
