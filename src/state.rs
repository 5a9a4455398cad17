//! The state the pipeline keeps, as an abstract ordered key-value store with a few
//! keyspaces, so the core stays free of I/O: RocksDB ([`crate::store`]) and the
//! in-memory [`MemoryStore`] (tests, simulation, `--dry-run`) implement it.
//!
//! Every key starts with the 8-byte [`Scope`] of the input partition it belongs to,
//! so one partition's state can be dropped, exported or restored whole.
//!
//! Writes are staged in a [`Staged`] overlay while a batch is processed (so later
//! records of the batch see earlier ones) and applied in one atomic [`StateBatch`]
//! only after the batch's output is acknowledged.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::StoreError;

/// The keyspaces (RocksDB column families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Keyspace {
    /// Composite dedupe keys: scope | identity digest | occurred_at -> expiry | content hash.
    Keys,
    /// Content hashes: scope | blake3 -> expiry.
    Hashes,
    /// Per-shipment status: scope | shipment digest -> shipment state.
    Shipments,
    /// Input progress: scope -> next offset to process.
    Offsets,
}

impl Keyspace {
    pub const ALL: [Keyspace; 4] = [Keyspace::Keys, Keyspace::Hashes, Keyspace::Shipments, Keyspace::Offsets];

    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Keys => "keys",
            Keyspace::Hashes => "hashes",
            Keyspace::Shipments => "shipments",
            Keyspace::Offsets => "offsets",
        }
    }

    /// Position in [`Keyspace::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(name: &str) -> Option<Keyspace> {
        Keyspace::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The `expires_at` (ms) stored in a value of this keyspace: the first 8 bytes
    /// (big-endian) for keys and hashes, bytes 10..18 of a shipment state; offsets
    /// never expire (`None`), and neither does a value too short to hold one.
    pub fn expiry(self, value: &[u8]) -> Option<i64> {
        let bytes = match self {
            Keyspace::Offsets => return None,
            Keyspace::Shipments => value.get(10..18)?,
            Keyspace::Keys | Keyspace::Hashes => value.get(..8)?,
        };
        Some(i64::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// The 8-byte prefix of all state derived from one input partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(pub [u8; 8]);

impl Scope {
    /// Scope of an input topic partition. Replay uses the archive's recorded topic
    /// and partition, so a backfill meets the live state of the same partition.
    pub fn of(topic: &str, partition: i32) -> Scope {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"waymark.scope.v1");
        hasher.update(&(topic.len() as u64).to_le_bytes());
        hasher.update(topic.as_bytes());
        hasher.update(&partition.to_le_bytes());
        let mut out = [0u8; 8];
        out.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
        Scope(out)
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Read access to committed state.
pub trait StateStore {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Entries with `from <= key < to`, in key order.
    fn scan(&self, keyspace: Keyspace, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError>;
    /// Apply a batch atomically: all of it or none of it, durable on return.
    fn write(&self, batch: StateBatch) -> Result<(), StoreError>;
    /// Visit the entries with `from <= key < to` in key order until `f`
    /// returns false, without holding them all (a whole partition's entries,
    /// for `waymark explain`). The default collects a [`StateStore::scan`].
    fn visit(&self, keyspace: Keyspace, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), StoreError> {
        for (key, value) in self.scan(keyspace, from, to)? {
            if !f(&key, &value) {
                break;
            }
        }
        Ok(())
    }
}

/// A set of writes applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateBatch {
    pub puts: Vec<(Keyspace, Vec<u8>, Vec<u8>)>,
}

impl StateBatch {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty()
    }
    pub fn put(&mut self, keyspace: Keyspace, key: Vec<u8>, value: Vec<u8>) {
        self.puts.push((keyspace, key, value));
    }
}

/// Uncommitted writes layered over a store.
pub struct Staged<'a, S: StateStore + ?Sized> {
    store: &'a S,
    /// One map per keyspace (indexed like [`Keyspace::ALL`]), so a lookup borrows
    /// the key instead of allocating a composite map key on the hot path.
    pending: [BTreeMap<Vec<u8>, Vec<u8>>; 4],
}

impl<'a, S: StateStore + ?Sized> Staged<'a, S> {
    pub fn new(store: &'a S) -> Self {
        Staged { store, pending: Default::default() }
    }

    pub fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.pending[keyspace.index()].get(key) {
            return Ok(Some(value.clone()));
        }
        self.store.get(keyspace, key)
    }

    pub fn scan(&self, keyspace: Keyspace, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let committed = self.store.scan(keyspace, from, to)?;
        if from >= to {
            return Ok(committed);
        }
        let staged = &self.pending[keyspace.index()];
        let mut range = staged.range::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Excluded(to))).peekable();
        if range.peek().is_none() {
            return Ok(committed);
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = committed.into_iter().collect();
        for (key, value) in range {
            merged.insert(key.clone(), value.clone());
        }
        Ok(merged.into_iter().collect())
    }

    /// Visit the entries with `from <= key < to`, staged values over committed
    /// ones, without holding them all (a whole partition's entries, say):
    /// committed keys in key order, then staged keys the store does not hold.
    /// Stops when `f` returns false.
    pub fn visit(&self, keyspace: Keyspace, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), StoreError> {
        let staged = &self.pending[keyspace.index()];
        let mut going = true;
        self.store.visit(keyspace, from, to, &mut |key, value| {
            going = f(key, staged.get(key).map_or(value, Vec::as_slice));
            going
        })?;
        if going && from < to {
            for (key, value) in staged.range::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Excluded(to))) {
                if self.store.get(keyspace, key)?.is_none() && !f(key, value) {
                    break;
                }
            }
        }
        Ok(())
    }

    pub fn put(&mut self, keyspace: Keyspace, key: Vec<u8>, value: Vec<u8>) {
        self.pending[keyspace.index()].insert(key, value);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.iter().all(BTreeMap::is_empty)
    }

    /// The staged writes as one batch, leaving the overlay empty.
    pub fn take_batch(&mut self) -> StateBatch {
        let mut batch = StateBatch::default();
        for keyspace in Keyspace::ALL {
            for (key, value) in std::mem::take(&mut self.pending[keyspace.index()]) {
                batch.put(keyspace, key, value);
            }
        }
        batch
    }

    /// Forget staged writes (their output was not acknowledged).
    pub fn discard(&mut self) {
        self.pending.iter_mut().for_each(BTreeMap::clear);
    }
}

