//! kallina-relay: the receiving end of Kallina.ai webhooks.
//!
//! The modules follow the path of one event:
//!
//! ```text
//! config ─▶ settings (each stage's options) ─┐
//!         ▼
//! POST /webhooks/kallina ─▶ ingress ─▶ signature ─▶ store (dedup + outbox, fsync) ─▶ 2xx
//!                                                     │
//!                                                     ▼
//!                                     relay ─▶ RabbitMQ topic exchange (confirms)
//! admin (metrics, health) reads store, relay and metrics; startup wires it all; cli drives it.
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
