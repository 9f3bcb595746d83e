//! The record log: an append-only, segmented file log that is the outbox's commit point for
//! the request path.
//!
//! ```text
//! DIR/log/00000000000000000001.seg   header: magic (8) ++ first_seq (u64 LE) ++ xxh3 of both (u64 LE)
//!                                     frames: len (u32 LE) ++ xxh3 of body (u64 LE) ++ body
//! ```
//!
//! One commit group is one frame. A frame's body holds what the group changed, in order, each
//! entry a tag and its fields: a record added (`1`, seq, length, bytes as `record.rs` encodes
//! them), a seq removed (`2`: delivered), a dedupe key the group claimed (`3`, key, acceptance
//! time in ms), a running total of a period-tiered price as it stands after the group's events
//! (`4`, key length (u32 LE), key, total as `rust_decimal`'s 16-byte serialization; see
//! `pricing::period`). A frame is whole or absent: on
//! open, the frames of each segment are read in order, and the first one whose length or
//! checksum does not hold ends the log. That is only legitimate in the last segment holding a
//! frame (a write torn by a crash; the file is truncated there so later frames do not follow
//! garbage), and newer segments may then only be empty or have a torn header (begun at
//! rotation; deleted): a frame is acknowledged only after a sync that covered every older
//! segment. Damage anywhere before is corruption, and the outbox refuses to open rather than
//! silently drop what follows.
//!
//! Segments are sealed at [`SEGMENT_BYTES`]; the writer does not wait for the sealed file's
//! sync, the sync thread does it (with the new segment and the folder) before it answers for
//! any later group. A segment is deleted, oldest first, once none of its records is pending
//! and the derived state (the dedupe index) is durable elsewhere; see the `index` module.
//!
//! Segments are preallocated (unless the settings turn it off): each is written in full with
//! zeros and synced before its first frame (`spare.tmp`, prepared by a background thread
//! while the segment before it fills), and rotation renames it into place and writes its
//! header. Frames then overwrite blocks the file system has already allocated, and an
//! `fdatasync` writes data only: appending to a growing file makes every sync also commit the
//! file system's journal (the file's new size and blocks), one more write and flush (PostgreSQL
//! zero-fills its WAL segments for the same reason). Measured here (ext4, 8 KiB per sync):
//! 120-135 against 185-195 µs per `fdatasync`. The log's end is then not the file's end:
//! reading stops at the first frame that does not hold (here a zero length with a zero
//! checksum), which is the torn-tail rule above, so the unused zeros of the last segment are
//! cut off on open like a torn tail. A sealed segment has no such zeros: it is sealed once its
//! frames reach the prepared size. The segment a run begins with is the spare the last run
//! left, if it is whole, or is prepared before the log opens (one segment of writes, ~60 ms
//! here). A rotation that finds the next spare not ready yet begins a plain segment instead
//! of waiting. A spare is prepared only while the disk has [`ROOM_IN_SEGMENTS`] segments'
//! worth of space free, and a preparation that fails removes what it wrote: on a fuller disk
//! the log grows plain segments as it did before, and the spare never takes the space the
//! log's own writes need.
//!
//! Positions are log sequence numbers, `segment id << 32 | byte offset`: they grow with
//! every frame, across segments.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use super::dedupe;
use super::OutboxError;

/// A segment is sealed once it holds this many bytes (a group is never split), by default.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
const MAGIC: &[u8; 8] = b"CPOLOG01";
const HEADER: usize = 24;
const FRAME_HEAD: usize = 12;
/// Largest frame body accepted on read (a length beyond it is a torn or corrupt frame).
const MAX_FRAME: usize = 1 << 30;

pub(crate) type Lsn = u64;

pub(crate) fn lsn(segment: u64, offset: u64) -> Lsn {
    (segment << 32) | offset
}

