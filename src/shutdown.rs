//! SIGTERM/SIGINT -> stop accepting -> finish in-flight requests -> flush -> exit.
//!
//! Contract: [`signal`] resolves on the first SIGTERM or SIGINT. The application then flips
//! readiness to draining, stops its servers gracefully (in-flight requests finish within the
//! grace period) and flushes what it can before returning.

/// Resolves when the process is asked to stop.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("sigterm received, draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("sigint received, draining"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for sigterm; only sigint stops the proxy");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
