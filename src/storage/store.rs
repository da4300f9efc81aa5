//! The data directory: one folder per stream with its options, snapshots and log segments;
//! creation, deletion and recovery.
//!
//! ```text
//! <data_dir>/streams/<name>/options.json              written atomically before the PUT's 201
//! <data_dir>/streams/<name>/snapshot-<seq>.bin        the newest two are kept (see `snapshot`)
//! <data_dir>/streams/<name>/wal-<first_seq>.log       segments back to the older snapshot (see `wal`)
//! <data_dir>/trash/                                   deleted streams, emptied at start
//! ```
//!
//! One log per stream (not one shared log): a stream's files are self-contained, so deleting a
//! stream is one rename, recovery of streams is independent, and a corrupt file fails one
//! stream, not the daemon. Concurrent writers to one stream are group-committed by its owner
//! (one append and one fsync for every batch waiting in its queue).
//!
//! Recovery of a stream: the newest snapshot that reads back whole (falling back to the older
//! one), then every logged batch after its seq, through the same `Stream::apply` the daemon
//! uses, so the state is bit-identical to the one before the crash. Log segments wholly before
//! that snapshot (kept for the fallback) are checked, but damage there is a warning, not a
//! failure: recovery does not need them.
//!
//! Creation and deletion are all or nothing, each one rename: a new stream's folder is prepared
//! in the trash and renamed into `streams/`; a deleted one is renamed into the trash. Errors
//! carry the paths for the log; [`StoreError::public`] says what failed without them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::engine::Options;
use crate::engine::{Observation, Plan, Stream};
use crate::storage::name::{describe_file, is_valid_stream_name};
use crate::storage::snapshot::{self, SnapshotError};
use crate::storage::wal::{self, FsyncPolicy, Wal, WalError};

/// Durability settings (the `[storage]` section of the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `always` (default): nothing is acknowledged before it is fsynced. `interval`: fsync at
    /// most every `fsync_interval_ms` (a power loss can lose that much acknowledged data; a
    /// process crash loses nothing). `never`: leave it to the OS.
    pub fsync: FsyncPolicy,
    pub fsync_interval_ms: u64,
    /// Snapshot after this many observations since the last snapshot...
    pub snapshot_every: u64,
    /// ...or after this many seconds if anything is new.
    pub snapshot_interval_s: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 10,
            snapshot_every: 10_000,
            snapshot_interval_s: 300,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("moving {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error(
        "cannot write in {dir}: {source} (the daemon keeps its streams there and must be able to write them)"
    )]
    NotWritable { dir: PathBuf, source: io::Error },
}

impl StoreError {
    /// The error without the host's paths, for API clients: what failed (the kind of file,
    /// its name inside the stream's directory) and the OS error. The paths go to the log.
    pub fn public(&self) -> String {
        match self {
            StoreError::Io { path, source } => format!("{}: {source}", describe_file(path)),
            StoreError::Wal(e) => e.public(),
            StoreError::Snapshot(e) => e.public(),
            StoreError::Invalid { path, reason } => format!("{}: {reason}", describe_file(path)),
            StoreError::Rename { from, to, source } => format!(
                "moving {} to {}: {source}",
                describe_file(from),
                describe_file(to)
            ),
            StoreError::NotWritable { dir, source } => {
                format!("cannot write in {}: {source}", describe_file(dir))
            }
        }
    }

    /// Whether the stream's files are gone from disk (removed underneath the daemon): its
    /// writes can no longer be made durable, so the stream fails rather than retrying.
    pub fn is_removed(&self) -> bool {
        matches!(self, StoreError::Wal(e) if e.is_removed())
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

const OPTIONS: &str = "options.json";

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    wal::sync_dir(dir)
}

/// Creates, writes, fsyncs and removes a small file in `dir`: whether the daemon can write
/// there (read-only mounts and immutable directories refuse even root).
fn probe_writable(dir: &Path) -> io::Result<()> {
    use std::io::Write;
    let probe = dir.join(".write-probe");
    let written = fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"ekid\n")?;
        f.sync_all()
    });
    let removed = fs::remove_file(&probe);
    written?;
    removed?;
    wal::sync_dir(dir)
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    config: StorageConfig,
    /// Test-only fault (`fail-after-options-rename:<stream>` in `EKID_FAILPOINTS`, see
    /// `server::Failpoints`): creating this stream fails right after its directory, options
    /// included, was renamed into `streams/`.
    fail_after_options_rename: Option<String>,
}

