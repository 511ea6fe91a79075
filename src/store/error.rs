//! Why the store could not take or give an event.

use std::path::PathBuf;

use super::record::RecordError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the outbox holds {capacity} events waiting for the broker, its configured capacity")]
    Full { capacity: u64 },
    #[error("the store cannot write to disk: {0}")]
    Unwritable(String),
    #[error(
        "data directory {0} is in use by another kallina-relay process \
         (only one process may open it; stop the other one or choose another directory)"
    )]
    Locked(PathBuf),
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the store is closed")]
    Closed,
}

/// The body log's own I/O errors: the disk refused a read or write the store needs.
impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Unwritable(format!("body log: {e}"))
    }
}
