//! The admin listener (localhost by default): `/metrics`, `/healthz`, `/readyz`, the admin
//! API under `/admin/` ([`api`]) and the event inspector page at `/ui/` ([`ui`]).
//!
//! Kept off the public port so that scanners on the internet see neither our numbers nor our
//! state, and so that a flood on the public port cannot starve the operator's view.

mod api;
pub mod contract;
pub mod options;
mod ui;

use actix_web::{web, HttpResponse};
use serde_json::json;
use tokio_util::task::TaskTracker;

pub use options::AdminOptions;

use crate::metrics::Metrics;
use crate::relay::{BrokerState, BrokerStatus};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// What the admin endpoints read.
pub struct Admin {
    pub store: Store,
    pub metrics: Metrics,
    pub broker: BrokerStatus,
    pub shutdown: Shutdown,
    /// Work the admin API starts and that outlives its request (a redrive): stopping waits
    /// for it.
    pub tasks: TaskTracker,
    /// Its address, its token (without one the admin API answers 404), the redrive rate.
    pub options: AdminOptions,
    /// How an event is published (exchange, routing key), for the inspector's preview.
    pub publishing: Publishing,
}

/// What the admin API needs of the relay's settings to show how an event is published.
#[derive(Debug, Clone)]
pub struct Publishing {
    pub exchange: String,
    pub routing_key: crate::relay::RoutingKey,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .configure(ui::routes)
        .service(api::scope());
}

async fn metrics(admin: web::Data<Admin>) -> HttpResponse {
    let stats = admin.store.stats();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(admin.metrics.render(&stats))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready while the receiver can do its job: the store writes and the outbox has room. The
/// broker's state is reported but does not make us unready: events wait in the outbox.
async fn readyz(admin: web::Data<Admin>) -> HttpResponse {
    let stats = admin.store.stats();
    let stopping = admin.shutdown.is_triggered();
    let has_room = stats.outbox_events < stats.outbox_capacity;
    let ready = stats.writable && has_room && !stopping;
    let broker = admin.broker.get();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "shutting_down": stopping,
        "store": {
            "writable": stats.writable,
            "outbox_events": stats.outbox_events,
            "outbox_capacity": stats.outbox_capacity,
            "outbox_oldest_age_seconds": stats.outbox_oldest_age.map(|d| d.as_secs_f64()),
            "dedup_keys": stats.dedup_keys,
            "quarantined_events": stats.quarantined_events,
        },
        "broker": broker,
        "broker_connected": matches!(broker, BrokerState::Connected { .. }),
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
