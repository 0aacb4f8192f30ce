//! Lingering request bodies. A request answered before its body was read to the end (an upload refused for want
//! of a slot, or for its caller, or for bad bits) would otherwise close a connection the client is still
//! writing to: the client's next write is reset, and most clients then report a broken pipe instead of the
//! answer. Like nginx's lingering close, the rest of such a body is read and thrown away in the background for a
//! short while, so that the client gets to read the answer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use futures::{Stream, StreamExt};

/// How long the rest of an unread body is read and thrown away. Bounded in time, not bytes: reading costs no
/// memory, and a client that has seen the answer stops sending.
const LINGER: Duration = Duration::from_secs(5);

/// `body`, read on in the background for [`LINGER`] when it is dropped before its end.
pub(super) fn lingering(body: Body) -> Body {
    Body::from_stream(Lingering { inner: Some(body.into_data_stream()), ended: false })
}

struct Lingering {
    inner: Option<BodyDataStream>,
    ended: bool,
}

impl Stream for Lingering {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let next = inner.poll_next_unpin(cx);
        if matches!(next, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        next
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let (Some(mut rest), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(LINGER, async { while let Some(Ok(_)) = rest.next().await {} }).await;
            });
        }
    }
}
