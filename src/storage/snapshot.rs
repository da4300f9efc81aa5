//! Snapshots: a stream's whole state at one sequence number, written atomically.
//!
//! On-disk format (little-endian):
//!
//! ```text
//! snapshot-<seq:020>.bin
//!   magic "EKIDSNP1" (8) | version u32 = 6 | seq u64 | len u64 | crc32 u32 | payload (len bytes)
//! ```
//!
//! The payload is the postcard encoding of [`StreamState`] (floats bit-exact, the RNG state
//! included); `crc32` covers the payload. Writing: `snapshot-<seq>.tmp`, fsync, rename to the
//! final name, fsync the directory; a crash at any point leaves either no snapshot or a whole
//! one, plus perhaps a stray `.tmp` that recovery removes.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{
    ArState, Calibrator, CalibratorV4, EnsembleState, ErrorMoments, LagBuffer, MixtureState,
    Observation, Options, Scaler, Stats, StreamState,
};
use crate::storage::name::describe_file;
use crate::storage::wal::sync_dir;

const MAGIC: &[u8; 8] = b"EKIDSNP1";
/// 2: `Stats` holds the user-unit noise and spread. 3: the state holds the calibrator of the
/// stream's intervals and the state of its mixture. 4: the mixture keeps the products of its
/// members' errors. 5: the calibrator keeps its trackers' recent updates. 6: the far tails'
/// trackers take larger steps (the same fields; a version-5 calibrator's sums of recent
/// updates are recounted with the new steps). Older snapshots are read and migrated
/// ([`StreamStateV1`], [`StreamStateV2`], [`StreamStateV3`], [`StreamStateV4`]).
const VERSION: u32 = 6;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: invalid snapshot: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl SnapshotError {
    /// The error without the host's paths, for API clients.
    pub fn public(&self) -> String {
        match self {
            SnapshotError::Io { path, source } => format!("{}: {source}", describe_file(path)),
            SnapshotError::Invalid { path, reason } => {
                format!("{}: invalid snapshot: {reason}", describe_file(path))
            }
        }
    }
}

pub fn snapshot_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.bin")
}

pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    name.strip_prefix("snapshot-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

/// Writes the snapshot of `state` taken at `seq` into `dir`, atomically. Returns its path.
pub fn write(dir: &Path, seq: u64, state: &StreamState) -> Result<PathBuf, SnapshotError> {
    let final_path = dir.join(snapshot_name(seq));
    let tmp = dir.join(format!("snapshot-{seq:020}.tmp"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { path, source }
    };
    // The payload is encoded straight into the file (no copy of it in memory: a big stream's
    // state is already a copy of its ensemble), then the header, whose length and checksum
    // are known only then, is written over the placeholder at the start.
    let result = File::create(&tmp).and_then(|mut file| {
        file.write_all(&[0; HEADER_LEN])?;
        let payload = BufWriter::new(Checksummed {
            out: file,
            crc: crc32fast::Hasher::new(),
            len: 0,
        });
        let payload = postcard::to_io(state, payload)
            .map_err(|e| io::Error::other(format!("cannot encode the state: {e}")))?;
        let Checksummed { mut out, crc, len } = payload
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        out.seek(SeekFrom::Start(0))?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&seq.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        out.write_all(&header)?;
        out.sync_all()
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
    sync_dir(dir).map_err(io(dir))?;
    Ok(final_path)
}

/// A writer that checksums and counts what passes through it.
struct Checksummed<W> {
    out: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads and checks a snapshot; returns its seq and state.
pub fn read(path: &Path) -> Result<(u64, StreamState), SnapshotError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        })?;
    decode(&bytes).map_err(|reason| SnapshotError::Invalid {
        path: path.to_owned(),
        reason,
    })
}

/// A snapshot of `state` at `seq` in memory, in the file's format (cluster mode keeps
/// snapshots in JetStream rather than in files).
pub fn encode(seq: u64, state: &StreamState) -> Result<Vec<u8>, String> {
    let payload =
        postcard::to_stdvec(state).map_err(|e| format!("cannot encode the state: {e}"))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and decodes a snapshot's bytes; returns its seq and state, or why not.
pub fn decode(bytes: &[u8]) -> Result<(u64, StreamState), String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("no snapshot header".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
    let version = u32_at(8);
    if !(1..=VERSION).contains(&version) {
        return Err(format!("version {version}, expected 1 to {VERSION}"));
    }
    let seq = u64_at(12);
    let len = u64_at(20);
    let crc = u32_at(28);
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format!(
            "truncated: {} of {len} payload bytes",
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let state: StreamState = match version {
        1 => postcard::from_bytes::<StreamStateV1>(payload)
            .map(|v| StreamState::from(StreamStateV2::from(v))),
        2 => postcard::from_bytes::<StreamStateV2>(payload).map(StreamState::from),
        3 => postcard::from_bytes::<StreamStateV3>(payload).map(StreamState::from),
        4 => postcard::from_bytes::<StreamStateV4>(payload).map(StreamState::from),
        5 => postcard::from_bytes::<StreamState>(payload).map(|mut s| {
            s.calibrator.recount_since_served();
            s
        }),
        _ => postcard::from_bytes(payload),
    }
    .map_err(|e| format!("undecodable: {e}"))?;
    if state.stats.last_seq != seq {
        return Err(format!(
            "header says seq {seq}, the state {}",
            state.stats.last_seq
        ));
    }
    Ok((seq, state))
}

/// Snapshots in `dir`, newest first.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_snapshot_name) {
            v.push((seq, entry.path()));
        }
    }
    v.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    Ok(v)
}

/// A snapshot's state in format version 1 (before `Stats` had the user-unit noise and
/// spread), read so that an upgraded daemon recovers older snapshots.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct StreamStateV1 {
    #[serde(with = "crate::engine::options_json_text")]
    options: Options,
    y_scale: Option<Vec<Scaler>>,
    x_scale: Option<Vec<Scaler>>,
    pending: Vec<Observation>,
    lags: LagBuffer,
    ensemble: EnsembleState,
    stats: StatsV1,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct StatsV1 {
    observations: u64,
    predicted: u64,
    last_seq: u64,
    sse_user: f64,
    sse_scaled: f64,
    noise_var: f64,
    prediction_spread: f64,
    repaired: u64,
}

#[cfg(test)]
impl StreamStateV1 {
    /// What a version-1 daemon would have saved of `s`.
    pub fn of(s: &StreamState) -> Self {
        let st = &s.stats;
        StreamStateV1 {
            options: s.options.clone(),
            y_scale: s.y_scale.clone(),
            x_scale: s.x_scale.clone(),
            pending: s.pending.clone(),
            lags: s.lags.clone(),
            ensemble: s.ensemble.clone(),
            stats: StatsV1 {
                observations: st.observations,
                predicted: st.predicted,
                last_seq: st.last_seq,
                sse_user: st.sse_user,
                sse_scaled: st.sse_scaled,
                noise_var: st.noise_var,
                prediction_spread: st.prediction_spread,
                repaired: st.repaired,
            },
        }
    }
}

/// A snapshot's state in format version 2 (before the calibrator of the intervals).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct StreamStateV2 {
    #[serde(with = "crate::engine::options_json_text")]
    options: Options,
    y_scale: Option<Vec<Scaler>>,
    x_scale: Option<Vec<Scaler>>,
    pending: Vec<Observation>,
    lags: LagBuffer,
    ensemble: EnsembleState,
    stats: Stats,
}

impl From<StreamStateV2> for StreamState {
    /// A calibrator and a mixture that start afresh: the forecasts the calibrator would score
    /// were never kept, and the autoregression beside the ensemble did not exist.
    fn from(v: StreamStateV2) -> Self {
        let o = &v.options;
        StreamState {
            calibrator: Calibrator::new(o.horizon, o.outputs),
            mixture: MixtureState::new(o.lags * o.outputs + o.inputs, o.outputs, o.horizon),
            options: v.options,
            y_scale: v.y_scale,
            x_scale: v.x_scale,
            pending: v.pending,
            lags: v.lags,
            ensemble: v.ensemble,
            stats: v.stats,
        }
    }
}

/// A snapshot's state in format versions 3 and 4: the calibrator without its trackers' recent
/// updates, and the mixture as that version kept it.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct StreamStateWith<M> {
    #[serde(with = "crate::engine::options_json_text")]
    options: Options,
    y_scale: Option<Vec<Scaler>>,
    x_scale: Option<Vec<Scaler>>,
    pending: Vec<Observation>,
    lags: LagBuffer,
    ensemble: EnsembleState,
    stats: Stats,
    calibrator: CalibratorV4,
    mixture: M,
}

/// Format version 3: the mixture kept each member's squared errors only.
pub type StreamStateV3 = StreamStateWith<MixtureStateV3>;
/// Format version 4: the calibrator kept no recent updates.
pub type StreamStateV4 = StreamStateWith<MixtureState>;

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct MixtureStateV3 {
    ar: ArState,
    loss: [f64; 3],
}

impl<M> StreamStateWith<M> {
    /// Today's state, its mixture made from the saved one by `migrate`.
    fn with_mixture(
        self,
        migrate: impl FnOnce(M, &Options, &Stats) -> MixtureState,
    ) -> StreamState {
        let mixture = migrate(self.mixture, &self.options, &self.stats);
        StreamState {
            options: self.options,
            y_scale: self.y_scale,
            x_scale: self.x_scale,
            pending: self.pending,
            lags: self.lags,
            ensemble: self.ensemble,
            stats: self.stats,
            calibrator: self.calibrator.into(),
            mixture,
        }
    }

