//! [`Finish`]: the part of a request that must run to its end even when the client goes away.
//!
//! Contract: a [`Finish`] future runs its inner future inline (polled by the caller, no task,
//! no thread hop). If the caller drops it before the inner future completed (actix drops a
//! handler's future when its connection is reset or fails, or when the server stops; a client
//! that only half-closes with a FIN is still answered), the inner future is
//! spawned as a task of its own on the current tokio runtime and runs to its end there; its
//! output is dropped. Without a runtime (only while one shuts down) the inner future is
//! dropped, as the runtime would drop the task.
//!
//! The pipeline wraps what follows the decision to accept: handing the events to the sink and
//! counting their outcomes. The sink's own guarantees (the outbox writes a queued append even
//! if its caller is dropped) then cover the data, and this covers the rest: an `ack =
//! "upstream"` delivery that already started completes, and every event handed off gets its
//! outcome counted once (`tests/api/ingest.rs::
//! a_client_that_gives_up_mid_request_still_has_its_event_charged_and_counted_once`). Spawning every request's pipeline as a task did the same at ~5% of
//! the request path's CPU (task allocation, moving the future, a scheduler round trip).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::instrument::WithSubscriber;
use tracing::Dispatch;

/// See the module docs.
pub struct Finish<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    inner: Option<Pin<Box<F>>>,
    dispatch: Option<Dispatch>,
}

impl<F> Finish<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `dispatch`: the trace dispatch to poll `inner` under (`None` when traces are off).
    pub fn new(inner: F, dispatch: Option<Dispatch>) -> Self {
        Finish {
            inner: Some(Box::pin(inner)),
            dispatch,
        }
    }
}

impl<F> Future for Finish<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Option<F::Output>;

    /// `None` only if polled again after it completed.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = match &this.dispatch {
            None => inner.as_mut().poll(cx),
            Some(dispatch) => {
                tracing::dispatcher::with_default(dispatch, || inner.as_mut().poll(cx))
            }
        };
        let output = std::task::ready!(polled);
        this.inner = None;
        Poll::Ready(Some(output))
    }
}

impl<F> Drop for Finish<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                match self.dispatch.take() {
                    Some(dispatch) => drop(runtime.spawn(inner.with_subscriber(dispatch))),
                    None => drop(runtime.spawn(inner)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn completed_inline_it_returns_the_output_and_spawns_nothing() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let out = Finish::new(async move { r.fetch_add(1, Ordering::SeqCst) + 41 }, None).await;
        assert_eq!(out, Some(41));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dropped_midway_it_still_runs_to_the_end() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<&str>();
        let work = Finish::new(
            async move {
                let _ = go_rx.await;
                let _ = done_tx.send("finished");
            },
            None,
        );
        // The caller gives up while the work waits (as actix drops a handler on disconnect).
        let gave_up = tokio::time::timeout(Duration::from_millis(20), work).await;
        assert!(gave_up.is_err());
        let _ = go_tx.send(());
        let done = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
        assert_eq!(done.ok().and_then(Result::ok), Some("finished"));
    }

    /// Flags its own drop, so a test sees what became of the future that owned it.
    struct DropFlag(Arc<AtomicUsize>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn dropped_without_a_runtime_it_is_dropped_quietly() {
        assert!(tokio::runtime::Handle::try_current().is_err());
        let runs = Arc::new(AtomicUsize::new(0));
        let drops = Arc::new(AtomicUsize::new(0));
        let (r, flag) = (runs.clone(), DropFlag(drops.clone()));
        let work = Finish::new(
            async move {
                let _owned = flag;
                r.fetch_add(1, Ordering::SeqCst);
            },
            None,
        );
        // No runtime to spawn on: the drop neither panics nor runs the work inline...
        drop(work);
        assert_eq!(runs.load(Ordering::SeqCst), 0, "the work must not run");
        // ...nor leaks it: the inner future and what it owns are dropped there and then.
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the work must be dropped");
        assert_eq!(Arc::strong_count(&runs), 1);
    }
}
