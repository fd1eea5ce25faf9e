//! The bodies on their way through: the client's request body to a
//! release, and the response body to the client.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use super::upstream::GuardedBody;

/// The client's request body (none for a copy made to send again). A read
/// error here is the client's doing (a malformed chunk, a connection cut
/// mid-body), so it raises `failed`: the failed forward is answered 400
/// and not counted as the release's failure.
pub(super) struct ClientBody {
    inner: Option<Incoming>,
    /// The client connection's flag, lowered for each request it sends.
    failed: Arc<AtomicBool>,
}

impl ClientBody {
    pub(super) fn new(inner: Incoming, failed: Arc<AtomicBool>) -> Self {
        Self {
            inner: Some(inner),
            failed,
        }
    }

    /// No body: what a bodiless request sent again carries.
    pub(super) fn empty(failed: Arc<AtomicBool>) -> Self {
        Self {
            inner: None,
            failed,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

/// A response body to the client: a release's, or the proxy's own. A
/// type of its own, not a boxed body: no allocation per response.
pub struct ProxyBody(Kind);

enum Kind {
    /// Streamed from the release, its request counted in flight until
    /// the end.
    Release(GuardedBody),
    /// The proxy's own answer, whole.
    Own(Full<Bytes>),
}

impl ProxyBody {
    pub(super) fn release(body: GuardedBody) -> Self {
        Self(Kind::Release(body))
    }

    pub(crate) fn own(bytes: Bytes) -> Self {
        Self(Kind::Own(Full::new(bytes)))
    }

    pub(super) fn empty() -> Self {
        Self::own(Bytes::new())
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().0 {
            Kind::Release(body) => Pin::new(body).poll_frame(cx),
            Kind::Own(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Release(body) => body.is_end_stream(),
            Kind::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Release(body) => body.size_hint(),
            Kind::Own(body) => body.size_hint(),
        }
    }
}
