//! What the relay knows about the broker, for `/readyz` and the logs.

use std::sync::{Arc, RwLock};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BrokerState {
    /// Not tried yet, or trying now.
    Connecting,
    /// Connected to node `node` (its position in `amqp_url`, from 1), topology declared,
    /// publishing.
    Connected { node: usize },
    /// Connected, but the broker refuses publishes for now (`connection.blocked`: a memory or
    /// disk alarm). Nothing is published and no confirm is timed out until it unblocks; the
    /// connection is kept, so the broker is not hammered with reconnects.
    Blocked { reason: String, node: usize },
    /// The last attempt failed; the relay retries with backoff.
    Disconnected { reason: String },
    /// A declaration clashes with what the broker has: an operator must act.
    TopologyError { reason: String },
    /// The relay has stopped (shutdown).
    Stopped,
}

/// Shared, cheap-to-clone view of the broker state.
#[derive(Debug, Clone)]
pub struct BrokerStatus(Arc<RwLock<BrokerState>>);

impl Default for BrokerStatus {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(BrokerState::Connecting)))
    }
}

impl BrokerStatus {
    pub fn get(&self) -> BrokerState {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, state: BrokerState) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = state;
    }
}