    /// What a version-3 or -4 daemon would have saved of `s`, its mixture as `mixture`.
    #[cfg(test)]
    fn of_with(s: &StreamState, mixture: M) -> Self {
        StreamStateWith {
            options: s.options.clone(),
            y_scale: s.y_scale.clone(),
            x_scale: s.x_scale.clone(),
            pending: s.pending.clone(),
            lags: s.lags.clone(),
            ensemble: s.ensemble.clone(),
            stats: s.stats.clone(),
            calibrator: CalibratorV4::of(&s.calibrator),
            mixture,
        }
    }
}

impl From<StreamStateV3> for StreamState {
    /// The products of the members' errors as if the members had erred alike (correlation 1):
    /// the weights then start at the member of least squared error, as version 3's nearly were,
    /// and the true products replace these within a few hundred observations. The steps ahead
    /// start unscored (they take step 1's weights until their first forecasts are scored).
    fn from(v: StreamStateV3) -> Self {
        v.with_mixture(|old, o, stats| {
            let loss = old.loss;
            let mut cross = [0.0; 3];
            for (c, (i, j)) in cross.iter_mut().zip([(0, 1), (0, 2), (1, 2)]) {
                *c = (loss[i] * loss[j]).sqrt();
            }
            let fresh = MixtureState::new(o.lags * o.outputs + o.inputs, o.outputs, o.horizon);
            MixtureState {
                ar: old.ar,
                errors: ErrorMoments {
                    squared: loss,
                    cross,
                    scored: stats.predicted,
                },
                ..fresh
            }
        })
    }
}

impl From<StreamStateV4> for StreamState {
    fn from(v: StreamStateV4) -> Self {
        v.with_mixture(|mixture, _, _| mixture)
    }
}

#[cfg(test)]
impl StreamStateV3 {
    /// What a version-3 daemon would have saved of `s`.
    pub fn of(s: &StreamState) -> Self {
        let mixture = MixtureStateV3 {
            ar: s.mixture.ar.clone(),
            loss: s.mixture.errors.squared,
        };
        Self::of_with(s, mixture)
    }
}

#[cfg(test)]
impl StreamStateV4 {
    /// What a version-4 daemon would have saved of `s`.
    pub fn of(s: &StreamState) -> Self {
        Self::of_with(s, s.mixture.clone())
    }
}

