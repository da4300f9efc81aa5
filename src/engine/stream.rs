//! One stream's whole learning state, with no IO: options, scaling, the online model, sequence
//! numbers and statistics. The daemon's owner task holds exactly one `Stream` per name; `eval`
//! uses the same [`crate::engine::model::OnlineModel`] underneath, so both predict identically.
//!
//! A batch is handled in two steps so that it is all-or-nothing: [`Stream::plan`] validates
//! every observation (dimensions, finiteness, sequence numbers) without changing anything, and
//! only then [`Stream::apply`] learns from the accepted ones.

use serde::{Deserialize, Serialize};

use crate::engine::ensemble::{AnyEnsemble, EnsembleState};
use crate::engine::forecast::{ForecastState, interval_particles};
use crate::engine::model::{LagBuffer, OnlineModel, Scaler};
use crate::engine::options::{Options, ScaleOption};

/// Options use untagged enums (`"off"` or a schedule), which compact binary formats cannot
/// decode; inside a snapshot they travel as their JSON text.
mod options_as_json {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::engine::options::Options;

    pub fn serialize<S: Serializer>(o: &Options, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(o).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Options, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

/// One observation as it arrives, in the user's units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub seq: Option<u64>,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

impl Observation {
    /// Whether this observation, at `index` in its batch, fits a stream of `inputs` and
    /// `outputs`: as many finite values as that in `y` then `x`, and no `seq` 0. (Sequence gaps
    /// depend on the stream's state: [`Stream::plan`].)
    pub fn check(&self, index: usize, inputs: usize, outputs: usize) -> Result<(), BatchError> {
        for (field, values, want) in [("y", &self.y, outputs), ("x", &self.x, inputs)] {
            if values.len() != want {
                return Err(BatchError::Dimension {
                    index,
                    field,
                    expected: want,
                    got: values.len(),
                });
            }
            if let Some(position) = values.iter().position(|v| !v.is_finite()) {
                return Err(BatchError::NotFinite {
                    index,
                    field,
                    position,
                });
            }
        }
        if self.seq == Some(0) {
            return Err(BatchError::SeqZero { index });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error("the batch is empty")]
    Empty,
    #[error("observation {index}: `{field}` has {got} values, the stream expects {expected}")]
    Dimension {
        index: usize,
        field: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("observation {index}: `{field}[{position}]` is not a finite number")]
    NotFinite {
        index: usize,
        field: &'static str,
        position: usize,
    },
    #[error("observation {index}: `seq` must be at least 1")]
    SeqZero { index: usize },
    #[error("observation {index}: `seq` {got} leaves a gap: the next expected is {expected}")]
    SeqGap {
        index: usize,
        expected: u64,
        got: u64,
    },
}

impl BatchError {
    /// Index of the offending observation in the batch, if any.
    pub fn index(&self) -> Option<usize> {
        match self {
            BatchError::Empty => None,
            BatchError::Dimension { index, .. }
            | BatchError::NotFinite { index, .. }
            | BatchError::SeqZero { index }
            | BatchError::SeqGap { index, .. } => Some(*index),
        }
    }
    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            BatchError::Empty => "body",
            BatchError::Dimension { field, .. } | BatchError::NotFinite { field, .. } => field,
            BatchError::SeqZero { .. } | BatchError::SeqGap { .. } => "seq",
        }
    }
}

/// What [`Stream::plan`] decided: which observations are new (consecutive from `first_seq`).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub accepted: Vec<usize>,
    pub duplicates: usize,
    pub first_seq: u64,
}

impl Plan {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.accepted.len() as u64 - 1
    }
}

/// One applied observation, in the user's units.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Applied {
    pub seq: u64,
    pub y: Vec<f64>,
    /// The prequential prediction (None while the lag buffer fills).
    pub prediction: Option<Vec<f64>>,
    /// Squared error summed over outputs, user units (None without a prediction).
    pub error: Option<f64>,
}

