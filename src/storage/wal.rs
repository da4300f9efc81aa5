//! The write-ahead log of one stream: segments of checksummed records, one record per accepted
//! batch.
//!
//! On-disk format (all integers little-endian):
//!
//! ```text
//! segment file  wal-<first_seq:020>.log
//!   header      magic "EKIDWAL1" (8 bytes) | version u32 = 1 | first_seq u64
//!   record*     len u32 | crc32 u32 | first_seq u64 | count u32 | payload (len − 12 bytes)
//! ```
//!
//! `len` counts the bytes after the crc (first_seq, count, payload); `crc32` (IEEE, crc32fast)
//! covers those same bytes. The payload is the batch's accepted observations in postcard
//! encoding (`Vec<Observation>`, floats bit-exact). Records are contiguous in seq: record k+1
//! starts at record k's `first_seq + count`.
//!
//! Reading: a record that is short or fails its checksum *and* reaches the end of the file is a
//! torn tail (a crash mid-append): it is cut off with a warning. A bad record followed by more
//! data is corruption: an error naming the file and offset. Trailing zero bytes (a filesystem
//! that extended the file before the crash) count as a torn tail. A last segment shorter than
//! its header is a rotation cut short (a crash between creating the file and writing its
//! header, which is fsynced before any record): it holds nothing, and recovery removes it.
//!
//! Ordering the daemon keeps: validate the batch → append → fsync (policy `always`) → apply →
//! acknowledge. A failed append is rolled back by truncating to the previous length, so the
//! log never holds a record the stream did not apply.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::Observation;
use crate::storage::name::describe_file;

const MAGIC: &[u8; 8] = b"EKIDWAL1";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 8 + 4 + 8;
/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
const MAX_RECORD: u32 = 1 << 30;

/// When appended records are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync before every acknowledgement: nothing acknowledged is lost, even on power loss.
    #[default]
    Always,
    /// fsync at most every `fsync_interval_ms`: a power loss may lose the acknowledged batches
    /// of the last interval (a process crash loses nothing: the data is in the page cache).
    Interval,
    /// Never fsync (the OS writes back when it likes): for tests and throwaway streams.
    Never,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt record at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: not a write-ahead log segment ({reason})")]
    BadHeader { path: PathBuf, reason: String },
    /// The segment (with its stream's directory, as a rule) was deleted while the daemon
    /// wrote to it: what was written is in no file anyone can find.
    #[error("{path}: removed from disk while the daemon was writing to it")]
    Removed { path: PathBuf },
}

impl WalError {
    /// The error without the host's paths, for API clients (see [`describe_file`]).
    pub fn public(&self) -> String {
        match self {
            WalError::Io { path, source } => format!("{}: {source}", describe_file(path)),
            WalError::Corrupt {
                path,
                offset,
                reason,
            } => format!(
                "{}: corrupt record at offset {offset}: {reason}",
                describe_file(path)
            ),
            WalError::BadHeader { path, reason } => format!(
                "{}: not a write-ahead log segment ({reason})",
                describe_file(path)
            ),
            WalError::Removed { path } => format!(
                "{} was removed from disk (with the stream's directory?) while the daemon was writing to it",
                describe_file(path)
            ),
        }
    }

    /// Whether the file is gone from disk (not a failed write that a retry may get through).
    pub fn is_removed(&self) -> bool {
        matches!(self, WalError::Removed { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub first_seq: u64,
    pub observations: Vec<Observation>,
}

impl Record {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.observations.len() as u64 - 1
    }
}

/// What reading a segment found.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentScan {
    pub first_seq: u64,
    pub records: Vec<Record>,
    /// Length of the valid prefix (header + whole records).
    pub valid_len: u64,
    /// Bytes after the valid prefix that were a torn tail.
    pub torn_bytes: u64,
}

pub fn segment_name(first_seq: u64) -> String {
    format!("wal-{first_seq:020}.log")
}

/// Parses `wal-<seq>.log`.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn encode_record(first_seq: u64, observations: &[Observation], out: &mut Vec<u8>) {
    let payload = postcard::to_stdvec(observations).unwrap_or_default();
    let mut body = Vec::with_capacity(12 + payload.len());
    body.extend_from_slice(&first_seq.to_le_bytes());
    body.extend_from_slice(&(observations.len() as u32).to_le_bytes());
    body.extend_from_slice(&payload);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Whether the segment at `path` is shorter than its header: its creation was cut short, so it
/// can hold no record (see the module doc).
pub fn is_torn_creation(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.len() < HEADER_LEN)
}

