//! kallina-relay: the receiving end of Kallina.ai webhooks.
//!
//! The modules follow the path of one event:
//!
//! ```text
//! config ─▶ settings ─▶ each stage's options (ingress/store/relay/admin `options.rs`)
//!
//! POST /webhooks/kallina ─▶ ingress ─▶ signature ─▶ store (dedup + outbox, synced) ─▶ 2xx
//!                                                     │
//!                                                     ▼
//!                                     relay ─▶ RabbitMQ topic exchange (confirms)
//!
//! admin (metrics, health, admin API) reads store, relay and metrics; http is what both
//! listeners share; startup wires it all and shutdown stops it; cli drives it from a shell.
//! ```

pub mod admin;
pub mod cli;
pub mod config;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod relay;
pub mod settings;
pub mod shutdown;
pub mod signature;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod trace;
