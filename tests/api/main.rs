//! One integration-test binary (one link step, shared helpers): the receiver's endpoint table,
//! and the relay against a real RabbitMQ.

mod admin;
mod chaos;
mod cli;
mod consumers;
mod deploy;
mod durability;
mod helpers;
mod hostile;
mod relay;
mod replicas;
mod tls;
mod webhook;
