//! `ekid inspect DIR`: what is on disk, for operators and for debugging recovery. Reads only;
//! checks every checksum.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{snapshot, wal};
use crate::engine::Options;

#[derive(Debug, Serialize)]
pub struct FileReport {
    pub file: String,
    pub bytes: u64,
    /// First and last seq held (snapshots: the seq they were taken at, twice).
    pub seq: Option<(u64, u64)>,
    pub records: usize,
    /// "ok", "torn tail: N bytes at offset O", or the error.
    pub status: String,
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub name: String,
    pub options: Result<Options, String>,
    pub snapshots: Vec<FileReport>,
    pub segments: Vec<FileReport>,
}

impl StreamReport {
    /// Recoverable: options readable, every log segment readable, and a readable snapshot if
    /// there are any.
    pub fn ok(&self) -> bool {
        self.options.is_ok()
            && self.segments.iter().all(|s| s.ok)
            && (self.snapshots.is_empty() || self.snapshots.iter().any(|s| s.ok))
    }
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

pub fn inspect(dir: &Path) -> anyhow::Result<Vec<StreamReport>> {
    let streams = dir.join("streams");
    let mut names: Vec<_> = std::fs::read_dir(&streams)
        .map_err(|e| anyhow::anyhow!("{}: {e}", streams.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .collect();
    names.sort_by_key(|e| e.file_name());
    let mut out = Vec::new();
    for entry in names {
        let d = entry.path();
        let options = std::fs::read(d.join("options.json"))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Options>(&b).map_err(|e| e.to_string()));
        let mut snapshots = Vec::new();
        for (seq, p) in snapshot::list(&d)? {
            let (status, ok) = match snapshot::read(&p) {
                Ok(_) => ("ok".to_owned(), true),
                Err(e) => (e.to_string(), false),
            };
            snapshots.push(FileReport {
                file: name_of(&p),
                bytes: size(&p),
                seq: Some((seq, seq)),
                records: 0,
                status,
                ok,
            });
        }
        let mut segments = Vec::new();
        let listed = wal::list_segments(&d)?;
        for (i, (_, p)) in listed.iter().enumerate() {
            let last = i + 1 == listed.len();
            if last && wal::is_torn_creation(p)? {
                segments.push(FileReport {
                    file: name_of(p),
                    bytes: size(p),
                    seq: None,
                    records: 0,
                    status: "creation cut short: shorter than its header, holds nothing (recovery removes it)".to_owned(),
                    ok: true,
                });
                continue;
            }
            segments.push(match wal::scan_segment(p) {
                Ok(scan) => {
                    let seq = scan
                        .records
                        .first()
                        .zip(scan.records.last())
                        .map(|(a, b)| (a.first_seq, b.last_seq()));
                    let (status, ok) = if scan.torn_bytes > 0 {
                        let s = format!(
                            "torn tail: {} bytes at offset {}",
                            scan.torn_bytes, scan.valid_len
                        );
                        // Only the last segment may be torn; recovery cuts it.
                        (
                            if last {
                                s
                            } else {
                                format!("{s} (not the last segment: recovery fails)")
                            },
                            last,
                        )
                    } else {
                        ("ok".to_owned(), true)
                    };
                    FileReport {
                        file: name_of(p),
                        bytes: size(p),
                        seq,
                        records: scan.records.len(),
                        status,
                        ok,
                    }
                }
                Err(e) => FileReport {
                    file: name_of(p),
                    bytes: size(p),
                    seq: None,
                    records: 0,
                    status: e.to_string(),
                    ok: false,
                },
            });
        }
        out.push(StreamReport {
            name: entry.file_name().to_string_lossy().into_owned(),
            options,
            snapshots,
            segments,
        });
    }
    Ok(out)
}

/// The human-readable listing.
pub fn render(reports: &[StreamReport]) -> String {
    let mut s = String::new();
    for r in reports {
        let _ = writeln!(
            s,
            "stream {}{}",
            r.name,
            if r.ok() { "" } else { "  [PROBLEM]" }
        );
        match &r.options {
            Ok(o) => {
                let _ = writeln!(
                    s,
                    "  options.json  ok: J={} hidden={} lags={} inputs={} outputs={} method={:?} seed={}",
                    o.ensemble, o.hidden, o.lags, o.inputs, o.outputs, o.method, o.seed
                );
            }
            Err(e) => {
                let _ = writeln!(s, "  options.json  {e}");
            }
        }
        for f in r.snapshots.iter().chain(&r.segments) {
            let seq = f.seq.map_or("-".to_owned(), |(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}..{b}")
                }
            });
            let _ = writeln!(
                s,
                "  {:<36} {:>10} B  seq {:<14} records {:<6} {}",
                f.file, f.bytes, seq, f.records, f.status
            );
        }
    }
    if reports.is_empty() {
        s.push_str("no streams\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Observation, Stream};
    use crate::storage::store::{StorageConfig, Store};

    #[test]
    fn lists_files_and_flags_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StorageConfig::default()).unwrap();
        let o = Options {
            ensemble: 4,
            hidden: 2,
            lags: 1,
            ..Options::default()
        }
        .check()
        .unwrap();
        let mut files = store.create_stream("x", &o).unwrap();
        let mut s = Stream::new(o);
        let b: Vec<Observation> = (0..5)
            .map(|i| Observation {
                seq: None,
                x: vec![],
                y: vec![i as f64],
            })
            .collect();
        let plan = s.plan(&b).unwrap();
        files.append(&[(plan.first_seq, &b)]).unwrap();
        s.apply(&b, &plan, |_| {});
        files.snapshot(&s).unwrap();
        let r = inspect(dir.path()).unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].ok(), "{}", render(&r));
        assert_eq!(r[0].snapshots[0].seq, Some((5, 5)));
        assert_eq!(r[0].segments[0].seq, Some((1, 5)));
        let text = render(&r);
        assert!(
            text.contains("wal-00000000000000000001.log") && text.contains("seq 1..5"),
            "{text}"
        );
        // Damage the snapshot: reported, not fatal.
        let snap = dir
            .path()
            .join("streams/x")
            .join(snapshot::snapshot_name(5));
        let mut bytes = std::fs::read(&snap).unwrap();
        let n = bytes.len() - 1;
        bytes[n] ^= 1;
        std::fs::write(&snap, bytes).unwrap();
        let r = inspect(dir.path()).unwrap();
        assert!(
            r[0].snapshots[0].status.contains("checksum"),
            "{}",
            render(&r)
        );
    }
}
