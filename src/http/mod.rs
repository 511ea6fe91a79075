//! What both listeners share: the `X-Request-Id` on every answer ([`request_id`]) and the one
//! way an error becomes an answer in the platform's own error shape ([`error`]). The public
//! listener ([`crate::ingress`]) and the admin listener ([`crate::admin`]) each define which
//! errors they can send; how those look on the wire is decided here, once.

pub mod error;
pub mod request_id;

pub use error::{error_body, respond, ApiError, Failure};
pub use request_id::{assign as assign_request_id, RequestId};
