//! Downloads of stored blobs: a redirect to a presigned URL when the store can sign one (the caller's
//! `Authorization` is not part of it, and clients must not forward it), the bytes themselves otherwise — streamed,
//! with `Content-Length` and single-range `Range` support.

use std::ops::Range;

use axum::body::Body;
use axum::http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;

use super::{AppState, CfError};
use crate::resources::BlobRef;
use crate::store::StoreError;

/// How a download answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A redirect when the store can presign, the bytes otherwise (the CF API).
    RedirectWhenSigned,
    /// Always the bytes (through the aggregated API, whose clients go through the Kubernetes API server).
    Bytes,
}

pub async fn download(
    state: &AppState,
    blob: &BlobRef,
    headers: &HeaderMap,
    delivery: Delivery,
) -> Result<Response, CfError> {
    let store = &state.store;
    if !store.holds(blob) {
        tracing::error!(blob.store, blob.key, store = store.url(), "the blob lives in another store");
        return Err(CfError::BlobstoreUnavailable);
    }
    let unavailable = |error: StoreError| {
        tracing::error!(%error, "download");
        CfError::BlobstoreUnavailable
    };
    if delivery == Delivery::RedirectWhenSigned
        && let Some(url) = store.presigned_get(&blob.key, state.config.download_url_ttl).await.map_err(unavailable)?
    {
        let location = HeaderValue::from_str(url.as_str()).map_err(|e| CfError::internal("presigned URL", &e))?;
        return Ok((StatusCode::FOUND, [(LOCATION, location)], "You are being redirected.").into_response());
    }
    let size = store.size(&blob.key).await.map_err(unavailable)?;
    let (status, range) = match headers.get(RANGE).and_then(|v| v.to_str().ok()).map(|r| byte_range(r, size)) {
        None | Some(RangeRequest::Ignored) => (StatusCode::OK, 0..size),
        Some(RangeRequest::Satisfiable(range)) => (StatusCode::PARTIAL_CONTENT, range),
        Some(RangeRequest::Unsatisfiable) => {
            let content_range = format!("bytes */{size}");
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, [(CONTENT_RANGE, content_range)]).into_response());
        }
    };
    let length = range.end - range.start;
    let content_range = format!("bytes {}-{}/{size}", range.start, range.end.saturating_sub(1));
    let stream = store.read_range(&blob.key, range).map_err(std::io::Error::other);
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(CONTENT_RANGE, HeaderValue::from_str(&content_range).expect("ASCII"));
    }
    Ok(response)
}

#[derive(Debug, PartialEq)]
enum RangeRequest {
    Satisfiable(Range<u64>),
    Unsatisfiable,
    /// Not one plain byte range (several, or malformed): answered with the whole body, as RFC 9110 allows.
    Ignored,
}

/// One `bytes=` range of a `size`-byte body.
fn byte_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return RangeRequest::Ignored };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Ignored };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => start..end.saturating_add(1).min(size),
        (Ok(start), Err(_)) if last.is_empty() => start..size,
        (Err(_), Ok(suffix)) if first.is_empty() => size.saturating_sub(suffix)..size,
        _ => return RangeRequest::Ignored,
    };
    if range.start >= size || range.is_empty() { RangeRequest::Unsatisfiable } else { RangeRequest::Satisfiable(range) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        use RangeRequest::*;
        assert_eq!(byte_range("bytes=0-9", 100), Satisfiable(0..10));
        assert_eq!(byte_range("bytes=90-", 100), Satisfiable(90..100));
        assert_eq!(byte_range("bytes=-10", 100), Satisfiable(90..100));
        assert_eq!(byte_range("bytes=95-200", 100), Satisfiable(95..100));
        assert_eq!(byte_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(byte_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(byte_range("bytes=0-1,5-6", 100), Ignored);
        assert_eq!(byte_range("bytes=9-1", 100), Ignored);
        assert_eq!(byte_range("items=0-1", 100), Ignored);
    }
}
