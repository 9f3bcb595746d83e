//! The dedupe index: which (tenant, event id) pairs were durably accepted, for how long.
//!
//! The index is the `dedupe` partition itself, not a heap map: a 7-day window at production
//! rates is hundreds of millions of ids, which must not live in RAM. Lookups are point reads
//! on the LSM tree (memtable, then bloom-filtered segments), done by the writer under the
//! commit lock, so a lookup and the write that claims the id are never interleaved with
//! another group.
//!
//! Keys are the first 16 bytes of SHA-256 over `u32 BE len(tenant) ++ tenant ++ event id`:
//! fixed size whatever the ids' lengths, and uniformly spread, so the memtable's comparisons
//! stop at the first bytes instead of walking a tenant prefix every id shares (the profile of
//! the request path showed those comparisons as the largest cost of a lookup). Two distinct
//! pairs collide with probability about n² / 2¹²⁹: below 10⁻²⁰ for a billion remembered ids.
//!
//! Memory per remembered id: while an id is in the active memtable it costs 16 bytes of key +
//! 8 bytes of value + ~40 bytes of skiplist overhead; once flushed, about 10 bits of fjall's
//! bloom filter per key plus whatever of it sits in the (bounded) block cache; and about 20
//! bits of the [`SeenFilter`] (below), which is capped at [`SeenFilter::MAX_BYTES`]. On disk:
//! about 24 bytes per id before compression.
//!
//! Almost every id looked up is new, and a point read of a new id still searches the
//! memtables (skiplists of tens of thousands of entries: cache misses at every level; the
//! profile showed it as a fifth of the CPU of a 100-event request). So the commit keeps a
//! [`SeenFilter`]: a bloom filter over every key in the partition, which answers "certainly
//! not seen" for almost all new ids without touching the tree; a "maybe" is read from the tree
//! as before. It is built by the pruning pass (which reads every entry anyway) from the entries
//! the pass keeps, the keys not yet indexed when it starts (see the `index` module) and every
//! key staged while it runs, and replaces the previous one when the
//! pass ends; until the first pass after open has ended, every lookup reads the tree. A filter
//! has no false negatives; a false positive only costs the read it would have cost anyway.
//!
//! Expiry: an entry older than the window no longer counts as seen (checked on lookup, so the
//! window is exact). Pruning (which only bounds the disk) walks the partition with a cursor,
//! a bounded chunk at a time between commit groups, deleting entries older than the window; a
//! re-accepted expired id overwrites its entry with the new time.
//!
//! A pass reads the whole partition, so it runs only when it has something to do
//! ([`SeenFilter::pass_due`]): when some entry may have expired (the last pass learned how old
//! the oldest entry can be), or when the filter has grown to [`SeenFilter::REBUILD_AT_LAYERS`]
//! layers (each a cache miss per lookup; the index grew ~8x since the filter was sized, so the
//! passes cost a constant per key inserted). A pass every minute regardless, as before, was a
//! scan of days of ids without end, and in the load test took 40% off 100-event requests
//! while it ran.

use std::ops::Bound;
use std::time::Duration;

use fjall::Batch;
use sha2::{Digest, Sha256};

use super::store::Store;
use super::OutboxError;
use crate::domain::{EventId, TenantId};

/// Most entries looked at in one pruning step, so pruning never stalls appends long.
pub(crate) const PRUNE_CHUNK: usize = 2_000;

/// A dedupe key (see the module docs).
pub(crate) type Key = [u8; 16];

/// Sets and maps of dedupe keys hash with foldhash (seeded per process), not SipHash: SipHash
/// over the group's keys was ~5% of a 100-event request.
pub(crate) type KeySet = std::collections::HashSet<Key, foldhash::fast::RandomState>;
pub(crate) type KeyMap<V> = std::collections::HashMap<Key, V, foldhash::fast::RandomState>;

