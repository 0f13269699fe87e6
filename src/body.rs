//! The one body type ehrgate passes around: a streamed peer body, a small complete one it
//! made itself, or any other stream (events, rewritten pages). Streamed bodies are
//! passed frame by frame and never collected whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::problem::BoxError;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A client's request body on its way upstream: its trailers are dropped (DESIGN
    /// §8), so no trailer field can carry a header ehrgate vouches for.
    Request(Incoming),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
    /// A body that ends with an error (a visible cut: connection closed or stream reset,
    /// never a clean end) the moment `stop` resolves.
    Until {
        inner: Box<Body>,
        stop: Pin<Box<dyn Future<Output = ()> + Send>>,
        why: &'static str,
    },
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

    /// A client's request body, forwarded without its trailers.
    pub fn from_client(b: Incoming) -> Self {
        Body::Request(b)
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
            Body::Request(b) => loop {
                match Pin::new(&mut *b).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => continue,
                    other => return other.map_err(Into::into),
                }
            },
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
            Body::Incoming(b) | Body::Request(b) => b.is_end_stream(),
            Body::Stream(b) => b.is_end_stream(),
            Body::Until { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Incoming(b) | Body::Request(b) => b.size_hint(),
            Body::Stream(b) => b.size_hint(),
            Body::Until { inner, .. } => inner.size_hint(),
        }
    }
}
