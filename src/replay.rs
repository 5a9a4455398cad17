//! `waymark replay`: historical archives through the very same pipeline and state.
//!
//! Semantics: archives are `kcat -C -J` NDJSON (plain or `.gz`, a file, a directory
//! of them in name order, or stdin). Each record is deduped against the state in
//! `--state-dir` (the worker's own state, when it is stopped) and against the rest
//! of the archive; without `--state-dir` the state lives in memory and the archive is
//! deduped only within itself. Records are processed in batches; a batch's state is
//! written only after its upserts and dead letters are flushed, so an interrupted
//! replay re-run emits at most identical upserts again. Replay never touches the
//! worker's input progress (stored offsets).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use thiserror::Error;

use crate::batch::{process, process_prepared, Summary};
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::output::DeadLetter;
use crate::pipeline::{stored_offset, Pipeline, Prepared, RecordResult};
use crate::sink::{Sink, SinkError};
use crate::state::StateStore;

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot read archive {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("replaying topic `{topic}`: {reason} (check kafka.brokers, the topic's name and that this principal may read it)")]
    Topic { topic: String, reason: String },
    #[error(
        "replaying topic `{topic}`: no record for {seconds} s while {waiting} still had records to read; nothing past them was replayed. \
         The broker may be unreachable, or an open transaction holds back what a read_committed reader sees. \
         Run the same command again once the broker answers (with --state-dir it continues where this run stopped)"
    )]
    TopicStalled { topic: String, seconds: u64, waiting: String },
}

/// Records per batch (one flush and one state write each).
pub const BATCH: usize = 1000;

/// Bytes of archive lines per batch at most (a batch closes at whichever of this
/// and [`BATCH`] comes first), as `worker.batch_max_bytes` bounds the worker's.
pub const BATCH_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Longest archive line read into memory for a body limit of `max_body_bytes`:
/// a body of that size written as a JSON string takes at most 6 bytes per byte
/// (`\u00XX`), plus room for the envelope's other fields. A longer line is not
/// held: its start (enough for the dead letter, which keeps 256 KiB of a body)
/// is kept, the rest is skipped up to the next line, and it becomes a
/// `too_large` dead letter.
pub fn max_line_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_mul(6).saturating_add(64 * 1024)
}

/// Bytes kept of a line over [`max_line_bytes`].
const OVERLONG_LINE_KEPT: usize = 256 * 1024;

/// How long a topic replay waits without a record before it fails (see
/// [`ReplayError::TopicStalled`]).
pub const TOPIC_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The archive files behind `input`, in the order they are replayed.
pub fn archive_files(input: &Path) -> Result<Vec<PathBuf>, ReplayError> {
    let meta = std::fs::metadata(input).map_err(|source| ReplayError::Read { path: input.into(), source })?;
    if !meta.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(input).map_err(|source| ReplayError::Read { path: input.into(), source })? {
        let entry = entry.map_err(|source| ReplayError::Read { path: input.into(), source })?;
        let path = entry.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Open one archive, gunzipping it when its content is gzip (whatever its name).
pub fn open_archive(path: &Path) -> Result<Box<dyn BufRead>, ReplayError> {
    open_archive_counted(path, &Arc::default())
}

/// [`open_archive`], adding the bytes read from the file (compressed, as on
/// disk: comparable with the file's size for progress and ETA) to `read`.
pub fn open_archive_counted(path: &Path, read: &Arc<AtomicU64>) -> Result<Box<dyn BufRead>, ReplayError> {
    let file = File::open(path).map_err(|source| ReplayError::Read { path: path.into(), source })?;
    let counted = Counted { inner: file, read: read.clone() };
    gunzip_if_gzip(Box::new(counted)).map_err(|source| ReplayError::Read { path: path.into(), source })
}

/// Standard input as an archive (gzip recognised by its content, as for files).
pub fn open_stdin() -> Result<Box<dyn BufRead>, ReplayError> {
    open_stdin_counted(&Arc::default())
}

/// [`open_stdin`], counting the bytes read into `read`.
pub fn open_stdin_counted(read: &Arc<AtomicU64>) -> Result<Box<dyn BufRead>, ReplayError> {
    let counted = Counted { inner: std::io::stdin(), read: read.clone() };
    gunzip_if_gzip(Box::new(counted)).map_err(|source| ReplayError::Read { path: "-".into(), source })
}

/// A reader that adds what it reads to a shared counter.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// gzip streams start with the bytes 1f 8b: look, then read through a decoder or not.
fn gunzip_if_gzip(reader: Box<dyn Read>) -> std::io::Result<Box<dyn BufRead>> {
    let mut buffered = BufReader::with_capacity(1 << 20, reader);
    let gzip = buffered.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    if gzip {
        Ok(Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(buffered))))
    } else {
        Ok(Box::new(buffered))
    }
}

