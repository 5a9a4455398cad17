//! RocksDB adapter for [`StateStore`]: one column family per [`Keyspace`], the
//! write-ahead log on, every batch atomic.
//!
//! Expiry: each value starts with its `expires_at` (ms),
//! the core checks it on every read, and a compaction filter drops expired entries
//! so the disk is reclaimed; periodic compaction makes sure cold files get visited.
//! RocksDB's own TTL mode is not used (one TTL for the whole database, expired
//! entries still returned until compaction).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::compaction_filter::Decision;
use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options, WriteBatch, WriteOptions, DB};

use crate::error::StoreError;
use crate::state::{Keyspace, StateBatch, StateStore};

/// A clock for the compaction filter, which runs on RocksDB's threads.
pub type MillisClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock, in milliseconds since the epoch (the adapters' default).
pub fn system_clock() -> MillisClock {
    Arc::new(|| chrono::Utc::now().timestamp_millis())
}

/// Tuning knobs (config `[state]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Shared LRU block cache for all keyspaces.
    pub block_cache_bytes: usize,
    /// Memtable budget per keyspace (write buffer size; two buffers at most).
    pub memtable_bytes: usize,
    /// fsync the WAL on every batch: survives power loss, not just process death.
    pub sync_writes: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { block_cache_bytes: 128 << 20, memtable_bytes: 32 << 20, sync_writes: true }
    }
}

/// The on-disk state store.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
    write_options: WriteOptions,
    lookups: LookupHistograms,
}

/// `waymark_store_lookup_seconds` per keyspace (indexed like [`Keyspace::ALL`]),
/// for point lookups and range scans. Registered once when the store opens (after
/// the binary installed its recorder), not per lookup: `histogram!` looks its
/// series up in the recorder's registry on every call, and a check makes two
/// lookups or more.
struct LookupHistograms {
    get: [metrics::Histogram; 4],
    scan: [metrics::Histogram; 4],
}

impl LookupHistograms {
    fn register() -> LookupHistograms {
        let of = |op: &'static str| Keyspace::ALL.map(|keyspace| metrics::histogram!(LOOKUP_METRIC, "op" => op, "keyspace" => keyspace.name()));
        LookupHistograms { get: of("get"), scan: of("scan") }
    }
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore").field("path", &self.path).finish()
    }
}

fn io(e: rocksdb::Error) -> StoreError {
    StoreError::Io(e.into_string())
}

/// Where the store records the layout its state was written in (offsets
/// keyspace; shorter than any progress or position key, so it collides with none).
pub const LAYOUT_KEY: &[u8] = b"\0waymark-layout";

/// Version of the state layout. v2: dedupe and shipment state scoped by the
/// shipment's home partition (earlier state was scoped by input partition and
/// carried no marker).
pub const LAYOUT_VERSION: &str = "v2";

