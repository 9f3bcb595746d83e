//! The one integration-test binary: real servers on 127.0.0.1:0, real clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod balance;
mod cli;
mod coalesce;
mod crash;
mod delivery;
mod durable;
mod emulator;
mod gateway;
mod identity;
mod image;
mod ingest;
mod kubernetes;
mod lifecycle;
mod metrics;
mod onboard;
mod openapi;
mod outbox;
mod pricing;
mod protocol;
mod proxy;
mod sdk;
mod traces;
mod venv;
mod webhooks;
