//! One integration-test binary (one link step, shared helpers): the receiver's endpoint table,
//! and the relay against a real RabbitMQ.

mod admin;
mod broker_faults;
mod broker_tls;
mod chaos;
mod cli;
mod cluster;
mod consumers;
mod deploy;
mod durability;
mod helpers;
mod hostile;
mod inspector;
mod own_broker;
mod relay;
mod replicas;
mod sources;
mod tls;
mod webhook;
