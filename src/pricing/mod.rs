//! Price books (being built).