/// How one stream came back.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryReport {
    pub snapshot_seq: Option<u64>,
    /// Snapshots that failed to read and were skipped.
    pub bad_snapshots: usize,
    pub replayed: u64,
    pub torn_bytes: u64,
    pub last_seq: u64,
    /// Damage found in log segments that recovery did not need (all their records are in the
    /// snapshot it started from), each described without its path: reported, not fatal.
    pub damaged_unneeded: Vec<String>,
}

/// One stream found on disk: recovered, or failed with the reason.
pub enum Recovered {
    Ok(Box<Stream>, Box<StreamStore>, RecoveryReport),
    Failed(Options, String),
}

impl Store {
    /// Opens (creating if needed) a data directory and empties its trash. Fails when the
    /// daemon cannot write there (a read-only mount, a file where a directory must be): one
    /// clear refusal to start rather than every stream failing on its first write.
    pub fn open(root: &Path, config: StorageConfig) -> Result<Store, StoreError> {
        for d in [root.join("streams"), root.join("trash")] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        for d in [root.to_owned(), root.join("streams"), root.join("trash")] {
            probe_writable(&d).map_err(|source| StoreError::NotWritable { dir: d, source })?;
        }
        let trash = root.join("trash");
        for entry in fs::read_dir(&trash).map_err(io_err(&trash))? {
            let p = entry.map_err(io_err(&trash))?.path();
            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
        }
        Ok(Store {
            root: root.to_owned(),
            config,
            fail_after_options_rename: None,
        })
    }

    /// Test-only: makes the creation of `stream` fail after its directory is in place (see
    /// the field).
    pub fn fail_after_options_rename(&mut self, stream: &str) {
        self.fail_after_options_rename = Some(stream.to_owned());
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    fn stream_dir(&self, name: &str) -> PathBuf {
        self.root.join("streams").join(name)
    }

    /// Makes a new stream durable: its folder, options and first log segment. All or nothing:
    /// everything is prepared in the trash and appears under `streams/` by one rename; if the
    /// step after it (making the rename durable) fails, the rename is undone.
    pub fn create_stream(&self, name: &str, options: &Options) -> Result<StreamStore, StoreError> {
        let dir = self.stream_dir(name);
        if dir.exists() {
            // Left over from a creation that was never acknowledged: start clean.
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let tmp = self.root.join("trash").join(format!("{name}.creating"));
        let _ = fs::remove_dir_all(&tmp);
        let prepared = fs::create_dir_all(&tmp)
            .map_err(io_err(&tmp))
            .and_then(|()| {
                let json = serde_json::to_vec_pretty(options).map_err(|e| StoreError::Invalid {
                    path: tmp.join(OPTIONS),
                    reason: e.to_string(),
                })?;
                let options_path = tmp.join(OPTIONS);
                write_atomic(&options_path, &json).map_err(io_err(&options_path))?;
                Ok(Wal::create(
                    &tmp,
                    1,
                    self.config.fsync,
                    self.fsync_interval(),
                )?)
            });
        let mut wal = match prepared {
            Ok(wal) => wal,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        // The folder appears under streams/ whole, by one rename.
        if let Err(source) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(StoreError::Rename {
                from: tmp,
                to: dir,
                source,
            });
        }
        wal.relocate(&dir);
        let streams = self.root.join("streams");
        let synced = if self.fail_after_options_rename.as_deref() == Some(name) {
            Err(io::Error::other("failpoint fail-after-options-rename"))
        } else {
            wal::sync_dir(&streams)
        };
        if let Err(e) = synced {
            // Not durable, so not acknowledged: take the folder back out, or a restart would
            // find a stream whose creation was answered with an error.
            drop(wal);
            if let Err(undo) = fs::rename(&dir, &tmp).and_then(|()| fs::remove_dir_all(&tmp)) {
                tracing::error!(stream = name, error = %undo, "could not take back a stream whose creation failed");
            }
            return Err(io_err(&streams)(e));
        }
        Ok(StreamStore::new(dir, wal, None, self.config.clone()))
    }

    /// Removes a stream durably: one rename into the trash (the commit point: on any error
    /// before it, or when it cannot be made durable and is undone, the stream is untouched),
    /// then its files go.
    pub fn delete_stream(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.stream_dir(name);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&dir)(e)),
            Ok(_) => {}
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dest = self.root.join("trash").join(format!("{name}.{nanos}"));
        fs::rename(&dir, &dest).map_err(|source| StoreError::Rename {
            from: dir.clone(),
            to: dest.clone(),
            source,
        })?;
        let streams = self.root.join("streams");
        if let Err(e) = wal::sync_dir(&streams) {
            // A crash could bring the stream back after it was reported deleted: put it back
            // and report the failure, so that what the API says and what the disk holds agree.
            if fs::rename(&dest, &dir).is_ok() {
                return Err(io_err(&streams)(e));
            }
            tracing::error!(stream = name, error = %e, "a deleted stream's removal could not be made durable");
        }
        let _ = fs::remove_dir_all(&dest);
        Ok(())
    }

