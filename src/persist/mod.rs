//! Last-known-good key states on disk (`cache.persist_dir`): what a node accepted from a live
//! source is written here, and read back at start so clients are served before the origin or
//! the owner answers.
//!
//! One file per key, named by the hex SHA-256 of the key (keys are arbitrary text), holding a
//! [`Record`]: the key, its type, the node sent upstream, the coverage and the full encoded
//! response (the bytes an owner forwards to its followers), behind a magic and a SHA-256 of
//! the body. A file is written to a temporary file in the same directory, fsynced, then
//! renamed over the old one (`tempfile`'s `NamedTempFile::persist`), and the directory is
//! fsynced once per batch: a reader sees the old record or the new one, never a mix. Files
//! rather than an embedded database (redb): each record is independent (one bad file never
//! affects another key, and needs no repair of a shared structure), the directory can be
//! inspected and pruned with ordinary tools, and corruption is trivial to produce in a test.
//!
//! Guarantees:
//! - writes never block the apply path: it only puts the key's new state in a latest-wins map
//!   ([`Queue`]); one writer task ([`writer::spawn`]) drains it, so memory is bounded by the
//!   number of keys and a key written often costs one write per batch;
//! - a record that is too short, lacks the magic, fails its checksum, is larger than the
//!   bound ([`record_bound`]), does not decode, is of another format version, sits under
//!   another key's file name or fails the checks of a forwarded state is skipped at start
//!   with a log line naming the file and the reason, and counted
//!   (`persist_records_skipped_total{reason}`); it is never served; leftover temporary files
//!   (a write cut by a crash) are removed;
//! - never written: a state holding a `do_not_cache` resource (the key's record is removed
//!   instead, so an older state is not served after it), private pass-through keys;
//! - a key evicted (TTL, `max_entries`) or cleared loses its record; a shutdown does not.

mod record;
pub mod writer;

pub use record::{FORMAT_VERSION, HEADER_LEN, MAGIC, Record, SkipReason, file_name};
pub use writer::Queue;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::Bootstrap;
use crate::node_cache::Cache;
use crate::telemetry::Metrics;

/// The extension of record files.
pub const RECORD_EXTENSION: &str = "lkg";

/// Prefix of the temporary files a write renames into place.
const TEMP_PREFIX: &str = ".tmp-";

/// Room in a record for everything but the response, the node and the key (its framing,
/// type URL, version and coverage).
pub const RECORD_OVERHEAD: u64 = 1024 * 1024;

/// The largest record file read at start: the largest origin response accepted
/// (`origin_server.max_message_size`), node (`limits.max_node_bytes`) and key
/// (`limits.max_key_length`), plus [`RECORD_OVERHEAD`]. A larger file is skipped unread.
pub fn record_bound(bootstrap: &Bootstrap) -> u64 {
    let parts =
        [bootstrap.origin_server.max_message_size, bootstrap.limits.max_node_bytes, bootstrap.limits.max_key_length];
    parts.iter().map(|&n| u64::try_from(n).unwrap_or(u64::MAX)).fold(RECORD_OVERHEAD, u64::saturating_add)
}

/// Why the store could not do something; each names the directory or the file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// `cache.persist_dir` cannot be used.
    #[error("cache.persist_dir {dir}: {message}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A record could not be written.
    #[error("cannot write the record of key {key} to {path}: {source}")]
    Write {
        /// The key.
        key: String,
        /// The record file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record could not be removed.
    #[error("cannot remove the record of key {key} at {path}: {source}")]
    Remove {
        /// The key.
        key: String,
        /// The record file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory could not be synced after a batch.
    #[error("cannot sync the directory {dir}: {source}")]
    Sync {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A record file read at start.
#[derive(Debug)]
pub struct Found {
    /// The file.
    pub path: PathBuf,
    /// Its record.
    pub record: Record,
}

/// A file skipped at start, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: SkipReason,
    /// More about it, for the log.
    pub detail: String,
}

/// What a scan of the directory found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Whole records.
    pub records: Vec<Found>,
    /// Files that are not.
    pub skipped: Vec<Skipped>,
}

/// The directory of record files.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    max_record_bytes: u64,
}

