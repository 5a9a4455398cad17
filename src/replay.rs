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

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use thiserror::Error;

use crate::batch::{process, Summary};
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::output::DeadLetter;
use crate::pipeline::Pipeline;
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
}

/// Records per batch (one flush and one state write each).
pub const BATCH: usize = 1000;

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

/// Replay one archive stream. `on_progress` is called after each batch with the
/// running summary (the CLI draws its progress bar from it).
pub fn replay_stream<S: StateStore + ?Sized>(
    pipeline: &Pipeline,
    store: &S,
    reader: &mut dyn BufRead,
    archive_name: &str,
    sink: &mut dyn Sink,
    now: &dyn Fn() -> DateTime<Utc>,
    summary: &mut Summary,
    on_progress: &mut dyn FnMut(&Summary),
) -> Result<(), ReplayError> {
    let mut batch: Vec<Envelope> = Vec::with_capacity(BATCH);
    let mut malformed: Vec<DeadLetter> = Vec::new();
    let mut line = String::new();
    let mut line_no: i64 = 0;
    loop {
        line.clear();
        let n = read_line_lossy(reader, &mut line).map_err(|source| ReplayError::Read { path: archive_name.into(), source })?;
        if n > 0 {
            line_no += 1;
            let trimmed = line.trim();
            if !trimmed.is_empty() {
                match Envelope::from_kcat_json(trimmed) {
                    Ok(envelope) => batch.push(envelope),
                    Err(error) => {
                        // Keep the line itself so nothing is silently dropped.
                        let envelope = Envelope {
                            topic: archive_name.to_string(),
                            partition: -1,
                            offset: line_no,
                            timestamp_ms: None,
                            headers: Vec::new(),
                            key: None,
                            payload: trimmed.as_bytes().to_vec(),
                        };
                        summary.records += 1;
                        summary.invalid += 1;
                        for counts in [summary.by_carrier.entry("unknown".into()).or_default(), summary.by_tenant.entry("unknown".into()).or_default()] {
                            counts.records += 1;
                            counts.invalid += 1;
                        }
                        *summary.invalid_by_kind.entry(error.kind().to_string()).or_default() += 1;
                        malformed.push(DeadLetter::new(&envelope, &error, None, None, now()));
                    }
                }
            }
        }
        if batch.len() >= BATCH || (n == 0 && (!batch.is_empty() || !malformed.is_empty())) {
            let output = process(pipeline, store, &batch, now(), false, None)?;
            let mut dead = std::mem::take(&mut malformed);
            dead.extend(output.dead_letters);
            let output = crate::batch::BatchOutput { dead_letters: dead, ..output };
            match crate::batch::deliver(store, sink, output, &mut crate::batch::no_crash) {
                Ok(delivered) => summary.merge(&delivered),
                Err(crate::batch::DeliverError::Sink(e)) => return Err(e.into()),
                Err(crate::batch::DeliverError::Store(e)) => return Err(e.into()),
                Err(crate::batch::DeliverError::Crashed(point)) => unreachable!("no failpoint is armed in replay ({point:?})"),
            }
            on_progress(summary);
            batch.clear();
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Read one line; invalid UTF-8 is kept (lossily) so the line still reaches the
/// dead-letter output instead of aborting the replay.
fn read_line_lossy(reader: &mut dyn BufRead, line: &mut String) -> std::io::Result<usize> {
    let mut bytes = Vec::new();
    let n = reader.read_until(b'\n', &mut bytes)?;
    line.push_str(&String::from_utf8_lossy(&bytes));
    Ok(n)
}
