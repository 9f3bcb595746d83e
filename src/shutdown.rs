//! SIGTERM/SIGINT -> stop accepting -> finish in-flight requests -> flush -> exit.
//!
//! Contract: [`signal`] resolves on the first SIGTERM or SIGINT. The application then flips
//! readiness to draining, stops its servers gracefully (in-flight requests finish within the
//! grace period) and flushes what it can before returning.

/// Resolves when the process is asked to stop.
pub async fn signal() {
    listen().await
}

/// Starts listening now and resolves on the first SIGTERM or SIGINT: a signal that arrives
/// before the future is first polled is not lost (and does not kill the process the default
/// way), so a caller can announce it is running and only then wait.
pub fn listen() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("sigterm received, draining"),
                        _ = int.recv() => tracing::info!("sigint received, draining"),
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot listen for sigterm; only sigint stops the proxy");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
