//! Reading a request body: within `max_body`, within the [budget](super::budget), and into the
//! one buffer the outbox record keeps (it is moved there, not copied).

use actix_web::http::header::CONTENT_LENGTH;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;

use super::budget::{BodyBudget, Held};
use super::envelope::PayloadError;
use super::error::IngressError;

/// Size of the blocks a body is read into.
const BLOCK: usize = 64 * 1024;
/// How long a sender should wait when the budget is full: bodies in flight finish in seconds.
const RETRY_AFTER_BUSY: u32 = 2;

/// Reads the body, refusing it as soon as it exceeds `limit` (whether or not a length was
/// sent) or finds no room in the budget. The budget is charged as bytes arrive: a
/// `Content-Length` alone reserves nothing.
pub async fn read<'b>(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    budget: &'b BodyBudget,
) -> Result<(Vec<u8>, Held<'b>), IngressError> {
    let too_large = IngressError::PayloadTooLarge { limit };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    // A body that says it cannot fit is refused before actix buffers any more of it for us
    // (up to 160 KiB a connection). Its length reserves nothing: the budget is still charged
    // as bytes arrive, whatever the header said.
    if declared.is_some_and(|n| !budget.could_take(n as usize)) {
        return Err(busy(budget));
    }
    let mut held = Held::default();
    // Copied at once into blocks of our own: a chunk from actix is a view of its connection's
    // read buffer (up to 128 KiB), which keeping the chunk would keep alive whole. Blocks of a
    // fixed size do not fragment the heap as one doubling buffer does (both measured under a
    // flood). One more copy puts the body into one buffer of its exact size.
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut len = 0;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            IngressError::InvalidPayload(PayloadError {
                field: "body",
                reason: format!("the body could not be read: {e}"),
            })
        })?;
        if len + chunk.len() > limit {
            return Err(too_large);
        }
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let room = blocks.last().map_or(0, |b| b.capacity() - b.len());
            if room == 0 {
                // The first block is no larger than the body says it is.
                let size = match (blocks.is_empty(), declared) {
                    (true, Some(n)) => (n as usize).clamp(rest.len().min(BLOCK), BLOCK),
                    _ => BLOCK,
                };
                if !budget.grow(&mut held, size) {
                    return Err(busy(budget));
                }
                blocks.push(Vec::with_capacity(size));
            }
            let block = blocks.last_mut().expect("a block with room");
            let n = rest.len().min(block.capacity() - block.len());
            block.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        len += chunk.len();
    }
    let body = match blocks.len() {
        0 => Vec::new(),
        // Small events fit one block: it is the body.
        1 => blocks.pop().expect("one block"),
        _ => {
            if !budget.grow(&mut held, len) {
                return Err(busy(budget));
            }
            let mut body = Vec::with_capacity(len);
            let charged: usize = blocks.iter().map(Vec::capacity).sum();
            for block in blocks.drain(..) {
                body.extend_from_slice(&block);
            }
            budget.shrink(&mut held, charged);
            body
        }
    };
    Ok((body, held))
}

fn busy(budget: &BodyBudget) -> IngressError {
    IngressError::BodyBudgetFull {
        budget_bytes: budget.total(),
        retry_after_seconds: RETRY_AFTER_BUSY,
    }
}
