//! On-disk layout of the outbox: the record log (`log` module) and an fjall keyspace (an LSM
//! tree with a write-ahead journal) for what lives long or is looked up by key.
//!
//! ```text
//! DIR/LOCK            exclusive flock: one process per directory (proxy or offline dlq tool)
//! DIR/log/            the record log: pending records, delivered marks, claimed dedupe keys
//! DIR/store/          fjall keyspace, partitions:
//!   dead              seq (u64 BE)                      -> JSON DeadLetter
//!   dedupe            dedupe key (16 bytes, dedupe.rs)  -> accepted_at ms (u64 BE)
//!   batches           batch id (16-byte UUID)           -> JSON [seq, ...] (coalesced sends)
//!   totals            running-total key (UTF-8)         -> total (rust_decimal, 16 bytes)
//!   meta              "format"                          -> FORMAT (checked on open)
//!   records           format 2 only: seq -> record; moved into the log on open
//! ```
//!
//! The log is the commit point of the request path: a group's records, delivered marks and
//! dedupe keys are one frame, whole or absent after a crash. fjall follows it: dedupe keys
//! reach the `dedupe` partition only after their frame is durable, and are put there again
//! from every segment on disk at open (see the `index` module); running totals of
//! period-tiered prices follow the log the same way (each frame carries the totals as they
//! stand after it, so putting them again in log order is idempotent). The rarer changes go to fjall
//! directly, ordered so that no crash loses a record or sends one twice under two ids:
//! a dead letter is written to `dead` only (the log keeps its record, and on open a record
//! that is also a dead letter is a dead letter); a replay is written to the log and synced
//! before it leaves `dead`; a completed batch's delivered marks are in the log before its
//! membership leaves `batches`, and a membership with a member no longer pending is dropped
//! on open. Sequence numbers only grow: each log segment's header records the next one, and
//! on open the bound also covers `dead`, `batches` and format 2's `meta/next_seq`.

use std::fs::{File, OpenOptions};
use std::path::Path;

use fjall::{
    compaction::Strategy as CompactionStrategy, Batch, CompressionType, Config, Keyspace,
    PartitionCreateOptions, PartitionHandle, PersistMode,
};
use std::collections::{BTreeMap, HashSet};

use rustix::fs::{flock, FlockOperation};
use uuid::Uuid;

use super::index::Indexing;
use super::log::Log;
use super::queue::Encoded;
use super::{record, DeadLetter, OutboxError};

const NEXT_SEQ: &[u8] = b"next_seq";
const FORMAT_KEY: &[u8] = b"format";
/// The on-disk format this build writes and reads. 2: 16-byte hashed dedupe keys, no time
/// index, binary charge records in fjall. 3: records in the log. A format 2 directory is
/// moved to 3 at open; any other is refused rather than misread.
pub(crate) const FORMAT: &str = "3";
const FORMAT_2: &str = "2";

pub(crate) struct Recovered {
    /// Pending records as encoded in the log, with their segment.
    pub(crate) pending: Vec<(u64, Encoded, u64)>,
    pub(crate) dead_count: usize,
    pub(crate) next_seq: u64,
    pub(crate) log: Log,
    pub(crate) indexing: Indexing,
}

/// The open keyspace and its partitions. Field order matters: the keyspace is dropped (its
/// threads joined) before the directory lock is released.
pub(crate) struct Store {
    pub(crate) keyspace: Keyspace,
    pub(crate) records: PartitionHandle,
    pub(crate) dead: PartitionHandle,
    pub(crate) dedupe: PartitionHandle,
    pub(crate) batches: PartitionHandle,
    pub(crate) meta: PartitionHandle,
    pub(crate) totals: PartitionHandle,
    _lock: File,
}

pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn seq_from_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Where the record log of the outbox in `dir` lives.
pub(crate) fn log_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("log")
}

/// Where the fjall keyspace of the outbox in `dir` lives.
pub(crate) fn store_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("store")
}

