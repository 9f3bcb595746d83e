//! credyt-proxy: a usage-metering sidecar in front of Credyt for Platforms.
//!
//! (The full narration of one event's path is written as the stages land.)

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod emulator;
pub mod identity;
pub mod ingest;
pub mod outbox;
pub mod outcome;
pub mod pricing;
pub mod ratelimit;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
