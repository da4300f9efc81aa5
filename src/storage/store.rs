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
//! uses, so the state is bit-identical to the one before the crash.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::engine::Options;
use crate::engine::{Observation, Plan, Stream};
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

/// The data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    config: StorageConfig,
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
}

/// One stream found on disk: recovered, or failed with the reason.
pub enum Recovered {
    Ok(Box<Stream>, Box<StreamStore>, RecoveryReport),
    Failed(Options, String),
}

impl Store {
    /// Opens (creating if needed) a data directory and empties its trash.
    pub fn open(root: &Path, config: StorageConfig) -> Result<Store, StoreError> {
        for d in [root.join("streams"), root.join("trash")] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let trash = root.join("trash");
        for entry in fs::read_dir(&trash).map_err(io_err(&trash))? {
            let p = entry.map_err(io_err(&trash))?.path();
            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
        }
        Ok(Store {
            root: root.to_owned(),
            config,
        })
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    fn stream_dir(&self, name: &str) -> PathBuf {
        self.root.join("streams").join(name)
    }

    /// Makes a new stream durable: its folder, options and first log segment.
    pub fn create_stream(&self, name: &str, options: &Options) -> Result<StreamStore, StoreError> {
        let dir = self.stream_dir(name);
        if dir.exists() {
            // Left over from a creation that was never acknowledged: start clean.
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let tmp = self.root.join("trash").join(format!("{name}.creating"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let json = serde_json::to_vec_pretty(options).map_err(|e| StoreError::Invalid {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&tmp.join(OPTIONS), &json).map_err(io_err(&tmp))?;
        // The folder appears under streams/ whole, by one rename.
        fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        let streams = self.root.join("streams");
        wal::sync_dir(&streams).map_err(io_err(&streams))?;
        let wal = Wal::create(&dir, 1, self.config.fsync, self.fsync_interval())?;
        Ok(StreamStore::new(dir, wal, None, self.config.clone()))
    }

    /// Removes a stream durably: one rename into the trash, then the files go.
    pub fn delete_stream(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.stream_dir(name);
        if !dir.exists() {
            return Ok(());
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dest = self.root.join("trash").join(format!("{name}.{nanos}"));
        fs::rename(&dir, &dest).map_err(io_err(&dir))?;
        let streams = self.root.join("streams");
        wal::sync_dir(&streams).map_err(io_err(&streams))?;
        let _ = fs::remove_dir_all(&dest);
        Ok(())
    }

    fn fsync_interval(&self) -> Duration {
        Duration::from_millis(self.config.fsync_interval_ms)
    }

    /// The stream folders on disk, by name.
    pub fn stream_names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("streams");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if entry.path().is_dir()
                && let Some(n) = entry.file_name().to_str()
            {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Recovers one stream. `None`: the folder held no acknowledged stream (removed).
    pub fn recover_stream(&self, name: &str) -> Option<Recovered> {
        let dir = self.stream_dir(name);
        let options_path = dir.join(OPTIONS);
        let options = match fs::read(&options_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    stream = name,
                    "no options.json: creation was never acknowledged; removing"
                );
                let _ = fs::remove_dir_all(&dir);
                return None;
            }
            Err(e) => {
                return Some(Recovered::Failed(
                    Options::default(),
                    format!("{}: {e}", options_path.display()),
                ));
            }
            Ok(bytes) => match serde_json::from_slice::<Options>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|o| o.check().map_err(|e| e.to_string()))
            {
                Ok(o) => o,
                Err(e) => {
                    return Some(Recovered::Failed(
                        Options::default(),
                        format!("{}: {e}", options_path.display()),
                    ));
                }
            },
        };
        match self.recover_dir(&dir, &options) {
            Ok((stream, store, report)) => Some(Recovered::Ok(stream, store, report)),
            Err(e) => Some(Recovered::Failed(options, e.to_string())),
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
