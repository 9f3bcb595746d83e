//! The in-memory pending queue: undelivered records and their leases.
//!
//! It mirrors the record log (rebuilt from it on open) and is changed only after the
//! write that justifies the change is committed, except for leases, which are memory-only by
//! design: a lease dies with the process and the record is simply leased again. Memory is
//! bounded by `max_pending` records (plus replayed dead letters).
//!
//! A record is kept as the bytes of its encoding in the log (one allocation of ~150 bytes for
//! a charge, shared with whoever leases it), not as a decoded `Delivery` (a struct several
//! times that size plus an allocation per string): a backlog of millions of records stays
//! small, and the request path stops growing the heap by a struct per event. The forwarder
//! decodes what it leases, outside the lock (see [`Outbox::next_batch`](super::Outbox)).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A record as encoded in the log (see the `record` module).
pub(crate) type Encoded = Arc<[u8]>;

/// A leased record before decoding.
pub(crate) struct Leased {
    pub(crate) seq: u64,
    pub(crate) record: Encoded,
    pub(crate) attempts: u32,
}

struct Entry {
    record: Encoded,
    /// The log segment holding the record's newest copy.
    seg: u64,
    attempts: u32,
    leased: bool,
}

#[derive(Default)]
pub(crate) struct Queue {
    /// Ordered by seq: new records are appended at the right edge, so growing to hundreds of
    /// thousands of pending records (an upstream outage) never rehashes the whole map, as a
    /// hash map did (a tenth of the commit's time in the load test's capacity phase).
    entries: BTreeMap<u64, Entry>,
    /// Seqs not leased, oldest first.
    ready: BTreeSet<u64>,
}

impl Queue {
    pub(crate) fn from_records(records: Vec<(u64, Encoded, u64)>) -> Queue {
        let mut q = Queue::default();
        for (seq, record, seg) in records {
            q.insert(seq, record, seg);
        }
        q
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn insert(&mut self, seq: u64, record: Encoded, seg: u64) {
        self.entries.insert(
            seq,
            Entry {
                record,
                seg,
                attempts: 0,
                leased: false,
            },
        );
        self.ready.insert(seq);
    }

    /// Whether the record was pending.
    pub(crate) fn remove(&mut self, seq: u64) -> bool {
        self.ready.remove(&seq);
        self.entries.remove(&seq).is_some()
    }

    /// The record with the lowest sequence number (the oldest accepted, but for replayed dead
    /// letters, which keep their sequence numbers).
    pub(crate) fn oldest(&self) -> Option<Encoded> {
        self.entries.values().next().map(|e| Arc::clone(&e.record))
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&Encoded> {
        self.entries.get(&seq).map(|e| &e.record)
    }

    /// The log segment holding the record.
    pub(crate) fn segment(&self, seq: u64) -> Option<u64> {
        self.entries.get(&seq).map(|e| e.seg)
    }

    /// Up to `max` of the records whose newest copy is in log segment `seg` (a scan: for
    /// copying them forward, which is rare).
    pub(crate) fn in_segment(&self, seg: u64, max: usize) -> Vec<(u64, Encoded)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.seg == seg)
            .take(max)
            .map(|(s, e)| (*s, Arc::clone(&e.record)))
            .collect()
    }

    /// The record's newest copy is now in `seg`.
    pub(crate) fn move_to(&mut self, seq: u64, seg: u64) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.seg = seg;
        }
    }

    pub(crate) fn lease(&mut self, max: usize) -> Vec<Leased> {
        let mut out = Vec::with_capacity(max.min(self.ready.len()));
        while out.len() < max {
            let Some(seq) = self.ready.pop_first() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&seq) else {
                continue;
            };
            entry.leased = true;
            out.push(Leased {
                seq,
                record: Arc::clone(&entry.record),
                attempts: entry.attempts,
            });
            entry.attempts = entry.attempts.saturating_add(1);
        }
        out
    }

    /// Leases the given records if they are pending and not leased (for a coalesced batch
    /// that must be re-sent with exactly its persisted membership).
    pub(crate) fn lease_seqs(&mut self, seqs: &[u64]) -> Vec<Leased> {
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if !self.ready.remove(seq) {
                continue;
            }
            let Some(entry) = self.entries.get_mut(seq) else {
                continue;
            };
            entry.leased = true;
            out.push(Leased {
                seq: *seq,
                record: Arc::clone(&entry.record),
                attempts: entry.attempts,
            });
            entry.attempts = entry.attempts.saturating_add(1);
        }
        out
    }

    /// Marks records leased (without handing them out) while a write about them is in flight.
    pub(crate) fn hold(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if let Some(entry) = self.entries.get_mut(seq) {
                entry.leased = true;
                self.ready.remove(seq);
            }
        }
    }

    /// Returns leased records to the ready set; returns how many were released.
    pub(crate) fn release(&mut self, seqs: &[u64]) -> usize {
        let mut n = 0;
        for seq in seqs {
            if let Some(entry) = self.entries.get_mut(seq) {
                if entry.leased {
                    entry.leased = false;
                    self.ready.insert(*seq);
                    n += 1;
                }
            }
        }
        n
    }

    /// Every record in the queue (cheap clones).
    pub(crate) fn records(&self) -> Vec<Encoded> {
        self.entries
            .values()
            .map(|e| Arc::clone(&e.record))
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> Vec<(u64, crate::domain::Delivery)> {
        self.entries
            .iter()
            .map(|(s, e)| (*s, super::record::decode(&e.record).expect("own encoding")))
            .collect()
    }
}