/// Why a state directory cannot be used with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("state directory {dir} holds state of an older Waymark (scoped by input partition, before shipment homes); this version cannot read it. Move the directory away and start with an empty one (and, with changelogs on, a new kafka.group_id or deleted changelog topics): the dedupe memory starts afresh, outputs stay idempotent by milestone_id")]
    Legacy { dir: PathBuf },
    #[error("state directory {dir} was written with `{stored}` but this configuration says `{wanted}`: routing.mode and routing.partitions are fixed for the life of a group (every shipment's home depends on them). Set them back, or deploy a new group (a new kafka.group_id and an empty state directory)")]
    Changed { dir: PathBuf, stored: String, wanted: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

use crate::telemetry::{STORE_EXPIRED as EXPIRED_METRIC, STORE_LOOKUP_SECONDS as LOOKUP_METRIC};

impl RocksStore {
    /// Open (creating if needed) the store in `path`.
    pub fn open(path: &Path, options: &StoreOptions, clock: MillisClock) -> Result<RocksStore, StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Io(format!("cannot create state directory {}: {e}", path.display())))?;
        let cache = block_cache(options);
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_keep_log_file_num(3);
        // Hash memtables (see keyspace_options) take one writer at a time; the
        // worker writes from one thread anyway.
        db_options.set_allow_concurrent_memtable_write(false);
        let descriptors = Keyspace::ALL.into_iter().map(|keyspace| {
            ColumnFamilyDescriptor::new(keyspace.name(), keyspace_options(keyspace, options, &cache, clock.clone()))
        });
        let db = DB::open_cf_descriptors(&db_options, path, descriptors).map_err(|e| {
            let reason = e.into_string();
            // One hint, the one that fits what RocksDB said.
            let hint = if reason.contains("lock") || reason.contains("LOCK") {
                "another process holds it: stop that waymark process, or use `waymark state stats` / `state export`, which open it read-only"
            } else if reason.contains("Read-only file system") || reason.contains("Permission denied") {
                "the directory is not writable: mount it writable, or inspect it read-only with `waymark state stats` / `state export`"
            } else {
                "check that the directory is a waymark state directory and the disk is not full"
            };
            StoreError::Open(format!("cannot open state store at {}: {reason} ({hint})", path.display()))
        })?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(options.sync_writes);
        Ok(RocksStore { db, path: path.to_path_buf(), write_options, lookups: LookupHistograms::register() })
    }

    /// Open an existing store read-only, beside a worker that may have it open
    /// for writing (`waymark state stats` and `export` on a running worker): it
    /// sees the state as of the last flush plus the write-ahead log at open time.
    pub fn open_read_only(path: &Path) -> Result<RocksStore, StoreError> {
        let options = StoreOptions::default();
        let cache = block_cache(&options);
        let clock = system_clock();
        let descriptors: Vec<ColumnFamilyDescriptor> = Keyspace::ALL
            .into_iter()
            .map(|keyspace| ColumnFamilyDescriptor::new(keyspace.name(), keyspace_options(keyspace, &options, &cache, clock.clone())))
            .collect();
        let db = DB::open_cf_descriptors_read_only(&Options::default(), path, descriptors, false).map_err(|e| {
            StoreError::Open(format!(
                "cannot open state store at {} read-only: {} (check that it is a waymark state directory and readable)",
                path.display(),
                e.into_string()
            ))
        })?;
        Ok(RocksStore { db, path: path.to_path_buf(), write_options: WriteOptions::default(), lookups: LookupHistograms::register() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout this store's state was written in (`None`: no marker).
    pub fn layout(&self) -> Result<Option<String>, StoreError> {
        Ok(self.get(Keyspace::Offsets, LAYOUT_KEY)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Refuse state written in another layout; with `mark`, mark an empty store
    /// with `layout` (a placement's [`crate::routing::Placement::layout`]).
    pub fn check_layout(&self, layout: &str, mark: bool) -> Result<(), LayoutError> {
        let wanted = format!("{LAYOUT_VERSION} {layout}");
        match self.layout()? {
            Some(stored) if stored == wanted => Ok(()),
            Some(stored) => Err(LayoutError::Changed { dir: self.path.clone(), stored, wanted }),
            None if !self.is_empty()? => Err(LayoutError::Legacy { dir: self.path.clone() }),
            None if !mark => Ok(()),
            None => {
                let mut batch = StateBatch::default();
                batch.put(Keyspace::Offsets, LAYOUT_KEY.to_vec(), wanted.into_bytes());
                Ok(self.write(batch)?)
            }
        }
    }

    /// No entry in any keyspace.
    fn is_empty(&self) -> Result<bool, StoreError> {
        for keyspace in Keyspace::ALL {
            let mut iter = self.db.raw_iterator_cf_opt(self.cf(keyspace)?, total_order());
            iter.seek_to_first();
            iter.status().map_err(io)?;
            if iter.valid() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn cf(&self, keyspace: Keyspace) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(keyspace.name())
            .ok_or_else(|| StoreError::Io(format!("column family {} missing", keyspace.name())))
    }

    /// RocksDB's estimate of live keys in a keyspace.
    pub fn estimated_keys(&self, keyspace: Keyspace) -> Result<u64, StoreError> {
        let cf = self.cf(keyspace)?;
        Ok(self.db.property_int_value_cf(cf, "rocksdb.estimate-num-keys").map_err(io)?.unwrap_or(0))
    }

    /// Memory RocksDB holds, by kind: memtables (all keyspaces, at most
    /// `memtable_bytes` x 2 each), block cache (shared, at most
    /// `block_cache_bytes`) and table readers (index and filter blocks of the
    /// open SST files, which grow with the data).
    pub fn memory_bytes(&self) -> Result<[(&'static str, u64); 3], StoreError> {
        let (mut memtables, mut readers, mut cache) = (0, 0, 0);
        for keyspace in Keyspace::ALL {
            let cf = self.cf(keyspace)?;
            let value = |name: &str| self.db.property_int_value_cf(cf, name).map_err(io).map(Option::unwrap_or_default);
            memtables += value("rocksdb.cur-size-all-mem-tables")?;
            readers += value("rocksdb.estimate-table-readers-mem")?;
            // One cache shared by every keyspace: each reports the same usage.
            cache = cache.max(value("rocksdb.block-cache-usage")?);
        }
        Ok([("memtables", memtables), ("block_cache", cache), ("table_readers", readers)])
    }

    /// Total size of the keyspace's SST files on disk.
    pub fn disk_bytes(&self, keyspace: Keyspace) -> Result<u64, StoreError> {
        let cf = self.cf(keyspace)?;
        Ok(self.db.property_int_value_cf(cf, "rocksdb.total-sst-files-size").map_err(io)?.unwrap_or(0))
    }

    /// Full manual compaction of every keyspace (runs the expiry filter everywhere).
    pub fn compact(&self) -> Result<(), StoreError> {
        for keyspace in Keyspace::ALL {
            let cf = self.cf(keyspace)?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Flush memtables (so on-disk statistics are current).
    pub fn flush(&self) -> Result<(), StoreError> {
        for keyspace in Keyspace::ALL {
            self.db.flush_cf(self.cf(keyspace)?).map_err(io)?;
        }
        Ok(())
    }

    /// Every entry of a keyspace, in key order (export, stats).
    pub fn for_each(&self, keyspace: Keyspace, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let cf = self.cf(keyspace)?;
        for item in self.db.iterator_cf_opt(cf, total_order(), rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(io)?;
            f(&key, &value)?;
        }
        Ok(())
    }
}

/// One exported state entry (NDJSON line of `waymark state export`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportedEntry {
    pub keyspace: String,
    /// Key, lower-case hex.
    pub key: String,
    /// Value, lower-case hex.
    pub value: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}


impl RocksStore {
    /// Write every entry (optionally only one partition's scope) as NDJSON.
    pub fn export(&self, scope: Option<crate::state::Scope>, out: &mut dyn std::io::Write) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for keyspace in Keyspace::ALL {
            self.for_each(keyspace, |key, value| {
                if scope.is_some_and(|s| !key.starts_with(&s.0)) {
                    return Ok(());
                }
                let entry = ExportedEntry { keyspace: keyspace.name().into(), key: hex(key), value: hex(value) };
                serde_json::to_writer(&mut *out, &entry).map_err(|e| StoreError::Io(e.to_string()))?;
                out.write_all(b"\n").map_err(|e| StoreError::Io(e.to_string()))?;
                n += 1;
                Ok(())
            })?;
        }
        Ok(n)
    }

    /// Read NDJSON written by [`RocksStore::export`], in atomic batches of 10 000.
    pub fn import(&self, input: &mut dyn std::io::BufRead) -> Result<u64, StoreError> {
        let mut batch = StateBatch::default();
        let mut n = 0u64;
        for (line_no, line) in std::io::BufRead::lines(&mut *input).enumerate() {
            let line = line.map_err(|e| StoreError::Io(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| StoreError::Corrupt { keyspace: "import", reason: format!("line {}: {reason}", line_no + 1) };
            let entry: ExportedEntry = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            let keyspace = Keyspace::parse(&entry.keyspace).ok_or_else(|| bad(format!("unknown keyspace `{}`", entry.keyspace)))?;
            let key = unhex(&entry.key).ok_or_else(|| bad("key is not hex".into()))?;
            let value = unhex(&entry.value).ok_or_else(|| bad("value is not hex".into()))?;
            batch.put(keyspace, key, value);
            n += 1;
            if batch.puts.len() >= 10_000 {
                self.write(std::mem::take(&mut batch))?;
            }
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        Ok(n)
    }

    /// Delete all state of one input partition (dedupe keys, shipments, progress).
    pub fn drop_scope(&self, scope: crate::state::Scope) -> Result<(), StoreError> {
        let from = scope.0.to_vec();
        let to = (u64::from_be_bytes(scope.0).wrapping_add(1)).to_be_bytes().to_vec();
        for keyspace in Keyspace::ALL {
            let cf = self.cf(keyspace)?;
            if to > from {
                self.db.delete_range_cf(cf, &from, &to).map_err(io)?;
            } else {
                // The last scope (all 0xff): delete key by key.
                let mut batch = WriteBatch::default();
                let from_scope = rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward);
                for item in self.db.iterator_cf_opt(cf, total_order(), from_scope) {
                    let (key, _) = item.map_err(io)?;
                    if !key.starts_with(&from) {
                        break;
                    }
                    batch.delete_cf(cf, key);
                }
                self.db.write_opt(batch, &self.write_options).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Delete every entry expired at `now_ms` now, without waiting for compaction.
    /// Returns how many were deleted per keyspace.
    pub fn expire(&self, now_ms: i64) -> Result<Vec<(Keyspace, u64)>, StoreError> {
        let mut counts = Vec::new();
        for keyspace in [Keyspace::Keys, Keyspace::Hashes, Keyspace::Shipments] {
            let cf = self.cf(keyspace)?;
            let mut batch = WriteBatch::default();
            let mut n = 0u64;
            for item in self.db.iterator_cf_opt(cf, total_order(), rocksdb::IteratorMode::Start) {
                let (key, value) = item.map_err(io)?;
                if keyspace.expiry(&value).is_some_and(|at| at <= now_ms) {
                    batch.delete_cf(cf, key);
                    n += 1;
                    if batch.len() >= 10_000 {
                        self.db.write_opt(std::mem::take(&mut batch), &self.write_options).map_err(io)?;
                    }
                }
            }
            self.db.write_opt(batch, &self.write_options).map_err(io)?;
            metrics::counter!(EXPIRED_METRIC, "keyspace" => keyspace.name()).increment(n);
            counts.push((keyspace, n));
        }
        Ok(counts)
    }
}

/// The shared block cache: RocksDB's clock cache, which looks entries up without
/// the LRU cache's per-shard mutex and list updates (measured: LRU bookkeeping
/// was about 6% of a dedupe check at 2M live events). Entry size auto-tuned.
fn block_cache(options: &StoreOptions) -> Cache {
    Cache::new_hyper_clock_cache(options.block_cache_bytes, 0)
}

/// Read options for an iteration across prefixes: with a prefix extractor set,
/// RocksDB iterates within the seek key's prefix unless told otherwise, and a
/// hash memtable then yields nothing at all.
fn total_order() -> rocksdb::ReadOptions {
    let mut options = rocksdb::ReadOptions::default();
    options.set_total_order_seek(true);
    options
}

/// The first `N` bytes of a key, or all of a shorter one.
fn capped_prefix<const N: usize>(key: &[u8]) -> &[u8] {
    &key[..key.len().min(N)]
}

fn keyspace_options(keyspace: Keyspace, options: &StoreOptions, cache: &Cache, clock: MillisClock) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_block_cache(cache);
    block.set_bloom_filter(10.0, false);
    // Index and filter blocks live in the block cache, so memory stays within the
    // configured budget at any number of keys. They are partitioned: a monolithic
    // index or filter of a large SST file is bigger than one cache shard, is never
    // retained, and every lookup re-reads it (measured: 9k checks/s at 1M keys,
    // against 100k+ at 300k). With partitions only the small top level is pinned
    // and each lookup touches one 4 KiB partition.
    block.set_cache_index_and_filter_blocks(true);
    block.set_cache_index_and_filter_blocks_with_high_priority(true);
    block.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    block.set_partition_filters(true);
    block.set_metadata_block_size(4096);
    block.set_pin_top_level_index_and_filter(true);
    block.set_pin_l0_filter_and_index_blocks_in_cache(true);
    if keyspace == Keyspace::Keys {
        // Keys are only ever range-scanned within one scope|identity prefix: the
        // prefix filter answers those; whole-key entries would only double the filter.
        block.set_whole_key_filtering(false);
    } else {
        // Point lookups: a hash index in each data block finds the key without a
        // binary search of the block's restart points.
        block.set_data_block_index_type(rocksdb::DataBlockIndexType::BinaryAndHash);
        block.set_data_block_hash_ratio(0.75);
    }
    let mut cf = Options::default();
    cf.set_block_based_table_factory(&block);
    cf.set_write_buffer_size(options.memtable_bytes);
    cf.set_max_write_buffer_number(2);
    cf.set_compression_type(DBCompressionType::Lz4);
    if keyspace != Keyspace::Offsets {
        // Memtables are hash tables of small skiplists, bucketed by a key prefix,
        // instead of one skiplist: a lookup (and an insert) walked ~20 levels of
        // one 32 MiB skiplist, a cache miss each, and that was the largest cost of
        // a replay (30% of its CPU). Every read the core makes stays within one
        // prefix (a point lookup, or a Keys scan within one scope|identity);
        // iterations across prefixes (export, expiry, stats) ask for total order.
        // Capped prefixes (shorter keys are their own prefix): any key length is
        // safe, including what `state import` brings.
        cf.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList { bucket_count: 1 << 18, height: 4, branching_factor: 4 });
        if keyspace == Keyspace::Keys {
            // Composite keys share a 24-byte scope|identity prefix: a prefix bloom
            // lets the skew-window range scan skip files that hold no key of that
            // identity.
            cf.set_prefix_extractor(rocksdb::SliceTransform::create("waymark.capped.24", capped_prefix::<24>, None));
            cf.set_memtable_prefix_bloom_ratio(0.1);
        } else {
            // Scope (8 bytes) and the first 8 bytes of a digest: one bucket per key,
            // nearly. SST filters keep whole keys too.
            cf.set_prefix_extractor(rocksdb::SliceTransform::create("waymark.capped.16", capped_prefix::<16>, None));
            // Most lookups miss the memtable (a new event, or a duplicate of one
            // already flushed): a bloom over whole keys answers them without a
            // memtable search.
            cf.set_memtable_prefix_bloom_ratio(0.1);
            cf.set_memtable_whole_key_filtering(true);
        }
        cf.set_periodic_compaction_seconds(24 * 3600);
        let name = format!("waymark-expiry-{}", keyspace.name());
        cf.set_compaction_filter(&name, move |_level, _key, value| {
            let expired = keyspace.expiry(value).is_some_and(|expires_at| expires_at <= clock());
            if expired {
                metrics::counter!(EXPIRED_METRIC, "keyspace" => keyspace.name()).increment(1);
                Decision::Remove
            } else {
                Decision::Keep
            }
        });
    }
    cf
}

impl StateStore for RocksStore {
    fn visit(&self, keyspace: Keyspace, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), StoreError> {
        let mut read_options = total_order();
        read_options.set_iterate_upper_bound(to.to_vec());
        for item in self.db.iterator_cf_opt(self.cf(keyspace)?, read_options, rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward)) {
            let (key, value) = item.map_err(io)?;
            if &*key >= to || !f(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let started = std::time::Instant::now();
        let value = self.db.get_cf(self.cf(keyspace)?, key).map_err(io);
        self.lookups.get[keyspace.index()].record(started.elapsed().as_secs_f64());
        value
    }

    fn scan(&self, keyspace: Keyspace, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let started = std::time::Instant::now();
        let cf = self.cf(keyspace)?;
        let mut read_options = rocksdb::ReadOptions::default();
        read_options.set_iterate_upper_bound(to.to_vec());
        // The core scans Keys within one scope|identity prefix (only the time part
        // varies), which the prefix bloom filters can answer; anything else is a
        // total-order scan.
        let same_prefix = keyspace == Keyspace::Keys && from.len() >= 24 && to.len() >= 24 && from[..24] == to[..24];
        read_options.set_prefix_same_as_start(same_prefix);
        read_options.set_total_order_seek(!same_prefix);
        let iter = self.db.iterator_cf_opt(cf, read_options, rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(io)?;
            if &*key >= to {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        self.lookups.scan[keyspace.index()].record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    fn write(&self, batch: StateBatch) -> Result<(), StoreError> {
        let mut write_batch = WriteBatch::default();
        for (keyspace, key, value) in &batch.puts {
            write_batch.put_cf(self.cf(*keyspace)?, key, value);
        }
        self.db.write_opt(write_batch, &self.write_options).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    #[test]
    fn batches_persist_across_reopen_and_compaction_drops_expired() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicI64::new(1_000));
        let clock_now = now.clone();
        let clock: MillisClock = Arc::new(move || clock_now.load(Ordering::SeqCst));
        {
            let store = RocksStore::open(dir.path(), &StoreOptions::default(), clock.clone()).unwrap();
            let mut batch = StateBatch::default();
            batch.put(Keyspace::Hashes, b"live".to_vec(), 5_000i64.to_be_bytes().to_vec());
            batch.put(Keyspace::Hashes, b"old".to_vec(), 2_000i64.to_be_bytes().to_vec());
            batch.put(Keyspace::Offsets, b"p".to_vec(), 7i64.to_be_bytes().to_vec());
            store.write(batch).unwrap();
        }
        let store = RocksStore::open(dir.path(), &StoreOptions::default(), clock).unwrap();
        assert!(store.get(Keyspace::Hashes, b"old").unwrap().is_some());
        now.store(3_000, Ordering::SeqCst);
        store.flush().unwrap();
        store.compact().unwrap();
        assert!(store.get(Keyspace::Hashes, b"old").unwrap().is_none(), "expired entry survived compaction");
        assert!(store.get(Keyspace::Hashes, b"live").unwrap().is_some());
        assert!(store.get(Keyspace::Offsets, b"p").unwrap().is_some(), "offsets never expire");
        let scanned = store.scan(Keyspace::Hashes, b"a", b"m").unwrap();
        assert_eq!(scanned.len(), 1);
    }

    /// The reviewer's scenario: events staged at T, the wall clock steps to T+40 d
    /// while the worker runs and a compaction happens, then the clock is set
    /// right (T+1 d): through the guarded clock, nothing expired and a
    /// redelivery is still a duplicate.
    #[test]
    fn a_wall_clock_step_expires_nothing_through_the_guarded_clock() {
        use crate::clock::{GuardedClock, DEFAULT_MAX_STEP};
        use crate::dedupe::{check_and_stage, DedupePolicy, Verdict};
        use crate::state::{Scope, Staged};
        use chrono::TimeZone;

        let day_ms = 86_400_000i64;
        let t = chrono::Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap().timestamp_millis();
        let wall = Arc::new(AtomicI64::new(t));
        let mono = Arc::new(AtomicI64::new(0));
        let (w, m) = (wall.clone(), mono.clone());
        let guarded = Arc::new(GuardedClock::new(
            Box::new(move || w.load(Ordering::SeqCst)),
            Box::new(move || std::time::Duration::from_millis(m.load(Ordering::SeqCst) as u64)),
            DEFAULT_MAX_STEP,
        ));
        let for_rocks = guarded.clone();
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &StoreOptions::default(), Arc::new(move || for_rocks.now_ms())).unwrap();
        let policy = DedupePolicy { ttl: std::time::Duration::from_secs(30 * 86_400), skew: std::time::Duration::from_secs(2) };
        let event = |n: usize| crate::event::TrackingEvent {
            tenant_id: "acme".into(),
            carrier: "ups".into(),
            tracking_number: format!("1Z{n:08}"),
            shipment_ref: None,
            status: crate::event::Status::InTransit,
            carrier_status_code: "AR".into(),
            carrier_status_detail: None,
            description: Some("Arrived at Facility".into()),
            occurred_at: chrono::Utc.timestamp_millis_opt(t - day_ms).unwrap(),
            time_assumed_utc: false,
            location: Default::default(),
            source_event_id: None,
            received_at: chrono::Utc.timestamp_millis_opt(t).unwrap(),
            source: crate::event::SourceRef { topic: "in".into(), partition: 0, offset: n as i64 },
        };
        let scope = Scope::of("waymark-repartition", 0);
        let mut staged = Staged::new(&store);
        for n in 0..50 {
            assert_eq!(check_and_stage(&mut staged, scope, policy, &event(n), guarded.now()).unwrap(), Verdict::New);
        }
        store.write(staged.take_batch()).unwrap();
        store.flush().unwrap();

        // +40 days on the wall clock, one second on the monotonic one; compact.
        wall.fetch_add(40 * day_ms + 1_000, Ordering::SeqCst);
        mono.fetch_add(1_000, Ordering::SeqCst);
        assert!(guarded.now_ms() < t + day_ms, "the step was followed");
        store.compact().unwrap();
        // Set right again (T+1 d is where time really is, a day later).
        wall.store(t + day_ms, Ordering::SeqCst);
        mono.store(day_ms, Ordering::SeqCst);
        let mut staged = Staged::new(&store);
        for n in 0..50 {
            let verdict = check_and_stage(&mut staged, scope, policy, &event(n), guarded.now()).unwrap();
            assert_eq!(verdict, Verdict::DuplicateHash, "event {n} was forgotten");
        }
    }

    #[test]
    fn export_import_drop_and_expire() {
        use crate::state::Scope;
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &StoreOptions::default(), system_clock()).unwrap();
        let (p0, p1) = (Scope::of("t", 0), Scope::of("t", 1));
        let key = |scope: Scope, tail: &[u8]| [&scope.0[..], tail].concat();
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Hashes, key(p0, b"a"), 100i64.to_be_bytes().to_vec());
        batch.put(Keyspace::Hashes, key(p0, b"b"), 900i64.to_be_bytes().to_vec());
        batch.put(Keyspace::Hashes, key(p1, b"a"), 900i64.to_be_bytes().to_vec());
        batch.put(Keyspace::Offsets, key(p1, b"o"), 5i64.to_be_bytes().to_vec());
        store.write(batch).unwrap();

        let mut only_p1 = Vec::new();
        assert_eq!(store.export(Some(p1), &mut only_p1).unwrap(), 2);
        let mut all = Vec::new();
        assert_eq!(store.export(None, &mut all).unwrap(), 4);

        store.drop_scope(p1).unwrap();
        assert!(store.get(Keyspace::Hashes, &key(p1, b"a")).unwrap().is_none());
        assert!(store.get(Keyspace::Offsets, &key(p1, b"o")).unwrap().is_none());
        assert!(store.get(Keyspace::Hashes, &key(p0, b"a")).unwrap().is_some());

        let other = tempfile::tempdir().unwrap();
        let restored = RocksStore::open(other.path(), &StoreOptions::default(), system_clock()).unwrap();
        assert_eq!(restored.import(&mut &only_p1[..]).unwrap(), 2);
        assert_eq!(restored.get(Keyspace::Offsets, &key(p1, b"o")).unwrap(), Some(5i64.to_be_bytes().to_vec()));

        let expired = store.expire(500).unwrap();
        assert_eq!(expired.iter().find(|(k, _)| *k == Keyspace::Hashes).unwrap().1, 1);
        assert!(store.get(Keyspace::Hashes, &key(p0, b"a")).unwrap().is_none());
        assert!(store.get(Keyspace::Hashes, &key(p0, b"b")).unwrap().is_some());
        assert!(restored.import(&mut &b"{\"keyspace\":\"nope\",\"key\":\"00\",\"value\":\"00\"}\n"[..]).is_err());
    }

    #[test]
    fn layouts_are_marked_checked_and_legacy_state_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RocksStore::open(dir.path(), &StoreOptions::default(), system_clock()).unwrap();
            store.check_layout("home topic=g-repartition partitions=16", true).unwrap();
            store.check_layout("home topic=g-repartition partitions=16", false).unwrap();
            let err = store.check_layout("home topic=g-repartition partitions=32", true).unwrap_err().to_string();
            assert!(err.contains("partitions=16") && err.contains("partitions=32") && err.contains("new kafka.group_id"), "{err}");
        }
        let legacy = tempfile::tempdir().unwrap();
        let store = RocksStore::open(legacy.path(), &StoreOptions::default(), system_clock()).unwrap();
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Hashes, vec![1; 40], vec![0; 8]);
        store.write(batch).unwrap();
        let err = store.check_layout("home topic=g-repartition partitions=16", true).unwrap_err();
        assert!(matches!(err, LayoutError::Legacy { .. }), "{err}");
        assert!(err.to_string().contains("older Waymark"), "{err}");
    }

    #[test]
    fn a_second_process_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RocksStore::open(dir.path(), &StoreOptions::default(), system_clock()).unwrap();
        let err = RocksStore::open(dir.path(), &StoreOptions::default(), system_clock()).unwrap_err();
        assert!(err.to_string().contains("another process holds it") && err.to_string().contains("read-only"), "{err}");
    }

    #[test]
    fn a_read_only_open_sees_every_unflushed_write_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = vec![b"z".to_vec(), vec![1; 40], vec![1; 24], vec![2; 32], b"a".to_vec()];
        {
            let store = RocksStore::open(dir.path(), &StoreOptions::default(), system_clock()).unwrap();
            let mut batch = StateBatch::default();
            for keyspace in Keyspace::ALL {
                for key in &keys {
                    batch.put(keyspace, key.clone(), i64::MAX.to_be_bytes().to_vec());
                }
            }
            store.write(batch).unwrap();
            // Dropped without a flush: everything is in the write-ahead log only.
        }
        let store = RocksStore::open_read_only(dir.path()).unwrap();
        let mut sorted = keys.clone();
        sorted.sort();
        for keyspace in Keyspace::ALL {
            let mut seen = Vec::new();
            store.for_each(keyspace, |key, _| Ok(seen.push(key.to_vec()))).unwrap();
            assert_eq!(seen, sorted, "{}", keyspace.name());
            for key in &keys {
                assert!(store.get(keyspace, key).unwrap().is_some(), "{} {key:?}", keyspace.name());
            }
        }
        assert!(!store.is_empty().unwrap());
    }

    #[test]
    fn state_written_with_the_earlier_table_options_reads_the_same() {
        // The earlier layout of the options: one skiplist memtable per keyspace, a
        // fixed 24-byte prefix extractor on Keys and none elsewhere. Its files
        // carry that extractor's name; RocksDB must not use their prefix filters
        // with the new extractor, and every read must still find what they hold.
        let dir = tempfile::tempdir().unwrap();
        let key = [[7u8; 8].as_slice(), &[3u8; 16], &42i64.to_be_bytes()].concat();
        let hash = [[7u8; 8].as_slice(), &[9u8; 32]].concat();
        {
            let mut db_options = Options::default();
            db_options.create_if_missing(true);
            db_options.create_missing_column_families(true);
            let descriptors = Keyspace::ALL.map(|keyspace| {
                let mut cf = Options::default();
                let mut block = BlockBasedOptions::default();
                block.set_bloom_filter(10.0, false);
                cf.set_block_based_table_factory(&block);
                if keyspace == Keyspace::Keys {
                    cf.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(24));
                }
                ColumnFamilyDescriptor::new(keyspace.name(), cf)
            });
            let db = DB::open_cf_descriptors(&db_options, dir.path(), descriptors).unwrap();
            db.put_cf(db.cf_handle("keys").unwrap(), &key, i64::MAX.to_be_bytes()).unwrap();
            db.put_cf(db.cf_handle("hashes").unwrap(), &hash, i64::MAX.to_be_bytes()).unwrap();
            for keyspace in Keyspace::ALL {
                db.flush_cf(db.cf_handle(keyspace.name()).unwrap()).unwrap();
            }
        }
        let store = RocksStore::open(dir.path(), &StoreOptions::default(), system_clock()).unwrap();
        let (from, to) = ([&key[..24], &0i64.to_be_bytes()].concat(), [&key[..24], &100i64.to_be_bytes()].concat());
        assert_eq!(store.scan(Keyspace::Keys, &from, &to).unwrap().len(), 1, "a key in an earlier file was missed");
        assert!(store.get(Keyspace::Hashes, &hash).unwrap().is_some());
        // New writes beside the old files, and a scan that finds both.
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Keys, [&key[..24], &43i64.to_be_bytes()].concat(), i64::MAX.to_be_bytes().to_vec());
        store.write(batch).unwrap();
        assert_eq!(store.scan(Keyspace::Keys, &from, &to).unwrap().len(), 2);
        store.flush().unwrap();
        store.compact().unwrap();
        assert_eq!(store.scan(Keyspace::Keys, &from, &to).unwrap().len(), 2);
    }

    #[test]
    fn every_lookup_is_timed_in_the_histogram_of_its_operation_and_keyspace() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let dir = tempfile::tempdir().unwrap();
        // Opened under the recorder, as the worker opens it after installing its own.
        let store = metrics::with_local_recorder(&recorder, || RocksStore::open(dir.path(), &StoreOptions::default(), system_clock())).unwrap();
        store.get(Keyspace::Hashes, b"h").unwrap();
        store.get(Keyspace::Hashes, b"h").unwrap();
        store.scan(Keyspace::Keys, b"a", b"b").unwrap();
        store.get(Keyspace::Shipments, b"s").unwrap();
        let text = handle.render();
        for line in [
            "waymark_store_lookup_seconds_count{op=\"get\",keyspace=\"hashes\"} 2",
            "waymark_store_lookup_seconds_count{op=\"scan\",keyspace=\"keys\"} 1",
            "waymark_store_lookup_seconds_count{op=\"get\",keyspace=\"shipments\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn reads_fill_the_block_cache_within_its_cap_and_the_gauge_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 4 << 20;
        let options = StoreOptions { block_cache_bytes: cap, sync_writes: false, ..StoreOptions::default() };
        let store = RocksStore::open(dir.path(), &options, system_clock()).unwrap();
        let key = |i: u32| [&[7u8; 8][..], blake3::hash(&i.to_le_bytes()).as_bytes()].concat();
        let mut batch = StateBatch::default();
        for i in 0..50_000u32 {
            batch.put(Keyspace::Hashes, key(i), i64::MAX.to_be_bytes().to_vec());
        }
        store.write(batch).unwrap();
        store.flush().unwrap();
        // Point lookups, hits and misses, as dedupe makes them.
        for i in 0..100_000u32 {
            assert_eq!(store.get(Keyspace::Hashes, &key(i)).unwrap().is_some(), i < 50_000);
        }
        let memory = store.memory_bytes().unwrap();
        let cache = memory.iter().find(|(kind, _)| *kind == "block_cache").map(|(_, bytes)| *bytes).unwrap();
        assert!(cache > 0, "reads of flushed data left nothing in the block cache: {memory:?}");
        assert!(cache <= cap as u64, "block cache at {cache} bytes, above its {cap}-byte cap: {memory:?}");
    }
}