    fn fsync_interval(&self) -> Duration {
        Duration::from_millis(self.config.fsync_interval_ms)
    }

    /// The stream folders on disk, by name. A folder whose name is not a stream name (made by
    /// hand, or by something else) is skipped with a warning and left alone.
    pub fn stream_names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("streams");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if !entry.path().is_dir() {
                continue;
            }
            match entry.file_name().into_string() {
                Ok(n) if is_valid_stream_name(&n) => names.push(n),
                Ok(n) => tracing::warn!(
                    name = ?n,
                    "skipping a directory under streams/ whose name is not a stream name"
                ),
                Err(n) => tracing::warn!(
                    name = ?n,
                    "skipping a directory under streams/ whose name is not UTF-8"
                ),
            }
        }
        names.sort();
        Ok(names)
    }

    /// Recovers one stream. `None`: the folder held no acknowledged stream (removed). A
    /// failure's reason names what failed without the host's paths (they go to the log).
    pub fn recover_stream(&self, name: &str) -> Option<Recovered> {
        let dir = self.stream_dir(name);
        let options_path = dir.join(OPTIONS);
        let failed = |options: Options, e: StoreError| {
            tracing::error!(stream = name, error = %e, "recovery failed");
            Some(Recovered::Failed(options, e.public()))
        };
        let options = match fs::read(&options_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    stream = name,
                    "no options.json: creation was never acknowledged; removing"
                );
                let _ = fs::remove_dir_all(&dir);
                return None;
            }
            Err(e) => return failed(Options::default(), io_err(&options_path)(e)),
            Ok(bytes) => match serde_json::from_slice::<Options>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|o| o.check().map_err(|e| e.to_string()))
            {
                Ok(o) => o,
                Err(reason) => {
                    return failed(
                        Options::default(),
                        StoreError::Invalid {
                            path: options_path,
                            reason,
                        },
                    );
                }
            },
        };
        match self.recover_dir(&dir, &options) {
            Ok((stream, store, report)) => Some(Recovered::Ok(stream, store, report)),
            Err(e) => failed(options, e),
        }
    }

    fn recover_dir(
        &self,
        dir: &Path,
        options: &Options,
    ) -> Result<(Box<Stream>, Box<StreamStore>, RecoveryReport), StoreError> {
        // Stray temporary files never block a restart. The newest log or snapshot write is when
        // the stream last learned (before recovery writes anything).
        let mut last_write = None;
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                tracing::warn!(path = %p.display(), "removing stray temporary file");
                let _ = fs::remove_file(&p);
            } else if p.extension().is_some_and(|e| e == "log" || e == "bin") {
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                last_write = last_write.max(modified);
            }
        }
        let mut report = RecoveryReport {
            snapshot_seq: None,
            bad_snapshots: 0,
            replayed: 0,
            torn_bytes: 0,
            last_seq: 0,
            damaged_unneeded: Vec::new(),
        };
        let mut stream = None;
        for (seq, path) in snapshot::list(dir).map_err(io_err(dir))? {
            match snapshot::read(&path).and_then(|(s, state)| {
                Stream::from_state(state)
                    .map(|st| (s, st))
                    .map_err(|reason| SnapshotError::Invalid {
                        path: path.clone(),
                        reason,
                    })
            }) {
                Ok((s, st)) if st.options() == options => {
                    report.snapshot_seq = Some(s);
                    stream = Some(st);
                    break;
                }
                Ok(_) => {
                    report.bad_snapshots += 1;
                    tracing::error!(path = %path.display(), "snapshot options differ from options.json; skipping it");
                }
                Err(e) => {
                    report.bad_snapshots += 1;
                    tracing::error!(seq, error = %e, "unreadable snapshot; falling back to an older one");
                }
            }
        }
        let mut stream = Box::new(stream.unwrap_or_else(|| Stream::new(options.clone())));
        let restored = stream.last_seq();
        let segments = wal::list_segments(dir).map_err(io_err(dir))?;
        let mut tail = None;
        for (i, (_, path)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            if last && wal::is_torn_creation(path).map_err(io_err(path))? {
                tracing::warn!(path = %path.display(), "removing a log segment whose creation was cut short (shorter than its header: it held nothing)");
                std::fs::remove_file(path).map_err(io_err(path))?;
                wal::sync_dir(dir).map_err(io_err(dir))?;
                continue;
            }
            if !wal::needed(&segments, i, restored) {
                // Kept only for a fallback to the older snapshot. Checked all the same, so that
                // damage is reported now rather than found when that fallback needs the file.
                let damage = match wal::scan_segment(path) {
                    Ok(scan) if scan.torn_bytes == 0 => None,
                    Ok(scan) => Some(format!(
                        "{}: {} unreadable bytes at offset {}",
                        describe_file(path),
                        scan.torn_bytes,
                        scan.valid_len
                    )),
                    Err(e) => Some(e.public()),
                };
                if let Some(damage) = damage {
                    tracing::warn!(path = %path.display(), %damage, snapshot = restored, "a log segment the snapshot covers is damaged; recovery does not need it (a fallback to the older snapshot would)");
                    report.damaged_unneeded.push(damage);
                }
                continue;
            }
            let scan = wal::scan_segment(path)?;
            if scan.torn_bytes > 0 {
                if !last {
                    return Err(StoreError::Invalid {
                        path: path.clone(),
                        reason: format!(
                            "{} unreadable bytes at offset {} in a segment that is not the last",
                            scan.torn_bytes, scan.valid_len
                        ),
                    });
                }
                tracing::warn!(path = %path.display(), offset = scan.valid_len, bytes = scan.torn_bytes, "cutting a torn tail");
                report.torn_bytes = scan.torn_bytes;
            }
            for rec in &scan.records {
                let have = stream.last_seq();
                if rec.last_seq() <= have {
                    continue;
                }
                if rec.first_seq > have + 1 {
                    return Err(StoreError::Invalid {
                        path: path.clone(),
                        reason: format!(
                            "the log jumps from seq {have} to {}: a segment is missing",
                            rec.first_seq
                        ),
                    });
                }
                let skip = (have + 1 - rec.first_seq) as usize;
                let plan = Plan {
                    accepted: (skip..rec.observations.len()).collect(),
                    duplicates: 0,
                    first_seq: have + 1,
                };
                stream.apply(&rec.observations, &plan, |_| {});
                report.replayed += plan.accepted.len() as u64;
            }
            if last {
                tail = Some(scan);
            }
        }
        let wal = match tail {
            Some(scan)
                if scan
                    .records
                    .last()
                    .map_or(scan.first_seq, |r| r.last_seq() + 1)
                    == stream.last_seq() + 1 =>
            {
                Wal::reopen(dir, &scan, self.config.fsync, self.fsync_interval())?
            }
            // No segment, or the last one ends before the snapshot: start a fresh segment.
            _ => Wal::create(
                dir,
                stream.last_seq() + 1,
                self.config.fsync,
                self.fsync_interval(),
            )?,
        };
        report.last_seq = stream.last_seq();
        let mut store = StreamStore::new(
            dir.to_owned(),
            wal,
            report.snapshot_seq,
            self.config.clone(),
        );
        // What was replayed is in the log only: the next snapshot (due, or at shutdown) takes
        // it in, so that the next start does not replay it again.
        store.since_snapshot = report.replayed;
        store.last_write = last_write.filter(|_| report.last_seq > 0);
        Ok((stream, Box::new(store), report))
    }
}