/// Reads and checks a whole segment.
pub fn scan_segment(path: &Path) -> Result<SegmentScan, WalError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    scan_bytes(path, &bytes)
}

fn scan_bytes(path: &Path, bytes: &[u8]) -> Result<SegmentScan, WalError> {
    let bad_header = |reason: &str| WalError::BadHeader {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < HEADER_LEN as usize {
        return Err(bad_header("shorter than its header"));
    }
    if &bytes[..8] != MAGIC {
        return Err(bad_header("wrong magic"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(bad_header(&format!(
            "version {version}, expected {VERSION}"
        )));
    }
    let first_seq = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let mut scan = SegmentScan {
        first_seq,
        records: Vec::new(),
        valid_len: HEADER_LEN,
        torn_bytes: 0,
    };
    let mut off = HEADER_LEN as usize;
    let mut expected = first_seq;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let corrupt = |reason: String| WalError::Corrupt {
            path: path.to_owned(),
            offset: off as u64,
            reason,
        };
        let torn = || rest.iter().all(|&b| b == 0);
        if rest.len() < 8 {
            scan.torn_bytes = rest.len() as u64;
            break;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        if len == 0 && torn() {
            scan.torn_bytes = rest.len() as u64;
            break;
        }
        if !(12..=MAX_RECORD).contains(&len) {
            // A length that cannot be right: torn if nothing can follow, else corrupt.
            if torn() || 8 + len as usize >= rest.len() {
                scan.torn_bytes = rest.len() as u64;
                break;
            }
            return Err(corrupt(format!("impossible record length {len}")));
        }
        let end = 8 + len as usize;
        if end > rest.len() {
            scan.torn_bytes = rest.len() as u64;
            break;
        }
        let body = &rest[8..end];
        if crc32fast::hash(body) != crc {
            if end == rest.len() || rest[end..].iter().all(|&b| b == 0) {
                scan.torn_bytes = rest.len() as u64;
                break;
            }
            return Err(corrupt("checksum mismatch".into()));
        }
        let rec_first = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
        let observations: Vec<Observation> = postcard::from_bytes(&body[12..])
            .map_err(|e| corrupt(format!("undecodable payload: {e}")))?;
        if observations.len() != count as usize || count == 0 {
            return Err(corrupt(format!(
                "record says {count} observations, holds {}",
                observations.len()
            )));
        }
        if rec_first != expected {
            return Err(corrupt(format!(
                "record starts at seq {rec_first}, expected {expected}"
            )));
        }
        expected = rec_first + count as u64;
        scan.records.push(Record {
            first_seq: rec_first,
            observations,
        });
        off += end;
        scan.valid_len = off as u64;
    }
    Ok(scan)
}

/// Fsyncs a directory so that creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The open tail segment of a stream's log.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    /// The seq the next record must start at.
    next_seq: u64,
    policy: FsyncPolicy,
    interval: Duration,
    last_sync: Instant,
    /// Bytes written since the last fsync.
    dirty: bool,
    buf: Vec<u8>,
}

impl Wal {
    /// Creates a new segment whose first record will be `first_seq`.
    pub fn create(
        dir: &Path,
        first_seq: u64,
        policy: FsyncPolicy,
        interval: Duration,
    ) -> Result<Wal, WalError> {
        let path = dir.join(segment_name(first_seq));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&first_seq.to_le_bytes());
        if let Err(e) = file.write_all(&header).and_then(|()| file.sync_all()) {
            // A full disk: leave no headerless segment behind, or a later rotation would put
            // one between two good segments, where recovery cannot tell it from corruption.
            let _ = std::fs::remove_file(&path);
            return Err(io_err(&path)(e));
        }
        sync_dir(dir).map_err(io_err(dir))?;
        Ok(Wal {
            dir: dir.to_owned(),
            path,
            file,
            len: HEADER_LEN,
            next_seq: first_seq,
            policy,
            interval,
            last_sync: Instant::now(),
            dirty: false,
            buf: Vec::new(),
        })
    }

    /// Reopens an existing segment for appending after recovery, cutting a torn tail.
    pub fn reopen(
        dir: &Path,
        scan: &SegmentScan,
        policy: FsyncPolicy,
        interval: Duration,
    ) -> Result<Wal, WalError> {
        let path = dir.join(segment_name(scan.first_seq));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if scan.torn_bytes > 0 {
            file.set_len(scan.valid_len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        let next_seq = scan
            .records
            .last()
            .map_or(scan.first_seq, |r| r.last_seq() + 1);
        Ok(Wal {
            dir: dir.to_owned(),
            path,
            file,
            len: scan.valid_len,
            next_seq,
            policy,
            interval,
            last_sync: Instant::now(),
            dirty: false,
            buf: Vec::new(),
        })
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Fails when the segment has no name left on disk (its directory was removed underneath
    /// the daemon): what was written to it would be acknowledged into a file that recovery
    /// never sees. One `fstat` of the open file, a fraction of a microsecond next to the write.
    fn check_linked(&self) -> Result<(), WalError> {
        use std::os::unix::fs::MetadataExt;
        match self.file.metadata() {
            Ok(m) if m.nlink() == 0 => Err(WalError::Removed {
                path: self.path.clone(),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(io_err(&self.path)(e)),
        }
    }

    /// The segment now lives in `dir` (its directory was renamed there whole, with the file
    /// open: the handle follows the rename).
    pub fn relocate(&mut self, dir: &Path) {
        if let Some(name) = self.path.file_name() {
            self.path = dir.join(name);
        }
        self.dir = dir.to_owned();
    }

    /// Appends one record per batch (each `(first_seq, observations)`, contiguous), then
    /// fsyncs per policy. On any failure the segment is truncated back to where it was and
    /// the error returned: nothing of these batches is in the log.
    pub fn append(&mut self, batches: &[(u64, &[Observation])]) -> Result<(), WalError> {
        self.buf.clear();
        let mut next = self.next_seq;
        for (first, obs) in batches {
            if obs.is_empty() {
                continue;
            }
            debug_assert_eq!(*first, next, "records must be contiguous");
            encode_record(*first, obs, &mut self.buf);
            next = first + obs.len() as u64;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let before = self.len;
        let sync_now = match self.policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => self.last_sync.elapsed() >= self.interval,
            FsyncPolicy::Never => false,
        };
        let result = self
            .file
            .seek(SeekFrom::Start(before))
            .and_then(|_| self.file.write_all(&self.buf))
            .and_then(|_| {
                if sync_now {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            });
        if result.is_ok() {
            // Checked after the write, so that a removal during it is seen too.
            self.check_linked()?;
        }
        match result {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                self.next_seq = next;
                if sync_now {
                    self.dirty = false;
                    self.last_sync = Instant::now();
                } else {
                    self.dirty = true;
                }
                Ok(())
            }
            Err(e) => {
                // Roll back whatever part reached the file; if even that fails, the next
                // append starts by writing at `before` again, overwriting the partial bytes.
                let _ = self.file.set_len(before);
                Err(WalError::Io {
                    path: self.path.clone(),
                    source: e,
                })
            }
        }
    }

    /// Forces everything appended so far to disk (interval ticks, shutdown).
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.dirty {
            self.file.sync_data().map_err(io_err(&self.path))?;
            self.check_linked()?;
            self.dirty = false;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Starts a new segment at `next_seq` (after a snapshot) and returns the old one's path.
    pub fn rotate(&mut self) -> Result<PathBuf, WalError> {
        self.sync()?;
        let new = Wal::create(&self.dir, self.next_seq, self.policy, self.interval)?;
        let old = std::mem::replace(self, new);
        Ok(old.path)
    }
}

/// Whether recovery from a state at `restored` (the seq of the snapshot it starts from, 0 for
/// none) needs segment `i` of `segments` (sorted by first seq): the last one always (it is
/// reopened for appending), any other one if it holds a seq after `restored` (the next segment
/// starts after `restored + 1`).
pub fn needed(segments: &[(u64, PathBuf)], i: usize, restored: u64) -> bool {
    segments
        .get(i + 1)
        .is_none_or(|(next_first, _)| *next_first > restored.saturating_add(1))
}

/// The segments in `dir`, sorted by first seq.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(parse_segment_name) {
            v.push((seq, entry.path()));
        }
    }
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(v: &[f64]) -> Vec<Observation> {
        v.iter()
            .map(|&y| Observation {
                seq: None,
                x: vec![],
                y: vec![y],
            })
            .collect()
    }

    fn written(dir: &Path) -> (PathBuf, Vec<u64>) {
        let mut w = Wal::create(dir, 1, FsyncPolicy::Always, Duration::ZERO).unwrap();
        let mut ends = vec![w.len];
        for (first, vals) in [
            (1, vec![1.0, 2.0]),
            (3, vec![3.5]),
            (4, vec![4.0, 5.0, 6.0]),
        ] {
            let o = obs(&vals);
            w.append(&[(first, &o)]).unwrap();
            ends.push(w.len);
        }
        (w.path.clone(), ends)
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = written(dir.path());
        let scan = scan_segment(&path).unwrap();
        assert_eq!(scan.records.len(), 3);
        assert_eq!(scan.records[2].first_seq, 4);
        assert_eq!(scan.records[2].observations, obs(&[4.0, 5.0, 6.0]));
        assert_eq!(scan.torn_bytes, 0);
    }

    #[test]
    fn a_torn_tail_at_every_byte_of_the_last_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = written(dir.path());
        let full = std::fs::read(&path).unwrap();
        let last_start = ends[2] as usize;
        for cut in last_start..full.len() {
            let scan = scan_bytes(&path, &full[..cut]).unwrap();
            assert_eq!(scan.records.len(), 2, "cut at {cut}");
            assert_eq!(scan.valid_len, last_start as u64);
            assert_eq!(scan.torn_bytes, (cut - last_start) as u64);
        }
        // Zeros after the valid part (a file extended before the crash) are a torn tail too.
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0; 100]);
        assert_eq!(scan_bytes(&path, &zeros).unwrap().records.len(), 3);
        // Reopening cuts the tail and appends after it.
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let scan = scan_segment(&path).unwrap();
        let mut w = Wal::reopen(dir.path(), &scan, FsyncPolicy::Always, Duration::ZERO).unwrap();
        assert_eq!(w.next_seq, 4);
        let o = obs(&[9.0]);
        w.append(&[(4, &o)]).unwrap();
        let scan = scan_segment(&path).unwrap();
        assert_eq!(scan.records.last().unwrap().observations, o);
        assert_eq!(scan.torn_bytes, 0);
    }

    #[test]
    fn flipped_bits_before_the_tail_are_corruption_naming_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = written(dir.path());
        let full = std::fs::read(&path).unwrap();
        // Every byte of the first two records (the last record is the tail).
        for i in ends[0] as usize..ends[2] as usize {
            for bit in [0u8, 3, 7] {
                let mut b = full.clone();
                b[i] ^= 1 << bit;
                match scan_bytes(&path, &b) {
                    Err(WalError::Corrupt { offset, .. }) => {
                        assert!(
                            offset == ends[0] || offset == ends[1],
                            "byte {i}: offset {offset}"
                        )
                    }
                    other => {
                        // A flip in a length field can make the record run to the end of the
                        // file: then it is indistinguishable from a torn tail, and everything
                        // before it is still intact.
                        let s = other.unwrap();
                        assert!(
                            s.records.len() < 3 && s.torn_bytes > 0,
                            "byte {i} bit {bit}: {s:?}"
                        );
                    }
                }
            }
        }
        // A bad header is its own error.
        let mut b = full.clone();
        b[0] = b'X';
        assert!(matches!(
            scan_bytes(&path, &b),
            Err(WalError::BadHeader { .. })
        ));
    }

    #[test]
    fn an_append_to_a_removed_segment_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), 1, FsyncPolicy::Never, Duration::ZERO).unwrap();
        let o = obs(&[1.0]);
        w.append(&[(1, &o)]).unwrap();
        std::fs::remove_file(&w.path).unwrap();
        let e = w.append(&[(2, &o)]).unwrap_err();
        assert!(e.is_removed(), "{e}");
        assert!(!e.public().contains(&*dir.path().to_string_lossy()));
        assert_eq!(w.next_seq, 2);
    }

    #[test]
    fn a_failed_append_leaves_the_log_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = written(dir.path());
        let scan = scan_segment(&path).unwrap();
        let mut w = Wal::reopen(dir.path(), &scan, FsyncPolicy::Always, Duration::ZERO).unwrap();
        // Swap the file for a read-only handle: the write fails.
        w.file = File::open(&path).unwrap();
        let o = obs(&[1.0]);
        assert!(w.append(&[(7, &o)]).is_err());
        assert_eq!(w.next_seq, 7);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            *ends.last().unwrap()
        );
        assert_eq!(scan_segment(&path).unwrap().records.len(), 3);
    }
}
