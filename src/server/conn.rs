//! One client connection: TLS handshake within its time limit, then HTTP/1.1 or HTTP/2 as
//! ALPN chose, with the idle keep-alive limit and graceful shutdown applied.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{ConnInfo, Handler};
use crate::body::Body;
use crate::config::ServerConfig;
use crate::error::BoxError;
use crate::metrics::Metrics;
use crate::tls::ALPN_H2;

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub tls_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// A response waiting on a client that reads nothing for this long ends the
    /// connection.
    pub send_timeout: Duration,
    pub max_header_bytes: usize,
    /// HTTP/1.1 read and write buffer limit.
    pub h1_buffer_bytes: usize,
    /// HTTP/2 send buffer and receive window per stream.
    pub stream_buffer_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
}

impl From<&ServerConfig> for ConnLimits {
    fn from(s: &ServerConfig) -> Self {
        Self {
            tls_handshake_timeout: s.tls_handshake_timeout.get(),
            header_read_timeout: s.header_read_timeout.get(),
            idle_timeout: s.idle_timeout.get(),
            send_timeout: s.send_timeout.get(),
            max_header_bytes: s.max_header_bytes,
            h1_buffer_bytes: s.h1_buffer_bytes(),
            stream_buffer_bytes: s.stream_buffer_bytes,
            max_streams: s.max_streams_per_connection,
        }
    }
}

/// Things a connection task holds until it ends.
pub struct ConnGuards {
    pub _permit: OwnedSemaphorePermit,
    /// Dropped when the connection ends; the server waits for all of them on shutdown.
    pub _drain: mpsc::Sender<()>,
}

/// Requests in flight and the time of the last activity, for the idle limit; response
/// bodies waiting on the client and the time of the last progress, for the send limit.
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    /// Response bodies that handed data to the connection and were not asked for more
    /// since: the client has not taken what they gave.
    waiting_on_client: AtomicUsize,
    /// When any response body last made progress (was asked for more).
    progress_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            waiting_on_client: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// When the send limit runs out, if a response is waiting on the client now; else a
    /// time to look again.
    fn send_deadline(&self, send: Duration) -> (Instant, bool) {
        if self.waiting_on_client.load(Ordering::Relaxed) == 0 {
            return (Instant::now() + send, false);
        }
        let last = self.born + Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        (last + send, true)
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// When the connection may next be idle long enough, or `None` if it is now.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        let last = self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        let deadline = last + idle;
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            Some(Instant::now() + idle)
        } else if deadline <= Instant::now() {
            None
        } else {
            Some(deadline)
        }
    }
}

/// Held from a request's arrival until its response body is finished or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The response body, carrying the in-flight mark until it is done, and telling the
/// connection when it waits on the client (DESIGN §4 `send_timeout`).
struct Tracked {
    inner: Body,
    in_flight: InFlight,
    waiting: bool,
}

impl Tracked {
    fn set_waiting(&mut self, waiting: bool) {
        if self.waiting != waiting {
            self.waiting = waiting;
            let a = &self.in_flight.0;
            if waiting {
                a.waiting_on_client.fetch_add(1, Ordering::Relaxed);
            } else {
                a.waiting_on_client.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // Asked for more: whatever was handed over before has been taken.
        this.set_waiting(false);
        let a = &this.in_flight.0;
        a.progress_ms.store(a.now_ms(), Ordering::Relaxed);
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data()) {
            this.set_waiting(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A served connection that can be asked to finish gracefully.
trait GracefulConn: Future<Output = Result<(), hyper::Error>> {
    fn begin_shutdown(self: Pin<&mut Self>);
}

impl<I, S> GracefulConn for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Tracked>,
    S::Error: Into<BoxError>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> GracefulConn for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Tracked>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one accepted TCP connection to its end.
#[allow(clippy::too_many_arguments)]
pub async fn serve<H: Handler>(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
    guards: ConnGuards,
) {
    let _guards = guards;
    metrics.connection_opened();
    let _open = scopeguard(|| metrics.connection_closed());
    let _ = tcp.set_nodelay(true);

    let tls = tokio::select! {
        r = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)) => r,
        _ = crate::shutdown::signalled(&mut shutdown) => return,
    };
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.tls_handshake_failed();
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_failed();
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let info = Arc::new(ConnInfo::new(
        peer,
        session
            .server_name()
            .map(|s| s.to_ascii_lowercase().into_boxed_str()),
    ));

    let activity = Arc::new(Activity::new());
    let svc = {
        let activity = activity.clone();
        service_fn(move |req| {
            let in_flight = activity.begin();
            let handler = handler.clone();
            let info = info.clone();
            async move {
                let resp = handler.handle(info, req).await;
                Ok::<_, Infallible>(resp.map(|inner| Tracked {
                    inner,
                    in_flight,
                    waiting: false,
                }))
            }
        })
    };
    let io = TokioIo::new(tls);
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // Flow control sized by configuration, never grown by measured bandwidth: what a
        // stream may make ehrgate hold is the same on a fast network as on a slow one.
        let window = limits.stream_buffer_bytes as u32;
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(limits.max_streams)
            .adaptive_window(false)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window.saturating_mul(16))
            .max_send_buf_size(limits.stream_buffer_bytes);
        drive(
            builder.serve_connection(io, svc),
            &activity,
            &limits,
            shutdown,
        )
        .await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes)
            .max_buf_size(limits.h1_buffer_bytes)
            .keep_alive(true);
        drive(
            builder.serve_connection(io, svc).with_upgrades(),
            &activity,
            &limits,
            shutdown,
        )
        .await;
    }
}