/// One replay run: the pipeline and state it goes through, where its outputs go,
/// and what it has counted so far. `stream` and `topic` feed it; the summary
/// keeps growing across sources (a directory of archives is one run).
pub struct Replay<'a, S: StateStore + ?Sized> {
    pub pipeline: &'a Pipeline,
    pub store: &'a S,
    pub sink: &'a mut dyn Sink,
    /// The injected clock.
    pub now: &'a dyn Fn() -> DateTime<Utc>,
    pub summary: Summary,
    /// Called after each batch with the running summary (progress display).
    pub on_progress: &'a mut dyn FnMut(&Summary),
    /// Skip what an earlier run with the same source committed to this store.
    pub resume: bool,
}

impl<S: StateStore + ?Sized> Replay<'_, S> {
    /// Replay one archive stream. With `resume`, lines an earlier run with the
    /// same archive name committed to this store are skipped (the store records
    /// the last committed line with each batch's state).
    ///
    /// Two stages overlap: while one batch is deduped, ordered and delivered on
    /// this thread (in archive order, as always), the next batch's lines are
    /// parsed and normalized on other threads (that half touches no state). At
    /// most three batches are in memory: the one being read, the one being
    /// prepared and the one being applied.
    pub fn stream(&mut self, reader: &mut dyn BufRead, archive_name: &str) -> Result<(), ReplayError> {
        let (store, resume) = (self.store, self.resume);
        // Raw lines: checking their UTF-8 is part of preparing, off this thread.
        let mut lines: Vec<ArchiveLine> = Vec::with_capacity(BATCH);
        let mut line = Vec::new();
        let mut line_no: i64 = 0;
        // Resumable: the store remembers the last line whose batch it committed.
        let checkpoint = (archive_name != "stdin").then(|| checkpoint_key(&["archive", archive_name]));
        let resume_after = match &checkpoint {
            Some(key) if resume => stored_offset(store, key)?.unwrap_or(0),
            _ => 0,
        };
        if resume_after > 0 {
            tracing::info!(archive = %archive_name, line = resume_after, "resuming after the last line an earlier run committed");
        }
        let mut applying: Option<PreparedLines> = None;
        let max_line = max_line_bytes(self.pipeline.carriers.max_body_bytes);
        let mut batch_bytes = 0usize;
        loop {
            line.clear();
            let (n, overlong) =
                read_bounded_line(reader, &mut line, max_line).map_err(|source| ReplayError::Read { path: archive_name.into(), source })?;
            if n > 0 {
                line_no += 1;
                // Blank lines are not records and do not count towards a batch
                // (lines of Unicode whitespace only are dropped when prepared).
                if line_no > resume_after && !line.iter().all(u8::is_ascii_whitespace) {
                    batch_bytes += line.len();
                    // The next line is likely about as long: one allocation, no regrowth.
                    let capacity = line.len().clamp(256, max_line);
                    let bytes = std::mem::replace(&mut line, Vec::with_capacity(capacity));
                    lines.push(ArchiveLine { line_no, bytes, overlong: overlong.then_some(n) });
                }
            }
            if lines.len() >= BATCH || batch_bytes >= BATCH_MAX_BYTES || (n == 0 && !lines.is_empty()) {
                batch_bytes = 0;
                let batch = std::mem::replace(&mut lines, Vec::with_capacity(BATCH));
                let done = checkpoint.as_ref().map(|key| vec![(key.clone(), line_no)]).unwrap_or_default();
                let now = (self.now)();
                let pipeline = self.pipeline;
                // Prepare this batch while the previous one is applied.
                let previous = applying.take();
                let prepared = std::thread::scope(|scope| {
                    let preparing = scope.spawn(move || PreparedLines::prepare(pipeline, batch, archive_name, now, done));
                    let delivered = previous.map_or(Ok(()), |previous| self.deliver_prepared(previous));
                    let prepared = preparing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    delivered.map(|()| prepared)
                })?;
                applying = Some(prepared);
            }
            if n == 0 {
                return applying.map_or(Ok(()), |last| self.deliver_prepared(last));
            }
        }
    }

    /// A prepared batch of archive lines through the rest of the pipeline: its
    /// unreadable lines counted as invalid records of an unknown carrier and
    /// tenant (their dead letters keep the line itself, so nothing is silently
    /// dropped), then dedupe, order and the commit order.
    fn deliver_prepared(&mut self, batch: PreparedLines) -> Result<(), ReplayError> {
        for dead in &batch.malformed {
            // A record without carrier or tenant: counted under `unknown`.
            self.summary.add_result(&RecordResult { dead_letter: Some(dead.clone()), ..RecordResult::default() });
        }
        let output = process_prepared(self.pipeline, self.store, &batch.envelopes, batch.prepared, batch.now, false, None)?;
        self.commit(output, batch.malformed, &batch.done)
    }

    /// Replay a topic's retained history (all partitions, `read_committed`) through
    /// the pipeline. The reading consumer assigns partitions itself and never commits:
    /// it joins no group, so the live group's membership and offsets are untouched.
    ///
    /// Returns the offsets it read, per partition: `[start, stop)`.
    pub fn topic(&mut self, client: &rdkafka::config::ClientConfig, topic: &str, range: &TopicRange) -> Result<std::collections::BTreeMap<i32, (i64, i64)>, ReplayError> {
        let (store, resume) = (self.store, self.resume);
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        use rdkafka::{Offset, TopicPartitionList};
        let failed = |e: rdkafka::error::KafkaError| ReplayError::Topic { topic: topic.to_string(), reason: e.to_string() };
        let timeout = std::time::Duration::from_secs(30);
        let mut client = client.clone();
        client
            .set("group.id", format!("waymark-replay-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer = client.create().map_err(failed)?;
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(failed)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if partitions.is_empty() {
            return Err(ReplayError::Topic { topic: topic.to_string(), reason: "no such topic, or it has no partitions".into() });
        }
        // Offsets of the range's edges, per partition.
        let offsets_at = |at: Option<DateTime<Utc>>| -> Result<HashMap<i32, Option<i64>>, ReplayError> {
            let mut out = HashMap::new();
            let Some(at) = at else { return Ok(out) };
            let mut query = TopicPartitionList::new();
            for p in &partitions {
                query.add_partition_offset(topic, *p, Offset::Offset(at.timestamp_millis())).map_err(failed)?;
            }
            for element in consumer.offsets_for_times(query, timeout).map_err(failed)?.elements() {
                out.insert(element.partition(), if let Offset::Offset(o) = element.offset() { Some(o) } else { None });
            }
            Ok(out)
        };
        let since = range.since.map(|t| t.to_rfc3339()).unwrap_or_default();
        let until = range.until.map(|t| t.to_rfc3339()).unwrap_or_default();
        let checkpoint_of = |partition: i32| checkpoint_key(&["topic", topic, &since, &until, &partition.to_string()]);
        let starts = offsets_at(range.since)?;
        let stops = offsets_at(range.until)?;
        let mut assignment = TopicPartitionList::new();
        let mut end: HashMap<i32, i64> = HashMap::new();
        let mut read = std::collections::BTreeMap::new();
        for p in &partitions {
            let (low, high) = consumer.fetch_watermarks(topic, *p, timeout).map_err(failed)?;
            let start = match (range.since, starts.get(p)) {
                (Some(_), Some(Some(o))) => *o,
                (Some(_), _) => high, // nothing at or after `since`
                (None, _) => low,
            };
            // Resumable: continue after what an earlier run with this range committed.
            let start = if resume { start.max(stored_offset(store, &checkpoint_of(*p))?.unwrap_or(0)) } else { start };
            let stop = match (range.until, stops.get(p)) {
                (Some(_), Some(Some(o))) => *o,
                _ => high,
            };
            if start < stop {
                assignment.add_partition_offset(topic, *p, Offset::Offset(start)).map_err(failed)?;
                end.insert(*p, stop);
                read.insert(*p, (start, stop));
            }
        }
        if end.is_empty() {
            return Ok(read);
        }
        consumer.assign(&assignment).map_err(failed)?;
        let mut batch: Vec<Envelope> = Vec::with_capacity(BATCH);
        let mut idle = std::time::Instant::now();
        while !end.is_empty() {
            match consumer.poll(std::time::Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    idle = std::time::Instant::now();
                    let partition = m.partition();
                    let Some(stop) = end.get(&partition).copied() else { continue };
                    if m.offset() >= stop {
                        end.remove(&partition);
                        continue;
                    }
                    if m.offset() + 1 >= stop {
                        end.remove(&partition);
                    }
                    batch.push(crate::worker::consumer::envelope_of(&m));
                }
                Some(Err(e)) => tracing::warn!(error = %e, %topic, "reading the topic; retrying"),
                None => {
                    // A transaction marker or aborted records can sit at a range's end:
                    // no record arrives for them, but the position moves past them.
                    if let Ok(position) = consumer.position() {
                        for element in position.elements() {
                            if let Offset::Offset(next) = element.offset() {
                                if end.get(&element.partition()).is_some_and(|stop| next >= *stop) {
                                    end.remove(&element.partition());
                                }
                            }
                        }
                    }
                    // Never end quietly short of the range: a backfill that stops
                    // at a broker outage and exits 0 looks complete.
                    if idle.elapsed() > range.stall_timeout {
                        if !batch.is_empty() {
                            self.deliver(&batch, Vec::new(), &topic_checkpoints(&batch, &checkpoint_of))?;
                        }
                        let positions = consumer.position().ok();
                        let mut waiting: Vec<String> = end
                            .iter()
                            .map(|(partition, stop)| {
                                let at = positions
                                    .as_ref()
                                    .and_then(|p| p.find_partition(topic, *partition))
                                    .and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o.to_string()) } else { None })
                                    .unwrap_or_else(|| "?".into());
                                format!("partition {partition} (at offset {at} of {stop})")
                            })
                            .collect();
                        waiting.sort();
                        return Err(ReplayError::TopicStalled {
                            topic: topic.to_string(),
                            seconds: range.stall_timeout.as_secs().max(1),
                            waiting: waiting.join(", "),
                        });
                    }
                }
            }
            if batch.len() >= BATCH || (end.is_empty() && !batch.is_empty()) || (!batch.is_empty() && idle.elapsed() > std::time::Duration::from_secs(1)) {
                self.deliver(&batch, Vec::new(), &topic_checkpoints(&batch, &checkpoint_of))?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            self.deliver(&batch, Vec::new(), &topic_checkpoints(&batch, &checkpoint_of))?;
        }
        Ok(read)
    }

    /// One batch through the pipeline and the commit order (outputs, then state);
    /// `done` are checkpoints (key, position) committed atomically with the state.
    fn deliver(&mut self, batch: &[Envelope], malformed: Vec<DeadLetter>, done: &[(Vec<u8>, i64)]) -> Result<(), ReplayError> {
        let output = process(self.pipeline, self.store, batch, (self.now)(), false, None)?;
        self.commit(output, malformed, done)
    }

    /// A processed batch's outputs, then its state with the checkpoints `done`.
    fn commit(&mut self, mut output: crate::batch::BatchOutput, malformed: Vec<DeadLetter>, done: &[(Vec<u8>, i64)]) -> Result<(), ReplayError> {
        for (key, position) in done {
            output.state.put(crate::state::Keyspace::Offsets, key.clone(), position.to_be_bytes().to_vec());
        }
        let mut dead = malformed;
        dead.extend(output.dead_letters);
        let output = crate::batch::BatchOutput { dead_letters: dead, ..output };
        match crate::batch::deliver(self.store, self.sink, output, &mut crate::failpoint::hook) {
            Ok(delivered) => {
                self.summary.merge(&delivered);
                (self.on_progress)(&self.summary);
            }
            Err(crate::batch::DeliverError::Sink(e)) => return Err(e.into()),
            Err(crate::batch::DeliverError::Store(e)) => return Err(e.into()),
            Err(crate::batch::DeliverError::Crashed(point)) => unreachable!("the replay's crash hook aborts the process itself, it never reports a crash ({point:?})"),
        }
        Ok(())
    }
}