impl From<StreamStateV1> for StreamStateV2 {
    /// The user-unit noise and spread from the scaled ones, as version 1's API reported them
    /// for one output; for several, as if every output had the average scaled value.
    fn from(v: StreamStateV1) -> Self {
        let widths2: f64 = v.y_scale.as_ref().map_or(v.options.outputs as f64, |s| {
            s.iter().map(|sc| sc.width() * sc.width()).sum()
        });
        let s = v.stats;
        StreamStateV2 {
            options: v.options,
            y_scale: v.y_scale,
            x_scale: v.x_scale,
            pending: v.pending,
            lags: v.lags,
            ensemble: v.ensemble,
            stats: Stats {
                observations: s.observations,
                predicted: s.predicted,
                last_seq: s.last_seq,
                sse_user: s.sse_user,
                sse_scaled: s.sse_scaled,
                noise_var: s.noise_var,
                prediction_spread: s.prediction_spread,
                repaired: s.repaired,
                noise_user: s.noise_var * widths2,
                spread_user: s.prediction_spread * widths2.sqrt(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Observation, Stream};
    use crate::engine::{Options, Range, ScaleOption};

    #[test]
    fn a_version_1_snapshot_is_read_and_migrated() {
        let options = Options {
            ensemble: 16,
            hidden: 4,
            lags: 2,
            scale: ScaleOption::Fixed(Range {
                min: 0.0,
                max: 50.0,
            }),
            ..Options::default()
        }
        .check()
        .expect("valid options");
        let mut stream = Stream::new(options);
        let batch: Vec<Observation> = (0..30)
            .map(|t| Observation {
                seq: None,
                x: vec![],
                y: vec![25.0 + 20.0 * (f64::from(t) / 4.0).sin()],
            })
            .collect();
        let plan = stream.plan(&batch).expect("valid batch");
        stream.apply(&batch, &plan, |_| {});
        let now = stream.state();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_old(dir.path(), 1, 30, &StreamStateV1::of(&now));
        let (seq, old) = read(&path).expect("a version-1 snapshot reads");
        assert_eq!(seq, 30);
        // Everything but the new statistics as saved; those as version 1 reported them.
        let (mut want, mut got) = (now.clone(), old.clone());
        let width = 50.0;
        assert_eq!(got.stats.noise_user, now.stats.noise_var * (width * width));
        assert_eq!(got.stats.spread_user, now.stats.prediction_spread * width);
        for s in [&mut want.stats, &mut got.stats] {
            (s.noise_user, s.spread_user) = (0.0, 0.0);
        }
        // The calibrator and the mixture start afresh.
        assert_eq!(got.calibrator, Calibrator::new(24, 1));
        assert_eq!(got.mixture, MixtureState::new(2, 1, 24));
        want.calibrator = got.calibrator.clone();
        want.mixture = got.mixture.clone();
        assert_eq!(got, want);
        // And today's format round-trips whole.
        let path = write(dir.path(), 30, &now).expect("write");
        assert_eq!(read(&path).expect("read").1, now);
    }

    /// A default stream after `n` observations of `f(t)`.
    fn fed(n: u32, f: fn(f64) -> f64) -> Stream {
        let mut stream = Stream::new(Options::default().check().expect("valid options"));
        let batch: Vec<Observation> = (0..n)
            .map(|t| Observation {
                seq: None,
                x: vec![],
                y: vec![f(f64::from(t) / 5.0)],
            })
            .collect();
        let plan = stream.plan(&batch).expect("valid batch");
        stream.apply(&batch, &plan, |_| {});
        stream
    }

    #[test]
    fn a_version_4_snapshot_keeps_all_but_the_trackers_recent_updates() {
        let now = fed(80, f64::cos).state();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_old(dir.path(), 4, 80, &StreamStateV4::of(&now));
        let (_, old) = read(&path).expect("a version-4 snapshot reads");
        let fresh = Calibrator::from(CalibratorV4::of(&now.calibrator));
        assert_ne!(
            fresh, now.calibrator,
            "the stream had recent updates to lose"
        );
        let mut want = now.clone();
        want.calibrator = fresh;
        assert_eq!(old, want);
        let mut restored = Stream::from_state(old).expect("restores");
        let more: Vec<Observation> = (0..24)
            .map(|t| Observation {
                seq: None,
                x: vec![],
                y: vec![f64::from(t).cos()],
            })
            .collect();
        let plan = restored.plan(&more).expect("valid batch");
        restored.apply(&more, &plan, |_| {});
        assert!(restored.forecast_state().is_some());
    }

    #[test]
    fn a_version_5_snapshot_has_its_trackers_recent_updates_recounted() {
        let now = fed(80, f64::sin).state();
        let mut want = now.clone();
        want.calibrator.recount_since_served();
        // The recount is the running sums', up to rounding.
        let (a, b) = (
            want.calibrator.since_served(),
            now.calibrator.since_served(),
        );
        assert!(a.iter().any(|&v| v != 0.0), "the stream had recent updates");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-12, "{x} against {y}");
        }
        // A version-5 daemon's sums came from other steps for the far tails: a stand-in.
        let mut saved = now.clone();
        saved.calibrator.clear_since_served();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_old(dir.path(), 5, 80, &saved);
        let (_, old) = read(&path).expect("a version-5 snapshot reads");
        assert_eq!(old, want);
    }

    #[test]
    fn a_version_3_snapshot_keeps_its_mixture_and_calibrator() {
        let now = fed(80, f64::sin).state();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_old(dir.path(), 3, 80, &StreamStateV3::of(&now));
        let (_, old) = read(&path).expect("a version-3 snapshot reads");
        // All but the products of the members' errors as saved; those as if they erred alike.
        let errors = old.mixture.errors;
        assert_eq!(errors.squared, now.mixture.errors.squared);
        assert_eq!(errors.scored, now.stats.predicted);
        assert!(errors.scored > 0);
        let s = errors.squared;
        assert_eq!(errors.cross[0], (s[0] * s[1]).sqrt());
        assert_eq!(errors.cross[2], (s[1] * s[2]).sqrt());
        // The steps ahead start unscored.
        assert!(old.mixture.ahead.iter().all(|a| a.scored == 0));
        assert_eq!(old.mixture.origins, 0);
        let mut want = now.clone();
        want.mixture.errors = errors;
        want.mixture.ahead = old.mixture.ahead.clone();
        want.mixture.paths = old.mixture.paths.clone();
        want.mixture.origins = 0;
        want.calibrator = CalibratorV4::of(&now.calibrator).into();
        assert_eq!(old, want);
        // A stream rebuilt from it serves a forecast.
        let restored = Stream::from_state(old).expect("restores");
        assert!(restored.forecast_state().is_some());
    }

    /// A snapshot as a daemon of format `version` wrote it: the same header, its payload.
    fn write_old(
        dir: &std::path::Path,
        version: u32,
        seq: u64,
        state: &impl serde::Serialize,
    ) -> PathBuf {
        let payload = postcard::to_stdvec(state).expect("encode");
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let path = dir.join(snapshot_name(seq));
        std::fs::write(&path, bytes).expect("write");
        path
    }
}
