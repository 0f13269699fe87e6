//! The one body type ehrgate passes around: a streamed peer body, a small complete one it
//! made itself, or any other stream (events, rewritten pages). Streamed bodies are
//! passed frame by frame and never collected whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::BoxError;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A client's request body on its way upstream: its trailers are dropped (DESIGN
    /// §8), so no trailer field can carry a header ehrgate vouches for; a pause longer
    /// than `idle` between two reads, or malformed framing, ends it with a
    /// [`ClientBodyError`].
    Request(Box<IdleBody>),
    /// An upstream's response body: a pause longer than `idle` between two reads ends it
    /// with an [`UpstreamStalled`] error (a visible cut, never a clean end).
    Response(Box<IdleBody>),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
    /// A body that ends with an error (a visible cut: connection closed or stream reset,
    /// never a clean end) the moment `stop` resolves.
    Until {
        inner: Box<Body>,
        stop: Pin<Box<dyn Future<Output = ()> + Send>>,
        why: &'static str,
    },
}

/// A peer's body with its idle limit.
pub struct IdleBody {
    body: Incoming,
    idle: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A client's request body (else an upstream's response body).
    from_client: bool,
    /// The upstream connection the body comes from, when reading the body is what
    /// drives it; given back once the body has ended cleanly, closed if it is dropped
    /// before.
    lease: Option<Box<dyn Lease>>,
}

/// An upstream connection that a response body drives while it is read.
pub trait Lease: Send {
    /// Lets the connection read and write what it can (registering `cx` for more).
    fn poll_drive(&mut self, cx: &mut Context<'_>);
    /// The body has ended cleanly: the connection may serve another request.
    fn release(self: Box<Self>);
}

/// An upstream paused its response body longer than `server.upstream_body_timeout`.
#[derive(Debug)]
pub struct UpstreamStalled;

impl std::fmt::Display for UpstreamStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream paused its response body too long")
    }
}

impl std::error::Error for UpstreamStalled {}

/// Why a client's request body could not be read to its end: a 408 or a 400 for the
/// client, never a 502, even when it surfaces as an upstream failure.
#[derive(Debug)]
pub enum ClientBodyError {
    /// No data for `server.client_body_timeout`.
    Timeout,
    /// Malformed framing (a bad chunk size, a missing CRLF, ...) or a broken connection.
    Malformed(hyper::Error),
}

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientBodyError::Timeout => f.write_str("the client paused its request body too long"),
            ClientBodyError::Malformed(e) => {
                write!(f, "the client's request body is malformed: {e}")
            }
        }
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientBodyError::Timeout => None,
            ClientBodyError::Malformed(e) => Some(e),
        }
    }
}

impl ClientBodyError {
    /// The client-body error somewhere in `e`'s chain, if that is what failed.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(found) = err.downcast_ref::<ClientBodyError>() {
                return Some(found);
            }
            next = err.source();
        }
        None
    }
}

impl IdleBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let mut polled = Pin::new(&mut self.body).poll_frame(cx);
            if polled.is_pending() {
                if let Some(lease) = &mut self.lease {
                    // The connection may have what the body waits for.
                    lease.poll_drive(cx);
                    polled = Pin::new(&mut self.body).poll_frame(cx);
                }
            }
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.timer = None;
                    if self.body.is_end_stream() {
                        // The last frame: whoever reads this body may not ask again.
                        self.release();
                    }
                    if frame.is_trailers() && self.from_client {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) if self.from_client => {
                    return Poll::Ready(Some(Err(Box::new(ClientBodyError::Malformed(e)))))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => {
                    self.release();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let idle = self.idle;
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(if self.from_client {
                            Box::new(ClientBodyError::Timeout)
                        } else {
                            Box::new(UpstreamStalled)
                        })));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl IdleBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

/// Most request-body bytes ehrgate reads and discards before a refusal, so that the
/// client, still sending, reads the answer instead of a reset.
pub const MAX_DRAIN_BYTES: u64 = 64 * 1024 * 1024;

/// Reads and discards a request body that will not be forwarded: at most
/// [`MAX_DRAIN_BYTES`], with at most `idle` between two reads. Returns whether it was
/// read to its end (if not, the connection should close after the answer).
pub async fn drain(body: Incoming, idle: std::time::Duration) -> bool {
    drain_any(body, idle).await
}

/// [`drain`] for any body.
pub async fn drain_any<B>(mut body: B, idle: std::time::Duration) -> bool
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut read = 0u64;
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > MAX_DRAIN_BYTES {
                    return false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// The error a body cut by [`Body::until`] ends with.
#[derive(Debug)]
pub struct Cut(pub &'static str);

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Cut {}

impl Body {
    pub fn empty() -> Self {
        Body::Empty
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }

    pub fn stream<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body::Stream(body.map_err(Into::into).boxed_unsync())
    }
}

impl Body {
    /// `self`, cut with `why` as soon as `stop` resolves.
    pub fn until(self, stop: Pin<Box<dyn Future<Output = ()> + Send>>, why: &'static str) -> Self {
        Body::Until {
            inner: Box::new(self),
            stop,
            why,
        }
    }

    /// A client's request body, read with `idle` as the longest pause between two reads
    /// and forwarded without its trailers.
    pub fn from_client(body: Incoming, idle: std::time::Duration) -> Self {
        if body.is_end_stream() {
            return Body::Empty;
        }
        Body::Request(Box::new(IdleBody {
            body,
            idle,
            timer: None,
            from_client: true,
            lease: None,
        }))
    }

    /// An upstream's response body, with `idle` as the longest pause between two reads;
    /// `lease` is the connection it comes from when reading the body drives it.
    pub fn from_upstream(
        body: Incoming,
        idle: std::time::Duration,
        lease: Option<Box<dyn Lease>>,
    ) -> Self {
        if body.is_end_stream() {
            if let Some(lease) = lease {
                lease.release();
            }
            return Body::Empty;
        }
        Body::Response(Box::new(IdleBody {
            body,
            idle,
            timer: None,
            from_client: false,
            lease,
        }))
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::full(b)
    }
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Self {
        Body::Incoming(b)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Request(b) | Body::Response(b) => b.poll_frame(cx),
            Body::Stream(b) => Pin::new(b).poll_frame(cx),
            Body::Until { inner, stop, why } => {
                if stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(Cut(why)))));
                }
                Pin::new(&mut **inner).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::Incoming(b) => b.is_end_stream(),
            Body::Request(b) | Body::Response(b) => b.body.is_end_stream(),
            Body::Stream(b) => b.is_end_stream(),
            Body::Until { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Incoming(b) => b.size_hint(),
            Body::Request(b) | Body::Response(b) => b.body.size_hint(),
            Body::Stream(b) => b.size_hint(),
            Body::Until { inner, .. } => inner.size_hint(),
        }
    }
}