/// A batch of archive lines read and normalized (no state touched yet).
struct PreparedLines {
    envelopes: Vec<Envelope>,
    prepared: Vec<(Prepared, std::time::Duration)>,
    /// Dead letters of the lines that are not envelopes.
    malformed: Vec<DeadLetter>,
    /// The instant the batch is processed at (one per batch, for both halves).
    now: DateTime<Utc>,
    /// Checkpoints committed with the batch's state.
    done: Vec<(Vec<u8>, i64)>,
}

impl PreparedLines {
    /// Parse the lines as envelopes and normalize them, on the pipeline's threads.
    fn prepare(pipeline: &Pipeline, lines: Vec<ArchiveLine>, archive_name: &str, now: DateTime<Utc>, done: Vec<(Vec<u8>, i64)>) -> PreparedLines {
        let max_line = max_line_bytes(pipeline.carriers.max_body_bytes);
        let lines: Vec<(i64, String, Option<usize>)> = lines
            .into_iter()
            .map(|line| (line.line_no, text_lossy(line.bytes), line.overlong))
            .filter(|(_, line, _)| !line.trim().is_empty())
            .collect();
        let parsed = crate::parallel::map_ordered(&lines, pipeline.threads, |(_, line, overlong)| match overlong {
            Some(size) => Err(crate::error::RecordError::LineTooLong { size: *size, limit: max_line }),
            None => Envelope::from_kcat_json(line.trim()),
        });
        let mut envelopes = Vec::with_capacity(lines.len());
        let mut malformed = Vec::new();
        for ((line_no, line, _), parsed) in lines.iter().zip(parsed) {
            match parsed {
                Ok(envelope) => envelopes.push(envelope),
                Err(error) => {
                    // Keep the line itself so nothing is silently dropped.
                    let envelope = Envelope {
                        topic: archive_name.to_string(),
                        partition: -1,
                        offset: *line_no,
                        timestamp_ms: None,
                        headers: Vec::new(),
                        key: None,
                        payload: line.trim().as_bytes().to_vec(),
                    };
                    malformed.push(DeadLetter::new(&envelope, &error, None, None, now));
                }
            }
        }
        let prepared = pipeline.prepare_batch(&envelopes, now);
        PreparedLines { envelopes, prepared, malformed, now, done }
    }
}

