//! The sync thread: every `fdatasync` of the outbox runs here, so a writer never waits
//! for the disk.
//!
//! * `always`: the writer (see the commit module) writes a group to the OS and hands it over;
//!   this thread takes every group handed over meanwhile, makes them durable with one
//!   `fdatasync`, then applies them to the in-memory queue in order and answers them. While it
//!   syncs, the next groups are already decided and written (pipelined group commit: the disk
//!   and the CPU work overlap instead of taking turns).
//! * `interval`: the writer answers its groups itself once written; this thread syncs
//!   every interval if anything was written since the last sync.
//! * A failed sync poisons the outbox and fails every group it was to cover; it is never
//!   retried. Groups behind it were written after the failure was possible, so they are failed
//!   too (the writers refuse new writes once poisoned).
//! * An id is answered `Duplicate` by a later group only after that later group's sync, which
//!   runs after the sync of the group that claimed the id: the "duplicate only once durable"
//!   rule of the commit module holds across the pipeline.
//!
//! A sync covers the record log (see the `log` module: sealed segments, the active one, the
//! folder) and, when a group wrote something to fjall that must be durable (dead letters,
//! batch memberships), fjall's journal. It syncs the journal through a descriptor of its own:
//! `Keyspace::persist` holds the journal writer's lock for the duration of the sync, which
//! would stall the writers' writes. fjall syncs a journal (and its folder) itself when it seals it at rotation, so only
//! the active journal, the highest-numbered file in `journals/`, needs syncing here; a group
//! handed over was written before this thread lists the folder, so it is in that file or in a
//! sealed (synced) one.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::commit::{apply, poison, staged_records, Staged};
use super::log::LogShared;
use super::{OutboxError, Shared, SyncPolicy};

/// With `always`, how long the thread waits for a group before it syncs what was written
/// without needing it.
const ALWAYS_IDLE_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) enum ToSyncer {
    /// A written group; `sync` if it holds anything whose loss would matter.
    Group { staged: Vec<Staged>, sync: bool },
    /// Finish the groups handed over, sync what was written, answer and stop.
    Close(mpsc::Sender<Result<(), OutboxError>>),
    /// Test-only crash: stop at once, answering nothing and syncing nothing.
    #[cfg(test)]
    Crash(mpsc::Sender<()>),
}

/// The active journal file of the keyspace, opened read-only (enough for `fdatasync`).
struct Journal {
    dir: PathBuf,
    open: Option<(u64, File)>,
}

impl Journal {
    fn newest(&self) -> io::Result<u64> {
        let mut newest = None::<u64>;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
                newest = newest.max(Some(id));
            }
        }
        newest.ok_or_else(|| io::Error::other("outbox journal folder holds no journal"))
    }

    fn sync(&mut self) -> io::Result<()> {
        // A journal sealed between the listing and the open was synced by fjall and may be
        // gone: list again (a few times at most; rotations are minutes apart).
        let mut attempts = 0;
        loop {
            let id = self.newest()?;
            if let Some((open_id, file)) = &self.open {
                if *open_id == id {
                    return file.sync_data();
                }
            }
            match File::open(self.dir.join(id.to_string())) {
                Ok(file) => self.open = Some((id, file)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

pub(crate) struct Syncer {
    shared: Arc<Shared>,
    policy: SyncPolicy,
    journal: Journal,
    log: Arc<LogShared>,
}

impl Syncer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        policy: SyncPolicy,
        store_dir: &Path,
        log: Arc<LogShared>,
    ) -> Self {
        Syncer {
            shared,
            policy,
            journal: Journal {
                dir: store_dir.join("journals"),
                open: None,
            },
            log,
        }
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<ToSyncer>) {
        loop {
            let first = match self.policy {
                // Groups that need no sync (delivered marks) still get one within a second,
                // so the index thread can go on deleting log segments.
                SyncPolicy::Always => rx.recv_timeout(ALWAYS_IDLE_SYNC),
                SyncPolicy::Interval(every) => rx.recv_timeout(every),
            };
            let first = match first {
                Ok(msg) => Some(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.final_sync();
                    return;
                }
            };
            let mut groups = Vec::new();
            let mut need_sync = false;
            let mut stop = None;
            for msg in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match msg {
                    ToSyncer::Group { staged, sync } => {
                        need_sync |= sync;
                        groups.push(staged);
                    }
                    ToSyncer::Close(done) => {
                        stop = Some(done);
                        break;
                    }
                    #[cfg(test)]
                    ToSyncer::Crash(done) => {
                        let _ = done.send(());
                        return;
                    }
                }
            }
            if matches!(self.policy, SyncPolicy::Interval(_)) || groups.is_empty() {
                // Interval groups are answered by their writer; this is the periodic sync.
                need_sync = true;
            }
            let synced = if need_sync {
                self.sync_if_dirty()
            } else {
                Ok(())
            };
            for staged in groups {
                let records = staged_records(&staged);
                match &synced {
                    Ok(()) if !self.poisoned() => apply(&self.shared, staged, records),
                    _ => {
                        self.shared.in_flight.fetch_sub(records, Ordering::AcqRel);
                        for s in staged {
                            s.fail(|| OutboxError::Poisoned);
                        }
                    }
                }
            }
            if let Some(done) = stop {
                let _ = done.send(self.final_sync());
                return;
            }
        }
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn final_sync(&mut self) -> Result<(), OutboxError> {
        if self.poisoned() {
            return Err(OutboxError::Poisoned);
        }
        self.sync_if_dirty()
    }

    /// Syncs the log (and fjall's journal, if something there must be durable) if anything
    /// was written since the last sync; then publishes how far the log is durable.
    fn sync_if_dirty(&mut self) -> Result<(), OutboxError> {
        if self.poisoned() {
            return Err(OutboxError::Poisoned);
        }
        // Cleared before the sync: a write landing during it sets it again for the next one.
        if !self.shared.unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // Every frame up to here was written before the sync begins, so the sync covers it.
        let upto = self.shared.written_lsn.load(Ordering::Acquire);
        let fjall = self.shared.fjall_unsynced.swap(false, Ordering::AcqRel);
        let started = Instant::now();
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_millis(
            self.shared.faults.sync_delay_ms.load(Ordering::SeqCst),
        ));
        #[cfg(test)]
        let result = if self.shared.faults.take_sync() {
            Err(io::Error::other("injected sync failure"))
        } else {
            self.sync_files(fjall)
        };
        #[cfg(not(test))]
        let result = self.sync_files(fjall);
        let took = started.elapsed();
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        if let Some(metrics) = &self.shared.metrics {
            metrics.observe_sync(took);
        }
        self.shared.last_sync_nanos.store(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX - 1),
            Ordering::Relaxed,
        );
        result.map_err(|e| {
            // Never retried: after a failed fsync the kernel may have dropped the dirty pages,
            // so a later "successful" fsync would prove nothing.
            poison(&self.shared, "sync", &OutboxError::Io(e));
            OutboxError::Poisoned
        })?;
        // The index thread reads it (see the `index` module).
        self.shared.synced_lsn.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    fn sync_files(&mut self, fjall: bool) -> io::Result<()> {
        self.log.sync()?;
        if fjall {
            self.journal.sync()?;
        }
        Ok(())
    }
}