/// Running statistics of a stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub observations: u64,
    pub predicted: u64,
    pub last_seq: u64,
    pub sse_user: f64,
    pub sse_scaled: f64,
    /// Estimated one-step noise variance (scaled units, averaged over outputs; the forecasts'
    /// noise): running mean of squared prequential errors, exponentially weighted after the
    /// first `NOISE_WINDOW` predictions.
    pub noise_var: f64,
    /// Standard deviation of the particles' last predictions (scaled, averaged over outputs).
    pub prediction_spread: f64,
    pub repaired: u64,
    /// The same noise estimate in the user's units, summed over outputs (like `sse_user`):
    /// each output's squared error in its own units.
    pub noise_user: f64,
    /// The particles' spread in the user's units: the root of the outputs' variances, each in
    /// its own units, summed.
    pub spread_user: f64,
}

const NOISE_WINDOW: f64 = 500.0;

impl Stats {
    pub fn mse_user(&self) -> Option<f64> {
        (self.predicted > 0).then(|| self.sse_user / self.predicted as f64)
    }
    pub fn mse_scaled(&self) -> Option<f64> {
        (self.predicted > 0).then(|| self.sse_scaled / self.predicted as f64)
    }
}

/// Everything a snapshot holds: a `Stream` is rebuilt from it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    #[serde(with = "options_as_json")]
    pub options: Options,
    pub y_scale: Option<Vec<Scaler>>,
    pub x_scale: Option<Vec<Scaler>>,
    pub pending: Vec<Observation>,
    pub lags: LagBuffer,
    pub ensemble: EnsembleState,
    pub stats: Stats,
}

/// A snapshot's state in format version 1 (before `Stats` had the user-unit noise and
/// spread), read so that an upgraded daemon recovers older snapshots.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub struct StreamStateV1 {
    #[serde(with = "options_as_json")]
    options: Options,
    y_scale: Option<Vec<Scaler>>,
    x_scale: Option<Vec<Scaler>>,
    pending: Vec<Observation>,
    lags: LagBuffer,
    ensemble: EnsembleState,
    stats: StatsV1,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
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