/// An archive line as text; invalid UTF-8 is kept (lossily) so the line still
/// reaches the dead-letter output instead of aborting the replay. A valid line
/// (every line, normally) is not copied.
fn text_lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// One archive line as read: its number (from 1) and bytes.
struct ArchiveLine {
    line_no: i64,
    bytes: Vec<u8>,
    /// The line's whole length when it was over [`max_line_bytes`] and only its
    /// start was kept.
    overlong: Option<usize>,
}

/// Read one line (up to and including `\n`) into `line`, holding at most `max`
/// bytes of it: past that, only the first [`OVERLONG_LINE_KEPT`] bytes are kept
/// and the rest is read and dropped. Returns the line's whole length (0 at the
/// end of the input) and whether it was over `max`. So one line without a
/// newline (a corrupt or binary file) cannot take all memory.
fn read_bounded_line(reader: &mut dyn BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<(usize, bool)> {
    let mut total = 0usize;
    let mut overlong = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((total, overlong));
        }
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let used = chunk.len();
        if !overlong && line.len() + used > max {
            overlong = true;
            line.truncate(OVERLONG_LINE_KEPT);
        }
        let room = if overlong { OVERLONG_LINE_KEPT.saturating_sub(line.len()) } else { used };
        line.extend_from_slice(&chunk[..room.min(used)]);
        total += used;
        reader.consume(used);
        if done {
            return Ok((total, overlong));
        }
    }
}