/// How much lower than the process the CPU priority (nice value) of fjall's own threads is.
pub(crate) const BACKGROUND_NICE_OFFSET: i32 = 10;

/// Opens the keyspace from a short-lived thread running `BACKGROUND_NICE_OFFSET` nice steps
/// below the caller, so that the threads fjall spawns while it opens (flusher, compactor,
/// monitor, and the flush workers the flusher spawns later) inherit that priority. In the
/// sidecar they share a core with the request path, and a memtable flush is 30-200 ms of CPU:
/// at nice +10 (weight 110 against 1024) the request threads preempt it and it runs in their
/// idle time. Measured: throughput unchanged, fewer multi-millisecond spikes at half rate, no
/// clear change of p99 over 8 runs. RocksDB offers the same for its compaction pool
/// (`LowerThreadPoolCPUPriority`); fjall does not, hence the inheritance. The writers (the
/// request threads, see the commit module) keep the normal priority. Linux only: elsewhere the
/// nice value is per process, so the keyspace is opened on the calling thread.
fn open_in_background(config: Config) -> Result<Keyspace, OutboxError> {
    if !cfg!(target_os = "linux") {
        return Ok(config.open()?);
    }
    std::thread::scope(|s| {
        let opener = s.spawn(move || {
            lower_priority();
            config.open()
        });
        match opener.join() {
            Ok(result) => Ok(result?),
            Err(_) => Err(OutboxError::Io(std::io::Error::other(
                "the thread opening the outbox store panicked",
            ))),
        }
    })
}

/// Lowers the calling thread's CPU priority (on Linux the nice value is per thread).
/// A failure only costs latency, so it is logged, not returned.
pub(crate) fn lower_priority() {
    let lowered = rustix::process::getpriority_process(None).and_then(|nice| {
        rustix::process::setpriority_process(None, (nice + BACKGROUND_NICE_OFFSET).min(19))
    });
    if let Err(e) = lowered {
        tracing::warn!(error = %e, "could not lower the priority of the outbox's storage threads");
    }
}

fn lock_dir(dir: &Path) -> Result<File, OutboxError> {
    std::fs::create_dir_all(dir).map_err(OutboxError::Io)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(OutboxError::Io)?;
    // An flock belongs to the open file description: a second open in this process conflicts
    // too, and the kernel releases it when the process dies, however it dies.
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(OutboxError::Locked { dir: dir.into() }),
        Err(e) => Err(OutboxError::Io(e.into())),
    }
}

impl Store {
    /// Locks `dir` and opens (recovering the journal of) the keyspace in `dir/store`.
    pub(crate) fn open(dir: &Path) -> Result<Store, OutboxError> {
        let lock = lock_dir(dir)?;
        // We decide durability per batch; fjall must not add syncs or buffering of its own.
        // Memory is sized for a sidecar: a small block cache and 4 MiB memtables (fjall's
        // default is 16 MiB per partition). The write-buffer cap stays at fjall's 64 MiB: it is
        // not what memtables use but the point where fjall puts the writer (whoever commits)
        // to sleep, 100 ms at a time, until flushes catch up; at 16 MiB, four memtables, it did
        // so in ordinary load (a 135 ms stall in a half-rate latency run).
        //
        // The journal cap is raised from fjall's 512 MiB to 1 GiB because fjall counts every
        // journal at its preallocated 32 MiB (a sparse file) whatever it holds: with 4 MiB
        // memtables a journal holds a few MiB, and under a 100-event-batch burst fjall reached
        // 90% of 512 MiB with a fraction of that written and slept the writer 500 ms.
        let config = Config::new(store_dir(dir))
            .manual_journal_persist(true)
            .cache_size(8 * 1024 * 1024)
            .max_write_buffer_size(64 * 1024 * 1024)
            .max_journaling_size(1024 * 1024 * 1024);
        let keyspace = open_in_background(config)?;
        let open = |name: &str| {
            let options = PartitionCreateOptions::default().max_memtable_size(4 * 1024 * 1024);
            // Dedupe keys are hashes (incompressible) and records live for milliseconds to
            // minutes: compressing their blocks at every flush and compaction is CPU for
            // nothing (it was ~5% of the request path's CPU in the load test).
            let options = match name {
                "dedupe" | "records" => options.compression(CompressionType::None),
                _ => options,
            };
            // Dedupe keys are random, so under leveled compaction every flushed segment
            // overlaps the whole next level and each compaction rewrites it. Size-tiered
            // compaction merges whole runs of similar size instead (far less rewriting); its
            // cost, more segments per point read, is mostly avoided by the commit's own
            // filter (a new id, almost every lookup, reads no segment).
            let options = match name {
                "dedupe" => options.compaction_strategy(CompactionStrategy::SizeTiered(
                    fjall::compaction::SizeTiered::default(),
                )),
                _ => options,
            };
            keyspace.open_partition(name, options)
        };
        let store = Store {
            records: open("records")?,
            dead: open("dead")?,
            dedupe: open("dedupe")?,
            batches: open("batches")?,
            meta: open("meta")?,
            totals: open("totals")?,
            keyspace,
            _lock: lock,
        };
        store.check_format(dir)?;
        Ok(store)
    }