impl From<StreamStateV1> for StreamState {
    /// The user-unit noise and spread from the scaled ones, as version 1's API reported them
    /// for one output; for several, as if every output had the average scaled value.
    fn from(v: StreamStateV1) -> Self {
        let widths2: f64 = v.y_scale.as_ref().map_or(v.options.outputs as f64, |s| {
            s.iter().map(|sc| sc.width() * sc.width()).sum()
        });
        let s = v.stats;
        StreamState {
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

#[derive(Debug, Clone)]
pub struct Stream {
    options: Options,
    /// Per output; fixed by the options, or (`auto`) from the first `max(lags, 1)` observations.
    y_scale: Option<Vec<Scaler>>,
    /// Per exogenous input; always `auto`.
    x_scale: Option<Vec<Scaler>>,
    /// Observations held back until the `auto` scales are fixed. They would only fill the lag
    /// buffer anyway, so holding them changes no prediction.
    pending: Vec<Observation>,
    model: OnlineModel<AnyEnsemble>,
    stats: Stats,
    // Scratch for one observation in model units (no allocation per observation).
    ys: Vec<f64>,
    xs: Vec<f64>,
    pred: Vec<f64>,
}

/// The `auto` scale: the range of the first observations, widened by a quarter on each side so
/// that a series drifting a little past its opening range stays near `[0, 1]`. A constant
/// opening gets a width of its magnitude (or 1 around 0).
fn auto_scaler(values: impl Iterator<Item = f64>) -> Scaler {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return Scaler::new(0.0, 1.0);
    }
    let width = hi - lo;
    if width <= 1e-9 * hi.abs().max(lo.abs()).max(1.0) {
        let half = 0.5 * lo.abs().max(1.0);
        return Scaler::new(lo - half, lo + half);
    }
    Scaler::new(lo - 0.25 * width, hi + 0.25 * width)
}

impl Stream {
    /// The memory a stream of these options may hold, in bytes: its ensemble
    /// ([`AnyEnsemble::footprint`]: the particles and every parameter-sized work buffer), a
    /// snapshot's copy of the ensemble's state while one is written (encoded straight into the
    /// file), the published forecast state, and the stream's own buffers (the lag buffer and
    /// its copy, the model's input).
    /// What the daemon's memory budget charges a stream; a batch's observations are its
    /// request's, bounded by the body limit.
    pub fn memory_bytes(options: &Options) -> u64 {
        let ensemble = AnyEnsemble::footprint(options);
        let n_in = options.lags * options.outputs + options.inputs;
        let own =
            (2 * options.lags * options.outputs + n_in + 2 * options.inputs + 8 * options.outputs)
                * std::mem::size_of::<f64>();
        // The published forecast state twice: a new one is built while readers hold the last.
        let forecast = 2 * ForecastState::bytes(options);
        (ensemble.resident + ensemble.snapshot + own + forecast) as u64
    }

    pub fn new(options: Options) -> Self {
        let y_scale = match options.scale {
            ScaleOption::Fixed(r) => Some(vec![Scaler::new(r.min, r.max); options.outputs]),
            ScaleOption::Auto(_) => None,
        };
        let model = OnlineModel::new(
            AnyEnsemble::new(&options),
            options.lags,
            options.inputs,
            options.outputs,
        );
        Stream {
            ys: vec![0.0; options.outputs],
            xs: vec![0.0; options.inputs],
            pred: vec![0.0; options.outputs],
            x_scale: if options.inputs == 0 {
                Some(Vec::new())
            } else {
                None
            },
            pending: Vec::new(),
            y_scale,
            model,
            stats: Stats::default(),
            options,
        }
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Lets this stream's steps use up to `threads` threads ([`crate::engine::ensemble::Ensemble::set_threads`]: only
    /// big ensembles split, and the results are the same bits either way).
    pub fn set_step_threads(&mut self, threads: usize) {
        self.model.learner.set_threads(threads);
    }

    /// Threads one step of this stream uses: 2 when its steps split, else 1.
    pub fn step_threads(&self) -> usize {
        if self.model.learner.is_parallel() {
            2
        } else {
            1
        }
    }

    pub fn state(&self) -> StreamState {
        StreamState {
            options: self.options.clone(),
            y_scale: self.y_scale.clone(),
            x_scale: self.x_scale.clone(),
            pending: self.pending.clone(),
            lags: self.model.lags().clone(),
            ensemble: self.model.learner.state(),
            stats: self.stats.clone(),
        }
    }

    /// Rebuilds a stream exactly as it was when `state` was taken.
    pub fn from_state(state: StreamState) -> Result<Stream, String> {
        let options = state.options.check().map_err(|e| e.to_string())?;
        let ensemble = AnyEnsemble::from_state(&options, state.ensemble)?;
        if state.lags.values().len() != options.lags * options.outputs {
            return Err("lag buffer does not match the options".into());
        }
        Ok(Stream {
            ys: vec![0.0; options.outputs],
            xs: vec![0.0; options.inputs],
            pred: vec![0.0; options.outputs],
            y_scale: state.y_scale,
            x_scale: state.x_scale,
            pending: state.pending,
            model: OnlineModel::with_lags(ensemble, state.lags, options.inputs),
            stats: state.stats,
            options,
        })
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn last_seq(&self) -> u64 {
        self.stats.last_seq
    }
    pub fn y_scale(&self) -> Option<&[Scaler]> {
        self.y_scale.as_deref()
    }

    /// Validates a whole batch against this stream without changing anything.
    pub fn plan(&self, batch: &[Observation]) -> Result<Plan, BatchError> {
        self.plan_after(batch, self.stats.last_seq)
    }

    /// Like [`Stream::plan`], as if `last_seq` had already been applied (the owner plans a
    /// group of queued batches before applying any of them).
    pub fn plan_after(&self, batch: &[Observation], last_seq: u64) -> Result<Plan, BatchError> {
        if batch.is_empty() {
            return Err(BatchError::Empty);
        }
        let mut expected = last_seq + 1;
        let mut plan = Plan {
            accepted: Vec::with_capacity(batch.len()),
            duplicates: 0,
            first_seq: expected,
        };
        for (index, o) in batch.iter().enumerate() {
            o.check(index, self.options.inputs, self.options.outputs)?;
            match o.seq {
                Some(s) if s < expected => plan.duplicates += 1,
                Some(s) if s > expected => {
                    return Err(BatchError::SeqGap {
                        index,
                        expected,
                        got: s,
                    });
                }
                _ => {
                    plan.accepted.push(index);
                    expected += 1;
                }
            }
        }
        Ok(plan)
    }

    /// Learns from the observations a [`Plan`] of this same state accepted, in order, calling
    /// `sink` with each one's prequential prediction.
    /// When the steps split over two threads, the whole batch runs on the step pool, so each
    /// step's fork-joins start from a pool worker instead of waking one per observation.
    pub fn apply(&mut self, batch: &[Observation], plan: &Plan, sink: impl FnMut(Applied) + Send) {
        crate::engine::ensemble::on_pool(self.step_threads() > 1, || {
            self.apply_here(batch, plan, sink)
        });
    }

    fn apply_here(&mut self, batch: &[Observation], plan: &Plan, mut sink: impl FnMut(Applied)) {
        if plan.accepted.is_empty() {
            return;
        }
        let mut k0 = 0;
        if self.y_scale.is_none() || self.x_scale.is_none() {
            let need = self.options.lags.max(1);
            while self.pending.len() < need && k0 < plan.accepted.len() {
                let o = &batch[plan.accepted[k0]];
                self.pending.push(o.clone());
                self.stats.observations += 1;
                self.stats.last_seq = plan.first_seq + k0 as u64;
                sink(Applied {
                    seq: self.stats.last_seq,
                    y: o.y.clone(),
                    prediction: None,
                    error: None,
                });
                k0 += 1;
            }
            if self.pending.len() < need {
                return;
            }
            let pending = std::mem::take(&mut self.pending);
            if self.y_scale.is_none() {
                self.y_scale = Some(
                    (0..self.options.outputs)
                        .map(|o| auto_scaler(pending.iter().map(|p| p.y[o])))
                        .collect(),
                );
            }
            if self.x_scale.is_none() {
                self.x_scale = Some(
                    (0..self.options.inputs)
                        .map(|o| auto_scaler(pending.iter().map(|p| p.x[o])))
                        .collect(),
                );
            }
            // Learn from the held-back observations now (they only fill the lag buffer, except
            // the last one when lags is 0).
            for o in &pending {
                self.learn(o, |_, _| {});
            }
        }
        for (k, &i) in plan.accepted.iter().enumerate().skip(k0) {
            let seq = plan.first_seq + k as u64;
            self.learn(&batch[i], |prediction, error| {
                sink(Applied {
                    seq,
                    y: batch[i].y.clone(),
                    prediction,
                    error,
                })
            });
            self.stats.observations += 1;
            self.stats.last_seq = seq;
        }
        self.stats.repaired = self.model.learner.repaired();
    }

    /// One observation through the model (scales must be fixed); `done` gets the prediction
    /// and its squared error in the user's units.
    fn learn(&mut self, o: &Observation, done: impl FnOnce(Option<Vec<f64>>, Option<f64>)) {
        let (Some(ysc), Some(xsc)) = (&self.y_scale, &self.x_scale) else {
            return;
        };
        for ((d, &v), sc) in self.ys.iter_mut().zip(&o.y).zip(ysc) {
            *d = sc.to_model(v);
        }
        for ((d, &v), sc) in self.xs.iter_mut().zip(&o.x).zip(xsc) {
            *d = sc.to_model(v);
        }
        if !self.model.observe(&self.xs, &self.ys, &mut self.pred) {
            return done(None, None);
        }
        let user: Vec<f64> = self
            .pred
            .iter()
            .zip(ysc)
            .map(|(&p, sc)| sc.to_user(p))
            .collect();
        let e_user: f64 = user
            .iter()
            .zip(&o.y)
            .map(|(p, y)| (p - y) * (p - y))
            .sum::<f64>()
            .min(f64::MAX);
        let e_scaled: f64 = self
            .pred
            .iter()
            .zip(&self.ys)
            .map(|(p, y)| (p - y) * (p - y))
            .sum();
        // Finite but extreme values (1e300 against a scale of 0..1) square to infinity; the
        // sums saturate at the largest number instead, so that the statistics stay numbers
        // (JSON has no infinity) and the noise estimate recovers once values are sane again.
        let capped = |v: f64| v.min(f64::MAX);
        let s = &mut self.stats;
        s.predicted += 1;
        s.sse_user = capped(s.sse_user + e_user);
        s.sse_scaled = capped(s.sse_scaled + e_scaled);
        let per_output = capped(e_scaled / self.options.outputs as f64);
        let w = 1.0 / (s.predicted as f64).min(NOISE_WINDOW);
        s.noise_var += w * (per_output - s.noise_var);
        s.noise_user += w * (e_user - s.noise_user);
        let learner = &self.model.learner;
        s.prediction_spread = capped(learner.prediction_variance().max(0.0).sqrt());
        let var_user: f64 = ysc
            .iter()
            .enumerate()
            .map(|(o, sc)| learner.prediction_variance_of(o).max(0.0) * sc.width() * sc.width())
            .sum();
        s.spread_user = capped(var_user.sqrt());
        done(Some(user), Some(e_user));
    }

    /// What a forecast needs, or None until the lag buffer is full.
    pub fn forecast_state(&self) -> Option<ForecastState> {
        if !self.model.lags().is_full() {
            return None;
        }
        let (y_scale, x_scale) = (self.y_scale.clone()?, self.x_scale.clone()?);
        let e = &self.model.learner;
        let j = e.size();
        let k = interval_particles(j);
        let mut particles = Vec::with_capacity(k * e.dim());
        let mut hidden = Vec::with_capacity(k * e.layout().hidden);
        for i in 0..k {
            e.copy_particle(i * j / k, &mut particles, &mut hidden);
        }
        let (mean, mean_hidden) = e.mean_f64();
        Some(ForecastState {
            layout: *e.layout(),
            lags: self.options.lags,
            inputs: self.options.inputs,
            mean,
            mean_hidden,
            particles,
            hidden,
            lag_values: self.model.lags().values().to_vec(),
            y_scale,
            x_scale,
            noise_var: self.stats.noise_var,
            seed: self.options.seed,
            seq: self.stats.last_seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Stream {
        Stream::new(
            Options {
                ensemble: 10,
                hidden: 3,
                lags: 2,
                ..Options::default()
            }
            .check()
            .unwrap(),
        )
    }

    fn obs(seq: Option<u64>, y: f64) -> Observation {
        Observation {
            seq,
            x: vec![],
            y: vec![y],
        }
    }

    #[test]
    fn seq_duplicates_are_skipped_and_gaps_refused() {
        let mut s = stream();
        let b = vec![obs(None, 1.0), obs(None, 2.0), obs(None, 3.0)];
        let p = s.plan(&b).unwrap();
        assert_eq!((p.first_seq, p.last_seq(), p.duplicates), (1, 3, 0));
        let mut preds = Vec::new();
        s.apply(&b, &p, |a| preds.push(a));
        assert_eq!(
            preds.iter().map(|a| a.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(preds[1].prediction.is_none() && preds[2].prediction.is_some());
        // A retry of 2..3 plus the new 4: two duplicates, one accepted.
        let retry = vec![obs(Some(2), 2.0), obs(Some(3), 3.0), obs(Some(4), 4.0)];
        let p = s.plan(&retry).unwrap();
        assert_eq!(
            (p.duplicates, p.accepted.clone(), p.first_seq),
            (2, vec![2], 4)
        );
        let gap = vec![obs(Some(6), 1.0)];
        assert_eq!(
            s.plan(&gap).unwrap_err(),
            BatchError::SeqGap {
                index: 0,
                expected: 4,
                got: 6
            }
        );
    }

    #[test]
    fn invalid_rows_fail_the_whole_plan() {
        let s = stream();
        let b = vec![obs(None, 1.0), obs(None, f64::NAN)];
        assert_eq!(s.plan(&b).unwrap_err().index(), Some(1));
        let wrong = vec![Observation {
            seq: None,
            x: vec![1.0],
            y: vec![1.0],
        }];
        assert_eq!(s.plan(&wrong).unwrap_err().field(), "x");
        assert_eq!(s.plan(&[]).unwrap_err(), BatchError::Empty);
        assert_eq!(s.plan(&[obs(Some(0), 1.0)]).unwrap_err().field(), "seq");
    }

    #[test]
    fn batch_and_one_by_one_give_identical_predictions_with_a_fixed_scale() {
        let mut o = stream().options().clone();
        o.scale = ScaleOption::Fixed(crate::engine::options::Range {
            min: 0.0,
            max: 10.0,
        });
        let values: Vec<f64> = (0..40)
            .map(|i| 5.0 + 3.0 * (i as f64 / 3.0).sin())
            .collect();
        let batch: Vec<Observation> = values.iter().map(|&v| obs(None, v)).collect();
        let mut a = Stream::new(o.clone());
        let mut pa = Vec::new();
        let plan = a.plan(&batch).unwrap();
        a.apply(&batch, &plan, |x| pa.push(x));
        let mut b = Stream::new(o);
        let mut pb = Vec::new();
        for ob in &batch {
            let one = std::slice::from_ref(ob);
            let plan = b.plan(one).unwrap();
            b.apply(one, &plan, |x| pb.push(x));
        }
        assert_eq!(pa, pb);
        assert_eq!(a.stats(), b.stats());
    }

    #[test]
    fn auto_scale_is_fixed_from_the_first_lags_observations_without_changing_predictions() {
        let values: Vec<f64> = (0..30)
            .map(|i| 5.0 + 3.0 * (i as f64 / 3.0).sin())
            .collect();
        let batch: Vec<Observation> = values.iter().map(|&v| obs(None, v)).collect();
        // Auto, one observation at a time: nothing predicted until the scale is fixed.
        let mut auto = stream();
        let mut pa = Vec::new();
        for ob in &batch {
            let one = std::slice::from_ref(ob);
            let plan = auto.plan(one).unwrap();
            auto.apply(one, &plan, |x| pa.push(x));
        }
        let (lo, hi) = (values[0].min(values[1]), values[0].max(values[1]));
        let w = hi - lo;
        let sc = auto.y_scale().unwrap()[0];
        assert_eq!((sc.min, sc.max), (lo - 0.25 * w, hi + 0.25 * w));
        // The same stream with that scale given explicitly predicts the same, bit for bit.
        let mut o = stream().options().clone();
        o.scale = ScaleOption::Fixed(crate::engine::options::Range {
            min: sc.min,
            max: sc.max,
        });
        let mut fixed = Stream::new(o);
        let mut pf = Vec::new();
        let plan = fixed.plan(&batch).unwrap();
        fixed.apply(&batch, &plan, |x| pf.push(x));
        assert_eq!(pa, pf);
        assert_eq!(auto.stats(), fixed.stats());
        assert_eq!(pa.iter().filter(|a| a.prediction.is_none()).count(), 2);
    }
}