/// An in-memory [`StateStore`], for tests, simulation and dry runs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    data: Mutex<BTreeMap<(Keyspace, Vec<u8>), Vec<u8>>>,
}

impl MemoryStore {
    pub fn len(&self, keyspace: Keyspace) -> usize {
        self.lock().keys().filter(|(ks, _)| *ks == keyspace).count()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Keyspace, Vec<u8>), Vec<u8>>> {
        // A poisoned lock only means another test thread panicked; the map is intact.
        self.data.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StateStore for MemoryStore {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(&(keyspace, key.to_vec())).cloned())
    }

    fn scan(&self, keyspace: Keyspace, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .lock()
            .range((keyspace, from.to_vec())..(keyspace, to.to_vec()))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: StateBatch) -> Result<(), StoreError> {
        let mut data = self.lock();
        for (keyspace, key, value) in batch.puts {
            data.insert((keyspace, key), value);
        }
        Ok(())
    }
}

/// A store whose writes stay in memory over a read-only base (`replay --dry-run`):
/// the run dedupes against the base and within itself, and the base is untouched.
pub struct Overlay<'a, S: StateStore + ?Sized> {
    base: &'a S,
    top: MemoryStore,
}

impl<'a, S: StateStore + ?Sized> Overlay<'a, S> {
    pub fn new(base: &'a S) -> Self {
        Overlay { base, top: MemoryStore::default() }
    }
}

impl<S: StateStore + ?Sized> StateStore for Overlay<'_, S> {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.top.get(keyspace, key)? {
            Some(value) => Ok(Some(value)),
            None => self.base.get(keyspace, key),
        }
    }

    fn scan(&self, keyspace: Keyspace, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.base.scan(keyspace, from, to)?.into_iter().collect();
        merged.extend(self.top.scan(keyspace, from, to)?);
        Ok(merged.into_iter().collect())
    }

    fn write(&self, batch: StateBatch) -> Result<(), StoreError> {
        self.top.write(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_index_is_its_position_in_all() {
        for (position, keyspace) in Keyspace::ALL.into_iter().enumerate() {
            assert_eq!(keyspace.index(), position, "{keyspace:?}");
        }
    }

    #[test]
    fn staged_writes_are_visible_before_commit_and_only_after_in_the_store() {
        let store = MemoryStore::default();
        let mut staged = Staged::new(&store);
        staged.put(Keyspace::Keys, b"a2".to_vec(), b"x".to_vec());
        store.write(StateBatch { puts: vec![(Keyspace::Keys, b"a1".to_vec(), b"y".to_vec())] }).unwrap();
        assert_eq!(staged.get(Keyspace::Keys, b"a2").unwrap(), Some(b"x".to_vec()));
        assert_eq!(store.get(Keyspace::Keys, b"a2").unwrap(), None);
        let scanned = staged.scan(Keyspace::Keys, b"a", b"b").unwrap();
        assert_eq!(scanned.len(), 2);
        assert!(staged.scan(Keyspace::Hashes, b"a", b"b").unwrap().is_empty());
        let batch = staged.take_batch();
        store.write(batch).unwrap();
        assert_eq!(store.get(Keyspace::Keys, b"a2").unwrap(), Some(b"x".to_vec()));
        assert!(staged.is_empty());
    }

    #[test]
    fn overlay_never_writes_its_base() {
        let base = MemoryStore::default();
        base.write(StateBatch { puts: vec![(Keyspace::Hashes, b"k1".to_vec(), b"base".to_vec())] }).unwrap();
        let overlay = Overlay::new(&base);
        overlay.write(StateBatch { puts: vec![(Keyspace::Hashes, b"k2".to_vec(), b"top".to_vec())] }).unwrap();
        assert_eq!(overlay.get(Keyspace::Hashes, b"k1").unwrap(), Some(b"base".to_vec()));
        assert_eq!(overlay.get(Keyspace::Hashes, b"k2").unwrap(), Some(b"top".to_vec()));
        assert_eq!(overlay.scan(Keyspace::Hashes, b"k", b"l").unwrap().len(), 2);
        assert_eq!(base.len(Keyspace::Hashes), 1);
    }

    #[test]
    fn scopes_differ_by_topic_and_partition() {
        assert_ne!(Scope::of("t", 0), Scope::of("t", 1));
        assert_ne!(Scope::of("t", 0), Scope::of("u", 0));
        assert_eq!(Scope::of("t", 0), Scope::of("t", 0));
    }
}