/// Where a topic replay starts and stops.
#[derive(Debug, Clone)]
pub struct TopicRange {
    /// First record at or after this time (`None`: each partition's beginning).
    pub since: Option<DateTime<Utc>>,
    /// Last record before this time (`None`: each partition's end when the replay
    /// starts; records produced later are not read).
    pub until: Option<DateTime<Utc>>,
    /// How long the replay may go without a record while the range is not read
    /// to its end before it fails ([`TOPIC_STALL_TIMEOUT`] by default).
    pub stall_timeout: std::time::Duration,
}

impl Default for TopicRange {
    fn default() -> Self {
        TopicRange { since: None, until: None, stall_timeout: TOPIC_STALL_TIMEOUT }
    }
}

/// The key under which a replay source's progress is stored (offsets keyspace):
/// a digest of what identifies the source, so a run with the same arguments
/// finds it. Starts with a NUL byte, shorter than any progress key.
pub fn checkpoint_key(parts: &[&str]) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let mut key = b"\0replay\0".to_vec();
    key.extend_from_slice(&hasher.finalize().as_bytes()[..16]);
    key
}

/// Per partition of a topic batch: the next offset to read.
fn topic_checkpoints(batch: &[Envelope], checkpoint_of: &dyn Fn(i32) -> Vec<u8>) -> Vec<(Vec<u8>, i64)> {
    let mut next: HashMap<i32, i64> = HashMap::new();
    for envelope in batch {
        let entry = next.entry(envelope.partition).or_insert(0);
        *entry = (*entry).max(envelope.offset + 1);
    }
    next.into_iter().map(|(partition, offset)| (checkpoint_of(partition), offset)).collect()
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::MemorySink;
    use crate::state::{MemoryStore, Staged};
    use crate::synth::{generate, TrafficSpec};
    use chrono::TimeZone;

    /// Archive lines of a realistic stream over several batches, with lines that
    /// are not envelopes and blank lines among them.
    fn archive() -> (Vec<String>, usize) {
        let traffic = generate(&TrafficSpec { seed: 7, shipments: 600, redelivery: 0.3, replay: 0.2, reorder: 0.2, ..TrafficSpec::default() });
        let mut lines = Vec::new();
        for (i, envelope) in traffic.envelopes.iter().enumerate() {
            lines.push(envelope.to_kcat_json());
            if i % 997 == 3 {
                lines.push("{not an envelope".into());
                lines.push(String::new());
            }
        }
        assert!(lines.len() > 3 * BATCH, "the archive must span several batches: {}", lines.len());
        (lines, traffic.distinct_events)
    }

    #[test]
    fn a_stream_replays_exactly_as_its_batches_one_after_another() {
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let (lines, distinct) = archive();
        let pipeline = Pipeline { threads: 2, ..Pipeline::default() };

        // The overlapped stream.
        let store = MemoryStore::default();
        let mut sink = MemorySink::default();
        let clock = move || now;
        let mut progress = |_: &Summary| {};
        let mut replay = Replay { pipeline: &pipeline, store: &store, sink: &mut sink, now: &clock, summary: Summary::default(), on_progress: &mut progress, resume: false };
        let text = lines.join("\n");
        replay.stream(&mut text.as_bytes(), "archive.ndjson").unwrap();
        let summary = replay.summary.clone();

        // The same batches, each read, processed and committed before the next.
        let reference_store = MemoryStore::default();
        let mut reference = Vec::new();
        let mut invalid = 0;
        let non_blank: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
        for chunk in non_blank.chunks(BATCH) {
            let envelopes: Vec<Envelope> = chunk.iter().filter_map(|l| Envelope::from_kcat_json(l.trim()).ok()).collect();
            invalid += chunk.len() - envelopes.len();
            let output = process(&pipeline, &reference_store, &envelopes, now, false, None).unwrap();
            reference.extend(output.upserts);
            reference_store.write(output.state).unwrap();
        }

        assert_eq!(sink.upserts.len(), distinct, "one upsert per distinct event");
        assert_eq!(sink.upserts, reference, "the overlapped stream emitted other upserts, or in another order");
        assert_eq!(sink.dead_letters.len(), invalid);
        assert_eq!(summary.invalid as usize, invalid);
        assert_eq!(summary.records as usize, non_blank.len());
        // Both committed the same state.
        let entries = |store: &MemoryStore| Staged::new(store).scan(crate::state::Keyspace::Keys, &[], &[0xff; 64]).unwrap();
        assert_eq!(entries(&store), entries(&reference_store));
    }

    /// Reading and checking lines moved off the applying thread: blank lines
    /// (ASCII or Unicode whitespace) are still no records, and a line that is not
    /// UTF-8 is still a dead letter that keeps the line (lossily), not an error
    /// that stops the replay.
    #[test]
    fn blank_lines_are_skipped_and_lines_that_are_not_utf8_are_dead_letters() {
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let traffic = generate(&TrafficSpec { seed: 3, shipments: 5, ..TrafficSpec::default() });
        let mut archive = Vec::new();
        for line in [
            traffic.envelopes[0].to_kcat_json().as_bytes(),
            b"  \t ",
            "\u{a0}\u{2003}".as_bytes(),
            b"{\"topic\": \"t\", \"payload\": \"\xff\xfe\"}",
            traffic.envelopes[1].to_kcat_json().as_bytes(),
        ] {
            archive.extend_from_slice(line);
            archive.push(b'\n');
        }
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let mut sink = MemorySink::default();
        let clock = move || now;
        let mut progress = |_: &Summary| {};
        let mut replay = Replay { pipeline: &pipeline, store: &store, sink: &mut sink, now: &clock, summary: Summary::default(), on_progress: &mut progress, resume: false };
        replay.stream(&mut archive.as_slice(), "archive.ndjson").unwrap();
        let summary = replay.summary.clone();
        assert_eq!(summary.records, 3, "two envelopes and one line that is not UTF-8");
        assert_eq!(summary.invalid, 1);
        assert_eq!(sink.dead_letters.len(), 1);
        let kept = serde_json::to_string(&sink.dead_letters[0].envelope).unwrap();
        assert!(kept.contains('\u{fffd}'), "the dead letter keeps the line, its invalid bytes replaced: {kept}");
        assert_eq!(sink.dead_letters[0].envelope.offset, 4, "line numbers count every line read");
    }

    /// A line is held up to its limit, whatever its length: an overlong one keeps
    /// its start and the reader goes on at the next line.
    #[test]
    fn lines_are_read_up_to_a_bound_and_the_rest_of_an_overlong_one_is_skipped() {
        let mut input = b"ab\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1_000_000));
        input.extend_from_slice(b"\ncd");
        // A tiny buffer, so every line arrives in many pieces.
        let mut reader = std::io::BufReader::with_capacity(7, input.as_slice());
        let mut line = Vec::new();
        assert_eq!(read_bounded_line(&mut reader, &mut line, 10).unwrap(), (3, false));
        assert_eq!(line, b"ab\n");
        line.clear();
        assert_eq!(read_bounded_line(&mut reader, &mut line, 10).unwrap(), (1_000_001, true));
        assert_eq!(line.len(), OVERLONG_LINE_KEPT, "only the start of an overlong line is held");
        line.clear();
        assert_eq!(read_bounded_line(&mut reader, &mut line, 10).unwrap(), (2, false));
        assert_eq!(line, b"cd", "the last line needs no newline");
        line.clear();
        assert_eq!(read_bounded_line(&mut reader, &mut line, 10).unwrap(), (0, false));
    }

    /// A line longer than any envelope of an acceptable body (a corrupt file, a
    /// binary file without newlines) is a `too_large` dead letter, and the lines
    /// after it are replayed.
    #[test]
    fn an_overlong_line_is_a_too_large_dead_letter_and_the_replay_goes_on() {
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let traffic = generate(&TrafficSpec { seed: 3, shipments: 5, ..TrafficSpec::default() });
        let mut pipeline = Pipeline::default();
        pipeline.carriers.max_body_bytes = 1000;
        let limit = max_line_bytes(1000);
        let mut archive = traffic.envelopes[0].to_kcat_json().into_bytes();
        archive.push(b'\n');
        archive.extend(std::iter::repeat_n(b'{', limit + 1));
        archive.push(b'\n');
        archive.extend_from_slice(traffic.envelopes[1].to_kcat_json().as_bytes());
        let store = MemoryStore::default();
        let mut sink = MemorySink::default();
        let clock = move || now;
        let mut progress = |_: &Summary| {};
        let mut replay = Replay { pipeline: &pipeline, store: &store, sink: &mut sink, now: &clock, summary: Summary::default(), on_progress: &mut progress, resume: false };
        replay.stream(&mut archive.as_slice(), "archive.ndjson").unwrap();
        let summary = replay.summary.clone();
        assert_eq!(summary.records, 3);
        assert_eq!(summary.invalid, 1);
        assert_eq!(summary.invalid_by_kind.get("too_large"), Some(&1));
        assert!(summary.events > 0, "the envelopes around the long line were normalized");
        let dead = &sink.dead_letters[0];
        assert_eq!(dead.envelope.offset, 2, "the dead letter names the line");
        assert!(dead.reason.contains(&format!("{} bytes", limit + 2)), "the reason gives the line's whole length: {}", dead.reason);
    }

    /// A topic replay that stops receiving records before the end of its range
    /// (a broker that stops answering fetches) fails with what to do, instead of
    /// ending where it stands and exiting 0 as if the backfill were complete.
    #[test]
    fn a_topic_replay_that_stops_receiving_fails_instead_of_ending_short() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("tracking.raw.easypost", 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: ThreadedProducer<DefaultProducerContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let traffic = generate(&TrafficSpec { seed: 5, shipments: 5, ..TrafficSpec::default() });
        for (i, envelope) in traffic.envelopes.iter().take(6).enumerate() {
            let record = BaseRecord::<(), [u8]>::to("tracking.raw.easypost").partition((i % 2) as i32).payload(&envelope.payload[..]);
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(std::time::Duration::from_secs(10)).unwrap();
        // Every fetch fails from now on; listing offsets still works.
        cluster.request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5000]);

        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let mut sink = MemorySink::default();
        let clock = move || now;
        let mut progress = |_: &Summary| {};
        let mut replay = Replay { pipeline: &pipeline, store: &store, sink: &mut sink, now: &clock, summary: Summary::default(), on_progress: &mut progress, resume: false };
        let mut client = rdkafka::ClientConfig::new();
        client.set("bootstrap.servers", &brokers);
        let range = TopicRange { stall_timeout: std::time::Duration::from_secs(2), ..TopicRange::default() };
        let error = replay.topic(&client, "tracking.raw.easypost", &range).unwrap_err();
        assert!(matches!(error, ReplayError::TopicStalled { .. }), "{error}");
        let text = error.to_string();
        assert!(text.contains("partition 0 (at offset") && text.contains("partition 1 (at offset"), "{text}");
        assert!(text.contains("Run the same command again"), "{text}");
    }
}