pub(crate) fn key(tenant: &TenantId, event: &EventId) -> Key {
    let (t, e) = (tenant.as_str().as_bytes(), event.as_str().as_bytes());
    let mut h = Sha256::new();
    // Tenant ids are short configured names; saturate rather than wrap on absurd input.
    h.update(u32::try_from(t.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(t);
    h.update(e);
    let digest: [u8; 32] = h.finalize().into();
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

fn accepted_at(value: &[u8]) -> u64 {
    // An unreadable timestamp errs on the side of "seen" (and is never pruned).
    value.try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX)
}

/// Where a pruning pass stands: the last key looked at, `None` before the first step.
#[derive(Default)]
pub(crate) struct PruneCursor {
    after: Option<Key>,
    /// The oldest acceptance time (ms) seen so far in the pass: of the entries it keeps, of
    /// the keys not indexed yet when it began, and the pass's start.
    oldest_ms: Option<u64>,
}

impl PruneCursor {
    /// Whether the next step begins a pass.
    pub(crate) fn at_start(&self) -> bool {
        self.after.is_none()
    }

    /// Counts keys the partition will hold that the pass may not read (written but not
    /// indexed when it began), with their acceptance times.
    pub(crate) fn also_holds(&mut self, accepted_ms: impl Iterator<Item = u64>) {
        for at in accepted_ms {
            self.saw(at);
        }
    }

    fn saw(&mut self, at_ms: u64) {
        self.oldest_ms = Some(self.oldest_ms.map_or(at_ms, |o| o.min(at_ms)));
    }
}

/// Slack on the oldest acceptance time a pass learned, for a wall clock stepped backwards.
const CLOCK_SLACK_MS: u64 = 60_000;

/// 512 bits: one cache line, the unit a key's probes stay within.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u64; 8]);

/// A blocked bloom filter over dedupe keys: a key's probes all fall in one 64-byte block, so
/// a lookup or insert touches one cache line (a classic filter touches one per probe, and at
/// megabytes those are cache misses on the request path). Keys are uniform hashes already, so
/// the block comes from the key's first half and the probe positions from its second, without
/// hashing again.
struct Bloom {
    blocks: Vec<Block>,
    /// Number of blocks minus one (the block count is a power of two).
    mask: u64,
    /// Keys inserted, and how many it is sized for (20 bits each: ~0.1% false positives).
    count: u64,
    capacity: u64,
}

impl Bloom {
    const PROBES: u32 = 7;
    const BITS_PER_KEY: u64 = 20;
    /// The smallest filter: 1 MiB (~419k keys). Every layer is one more cache miss per
    /// lookup of a new key; starting at 16 KiB, a proxy that took 3 million events in a minute
    /// looked up 10 layers, and its 100-event requests ran ~8% slower.
    const MIN_KEYS: u64 = 1 << 18;
    const BLOCK_BITS: u64 = 512;

    /// Room for `keys` (rounded up to a power of two blocks), at most `max_bytes` (but one
    /// block at least).
    fn for_keys(keys: u64, max_bytes: usize) -> Bloom {
        // The largest power of two number of blocks within `max_bytes`.
        let max_blocks = 1u64
            << (63
                - (max_bytes as u64 * 8 / Self::BLOCK_BITS)
                    .max(1)
                    .leading_zeros());
        let blocks = keys
            .max(Self::MIN_KEYS)
            .saturating_mul(Self::BITS_PER_KEY)
            .div_ceil(Self::BLOCK_BITS)
            .checked_next_power_of_two()
            .unwrap_or(max_blocks)
            .min(max_blocks);
        Bloom {
            blocks: vec![Block([0; 8]); usize::try_from(blocks).unwrap_or(usize::MAX)],
            mask: blocks - 1,
            count: 0,
            capacity: blocks * Self::BLOCK_BITS / Self::BITS_PER_KEY,
        }
    }

    /// The block of `key` and the bits within it: ([word index, bit mask] per probe).
    fn probes(key: &Key, mask: u64) -> (usize, impl Iterator<Item = (usize, u64)>) {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&key[..8]);
        hi.copy_from_slice(&key[8..]);
        let block = (u64::from_le_bytes(lo) & mask) as usize;
        // Seven independent 9-bit positions (0..512) from the second half's 63 low bits.
        let bits = u64::from_le_bytes(hi);
        let probes = (0..Self::PROBES).map(move |i| {
            let bit = (bits >> (9 * i)) & (Self::BLOCK_BITS - 1);
            ((bit / 64) as usize, 1u64 << (bit % 64))
        });
        (block, probes)
    }

    fn insert(&mut self, key: &Key) {
        let (block, probes) = Self::probes(key, self.mask);
        if let Some(Block(words)) = self.blocks.get_mut(block) {
            for (word, bit) in probes {
                words[word] |= bit;
            }
        }
        self.count += 1;
    }

    fn may_contain(&self, key: &Key) -> bool {
        let (block, mut probes) = Self::probes(key, self.mask);
        // A block out of range cannot happen (the mask is the block count minus one); were it
        // to, "maybe" keeps the filter free of false negatives.
        self.blocks
            .get(block)
            .is_none_or(|Block(words)| probes.all(|(word, bit)| words[word] & bit != 0))
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
    }

    /// The first word of `key`'s block (a load of its cache line).
    fn touch(&self, key: &Key) -> u64 {
        let (block, _) = Self::probes(key, self.mask);
        self.blocks.get(block).map_or(0, |Block(words)| words[0])
    }
}

/// A filter that grows: when its newest bloom is full, keys go to a new one twice its size
/// (a scalable bloom filter), so a partition growing between two pruning passes does not
/// saturate it. Lookups check every layer; a pass replaces them all by one of the right size.
struct Layers(Vec<Bloom>);

impl Layers {
    fn for_keys(keys: u64) -> Layers {
        Layers(vec![Bloom::for_keys(keys, SeenFilter::MAX_BYTES)])
    }

    fn insert(&mut self, key: &Key) {
        if let Some(last) = self.0.last().filter(|l| l.count >= l.capacity) {
            let grown = last.bytes() * 2;
            if self.bytes() + grown <= SeenFilter::MAX_BYTES {
                self.0.push(Bloom::for_keys(last.capacity * 2, grown));
            }
        }
        // At the memory cap the newest layer just fills up (more false positives, never a
        // false negative).
        if let Some(last) = self.0.last_mut() {
            last.insert(key);
        }
    }

    fn may_contain(&self, key: &Key) -> bool {
        self.0.iter().any(|b| b.may_contain(key))
    }

    fn bytes(&self) -> usize {
        self.0.iter().map(Bloom::bytes).sum()
    }
}

/// The filter of the commit (see the module docs): the one in use, and the one the pruning
/// pass in progress is building.
#[derive(Default)]
pub(crate) struct SeenFilter {
    current: Option<Layers>,
    building: Option<Layers>,
    /// No entry of the partition was accepted before this (ms), as of the last complete pass
    /// (entries written since are newer).
    oldest_ms: Option<u64>,
}

impl SeenFilter {
    /// A filter grown to this many layers is rebuilt by a pass (see the module docs).
    pub(crate) const REBUILD_AT_LAYERS: usize = 4;

    /// Whether a pruning pass has work: no filter yet, a filter of too many layers, or an
    /// entry that may have expired.
    pub(crate) fn pass_due(&self, now_ms: u64, window: Duration) -> bool {
        let Some(Layers(layers)) = &self.current else {
            return true;
        };
        layers.len() >= Self::REBUILD_AT_LAYERS
            || self
                .oldest_ms
                .is_none_or(|oldest| oldest.saturating_add(window_ms(window)) < now_ms)
    }

    /// The most one filter takes (16 MiB: ~6.7 million ids at 20 bits each; more ids only
    /// raise the false-positive rate). Two exist while a pass runs.
    pub(crate) const MAX_BYTES: usize = 16 * 1024 * 1024;

    /// False only if `key` is certainly not in the partition.
    pub(crate) fn may_contain(&self, key: &Key) -> bool {
        self.current.as_ref().is_none_or(|l| l.may_contain(key))
    }

    /// Loads the blocks the lookups of `keys` will read. A lookup branches on its load, so
    /// lookups one after the other mostly wait for one cache miss at a time (the filter is
    /// megabytes); these loads depend on nothing and overlap, so the lookups that follow
    /// find their blocks in cache (a 100-event request waited ~5% of its time on them).
    /// During a pass, new keys are also inserted into the filter it builds: its blocks too.
    pub(crate) fn warm<'a>(&self, keys: impl Iterator<Item = &'a Key>) {
        let blooms: Vec<&Bloom> = [&self.current, &self.building]
            .into_iter()
            .flatten()
            .flat_map(|Layers(layers)| layers)
            .collect();
        let mut seen = 0u64;
        for key in keys {
            for bloom in &blooms {
                seen ^= bloom.touch(key);
            }
        }
        std::hint::black_box(seen);
    }

    /// A key about to be written to the partition.
    pub(crate) fn insert(&mut self, key: &Key) {
        for layers in [&mut self.current, &mut self.building]
            .into_iter()
            .flatten()
        {
            layers.insert(key);
        }
    }

    /// Heap bytes of the filters.
    pub(crate) fn bytes(&self) -> usize {
        [&self.current, &self.building]
            .into_iter()
            .flatten()
            .map(Layers::bytes)
            .sum()
    }
}