impl Store {
    /// The store in `dir` (which the configuration's validation created), reading records of
    /// at most `max_record_bytes`.
    ///
    /// # Errors
    /// [`PersistError::Dir`] when `dir` is not a directory.
    pub fn open(dir: &Path, max_record_bytes: u64) -> Result<Self, PersistError> {
        if !dir.is_dir() {
            return Err(PersistError::Dir { dir: dir.to_owned(), message: "not a directory".to_owned() });
        }
        Ok(Self { dir: dir.to_owned(), max_record_bytes })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `key`'s record.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Reads every record file (blocking), in file name order, handing each whole record or
    /// skipped file to `visit` as it goes (one record in memory at a time). Leftover temporary
    /// files are removed and reported as skipped; files that are neither records nor
    /// temporary files are left alone.
    ///
    /// # Errors
    /// [`PersistError::Dir`] when the directory cannot be listed.
    pub fn visit(&self, mut visit: impl FnMut(Result<Found, Skipped>)) -> Result<(), PersistError> {
        let listing = std::fs::read_dir(&self.dir)
            .map_err(|e| PersistError::Dir { dir: self.dir.clone(), message: format!("cannot list it: {e}") })?;
        let mut paths: Vec<PathBuf> = listing.filter_map(|entry| entry.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            if name.starts_with(TEMP_PREFIX) {
                let removed =
                    std::fs::remove_file(&path).map_or_else(|e| format!("; cannot remove it: {e}"), |()| String::new());
                let detail = format!("a write cut short (temporary file){removed}");
                visit(Err(Skipped { path, reason: SkipReason::Corrupt, detail }));
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some(RECORD_EXTENSION) {
                continue;
            }
            match self.read(&path, &name) {
                Ok(record) => visit(Ok(Found { path, record })),
                Err((reason, detail)) => visit(Err(Skipped { path, reason, detail })),
            }
        }
        Ok(())
    }

    /// Every record file read at once ([`Store::visit`] collected).
    ///
    /// # Errors
    /// [`PersistError::Dir`] when the directory cannot be listed.
    pub fn scan(&self) -> Result<Scan, PersistError> {
        let mut scan = Scan::default();
        self.visit(|file| match file {
            Ok(found) => scan.records.push(found),
            Err(skipped) => scan.skipped.push(skipped),
        })?;
        Ok(scan)
    }

    /// Reads one record file named `name`.
    fn read(&self, path: &Path, name: &str) -> Result<Record, (SkipReason, String)> {
        let unreadable = |e: std::io::Error| (SkipReason::Corrupt, format!("cannot read it: {e}"));
        let metadata = std::fs::symlink_metadata(path).map_err(unreadable)?;
        if !metadata.is_file() {
            return Err((SkipReason::Corrupt, "not a regular file".to_owned()));
        }
        let too_large = |len: u64| {
            (SkipReason::TooLarge, format!("{len} bytes, over the bound of {} bytes", self.max_record_bytes))
        };
        if metadata.len() > self.max_record_bytes {
            return Err(too_large(metadata.len()));
        }
        let mut bytes = Vec::new();
        let file = std::fs::File::open(path).map_err(unreadable)?;
        // Bounded even if the file grows after its size was read.
        file.take(self.max_record_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(unreadable)?;
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if len > self.max_record_bytes {
            return Err(too_large(len));
        }
        let record = Record::from_file_bytes(&bytes).map_err(|reason| (reason, String::new()))?;
        if file_name(&record.key) != name {
            return Err((SkipReason::Decode, format!("it holds key {:?}, whose file has another name", record.key)));
        }
        Ok(record)
    }

    /// Writes `record` (blocking): to a temporary file in the directory, fsynced, then
    /// renamed over the key's file. The directory itself is synced by [`Store::sync_dir`].
    ///
    /// # Errors
    /// [`PersistError::Write`] naming the key and the file.
    pub fn write(&self, record: &Record) -> Result<(), PersistError> {
        use std::io::Write;
        let path = self.path_of(&record.key);
        let failed = |source| PersistError::Write { key: record.key.clone(), path: path.clone(), source };
        let mut file = tempfile::Builder::new().prefix(TEMP_PREFIX).tempfile_in(&self.dir).map_err(failed)?;
        file.write_all(&record.to_file_bytes()).map_err(failed)?;
        file.as_file().sync_all().map_err(failed)?;
        file.persist(&path).map_err(|e| failed(e.error))?;
        Ok(())
    }

    /// Removes `key`'s record (blocking); `Ok(false)` when it had none.
    ///
    /// # Errors
    /// [`PersistError::Remove`] naming the key and the file.
    pub fn remove(&self, key: &str) -> Result<bool, PersistError> {
        let path = self.path_of(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(PersistError::Remove { key: key.to_owned(), path, source }),
        }
    }

    /// Syncs the directory (blocking), so the renames and removals of a batch survive a crash.
    ///
    /// # Errors
    /// [`PersistError::Sync`] naming the directory.
    pub fn sync_dir(&self) -> Result<(), PersistError> {
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| PersistError::Sync { dir: self.dir.clone(), source })
    }
}

/// What a load of the directory did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Keys seeded.
    pub seeded: usize,
    /// Files skipped.
    pub skipped: usize,
}

/// Seeds `cache` with every whole record of `store` (blocking), each marked stale until a
/// live source delivers, reading one file at a time; logs and counts every file skipped.
/// Records of private pass-through keys (`pass_through`: `server.pass_through_unmapped` is
/// on) are skipped as `rejected`.
///
/// # Errors
/// [`PersistError::Dir`] when the directory cannot be listed.
pub fn load(cache: &Cache, store: &Store, metrics: &Metrics, pass_through: bool) -> Result<Loaded, PersistError> {
    let mut loaded = Loaded::default();
    store.visit(|file| match file {
        Ok(found) => match seed_one(cache, found, metrics, pass_through) {
            true => loaded.seeded += 1,
            false => loaded.skipped += 1,
        },
        Err(skipped) => {
            loaded.skipped += 1;
            skip(metrics, &skipped.path, skipped.reason, &skipped.detail);
        }
    })?;
    Ok(loaded)
}

/// Seeds `cache` with the records of `scan` and reports its skipped files, like [`load`];
/// returns how many keys were seeded.
pub fn seed(cache: &Cache, scan: Scan, metrics: &Metrics, pass_through: bool) -> usize {
    for skipped in &scan.skipped {
        skip(metrics, &skipped.path, skipped.reason, &skipped.detail);
    }
    scan.records.into_iter().map(|found| seed_one(cache, found, metrics, pass_through)).filter(|seeded| *seeded).count()
}

/// Logs and counts a file skipped for `reason`.
fn skip(metrics: &Metrics, path: &Path, reason: SkipReason, detail: &str) {
    tracing::warn!(
        file = %path.display(), reason = reason.label(), detail,
        "last-known-good record skipped: it is not served"
    );
    let labels = crate::telemetry::ReasonLabels { reason: reason.label().to_owned() };
    metrics.persist_records_skipped.get_or_create(&labels).inc();
}

/// Seeds `cache` with one record; false (logged and counted) when it is skipped.
fn seed_one(cache: &Cache, found: Found, metrics: &Metrics, pass_through: bool) -> bool {
    let Found { path, record } = found;
    if pass_through && crate::downstream::passthrough::is_private_key(&record.key) {
        skip(metrics, &path, SkipReason::Rejected, "a private pass-through key");
        return false;
    }
    let (node, response, coverage) = match record.parts() {
        Ok(parts) => parts,
        Err(reason) => {
            skip(metrics, &path, reason, "the node or the response does not decode");
            return false;
        }
    };
    match cache.seed(&record.key, &record.type_url, node, response, &coverage) {
        Ok(_) => {
            metrics.persist_records_loaded.inc();
            tracing::debug!(key = %record.key, type_url = %record.type_url, version = %record.version_info, "key seeded from disk");
            true
        }
        Err(e @ (crate::cache::SeedError::Exists { .. } | crate::cache::SeedError::Full { .. })) => {
            skip(metrics, &path, SkipReason::Full, &e.to_string());
            false
        }
        Err(e) => {
            skip(metrics, &path, SkipReason::Rejected, &e.to_string());
            false
        }
    }
}

#[cfg(test)]
mod tests;
