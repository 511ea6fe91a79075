//! `/admin/quarantine`: the outbox records the relay could not publish and set aside, and
//! putting one back into the outbox once its cause is fixed.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::{parse_cursor, parse_limit, AdminError, Answer, WithRequest};
use crate::admin::contract::{QuarantineList, QuarantinedEvent, Redelivered};
use crate::admin::Admin;
use crate::store::{Redelivery, Shelf, StoreError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineParams {
    limit: Option<String>,
    cursor: Option<String>,
}

pub(super) async fn list(req: HttpRequest, admin: web::Data<Admin>) -> Answer {
    let params: QuarantineParams = serde_urlencoded::from_str(req.query_string())
        .map_err(|e| AdminError::invalid("query", e.to_string()))
        .for_request(&req)?;
    let limit = parse_limit(params.limit.as_deref()).for_request(&req)?;
    let after = parse_cursor(params.cursor).for_request(&req)?;
    let store = admin.store.clone();
    let views = web::block(move || store.list_quarantined(after, limit))
        .await
        .map_err(|e| StoreError::Unwritable(e.to_string()))
        .for_request(&req)?
        .for_request(&req)?;
    let next_cursor = (views.len() == limit)
        .then(|| views.last().map(|v| v.seq.to_string()))
        .flatten();
    Ok(HttpResponse::Ok().json(QuarantineList {
        events: views.iter().map(QuarantinedEvent::from).collect(),
        next_cursor,
    }))
}

pub(super) async fn redeliver(
    req: HttpRequest,
    admin: web::Data<Admin>,
    seq: web::Path<String>,
) -> Answer {
    let seq: u64 = seq
        .parse()
        .map_err(|_| AdminError::invalid("seq", "the `seq` of a quarantined event"))
        .for_request(&req)?;
    let outcomes = admin
        .store
        .redeliver(vec![seq], Shelf::Quarantine)
        .await
        .for_request(&req)?;
    match outcomes.first() {
        Some(Redelivery::Queued(_)) => {
            admin
                .metrics
                .redelivered
                .with_label_values(&["quarantine"])
                .inc();
            tracing::info!(seq, "quarantined record put back into the outbox");
            Ok(HttpResponse::Accepted().json(Redelivered {
                id: seq.to_string(),
                status: "pending".into(),
            }))
        }
        _ => Err(AdminError::NotFound).for_request(&req),
    }
}