    /// Refuses a directory of another format; stamps a new (empty) one with [`FORMAT`]. A
    /// format 2 directory is let through: [`Store::recover`] moves it to [`FORMAT`].
    fn check_format(&self, dir: &Path) -> Result<(), OutboxError> {
        let refuse = |found: String| OutboxError::Format {
            dir: dir.into(),
            found,
            expected: FORMAT,
        };
        match self.meta.get(FORMAT_KEY)? {
            Some(v) if v.as_ref() == FORMAT.as_bytes() || v.as_ref() == FORMAT_2.as_bytes() => {
                Ok(())
            }
            Some(v) => Err(refuse(String::from_utf8_lossy(&v).into_owned())),
            None if self.meta.is_empty()? && self.dedupe.is_empty()? => {
                self.meta.insert(FORMAT_KEY, FORMAT.as_bytes())?;
                self.keyspace.persist(PersistMode::SyncAll)?;
                Ok(())
            }
            None => Err(refuse("1".into())),
        }
    }

    /// Recovers the outbox (blocking, at open only): reads the record log, puts the dedupe
    /// keys of every segment still on disk into the partition again (see the `index` module),
    /// moves the records of a directory written by an older version (format 2, records in
    /// fjall) into the log, and drops what the log says is over (records that are dead
    /// letters, memberships of completed coalesced batches).
    pub(crate) fn recover(
        &self,
        dir: &Path,
        segment_bytes: u64,
        preallocate: bool,
    ) -> Result<Recovered, OutboxError> {
        let mut dead = HashSet::new();
        let mut floor = 0u64;
        for kv in self.dead.iter() {
            let (k, _) = kv?;
            if let Some(seq) = seq_from_key(&k) {
                dead.insert(seq);
                floor = floor.max(seq + 1);
            }
        }
        let mut legacy = Vec::new();
        for kv in self.records.iter() {
            let (k, v) = kv?;
            if let Some(seq) = seq_from_key(&k) {
                floor = floor.max(seq + 1);
                legacy.push((seq, v.to_vec()));
            }
        }
        let batches = self.batches()?;
        for (_, seqs) in &batches {
            floor = floor.max(seqs.iter().max().map_or(0, |s| s + 1));
        }
        if let Some(v) = self.meta.get(NEXT_SEQ)? {
            floor = floor.max(seq_from_key(&v).unwrap_or(0));
        }
        let (mut log, segments, next_seq) =
            Log::open(&log_dir(dir), segment_bytes, preallocate, |n| n.max(floor))?;
        let mut indexing = Indexing::default();
        let mut pending: BTreeMap<u64, (Vec<u8>, u64)> = BTreeMap::new();
        // The totals as the newest frame holding each left them (frames are read in order).
        let mut totals: std::collections::HashMap<Box<str>, rust_decimal::Decimal> =
            std::collections::HashMap::new();
        for seg in segments {
            indexing.segments.insert(seg.id);
            let mut keys = Vec::new();
            for frame in seg.frames {
                // Every record the segment holds counts as written to it, delivered or not,
                // as in the run that wrote it: a segment of delivered records and a few
                // pending ones is then copied forward (see `Committer::copy_forward`).
                *indexing.written.entry(seg.id).or_default() += frame.adds.len();
                for (seq, bytes) in frame.adds {
                    pending.insert(seq, (bytes, seg.id));
                }
                for seq in frame.removes {
                    pending.remove(&seq);
                }
                keys.extend(frame.keys);
                totals.extend(frame.totals);
            }
            keys.sort_by_key(|(k, _)| *k);
            let mut batch = self.batch();
            for (k, at) in keys {
                self.stage_seen(&mut batch, &k, at);
            }
            batch.commit()?;
        }
        indexing.segments.insert(log.segment());
        if !legacy.is_empty() {
            // Into the log first, durably; only then out of fjall (a crash in between
            // leaves them in both, and the next open moves them again: same seqs).
            let seg = log.segment();
            for (seq, bytes) in &legacy {
                log.frame().add(*seq, bytes);
                pending.insert(*seq, (bytes.clone(), seg));
            }
            *indexing.written.entry(seg).or_default() += legacy.len();
            log.write(next_seq).map_err(OutboxError::Io)?;
            log.shared().sync().map_err(OutboxError::Io)?;
            let mut batch = self.batch();
            for (seq, _) in &legacy {
                batch.remove(&self.records, seq_key(*seq).to_vec());
            }
            batch.commit()?;
        }
        let mut batch = self.batch();
        for (key, total) in &totals {
            self.stage_total(&mut batch, key, *total);
        }
        if self.meta.get(FORMAT_KEY)?.as_deref() != Some(FORMAT.as_bytes()) {
            batch.insert(&self.meta, FORMAT_KEY, FORMAT.as_bytes());
        }
        // A dead letter is in `dead` only; its record may still be in the log.
        pending.retain(|seq, _| !dead.contains(seq));
        // A batch one of whose members is no longer pending was completed: its delivered
        // marks are in the log, and forgetting it had not reached fjall yet.
        for (id, seqs) in &batches {
            if seqs.iter().any(|s| !pending.contains_key(s)) {
                batch.remove(&self.batches, id.as_bytes().to_vec());
            }
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        self.keyspace.persist(PersistMode::SyncAll)?;
        let mut records = Vec::with_capacity(pending.len());
        for (seq, (bytes, seg)) in pending {
            *indexing.live.entry(seg).or_default() += 1;
            // Decoded once here, so a record that would not decode refuses the open.
            record::decode(&bytes)?;
            records.push((seq, Encoded::from(bytes), seg));
        }
        Ok(Recovered {
            pending: records,
            dead_count: dead.len(),
            next_seq,
            log,
            indexing,
        })
    }

    /// The running total stored under `key` (zero when none is).
    pub(crate) fn total(&self, key: &str) -> Result<rust_decimal::Decimal, OutboxError> {
        match self.totals.get(key.as_bytes())? {
            None => Ok(rust_decimal::Decimal::ZERO),
            Some(v) => {
                let bytes: [u8; 16] =
                    v.as_ref().try_into().map_err(|_| OutboxError::Malformed {
                        partition: "totals",
                        what: "a total is not 16 bytes",
                    })?;
                Ok(rust_decimal::Decimal::deserialize(bytes))
            }
        }
    }

    /// Adds a running total to `batch`.
    pub(crate) fn stage_total(&self, batch: &mut Batch, key: &str, total: rust_decimal::Decimal) {
        batch.insert(
            &self.totals,
            key.as_bytes().to_vec(),
            total.serialize().to_vec(),
        );
    }

    pub(crate) fn batch(&self) -> Batch {
        self.keyspace.batch().durability(Some(PersistMode::Buffer))
    }

    pub(crate) fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        self.dead
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                decode_dead(&v)
            })
            .collect()
    }

    /// Up to `limit` dead letters with a sequence number above `after`, oldest first, and
    /// whether more follow: one page of the store, read without loading the rest.
    pub(crate) fn dead_letters_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), OutboxError> {
        let from = match after {
            None => 0,
            // Nothing can follow the largest sequence number.
            Some(u64::MAX) => return Ok((Vec::new(), false)),
            Some(seq) => seq + 1,
        };
        let mut page = Vec::with_capacity(limit.min(1024));
        for kv in self.dead.range(seq_key(from)..) {
            let (_, v) = kv?;
            if page.len() == limit {
                return Ok((page, true));
            }
            page.push(decode_dead(&v)?);
        }
        Ok((page, false))
    }

    pub(crate) fn get_dead(&self, seq: u64) -> Result<Option<DeadLetter>, OutboxError> {
        self.dead
            .get(seq_key(seq))?
            .map(|v| decode_dead(&v))
            .transpose()
    }

    /// Adds to `batch` the removal of the given (or all) dead letters from `dead`, and returns
    /// them with their records encoded, for the log (see [`Store::recover`] for the order).
    pub(crate) fn stage_replay(
        &self,
        batch: &mut Batch,
        seqs: Option<&[u64]>,
    ) -> Result<Vec<(u64, Vec<u8>)>, OutboxError> {
        let letters = match seqs {
            None => self.dead_letters()?,
            Some(seqs) => {
                let mut out = Vec::with_capacity(seqs.len());
                for &seq in seqs {
                    if let Some(letter) = self.get_dead(seq)? {
                        out.push(letter);
                    }
                }
                out.sort_by_key(|l| l.seq);
                out.dedup_by_key(|l| l.seq);
                out
            }
        };
        let mut moved = Vec::with_capacity(letters.len());
        for letter in letters {
            let bytes = record::encode(&letter.delivery)?;
            batch.remove(&self.dead, seq_key(letter.seq).to_vec());
            moved.push((letter.seq, bytes));
        }
        Ok(moved)
    }
}

