//! The durable outbox (being built).
