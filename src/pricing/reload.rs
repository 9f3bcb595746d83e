//! Hot reload of the pricing directory.
//!
//! Contract: [`Pricing`] always serves a complete, validated [`PricingSet`]. A reload reads the
//! directory (through symlinks, so a Kubernetes ConfigMap `..data` swap is just new content),
//! hashes the bytes, and only when the hash differs parses and validates the whole new set,
//! then swaps it in atomically (`ArcSwap`). On any mistake the last good set keeps serving and
//! the error is logged at WARN once per distinct broken content and kept for [`Pricing::last_error`].
//! Readers never lock: [`Pricing::current`] is an `ArcSwap` load.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::load::{self, LoadErrors};
use super::PricingSet;

/// The hot-reloadable pricing handle; share it through `Arc`.
#[derive(Debug)]
pub struct Pricing {
    dir: PathBuf,
    current: ArcSwap<PricingSet>,
    /// Hash and errors of the last content that failed, so it is reported once, not per poll.
    failed: Mutex<Option<(String, LoadErrors)>>,
}

impl Pricing {
    /// Loads `dir`; fails (with every mistake) if it is not valid.
    pub fn load(dir: &Path) -> Result<Pricing, LoadErrors> {
        let set = PricingSet::load_dir(dir)?;
        Ok(Pricing {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(set),
            failed: Mutex::new(None),
        })
    }

    /// The set in force (lock-free).
    pub fn current(&self) -> Arc<PricingSet> {
        self.current.load_full()
    }

    /// Re-reads the directory. `Ok(true)`: new content validated and swapped in; `Ok(false)`:
    /// content unchanged; `Err`: the new content is invalid and the old set keeps serving.
    pub fn reload_now(&self) -> Result<bool, LoadErrors> {
        let files = match load::read_dir_files(&self.dir) {
            Ok(f) => f,
            Err(e) => return Err(self.record_failure(String::new(), e)),
        };
        let hash = load::content_hash(&files);
        if hash == self.current.load().hash() {
            // Reverting a broken edit clears the error.
            *self.failed.lock() = None;
            return Ok(false);
        }
        if let Some((failed_hash, errors)) = self.failed.lock().as_ref() {
            if *failed_hash == hash {
                return Err(errors.clone());
            }
        }
        match load::build(&files) {
            Ok(set) => {
                let old = self.current.load().version().to_owned();
                tracing::info!(old_version = %old, new_version = %set.version(), hash = %set.hash(), "pricing reloaded");
                self.current.store(Arc::new(set));
                *self.failed.lock() = None;
                Ok(true)
            }
            Err(e) => Err(self.record_failure(hash, e)),
        }
    }

    fn record_failure(&self, hash: String, errors: LoadErrors) -> LoadErrors {
        let mut failed = self.failed.lock();
        let repeated = failed
            .as_ref()
            .is_some_and(|(h, e)| *h == hash && *e == errors);
        if !repeated {
            tracing::warn!(
                dir = %self.dir.display(),
                mistakes = errors.errors().len(),
                errors = %errors,
                serving_version = %self.current.load().version(),
                "pricing reload rejected, keeping the last good set"
            );
        }
        *failed = Some((hash, errors.clone()));
        errors
    }

    /// The mistakes of the last rejected reload, while they are still on disk.
    pub fn last_error(&self) -> Option<String> {
        self.failed.lock().as_ref().map(|(_, e)| e.to_string())
    }

    /// Polls the directory every `interval` (hashing the resolved content). Stops when the
    /// last other `Arc<Pricing>` is dropped, or when the handle is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Pricing> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pricing) = weak.upgrade() else {
                    break;
                };
                // File reads and parsing are blocking work: keep them off the async workers.
                let outcome = tokio::task::spawn_blocking(move || pricing.reload_now()).await;
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, "pricing reload task failed");
                }
            }
        })
    }
}