pub(crate) fn store_batch_value(seqs: &[u64]) -> Result<Vec<u8>, OutboxError> {
    serde_json::to_vec(seqs).map_err(OutboxError::Encode)
}

fn decode_batch(bytes: &[u8]) -> Result<Vec<u64>, OutboxError> {
    serde_json::from_slice(bytes).map_err(|source| OutboxError::Corrupt {
        partition: "batches",
        source,
    })
}

impl Store {
    pub(crate) fn get_batch(&self, id: Uuid) -> Result<Option<Vec<u64>>, OutboxError> {
        self.batches
            .get(id.as_bytes())?
            .map(|v| decode_batch(&v))
            .transpose()
    }

    pub(crate) fn batches(&self) -> Result<Vec<(Uuid, Vec<u64>)>, OutboxError> {
        let mut out = Vec::new();
        for kv in self.batches.iter() {
            let (k, v) = kv?;
            let Ok(id) = Uuid::from_slice(&k) else {
                continue;
            };
            out.push((id, decode_batch(&v)?));
        }
        Ok(out)
    }
}

pub(crate) fn encode_dead(letter: &DeadLetter) -> Result<Vec<u8>, OutboxError> {
    serde_json::to_vec(letter).map_err(OutboxError::Encode)
}

fn decode_dead(bytes: &[u8]) -> Result<DeadLetter, OutboxError> {
    serde_json::from_slice(bytes).map_err(|source| OutboxError::Corrupt {
        partition: "dead",
        source,
    })
}