impl Store {
    /// Whether `key` was accepted (durably: only committed batches are visible) within the
    /// window ending at `now_ms`.
    pub(crate) fn is_seen(
        &self,
        key: &Key,
        now_ms: u64,
        window: Duration,
    ) -> Result<bool, OutboxError> {
        let Some(v) = self.dedupe.get(key)? else {
            return Ok(false);
        };
        Ok(accepted_at(&v).saturating_add(window_ms(window)) >= now_ms)
    }

    /// Adds the dedupe entry of an accepted event to `batch`.
    pub(crate) fn stage_seen(&self, batch: &mut Batch, key: &Key, at_ms: u64) {
        batch.insert(&self.dedupe, key.to_vec(), at_ms.to_be_bytes().to_vec());
    }

    /// One pruning step: looks at up to `chunk` entries after the cursor and deletes those
    /// older than the window. Losing a pruning batch in a crash is harmless (it is redone), so
    /// it is written without a sync. Returns how many ids were forgotten and whether the pass
    /// reached the end of the partition (the cursor is then reset for the next pass).
    ///
    /// The pass also builds the next [`SeenFilter`]: from the entries it keeps (plus, through
    /// [`SeenFilter::insert`], the keys staged while it runs); it is put in use when the pass
    /// ends.
    pub(crate) fn prune_dedupe_step(
        &self,
        cursor: &mut PruneCursor,
        now_ms: u64,
        window: Duration,
        chunk: usize,
        filter: &mut SeenFilter,
    ) -> Result<(usize, bool), OutboxError> {
        if cursor.after.is_none() {
            // A new pass: size the next filter for what the partition holds now, twice over
            // (it grows by layers if that is not enough before the next pass).
            let keys = u64::try_from(self.dedupe.approximate_len()).unwrap_or(u64::MAX);
            filter.building = Some(Layers::for_keys(keys.saturating_mul(2)));
            cursor.saw(now_ms);
        }
        let cutoff = now_ms.saturating_sub(window_ms(window));
        let mut batch = self.batch();
        let mut forgotten = 0;
        let mut seen = 0;
        let from = match cursor.after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Unbounded,
        };
        let range = self.dedupe.range::<Vec<u8>, _>((from, Bound::Unbounded));
        let mut last = None;
        for kv in range.take(chunk) {
            let (k, v) = kv?;
            seen += 1;
            let key = Key::try_from(k.as_ref()).ok();
            let at = accepted_at(&v);
            if at < cutoff {
                batch.remove(&self.dedupe, k.to_vec());
                forgotten += 1;
            } else {
                cursor.saw(at);
                if let (Some(key), Some(building)) = (&key, &mut filter.building) {
                    building.insert(key);
                }
            }
            last = key;
        }
        if forgotten > 0 {
            batch.commit()?;
        }
        let done = seen < chunk || last.is_none();
        cursor.after = if done { None } else { last };
        if done {
            if let Some(next) = filter.building.take() {
                filter.current = Some(next);
            }
            filter.oldest_ms = cursor
                .oldest_ms
                .take()
                .map(|o| o.saturating_sub(CLOCK_SLACK_MS));
        }
        Ok((forgotten, done))
    }

    /// A whole pruning pass (tests and tools; the running outbox prunes step by step).
    #[cfg(test)]
    pub(crate) fn prune_dedupe(&self, now_ms: u64, window: Duration) -> Result<usize, OutboxError> {
        let mut cursor = PruneCursor::default();
        let mut filter = SeenFilter::default();
        let mut total = 0;
        loop {
            let (n, done) =
                self.prune_dedupe_step(&mut cursor, now_ms, window, PRUNE_CHUNK, &mut filter)?;
            total += n;
            if done {
                return Ok(total);
            }
        }
    }
}