/// One stream's files, owned by the stream's owner task.
#[derive(Debug)]
pub struct StreamStore {
    dir: PathBuf,
    wal: Wal,
    config: StorageConfig,
    last_snapshot: Option<u64>,
    since_snapshot: u64,
    snapshot_time: Instant,
    /// For a recovered stream that had learned: when its files were last written.
    last_write: Option<SystemTime>,
}

impl StreamStore {
    fn new(dir: PathBuf, wal: Wal, last_snapshot: Option<u64>, config: StorageConfig) -> Self {
        StreamStore {
            dir,
            wal,
            config,
            last_snapshot,
            since_snapshot: 0,
            snapshot_time: Instant::now(),
            last_write: None,
        }
    }

    /// When a recovered stream last learned before this start (its newest log or snapshot
    /// write); `None` for a new stream or one that had no observations.
    pub fn last_write(&self) -> Option<SystemTime> {
        self.last_write
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends accepted batches (each `(first_seq, observations)`) and fsyncs per policy.
    /// On error nothing of them is in the log.
    pub fn append(&mut self, batches: &[(u64, &[Observation])]) -> Result<(), StoreError> {
        self.wal.append(batches)?;
        self.since_snapshot += batches.iter().map(|(_, o)| o.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Fsyncs appended records (interval policy ticks, shutdown).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        Ok(self.wal.sync()?)
    }

    /// Whether a snapshot is due.
    pub fn snapshot_due(&self) -> bool {
        self.since_snapshot >= self.config.snapshot_every
            || (self.since_snapshot > 0
                && self.snapshot_time.elapsed()
                    >= Duration::from_secs(self.config.snapshot_interval_s))
    }

    /// Whether appended records still wait for an fsync (`interval` and `never` policies).
    pub fn needs_sync(&self) -> bool {
        self.wal.is_dirty()
    }

    pub fn fsync_interval(&self) -> Option<Duration> {
        (self.config.fsync == FsyncPolicy::Interval)
            .then(|| Duration::from_millis(self.config.fsync_interval_ms.max(1)))
    }

    pub fn has_unsnapshotted(&self) -> bool {
        self.since_snapshot > 0
    }

    /// Snapshots `stream`, starts a new log segment, and removes what recovery no longer
    /// needs: snapshots older than the previous one, and log segments entirely before it.
    pub fn snapshot(&mut self, stream: &Stream) -> Result<(), StoreError> {
        let seq = stream.last_seq();
        snapshot::write(&self.dir, seq, &stream.state())?;
        self.wal.rotate()?;
        let previous = self.last_snapshot.replace(seq);
        self.since_snapshot = 0;
        self.snapshot_time = Instant::now();
        // Keep two snapshots; the log must reach back to the older one for the fallback.
        let keep_from = previous.unwrap_or(0);
        for (s, path) in snapshot::list(&self.dir)
            .map_err(io_err(&self.dir))?
            .into_iter()
            .skip(2)
        {
            tracing::debug!(seq = s, "removing old snapshot");
            let _ = fs::remove_file(path);
        }
        let segments = wal::list_segments(&self.dir).map_err(io_err(&self.dir))?;
        for pair in segments.windows(2) {
            // Segment pair[0] holds seqs first .. next_first − 1.
            if pair[1].0 <= keep_from + 1 {
                let _ = fs::remove_file(&pair[0].1);
            }
        }
        wal::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
