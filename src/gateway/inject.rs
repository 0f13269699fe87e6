//! Adds `<script src="/.ehrgate/session.js">` to a viewer page as it streams: right after
//! the `<head>` tag (else after `<body>`). Only the start of the page is held, and at most
//! [`SCAN_LIMIT`] bytes of it; a page without either tag there passes unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};

use crate::body::Body;
use crate::problem::BoxError;

pub const SCRIPT_TAG: &[u8] = b"<script src=\"/.ehrgate/session.js\"></script>";

/// How much of a page is searched for its `<head>` or `<body>` tag.
const SCAN_LIMIT: usize = 64 * 1024;

pub fn with_session_script(inner: Body) -> Body {
    Body::stream(Inject {
        inner,
        held: BytesMut::new(),
        trailers: None,
        done: false,
    })
}

struct Inject {
    inner: Body,
    held: BytesMut,
    /// Trailers that arrived while bytes were held: sent after them.
    trailers: Option<Frame<Bytes>>,
    /// Inserted, or given up: pass everything through.
    done: bool,
}

/// Where the script goes: after the first `<head …>`, else after the first `<body …>`.
pub fn insertion_point(page: &[u8]) -> Option<usize> {
    tag_end(page, b"<head").or_else(|| tag_end(page, b"<body"))
}

fn tag_end(page: &[u8], open: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = find_ci(&page[from..], open) {
        let start = from + i;
        let after = start + open.len();
        match page.get(after) {
            // `<header>` is not `<head>`.
            Some(b'>') | Some(b' ') | Some(b'\t') | Some(b'\n') | Some(b'\r') | Some(b'/') => {
                return page[after..]
                    .iter()
                    .position(|&b| b == b'>')
                    .map(|p| after + p + 1);
            }
            Some(_) => from = after,
            None => return None,
        }
    }
    None
}

fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

impl Inject {
    /// Inserts if the held bytes allow it; returns the bytes to send, if any.
    fn try_insert(&mut self, end_of_stream: bool) -> Option<Bytes> {
        if let Some(at) = insertion_point(&self.held) {
            let mut out = BytesMut::with_capacity(self.held.len() + SCRIPT_TAG.len());
            out.extend_from_slice(&self.held[..at]);
            out.extend_from_slice(SCRIPT_TAG);
            out.extend_from_slice(&self.held[at..]);
            self.held.clear();
            self.done = true;
            return Some(out.freeze());
        }
        if end_of_stream || self.held.len() >= SCAN_LIMIT {
            self.done = true;
            return (!self.held.is_empty()).then(|| self.held.split().freeze());
        }
        None
    }
}

impl http_body::Body for Inject {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                if !this.held.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(this.held.split().freeze()))));
                }
                if let Some(trailers) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(trailers)));
                }
                return Pin::new(&mut this.inner).poll_frame(cx);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(this.try_insert(true).map(|b| Ok(Frame::data(b))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.held.extend_from_slice(&data);
                        if let Some(out) = this.try_insert(false) {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => {
                        // Trailers end the data: what is held goes first, then them.
                        this.done = true;
                        this.trailers = Some(trailers);
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.held.is_empty() && self.trailers.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    async fn run(chunks: Vec<&'static str>) -> String {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(c.as_bytes())))),
        );
        let body = with_session_script(Body::stream(StreamBody::new(stream)));
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn inserts_after_head_even_split_across_chunks() {
        let out = run(vec![
            "<!doctype html><html><he",
            "ad lang=x>",
            "<title>t</title></head><body>x</body>",
        ])
        .await;
        assert_eq!(
            out,
            "<!doctype html><html><head lang=x><script src=\"/.ehrgate/session.js\"></script><title>t</title></head><body>x</body>"
        );
    }

    #[tokio::test]
    async fn falls_back_to_body_and_ignores_header_tags() {
        let out = run(vec!["<header>h</header><BODY class=a>text</BODY>"]).await;
        assert_eq!(
            out,
            "<header>h</header><BODY class=a><script src=\"/.ehrgate/session.js\"></script>text</BODY>"
        );
    }

    #[tokio::test]
    async fn pages_without_tags_pass_unchanged() {
        assert_eq!(run(vec!["just ", "text"]).await, "just text");
        assert_eq!(run(vec![]).await, "");
    }

    #[test]
    fn insertion_points() {
        assert_eq!(insertion_point(b"<head>"), Some(6));
        assert_eq!(insertion_point(b"<HEAD\n>"), Some(7));
        assert_eq!(insertion_point(b"<headers>"), None);
        assert_eq!(insertion_point(b"<head"), None);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    fn page() -> impl Strategy<Value = String> {
        (
            "[ -~]{0,200}",
            prop_oneof![
                Just("<head>"),
                Just("<HEAD lang=en>"),
                Just("<header>"),
                Just("<body class=x>"),
                Just(""),
            ],
            "[ -~]{0,200}",
        )
            .prop_map(|(a, tag, b)| format!("{a}{tag}{b}"))
    }

    fn run(page: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut pieces = Vec::new();
        let mut at = 0;
        for &c in cuts {
            let c = c.min(page.len());
            if c > at {
                pieces.push(Bytes::copy_from_slice(&page[at..c]));
                at = c;
            }
        }
        pieces.push(Bytes::copy_from_slice(&page[at..]));
        let stream = futures_util::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Frame::data(p))),
        );
        let body = with_session_script(Body::stream(http_body_util::StreamBody::new(stream)));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(body.collect())
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    proptest! {
        #[test]
        fn the_script_goes_in_once_wherever_the_page_is_cut(
            page in page(),
            mut cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            cuts.sort_unstable();
            let whole = run(page.as_bytes(), &[]);
            let cut = run(page.as_bytes(), &cuts);
            prop_assert_eq!(&cut, &whole);
            let count = whole.windows(SCRIPT_TAG.len()).filter(|w| *w == SCRIPT_TAG).count();
            let expected = usize::from(insertion_point(page.as_bytes()).is_some());
            prop_assert_eq!(count, expected);
            // Nothing of the page is lost or reordered.
            let mut without = whole.clone();
            if let Some(i) = whole.windows(SCRIPT_TAG.len()).position(|w| w == SCRIPT_TAG) {
                without.drain(i..i + SCRIPT_TAG.len());
            }
            prop_assert_eq!(without, page.as_bytes().to_vec());
        }
    }
}
