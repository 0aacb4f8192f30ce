//! Cloud Foundry's error responses: `{"errors": [{"detail", "title": "CF-<Name>", "code"}]}` with the HTTP status
//! Cloud Controller uses for each.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error as the CF v3 API reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CfError {
    /// No credentials at all.
    #[error("Authentication error")]
    NotAuthenticated,
    /// A token Kubernetes does not accept.
    #[error("Invalid Auth Token")]
    InvalidAuthToken,
    #[error("You are not authorized to perform the requested action")]
    NotAuthorized,
    /// `what` is "Package", "Droplet" or "Job".
    #[error("{what} not found")]
    ResourceNotFound { what: &'static str },
    /// A route the API does not have.
    #[error("Unknown request")]
    UnknownRequest,
    #[error("{0}")]
    UnprocessableEntity(String),
    #[error("Bits may be uploaded only once. Create a new package to upload different bits.")]
    PackageBitsAlreadyUploaded,
    #[error("The app package is invalid: {0}")]
    AppPackageInvalid(String),
    #[error("The app upload is invalid: {0}")]
    AppBitsUploadInvalid(String),
    #[error("The resource file checksum is mismatched: {0}")]
    ResourceChecksumMismatch(String),
    #[error("Failed to perform operation due to blobstore unavailability.")]
    BlobstoreUnavailable,
    /// The API is at capacity (`--max-concurrent-uploads`); answered with `Retry-After`.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// Anything unexpected. The detail never carries internals; they go to the log.
    #[error("An unknown error occurred.")]
    Unknown,
}

impl CfError {
    /// `(HTTP status, code, title)`.
    pub fn parts(&self) -> (StatusCode, u32, &'static str) {
        match self {
            CfError::NotAuthenticated => (StatusCode::UNAUTHORIZED, 10002, "CF-NotAuthenticated"),
            CfError::InvalidAuthToken => (StatusCode::UNAUTHORIZED, 1000, "CF-InvalidAuthToken"),
            CfError::NotAuthorized => (StatusCode::FORBIDDEN, 10003, "CF-NotAuthorized"),
            CfError::ResourceNotFound { .. } => (StatusCode::NOT_FOUND, 10010, "CF-ResourceNotFound"),
            CfError::UnknownRequest => (StatusCode::NOT_FOUND, 10000, "CF-NotFound"),
            CfError::UnprocessableEntity(_) => (StatusCode::UNPROCESSABLE_ENTITY, 10008, "CF-UnprocessableEntity"),
            CfError::PackageBitsAlreadyUploaded => (StatusCode::BAD_REQUEST, 150004, "CF-PackageBitsAlreadyUploaded"),
            CfError::AppPackageInvalid(_) => (StatusCode::BAD_REQUEST, 150001, "CF-AppPackageInvalid"),
            CfError::AppBitsUploadInvalid(_) => (StatusCode::BAD_REQUEST, 160001, "CF-AppBitsUploadInvalid"),
            CfError::ResourceChecksumMismatch(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, 150010, "CF-ResourceChecksumMismatch")
            }
            CfError::BlobstoreUnavailable => (StatusCode::BAD_GATEWAY, 150006, "CF-BlobstoreUnavailable"),
            CfError::ServiceUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, 10015, "CF-ServiceUnavailable"),
            CfError::Unknown => (StatusCode::INTERNAL_SERVER_ERROR, 10001, "CF-UnknownError"),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let (_, code, title) = self.parts();
        json!({"errors": [{"detail": self.to_string(), "title": title, "code": code}]})
    }

    /// Log an internal failure and answer with the opaque [`CfError::Unknown`].
    pub fn internal(context: &str, error: &dyn std::error::Error) -> CfError {
        tracing::error!(%error, "{context}");
        CfError::Unknown
    }
}

impl IntoResponse for CfError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        (status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_match_cloud_controller() {
        let body = CfError::ResourceNotFound { what: "Package" }.body();
        assert_eq!(
            body,
            json!({"errors": [{"detail": "Package not found", "title": "CF-ResourceNotFound", "code": 10010}]})
        );
        assert_eq!(
            CfError::PackageBitsAlreadyUploaded.parts(),
            (StatusCode::BAD_REQUEST, 150004, "CF-PackageBitsAlreadyUploaded")
        );
        assert_eq!(CfError::InvalidAuthToken.parts().1, 1000);
        assert_eq!(
            CfError::ServiceUnavailable("busy".into()).parts(),
            (StatusCode::SERVICE_UNAVAILABLE, 10015, "CF-ServiceUnavailable")
        );
        assert_eq!(CfError::Unknown.body()["errors"][0]["detail"], "An unknown error occurred.");
    }
}
