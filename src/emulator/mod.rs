//! The Credyt API emulator (being built).
