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
    /// Whether recovery reads this file: every snapshot (the newest readable one is used),
    /// and a log segment only if it holds records after that snapshot (see `wal::needed`).
    pub needed: bool,
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub name: String,
    pub options: Result<Options, String>,
    pub snapshots: Vec<FileReport>,
    pub segments: Vec<FileReport>,
}

impl StreamReport {
    /// Recoverable: options readable, every log segment recovery needs readable, and a
    /// readable snapshot if there are any.
    pub fn ok(&self) -> bool {
        self.options.is_ok()
            && self.segments.iter().all(|s| s.ok || !s.needed)
            && (self.snapshots.is_empty() || self.snapshots.iter().any(|s| s.ok))
    }

    /// Damage that does not stop recovery: an unreadable older snapshot, a damaged segment
    /// the snapshot covers.
    pub fn damaged(&self) -> bool {
        self.snapshots.iter().chain(&self.segments).any(|f| !f.ok)
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
        let name = match entry.file_name().into_string() {
            Ok(n) if super::is_valid_stream_name(&n) => n,
            other => {
                let shown = match other {
                    Ok(n) => format!("{n:?}"),
                    Err(n) => format!("{n:?}"),
                };
                out.push(StreamReport {
                    name: shown,
                    options: Err(
                        "not a stream name: the daemon skips this directory (move it away)".into(),
                    ),
                    snapshots: Vec::new(),
                    segments: Vec::new(),
                });
                continue;
            }
        };
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
                needed: true,
            });
        }
        // Recovery starts from the newest readable snapshot (newest first in the list).
        let restored = snapshots
            .iter()
            .find(|f| f.ok)
            .and_then(|f| f.seq)
            .map_or(0, |(s, _)| s);
        let mut segments = Vec::new();
        let listed = wal::list_segments(&d)?;
        for (i, (_, p)) in listed.iter().enumerate() {
            let last = i + 1 == listed.len();
            let needed = wal::needed(&listed, i, restored);
            if last && wal::is_torn_creation(p)? {
                segments.push(FileReport {
                    file: name_of(p),
                    bytes: size(p),
                    seq: None,
                    records: 0,
                    status: "creation cut short: shorter than its header, holds nothing (recovery removes it)".to_owned(),
                    ok: true,
                    needed,
                });
                continue;
            }
            let covered = |status: String| {
                if needed {
                    status
                } else {
                    format!(
                        "{status} (snapshot {restored} covers this segment: recovery does not need it, a fallback to the older snapshot would)"
                    )
                }
            };
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
                            } else if needed {
                                format!("{s} (not the last segment: recovery fails)")
                            } else {
                                covered(s)
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
                        needed,
                    }
                }
                Err(e) => FileReport {
                    file: name_of(p),
                    bytes: size(p),
                    seq: None,
                    records: 0,
                    status: covered(e.to_string()),
                    ok: false,
                    needed,
                },
            });
        }
        out.push(StreamReport {
            name,
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
        let flag = if !r.ok() {
            "  [PROBLEM]"
        } else if r.damaged() {
            "  [DAMAGED: recoverable]"
        } else {
            ""
        };
        let _ = writeln!(s, "stream {}{flag}", r.name);
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