pub(crate) fn segment_of(lsn: Lsn) -> u64 {
    lsn >> 32
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// The segment being prepared, before rotation gives it a name.
const SPARE: &str = "spare.tmp";
/// A spare is prepared only while the file system has this many segments' worth of space
/// free: on a fuller disk segments are plain, so a spare never takes the last of the space
/// the log itself needs (its writes would fail, and a failed write stops the outbox).
const ROOM_IN_SEGMENTS: u64 = 4;
/// Zeros written, and synced, at a time while preparing a spare: the disk's queue then never
/// holds more than this much of a spare ahead of a sync of the log (one `fsync` of a whole
/// 32 MiB spare at the end held the log's syncs back 40-270 ms at each rotation here).
const ZERO_CHUNK: usize = 512 * 1024;

fn corrupt(what: &'static str) -> OutboxError {
    OutboxError::Malformed {
        partition: "log",
        what,
    }
}

/// What the sync thread must make durable: sealed segments not synced yet, the active one,
/// and the folder when segments were created since the last sync.
pub(crate) struct SyncSet {
    pub(crate) sealed: Vec<Arc<File>>,
    pub(crate) active: Arc<File>,
    pub(crate) dir_dirty: bool,
}

/// The parts of the log the sync thread and the index thread share with the writer.
pub(crate) struct LogShared {
    pub(crate) dir: PathBuf,
    pub(crate) sync: Mutex<SyncSet>,
}

impl LogShared {
    /// `fdatasync` of everything written so far (every group whose write returned before this
    /// call began): sealed segments, the active one, and the folder.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let (sealed, active, dir_dirty) = {
            let mut s = self.sync.lock();
            let dirty = std::mem::take(&mut s.dir_dirty);
            (std::mem::take(&mut s.sealed), Arc::clone(&s.active), dirty)
        };
        for f in &sealed {
            f.sync_data()?;
        }
        active.sync_data()?;
        if dir_dirty {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Deletes the given segments (oldest first; the caller made sure nothing in them is
    /// needed any more) and syncs the folder.
    pub(crate) fn delete_segments(&self, ids: &[u64]) -> io::Result<()> {
        for &id in ids {
            remove_if_present(&segment_path(&self.dir, id))?;
        }
        if !ids.is_empty() {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// One frame's changes, as read back.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Frame {
    pub(crate) adds: Vec<(u64, Vec<u8>)>,
    pub(crate) removes: Vec<u64>,
    pub(crate) keys: Vec<(dedupe::Key, u64)>,
    /// Running totals as they stood after the frame's events, in the order written.
    pub(crate) totals: Vec<(Box<str>, rust_decimal::Decimal)>,
}

const ADD: u8 = 1;
const REMOVE: u8 = 2;
const KEY: u8 = 3;
const TOTAL: u8 = 4;

/// A frame being built by the writer (reused from group to group): the head's room, then the
/// entries as they are staged, each a tag and its fields, so the frame is written as it was
/// built, without a copy.
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
}

impl Default for FrameBuf {
    fn default() -> Self {
        FrameBuf {
            buf: vec![0; FRAME_HEAD],
        }
    }
}

/// Where a frame stood, to undo what was staged after it.
#[derive(Clone, Copy)]
pub(crate) struct Mark(usize);

impl FrameBuf {
    /// Adds a record, encoded by `encode` straight into the frame; returns where its bytes
    /// are in the frame (see [`FrameBuf::record`]). If it fails, the frame is left as it was.
    pub(crate) fn add_with<E>(
        &mut self,
        seq: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<std::ops::Range<usize>, E> {
        let mark = self.mark();
        self.buf.push(ADD);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        if let Err(e) = encode(&mut self.buf) {
            self.rollback(mark);
            return Err(e);
        }
        // Records are small (a charge is ~150 bytes); one over 4 GiB cannot be built.
        let len = u32::try_from(self.buf.len() - len_at - 4).unwrap_or(u32::MAX);
        self.buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        Ok(len_at + 4..self.buf.len())
    }

    /// The bytes of a record added since the frame was last cleared.
    pub(crate) fn record(&self, at: std::ops::Range<usize>) -> &[u8] {
        self.buf.get(at).unwrap_or_default()
    }

    /// Adds a record already encoded.
    pub(crate) fn add(&mut self, seq: u64, bytes: &[u8]) {
        let _ = self.add_with(seq, |b| {
            b.extend_from_slice(bytes);
            Ok::<(), ()>(())
        });
    }

    pub(crate) fn remove(&mut self, seq: u64) {
        self.buf.push(REMOVE);
        self.buf.extend_from_slice(&seq.to_le_bytes());
    }

    pub(crate) fn key(&mut self, key: &dedupe::Key, at_ms: u64) {
        self.buf.push(KEY);
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(&at_ms.to_le_bytes());
    }

    pub(crate) fn total(&mut self, key: &str, total: rust_decimal::Decimal) {
        self.buf.push(TOTAL);
        // Keys are a few ids long; one over 4 GiB cannot be built.
        let len = u32::try_from(key.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(&total.serialize());
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.len() == FRAME_HEAD
    }

    pub(crate) fn mark(&self) -> Mark {
        Mark(self.buf.len())
    }

    /// Undoes everything staged since `mark`.
    pub(crate) fn rollback(&mut self, mark: Mark) {
        self.buf.truncate(mark.0.max(FRAME_HEAD));
    }

    pub(crate) fn clear(&mut self) {
        self.buf.truncate(FRAME_HEAD);
    }

    /// The whole frame: head and body.
    fn encode(&mut self) -> &[u8] {
        let body_len = self.buf.len() - FRAME_HEAD;
        let sum = xxh3_64(&self.buf[FRAME_HEAD..]);
        self.buf[..4].copy_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
        self.buf[4..FRAME_HEAD].copy_from_slice(&sum.to_le_bytes());
        &self.buf
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

fn decode_body(body: &[u8]) -> Option<Frame> {
    let mut c = Cursor(body);
    let mut frame = Frame::default();
    while let Some(tag) = c.take(1) {
        match tag[0] {
            ADD => {
                let seq = c.u64()?;
                let len = usize::try_from(c.u32()?).ok()?;
                frame.adds.push((seq, c.take(len)?.to_vec()));
            }
            REMOVE => frame.removes.push(c.u64()?),
            KEY => {
                let key = dedupe::Key::try_from(c.take(16)?).ok()?;
                frame.keys.push((key, c.u64()?));
            }
            TOTAL => {
                let len = usize::try_from(c.u32()?).ok()?;
                let key = std::str::from_utf8(c.take(len)?).ok()?;
                let total: [u8; 16] = c.take(16)?.try_into().ok()?;
                frame
                    .totals
                    .push((key.into(), rust_decimal::Decimal::deserialize(total)));
            }
            _ => return None,
        }
    }
    Some(frame)
}

/// A segment as read on open.
pub(crate) struct Segment {
    pub(crate) id: u64,
    pub(crate) first_seq: u64,
    pub(crate) frames: Vec<Frame>,
    /// Where its valid frames end.
    pub(crate) end: u64,
}

fn header(first_seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    let sum = xxh3_64(&h[..16]);
    h[16..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Reads one segment's valid frames: `None` if its header is torn (a segment created just
/// before a crash), else the segment and whether bytes follow its last valid frame.
fn read_segment(id: u64, bytes: &[u8]) -> Option<(Segment, bool)> {
    let valid_header = bytes.len() >= HEADER
        && &bytes[..8] == MAGIC
        && bytes[16..HEADER] == xxh3_64(&bytes[..16]).to_le_bytes();
    if !valid_header {
        return None;
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[8..16]);
    let mut seg = Segment {
        id,
        first_seq: u64::from_le_bytes(first),
        frames: Vec::new(),
        end: HEADER as u64,
    };
    let mut at = HEADER;
    while at < bytes.len() {
        let frame = (|| {
            let mut c = Cursor(&bytes[at..]);
            let len = usize::try_from(c.u32()?).ok()?;
            let sum = c.u64()?;
            if len > MAX_FRAME {
                return None;
            }
            let body = c.take(len)?;
            (xxh3_64(body) == sum).then_some(())?;
            Some((decode_body(body)?, FRAME_HEAD + len))
        })();
        let Some((frame, size)) = frame else {
            break;
        };
        seg.frames.push(frame);
        at += size;
    }
    seg.end = at as u64;
    Some((seg, at < bytes.len()))
}

/// The writer's end of the log. Owned by the commit (used under its lock).
pub(crate) struct Log {
    shared: Arc<LogShared>,
    active: Arc<File>,
    id: u64,
    offset: u64,
    frame: FrameBuf,
    segment_bytes: u64,
    /// The spare segment being prepared, if preallocation is on.
    spare: Option<Spare>,
}

/// A spare segment prepared by a background thread (see the module docs).
struct Spare {
    path: PathBuf,
    size: u64,
    /// Set when the log is dropped: the thread stops before its next chunk.
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<File>>>,
}

impl Spare {
    fn new(dir: &Path, size: u64) -> Self {
        let mut spare = Spare {
            path: dir.join(SPARE),
            size,
            cancel: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        spare.start();
        spare
    }

    /// At open: the spare the last run left if it has the full size (it only ever holds
    /// zeros, and perhaps a header about to be overwritten), else one prepared now if the
    /// disk has room for it; `None` if not (the run begins on a plain segment).
    fn at_open(dir: &Path, size: u64) -> io::Result<Option<File>> {
        let path = dir.join(SPARE);
        let left = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) if file.metadata()?.len() == size => Some(file),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        match left {
            // Its last run may have died before the sync.
            Some(file) => file.sync_all().map(|()| Some(file)),
            None if has_room(dir, size) => {
                prepare_spare(&path, size, &AtomicBool::new(false)).map(Some)
            }
            None => {
                // A partial spare of the last run holds space the log may need.
                remove_if_present(&path)?;
                Ok(None)
            }
        }
    }

    /// Begins preparing the next spare, if the disk has room for it. Without room, or if the
    /// thread cannot be spawned, the log stays on plain segments until the next rotation
    /// tries again.
    fn start(&mut self) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        if !has_room(dir, self.size) {
            tracing::debug!("too little free disk for a spare log segment");
            return;
        }
        let (path, size, cancel) = (self.path.clone(), self.size, Arc::clone(&self.cancel));
        let spawned = std::thread::Builder::new()
            .name("outbox-spare".into())
            .spawn(move || {
                super::store::lower_priority();
                prepare_spare(&path, size, &cancel)
            });
        match spawned {
            Ok(thread) => self.thread = Some(thread),
            Err(e) => tracing::warn!(error = %e, "could not start preparing a log segment"),
        }
    }

    /// The prepared spare, if its thread has finished (the caller renames it, then starts the
    /// next one); never waits. A failed preparation is logged and another one begun.
    fn take_ready(&mut self) -> Option<File> {
        if !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            if self.thread.is_none() {
                self.start();
            }
            return None;
        }
        let outcome = self.thread.take().map(JoinHandle::join);
        match outcome {
            Some(Ok(Ok(file))) => return Some(file),
            Some(Ok(Err(e))) => tracing::warn!(error = %e, "could not prepare a log segment"),
            Some(Err(_)) => tracing::warn!("the thread preparing a log segment panicked"),
            None => {}
        }
        self.start();
        None
    }

    #[cfg(test)]
    fn is_ready(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.is_finished())
    }
}

impl Drop for Spare {
    /// Stops the thread (within one chunk) and waits for it, so nothing writes to the
    /// folder once the log is gone.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether the file system holding `dir` has room for a spare of `size` bytes and then some
/// (see [`ROOM_IN_SEGMENTS`]). Unknown counts as no room.
fn has_room(dir: &Path, size: u64) -> bool {
    rustix::fs::statvfs(dir).is_ok_and(|st| {
        st.f_bavail.saturating_mul(st.f_frsize) >= size.saturating_mul(ROOM_IN_SEGMENTS)
    })
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `size` zero bytes to a new file at `path`, a chunk at a time, and syncs it (data,
/// size and the allocation of its blocks). On any failure (a full disk, the log closing) the
/// partial file is removed, so it holds no space the log needs.
fn prepare_spare(path: &Path, size: u64, cancel: &AtomicBool) -> io::Result<File> {
    let prepared = write_zeros(path, size, cancel);
    if prepared.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = remove_if_present(path);
    }
    prepared
}

fn write_zeros(path: &Path, size: u64, cancel: &AtomicBool) -> io::Result<File> {
    let closed = || io::Error::new(io::ErrorKind::Interrupted, "log closed");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = 0u64;
    while at < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(closed());
        }
        let n = usize::try_from(size - at).map_or(ZERO_CHUNK, |left| left.min(ZERO_CHUNK));
        file.write_all_at(&zeros[..n], at)?;
        file.sync_data()?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

impl Log {
    /// Opens (creating) the log in `dir`, reads every segment in order, truncates a torn tail,
    /// and starts a new segment for this run whose header records `next_seq`, a bound on
    /// every seq the log ever held (seqs are never reused, even once their segments are gone).
    /// `next_seq` is given the seqs the caller knows of besides the log (dead letters).
    /// With `preallocate`, a spare segment is prepared from now on (see the module docs).
    pub(crate) fn open(
        dir: &Path,
        segment_bytes: u64,
        preallocate: bool,
        next_seq: impl FnOnce(u64) -> u64,
    ) -> Result<(Log, Vec<Segment>, u64), OutboxError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(OutboxError::Io)?;
            // The folder itself must survive a power loss along with what goes into it.
            if let Some(parent) = dir.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(OutboxError::Io)?;
            }
        }
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(OutboxError::Io)? {
            let name = entry.map_err(OutboxError::Io)?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut read = Vec::with_capacity(ids.len());
        for &id in &ids {
            let path = segment_path(dir, id);
            let bytes = std::fs::read(&path).map_err(OutboxError::Io)?;
            read.push((path, read_segment(id, &bytes)));
        }
        // The log ends in the last segment holding a frame. A crash can tear its tail, or
        // leave a newer segment (begun at rotation) with a torn header or nothing in it; an
        // acknowledged frame in a newer segment implies a completed sync of the older ones.
        // Damage before that point is corruption.
        let last_full = read
            .iter()
            .rposition(|(_, r)| matches!(r, Some((seg, _)) if !seg.frames.is_empty()));
        let newest = read.len().checked_sub(1);
        let mut segments = Vec::with_capacity(read.len());
        let mut log_next_seq = 0u64;
        for (i, (path, seg)) in read.into_iter().enumerate() {
            let at_end = last_full.is_none_or(|l| i >= l);
            let Some((seg, torn)) = seg else {
                if !at_end {
                    return Err(corrupt("segment header"));
                }
                std::fs::remove_file(&path).map_err(OutboxError::Io)?;
                continue;
            };
            if torn && !at_end {
                return Err(corrupt("frame in a sealed segment"));
            }
            log_next_seq = log_next_seq.max(seg.first_seq);
            for f in &seg.frames {
                for (seq, _) in &f.adds {
                    log_next_seq = log_next_seq.max(seq + 1);
                }
            }
            if torn || Some(i) == newest {
                // Sealed from now on: cut a torn tail off, and sync it (a run ended by a kill
                // left its last writes unsynced).
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(OutboxError::Io)?;
                if torn {
                    f.set_len(seg.end).map_err(OutboxError::Io)?;
                }
                f.sync_all().map_err(OutboxError::Io)?;
            }
            segments.push(seg);
        }
        let next_seq = next_seq(log_next_seq);
        let id = segments.last().map_or(1, |s| s.id + 1);
        let prepared = if preallocate {
            Spare::at_open(dir, segment_bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not prepare a log segment; this run begins on a plain one");
                None
            })
        } else {
            remove_if_present(&dir.join(SPARE)).map_err(OutboxError::Io)?;
            None
        };
        let file = match prepared {
            Some(file) => {
                file.write_all_at(&header(next_seq), 0)
                    .map_err(OutboxError::Io)?;
                std::fs::rename(dir.join(SPARE), segment_path(dir, id)).map_err(OutboxError::Io)?;
                file
            }
            None => create_segment(dir, id, next_seq)?,
        };
        // The new segment must exist after a crash before anything is written to it.
        file.sync_all().map_err(OutboxError::Io)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(OutboxError::Io)?;
        let active = Arc::new(file);
        let shared = Arc::new(LogShared {
            dir: dir.to_path_buf(),
            sync: Mutex::new(SyncSet {
                sealed: Vec::new(),
                active: Arc::clone(&active),
                dir_dirty: false,
            }),
        });
        Ok((
            Log {
                shared,
                active,
                id,
                offset: HEADER as u64,
                frame: FrameBuf::default(),
                segment_bytes,
                spare: preallocate.then(|| Spare::new(dir, segment_bytes)),
            },
            segments,
            next_seq,
        ))
    }

    pub(crate) fn shared(&self) -> &Arc<LogShared> {
        &self.shared
    }

    /// The frame of the group being staged.
    pub(crate) fn frame(&mut self) -> &mut FrameBuf {
        &mut self.frame
    }

    /// The segment the next frame goes to.
    pub(crate) fn segment(&self) -> u64 {
        self.id
    }

    /// Where the next frame will start.
    pub(crate) fn position(&self) -> Lsn {
        lsn(self.id, self.offset)
    }

    /// Writes the staged frame (to the OS, not synced) and clears it; returns the position
    /// where it ends. Seals the segment afterwards if it is full; the new one's header
    /// records `next_seq`. An error leaves an unknown part of the frame in the file: the
    /// caller must write nothing more (the outbox is poisoned).
    pub(crate) fn write(&mut self, next_seq: u64) -> io::Result<Lsn> {
        let bytes = self.frame.encode();
        self.active.write_all_at(bytes, self.offset)?;
        self.offset += bytes.len() as u64;
        self.frame.clear();
        let end = lsn(self.id, self.offset);
        if self.offset >= self.segment_bytes {
            self.rotate(next_seq)?;
        }
        Ok(end)
    }

    /// Seals the active segment and starts the next one, the spare if one is ready; the sync
    /// thread syncs both (and the folder) before it answers for anything written later.
    fn rotate(&mut self, next_seq: u64) -> io::Result<()> {
        let id = self.id + 1;
        let path = segment_path(&self.shared.dir, id);
        let prepared = self.spare.as_mut().and_then(Spare::take_ready);
        let file = match prepared {
            Some(file) => {
                // Header first: a crash before the rename leaves only a spare, which the next
                // open uses (overwriting the header) or prepares again.
                file.write_all_at(&header(next_seq), 0)?;
                std::fs::rename(self.shared.dir.join(SPARE), &path)?;
                if let Some(spare) = self.spare.as_mut() {
                    spare.start();
                }
                file
            }
            None => {
                tracing::debug!(
                    segment = id,
                    "no spare log segment ready, a plain one begun"
                );
                create_segment(&self.shared.dir, id, next_seq).map_err(|e| match e {
                    OutboxError::Io(e) => e,
                    other => io::Error::other(other.to_string()),
                })?
            }
        };
        let file = Arc::new(file);
        {
            let mut s = self.shared.sync.lock();
            let old = std::mem::replace(&mut s.active, Arc::clone(&file));
            s.sealed.push(old);
            s.dir_dirty = true;
        }
        self.active = file;
        self.id = id;
        self.offset = HEADER as u64;
        Ok(())
    }
}

fn create_segment(dir: &Path, id: u64, first_seq: u64) -> Result<File, OutboxError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(segment_path(dir, id))
        .map_err(OutboxError::Io)?;
    file.write_all_at(&header(first_seq), 0)
        .map_err(OutboxError::Io)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (Log, Vec<Segment>, u64) {
        Log::open(dir, 4 * 1024 * 1024, false, |n| n).unwrap()
    }

    /// Opens with preallocated segments of `size` bytes.
    fn open_prepared(dir: &Path, size: u64) -> (Log, Vec<Segment>, u64) {
        Log::open(dir, size, true, |n| n).unwrap()
    }

    fn key(b: u8) -> dedupe::Key {
        [b; 16]
    }

    /// Writes a frame adding `seq` ("kept") and one adding `seq + 1` ("torn"), then cuts `cut`
    /// bytes off the second, as a crash during its write would.
    fn kept_then_torn(dir: &Path, seq: u64, cut: u64) {
        let (mut log, _, _) = open(dir);
        log.frame().add(seq, b"kept");
        log.write(seq + 1).unwrap();
        log.frame().add(seq + 1, b"torn");
        log.write(seq + 2).unwrap();
        let path = segment_path(dir, log.segment());
        drop(log);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - cut).unwrap();
    }

    /// The seqs of every record added, in log order.
    fn added_seqs(segs: &[Segment]) -> Vec<u64> {
        segs.iter()
            .flat_map(|s| &s.frames)
            .flat_map(|f| f.adds.iter().map(|(s, _)| *s))
            .collect()
    }

    #[test]
    fn frames_come_back_in_order_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, segs, next) = open(dir.path());
        assert!(segs.is_empty());
        assert_eq!(next, 0);
        log.frame().add(0, b"zero");
        log.frame().add(1, b"one");
        log.frame().key(&key(7), 42);
        log.frame().total("k", rust_decimal::Decimal::new(15, 1));
        log.write(2).unwrap();
        log.frame().remove(0);
        log.write(2).unwrap();
        drop(log);
        let (_log, segs, next) = open(dir.path());
        assert_eq!(next, 2);
        assert_eq!(segs.len(), 1);
        let f = &segs[0].frames;
        assert_eq!(
            f[0],
            Frame {
                adds: vec![(0, b"zero".to_vec()), (1, b"one".to_vec())],
                removes: vec![],
                keys: vec![(key(7), 42)],
                totals: vec![("k".into(), rust_decimal::Decimal::new(15, 1))],
            }
        );
        assert_eq!(f[1].removes, vec![0]);
    }

    #[test]
    fn a_torn_tail_ends_the_newest_segment_and_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        kept_then_torn(dir.path(), 5, 3);
        let (mut log, segs, next) = open(dir.path());
        let frames: Vec<_> = segs.iter().flat_map(|s| &s.frames).collect();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].adds, vec![(5, b"kept".to_vec())]);
        // The header of the empty segment the torn run began keeps the seq bound.
        assert_eq!(next, 6);
        // Writing goes on after the cut without a gap of garbage.
        log.frame().add(9, b"after");
        log.write(10).unwrap();
        drop(log);
        let (_, segs, _) = open(dir.path());
        let adds = added_seqs(&segs);
        assert_eq!(adds, vec![5, 9]);
    }

    #[test]
    fn a_flipped_bit_in_the_newest_segment_ends_it_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path());
        log.frame().add(1, b"first");
        log.write(2).unwrap();
        let mid = log.offset;
        log.frame().add(2, b"second");
        log.write(3).unwrap();
        let path = segment_path(dir.path(), log.segment());
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = usize::try_from(mid).unwrap() + FRAME_HEAD + 2;
        bytes[i] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, segs, _) = open(dir.path());
        let adds = added_seqs(&segs);
        assert_eq!(adds, vec![1]);
    }

    #[test]
    fn corruption_in_a_sealed_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path());
        log.frame().add(1, b"first");
        log.write(2).unwrap();
        let path = segment_path(dir.path(), log.segment());
        drop(log);
        // Reopening starts a newer segment, so this one is sealed now; a frame goes there.
        let (mut log, _, _) = open(dir.path());
        log.frame().add(2, b"second");
        log.write(3).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Log::open(dir.path(), SEGMENT_BYTES, false, |n| n),
            Err(OutboxError::Malformed {
                partition: "log",
                ..
            })
        ));
    }

    /// A crash right after a rotation: the sealed segment's tail is torn and the new segment
    /// holds nothing valid (here: a torn header). The log ends at the last whole frame.
    #[test]
    fn a_torn_tail_before_a_rotation_ends_the_log_there() {
        let dir = tempfile::tempdir().unwrap();
        kept_then_torn(dir.path(), 1, 2);
        // What rotation had begun: a newer segment whose header did not reach the disk.
        let newer = segment_path(dir.path(), 99);
        std::fs::write(&newer, b"CPOL").unwrap();
        let (_, segs, next) = open(dir.path());
        let adds = added_seqs(&segs);
        assert_eq!(adds, vec![1]);
        assert_eq!(next, 2);
        assert!(!newer.exists(), "the torn newer segment is removed");
    }

    #[test]
    fn full_segments_are_sealed_and_the_sync_set_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path());
        let first = log.segment();
        let big = vec![7u8; 1024 * 1024];
        let mut seq = 0;
        while log.segment() == first {
            log.frame().add(seq, &big);
            seq += 1;
            log.write(seq).unwrap();
        }
        {
            let s = log.shared().sync.lock();
            assert_eq!(s.sealed.len(), 1);
            assert!(s.dir_dirty);
        }
        log.shared().sync().unwrap();
        {
            let s = log.shared().sync.lock();
            assert!(s.sealed.is_empty());
            assert!(!s.dir_dirty);
        }
        drop(log);
        let (_, segs, next) = open(dir.path());
        assert_eq!(next, seq);
        let n: usize = segs.iter().map(|s| s.frames.len()).sum();
        assert_eq!(n, usize::try_from(seq).unwrap());
    }

    #[test]
    fn seqs_are_never_reused_after_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path());
        log.frame().add(41, b"x");
        log.write(42).unwrap();
        let old = log.segment();
        drop(log);
        let (log, _, next) = open(dir.path());
        assert_eq!(next, 42);
        log.shared().delete_segments(&[old]).unwrap();
        drop(log);
        let (_, segs, next) = open(dir.path());
        assert!(segs.iter().all(|s| s.frames.is_empty()));
        assert_eq!(next, 42, "the newer segment's header keeps the bound");
    }

    /// Waits until the spare being prepared is ready (a test only: the writer never waits).
    fn wait_for_spare(log: &Log) {
        let spare = log.spare.as_ref().unwrap();
        for _ in 0..10_000 {
            if spare.is_ready() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no spare prepared in 10 s");
    }

    fn file_len(dir: &Path, id: u64) -> u64 {
        std::fs::metadata(segment_path(dir, id)).unwrap().len()
    }

    #[test]
    fn a_preallocated_segment_is_written_in_place_and_its_zeros_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 1024;
        let (mut log, _, _) = open_prepared(dir.path(), size);
        let id = log.segment();
        assert_eq!(
            file_len(dir.path(), id),
            size,
            "prepared before the first frame"
        );
        log.frame().add(0, b"zero");
        log.write(1).unwrap();
        log.frame().add(1, b"one");
        log.write(2).unwrap();
        assert_eq!(file_len(dir.path(), id), size, "written in place");
        let end = log.offset;
        assert!(end < size);
        drop(log);
        let (_, segs, next) = open(dir.path());
        assert_eq!(added_seqs(&segs), vec![0, 1]);
        assert_eq!(next, 2);
        assert_eq!(
            file_len(dir.path(), id),
            end,
            "the unused zeros are cut off"
        );
    }

    /// Sealed prepared segments hold frames up to their end: reading them back is not
    /// mistaken for a torn tail in the middle of the log.
    #[test]
    fn prepared_segments_seal_full_and_read_back_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * 1024;
        let (mut log, _, _) = open_prepared(dir.path(), size);
        let first = log.segment();
        let record = vec![5u8; 1000];
        let mut seq = 0;
        while log.segment() < first + 4 {
            wait_for_spare(&log);
            log.frame().add(seq, &record);
            seq += 1;
            log.write(seq).unwrap();
        }
        for id in first..first + 4 {
            let len = file_len(dir.path(), id);
            assert!(len >= size && len < size + 1100, "sealed at {len}");
        }
        assert_eq!(
            file_len(dir.path(), first + 4),
            size,
            "the next one is prepared too"
        );
        drop(log);
        let (_, segs, next) = open(dir.path());
        assert_eq!(added_seqs(&segs), (0..seq).collect::<Vec<_>>());
        assert_eq!(next, seq);
    }

    /// A crash in the middle of a frame in a prepared segment leaves the frame's start
    /// followed by zeros: the log ends before it.
    #[test]
    fn a_torn_frame_in_a_prepared_segment_ends_the_log_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open_prepared(dir.path(), 64 * 1024);
        log.frame().add(1, b"kept");
        log.write(2).unwrap();
        let torn_at = log.offset;
        log.frame().add(2, &[9u8; 300]);
        log.write(3).unwrap();
        let path = segment_path(dir.path(), log.segment());
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let from = usize::try_from(torn_at).unwrap() + 100;
        bytes[from..from + 212].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let (mut log, segs, _) = open_prepared(dir.path(), 64 * 1024);
        assert_eq!(added_seqs(&segs), vec![1]);
        log.frame().add(7, b"after");
        log.write(8).unwrap();
        drop(log);
        let (_, segs, _) = open(dir.path());
        assert_eq!(added_seqs(&segs), vec![1, 7]);
    }

    #[test]
    fn a_spare_whose_preparation_fails_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPARE);
        let err = prepare_spare(&path, 4 * 1024 * 1024, &AtomicBool::new(true)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert!(!path.exists());
        assert!(has_room(dir.path(), 1024));
        assert!(
            !has_room(dir.path(), u64::MAX / 2),
            "no disk has room for this"
        );
    }

    /// A run leaves its spare behind; the next run begins on it if it is whole, prepares a
    /// new one if not (a crash while preparing), and without preallocation deletes it.
    #[test]
    fn the_spare_a_run_leaves_is_used_if_whole() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 1024;
        let (log, _, _) = open_prepared(dir.path(), size);
        wait_for_spare(&log);
        drop(log);
        let spare = dir.path().join(SPARE);
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let left = inode(&spare);
        let (log, _, _) = open_prepared(dir.path(), size);
        assert_eq!(inode(&segment_path(dir.path(), log.segment())), left);
        drop(log);

        std::fs::write(&spare, b"half a spare").unwrap();
        let (log, _, _) = open_prepared(dir.path(), size);
        assert_eq!(file_len(dir.path(), log.segment()), size);
        let bytes = std::fs::read(segment_path(dir.path(), log.segment())).unwrap();
        assert!(bytes[HEADER..].iter().all(|&b| b == 0));
        drop(log);

        std::fs::write(&spare, b"half a spare").unwrap();
        drop(open(dir.path()));
        assert!(!spare.exists());
    }
}
