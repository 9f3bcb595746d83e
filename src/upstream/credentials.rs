//! The platform key and whether Credyt accepts it.
//!
//! Contract: the key is read from the configuration, or from `credyt.api_key_file` (a mounted
//! Secret), which is read again before every check, so a rotated key takes effect without a
//! restart. [`Credentials::check`] asks Credyt (`GET /accounts/self`) and records the verdict:
//! `valid`, `refused` (401/403: the key is wrong or revoked), or, when Credyt cannot be reached,
//! the verdict stays what it was. While the key is refused the proxy is not ready and the
//! forwarder sends nothing; the monitor ([`Credentials::monitor`]) checks again on a schedule
//! (1 s doubling to 30 s, and at once when the key file changes) and whenever the forwarder
//! reports a suspicious 401/403 ([`Credentials::suspect`]). Nothing is dead-lettered for a
//! refused key: every record stays pending until the key works again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use reqwest::header::HeaderValue;
use tokio::sync::{watch, Notify};

use super::{ClientError, CredytClient};
use crate::config::Secret;

/// What Credyt last said about the platform key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// Not checked yet, or Credyt could not be reached when it was.
    Unknown,
    Valid,
    /// 401/403 on `GET /accounts/self`.
    Refused,
}

/// The verdict and when it was reached.
#[derive(Debug, Clone, Copy)]
pub struct KeyState {
    pub status: KeyStatus,
    /// Incremented by every completed check, whatever its outcome.
    pub checks: u64,
    /// The last time Credyt accepted the key.
    pub valid_at: Option<Instant>,
}

/// Where the key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Fixed(Secret),
    File(PathBuf),
}

/// The key every request carries; swapped in place when its file changes.
pub struct PlatformKey {
    current: ArcSwap<HeaderValue>,
    source: KeySource,
}

fn header(key: &str) -> Result<HeaderValue, ClientError> {
    let mut value = HeaderValue::from_str(key.trim()).map_err(|_| ClientError::ApiKey)?;
    value.set_sensitive(true);
    Ok(value)
}

fn read_file(path: &PathBuf) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::KeyFile(format!("{}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(ClientError::KeyFile(format!("{} is empty", path.display())));
    }
    Ok(text)
}

impl PlatformKey {
    /// Reads the key once (at startup: an unreadable key file is an error).
    pub fn new(source: KeySource) -> Result<PlatformKey, ClientError> {
        let value = match &source {
            KeySource::Fixed(secret) => header(secret.expose())?,
            KeySource::File(path) => header(&read_file(path)?)?,
        };
        Ok(PlatformKey {
            current: ArcSwap::from_pointee(value),
            source,
        })
    }

    /// The header value to send.
    pub fn value(&self) -> HeaderValue {
        HeaderValue::clone(&self.current.load())
    }

    /// Whether the key comes from a file (and can change while the proxy runs).
    pub fn is_file(&self) -> bool {
        matches!(self.source, KeySource::File(_))
    }

    /// Reads the key file again; `Ok(true)` when the key changed.
    pub fn reload(&self) -> Result<bool, ClientError> {
        let KeySource::File(path) = &self.source else {
            return Ok(false);
        };
        let fresh = header(&read_file(path)?)?;
        if fresh.as_bytes() == self.current.load().as_bytes() {
            return Ok(false);
        }
        self.current.store(Arc::new(fresh));
        Ok(true)
    }
}

/// The key's verdict, shared by the forwarder, readiness and metrics.
pub struct Credentials {
    state: watch::Sender<KeyState>,
    suspect: Notify,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            state: watch::Sender::new(KeyState {
                status: KeyStatus::Unknown,
                checks: 0,
                valid_at: None,
            }),
            suspect: Notify::new(),
        }
    }
}

/// The first wait between checks while the key is refused, and the longest.
const RECHECK_FIRST: Duration = Duration::from_secs(1);
const RECHECK_MAX: Duration = Duration::from_secs(30);
/// How often the key file is read while the key is accepted: a rotated Secret is in use (and
/// checked) within this, before the platform revokes the old key.
const KEY_FILE_POLL: Duration = Duration::from_secs(5);

impl Credentials {
    pub fn state(&self) -> KeyState {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<KeyState> {
        self.state.subscribe()
    }

    pub fn is_refused(&self) -> bool {
        self.state().status == KeyStatus::Refused
    }

    /// A call was refused with 401/403: check the key now (the monitor does it).
    pub fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// Re-reads the key and asks Credyt whether it accepts it; records and returns the verdict.
    pub async fn check(&self, client: &CredytClient) -> KeyStatus {
        if let Err(e) = client.key().reload() {
            tracing::warn!(error = %e, "cannot re-read the platform key; keeping the current one");
        }
        let result = client.account_context().await;
        let before = self.state();
        let status = match &result {
            Ok(_) => KeyStatus::Valid,
            Err(e) if e.is_auth_refused() => KeyStatus::Refused,
            Err(_) => before.status,
        };
        match (&result, before.status, status) {
            (_, KeyStatus::Refused, KeyStatus::Valid) => {
                tracing::info!("credyt accepts the platform key again; delivery resumes")
            }
            (_, b, KeyStatus::Refused) if b != KeyStatus::Refused => tracing::error!(
                "credyt refused the platform key (401/403 on GET /accounts/self): not ready, delivery paused, nothing is dropped; fix credyt.api_key or credyt.api_key_file"
            ),
            (Err(e), _, _) if !e.is_auth_refused() => {
                tracing::warn!(error = %e, "cannot check the platform key: credyt unreachable")
            }
            _ => {}
        }
        self.state.send_modify(|s| {
            s.status = status;
            s.checks += 1;
            if status == KeyStatus::Valid {
                s.valid_at = Some(Instant::now());
            }
        });
        status
    }

    /// Checks the key whenever a call is suspicious and, while it is refused, on a doubling
    /// schedule and as soon as the key file changes. Runs until aborted.
    pub async fn monitor(self: Arc<Self>, client: CredytClient) {
        let mut wait = RECHECK_FIRST;
        let mut next = Instant::now() + wait;
        loop {
            let refused = self.is_refused();
            let poll = if refused {
                RECHECK_FIRST
            } else {
                KEY_FILE_POLL
            };
            tokio::select! {
                _ = self.suspect.notified() => {}
                _ = tokio::time::sleep(poll), if refused || client.key().is_file() => {
                    let changed = client.key().reload().unwrap_or(false);
                    if changed {
                        tracing::info!("the platform key file changed; checking the new key");
                    } else if !refused || Instant::now() < next {
                        continue;
                    }
                }
            }
            if self.check(&client).await == KeyStatus::Refused {
                wait = if refused {
                    (wait * 2).min(RECHECK_MAX)
                } else {
                    RECHECK_FIRST
                };
                next = Instant::now() + wait;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_read_again_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "key_one\n").unwrap();
        let key = PlatformKey::new(KeySource::File(path.clone())).unwrap();
        assert_eq!(key.value(), "key_one");
        assert!(key.value().is_sensitive());
        assert!(!key.reload().unwrap());
        std::fs::write(&path, "key_two").unwrap();
        assert!(key.reload().unwrap());
        assert_eq!(key.value(), "key_two");
        // A broken update keeps the last good key.
        std::fs::write(&path, "  \n").unwrap();
        assert!(key.reload().is_err());
        assert_eq!(key.value(), "key_two");
        std::fs::remove_file(&path).unwrap();
        assert!(PlatformKey::new(KeySource::File(path)).is_err());
    }
}