/// Polls a connection to its end, starting a graceful close on shutdown or when it has
/// been idle (no request in flight) for `idle_timeout`.
async fn drive<C: GracefulConn>(
    conn: C,
    activity: &Activity,
    limits: &ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = activity.idle_deadline(limits.idle_timeout);
        let (send_at, waiting) = activity.send_deadline(limits.send_timeout);
        let event = {
            // Shutdown and the two deadlines are rarely ready, while the connection's
            // task wakes several times a request: they are polled only when one of them
            // woke it (see `WokenOnly`). They go first, while the task still has its
            // cooperative budget: a connection whose socket is always ready (a client
            // streaming frames while it reads nothing) uses all of it on every poll,
            // and would otherwise leave them never polled, never cut at `send_timeout`
            // and deaf to shutdown.
            let rare = std::pin::pin!(async {
                tokio::select! {
                    _ = crate::shutdown::signalled(&mut shutdown), if !closing => Event::Shutdown,
                    _ = tokio::time::sleep_until(send_at.into()) => Event::SendDeadline,
                    _ = sleep_until(idle_at), if !closing => Event::IdleDeadline,
                }
            });
            tokio::select! {
                biased;
                event = WokenOnly::new(rare) => event,
                res = conn.as_mut() => Event::Ended(res),
            }
        };
        match event {
            Event::Ended(res) => {
                if let Err(e) = res {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            Event::Shutdown => {
                conn.as_mut().begin_shutdown();
                closing = true;
            }
            Event::SendDeadline => {
                if waiting && activity.send_deadline(limits.send_timeout) == (send_at, true) {
                    // A client that takes nothing of a response holds an upstream
                    // connection and buffers: the exchange ends (RST / close).
                    debug!("client read nothing for send_timeout; closing the connection");
                    return;
                }
            }
            Event::IdleDeadline => {
                if activity.idle_deadline(limits.idle_timeout).is_none() {
                    debug!("closing idle connection");
                    conn.as_mut().begin_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// What ended one wait of [`drive`].
enum Event<E> {
    Ended(Result<(), E>),
    Shutdown,
    SendDeadline,
    IdleDeadline,
}

/// A future polled only when its own waker has fired (and on its first poll), though the
/// task it belongs to wakes for other reasons too. `select!` polls every branch at each
/// wake of its task; for futures that are almost never ready (a shutdown signal, a
/// timer), that is a lock or timer-wheel visit per wake for nothing.
struct WokenOnly<F> {
    inner: F,
    gate: Arc<Gate>,
    waker: std::task::Waker,
}

/// Whether the inner future was woken since it was last polled, and the task to wake.
struct Gate {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> WokenOnly<F> {
    fn new(inner: F) -> Self {
        let gate = Arc::new(Gate {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        Self {
            inner,
            waker: std::task::Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<F: Future + Unpin> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // The task's waker first, so a wake after the check below is not lost.
        self.gate.task.register(cx.waker());
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner.poll_unpin(&mut Context::from_waker(&this.waker))
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

struct ScopeGuard<F: FnMut()>(F);

impl<F: FnMut()> Drop for ScopeGuard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn scopeguard<F: FnMut()>(f: F) -> ScopeGuard<F> {
    ScopeGuard(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    /// Counts its polls; ready once `ready` is set, waking whoever polled it last when
    /// `wake` is called.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<std::task::Waker>>,
    }

    impl Probe {
        fn wake(&self) {
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    struct ProbeFuture(Arc<Probe>);

    impl Future for ProbeFuture {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct TaskWakes(AtomicUsize);

    impl Wake for TaskWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polled_first_and_then_only_when_its_own_waker_fires() {
        let probe = Arc::new(Probe::default());
        let task = Arc::new(TaskWakes::default());
        let waker = std::task::Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut gated = WokenOnly::new(ProbeFuture(probe.clone()));

        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(
            probe.polls.load(Ordering::SeqCst),
            1,
            "polled on its first poll"
        );
        // The task woke for something else (the connection): the inner is left alone.
        for _ in 0..5 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::SeqCst), 1);

        // The inner's own wake-up reaches the task and gets the inner polled.
        probe.ready.store(true, Ordering::SeqCst);
        probe.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(probe.polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn after_the_task_waker_changes_a_wake_reaches_the_newest() {
        let probe = Arc::new(Probe::default());
        let first = Arc::new(TaskWakes::default());
        let second = Arc::new(TaskWakes::default());
        let mut gated = WokenOnly::new(ProbeFuture(probe.clone()));
        let w1 = std::task::Waker::from(first.clone());
        assert!(Pin::new(&mut gated)
            .poll(&mut Context::from_waker(&w1))
            .is_pending());
        // Polled later with another waker (the future moved to another task's select).
        let w2 = std::task::Waker::from(second.clone());
        assert!(Pin::new(&mut gated)
            .poll(&mut Context::from_waker(&w2))
            .is_pending());
        probe.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the latest waker is woken"
        );
    }

    /// A connection whose socket is always ready: each poll spends the task's whole
    /// cooperative budget (as reading an endless stream of frames does), then yields.
    struct AlwaysReady(Arc<tokio::sync::Notify>);

    impl Future for AlwaysReady {
        type Output = Result<(), hyper::Error>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            loop {
                match tokio::task::coop::poll_proceed(cx) {
                    Poll::Ready(progress) => progress.made_progress(),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
    }

    impl GracefulConn for AlwaysReady {
        fn begin_shutdown(self: Pin<&mut Self>) {
            self.0.notify_one();
        }
    }

    fn short_limits() -> ConnLimits {
        ConnLimits {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_millis(50),
            send_timeout: Duration::from_millis(50),
            max_header_bytes: 1024,
            h1_buffer_bytes: 1024,
            stream_buffer_bytes: 1024,
            max_streams: 1,
        }
    }

    #[tokio::test]
    async fn a_connection_always_ready_is_still_cut_at_send_timeout() {
        let activity = Activity::new();
        // A response is waiting on a client that takes none of it.
        activity.in_flight.store(1, Ordering::Relaxed);
        activity.waiting_on_client.store(1, Ordering::Relaxed);
        let (_tx, rx) = watch::channel(false);
        let conn = AlwaysReady(Arc::default());
        tokio::time::timeout(
            Duration::from_secs(20),
            drive(conn, &activity, &short_limits(), rx),
        )
        .await
        .expect("the connection ended at send_timeout");
    }

    #[tokio::test]
    async fn a_connection_always_ready_still_hears_shutdown() {
        let shutdown_begun = Arc::new(tokio::sync::Notify::new());
        let conn = AlwaysReady(shutdown_begun.clone());
        let (tx, rx) = watch::channel(false);
        let driving = tokio::spawn(async move {
            let activity = Activity::new();
            activity.in_flight.store(1, Ordering::Relaxed);
            let limits = ConnLimits {
                send_timeout: Duration::from_secs(3600),
                ..short_limits()
            };
            drive(conn, &activity, &limits, rx).await;
        });
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), shutdown_begun.notified())
            .await
            .expect("the connection was told to close gracefully");
        driving.abort();
    }

    #[tokio::test]
    async fn a_timer_behind_the_gate_still_fires() {
        let sleep = std::pin::pin!(tokio::time::sleep(Duration::from_millis(20)));
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(20), WokenOnly::new(sleep))
            .await
            .expect("the timer's wake-up got through the gate");
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
