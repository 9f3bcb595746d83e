//! SIGTERM/SIGINT: the first one drains, a second one exits at once.
//!
//! Contract: [`Signals`] starts listening when it is created, so a signal that arrives before
//! anyone waits is neither lost nor fatal the default way; [`Signals::recv`] resolves once per
//! signal. The application's drain (`app::Application::stop`) follows a pod's shutdown: not
//! ready at once, still serving for `shutdown.drain_delay_ms`, then stop accepting, finish
//! in-flight requests and deliver the outbox until `server.shutdown_grace_ms` is spent. A second
//! signal during the drain ends the process at once: every acknowledged debit is already in the
//! outbox (written to the operating system, or synced with `outbox.sync = "always"`), so the
//! next start delivers it.

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
}

impl Signal {
    /// The exit status of a process ended by this signal (128 + its number), the convention
    /// for an exit forced by a second signal.
    pub fn exit_status(self) -> u8 {
        match self {
            Signal::Terminate => 128 + 15,
            Signal::Interrupt => 128 + 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "sigterm",
            Signal::Interrupt => "sigint",
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SIGTERM and SIGINT, listened to from creation on.
pub struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Starts listening (before the caller announces it runs).
    pub fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot listen for sigterm; only ctrl-c stops the proxy");
                    None
                }
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some((term, int)) = self.streams.as_mut() {
            return tokio::select! {
                _ = term.recv() => Signal::Terminate,
                _ = int.recv() => Signal::Interrupt,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}

impl Default for Signals {
    fn default() -> Self {
        Signals::new()
    }
}

/// Resolves on the first SIGTERM or SIGINT (for commands with nothing to drain).
pub async fn signal() {
    Signals::new().recv().await;
}
