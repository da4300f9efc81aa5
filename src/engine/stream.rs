//! One stream's whole learning state, with no IO: options, scaling, the online model, sequence
//! numbers and statistics. The daemon's owner task holds exactly one `Stream` per name; `eval`
//! uses the same [`crate::engine::model::OnlineModel`] underneath, so both predict identically.
//!
//! A batch is handled in two steps so that it is all-or-nothing: [`Stream::plan`] validates
//! every observation (dimensions, finiteness, sequence numbers) without changing anything, and
//! only then [`Stream::apply`] learns from the accepted ones.

use serde::{Deserialize, Serialize};

use crate::engine::calibration::{Calibrator, Coverage};
use crate::engine::ensemble::{AnyEnsemble, EnsembleState};
use crate::engine::forecast::{ForecastState, interval_particles};
use crate::engine::mixture::{Mixture, MixtureState};
use crate::engine::model::{Forecaster, LagBuffer, OnlineModel, Scaler};
use crate::engine::options::{Options, ScaleOption};
use crate::engine::rollout::RollOut;

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
    /// The `auto` scale this observation would fix (from the stream's opening values) is not a
    /// finite range: every later prediction would be infinite.
    #[error(
        "observation {index} (seq {seq}) completes the opening values that fix the `auto` scale, and those of `{field}[{position}]` run from {min:e} to {max:e}: widened by a quarter that is not a finite range. Send values of a smaller magnitude, or give the stream an explicit `scale`"
    )]
    Scale {
        index: usize,
        seq: u64,
        field: &'static str,
        position: usize,
        min: f64,
        max: f64,
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
            | BatchError::SeqGap { index, .. }
            | BatchError::Scale { index, .. } => Some(*index),
        }
    }
    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            BatchError::Empty => "body",
            BatchError::Dimension { field, .. }
            | BatchError::NotFinite { field, .. }
            | BatchError::Scale { field, .. } => field,
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
    #[serde(with = "crate::engine::options::json_text")]
    pub options: Options,
    pub y_scale: Option<Vec<Scaler>>,
    pub x_scale: Option<Vec<Scaler>>,
    pub pending: Vec<Observation>,
    pub lags: LagBuffer,
    pub ensemble: EnsembleState,
    pub stats: Stats,
    pub calibrator: Calibrator,
    pub mixture: MixtureState,
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
    model: OnlineModel<Mixture>,
    stats: Stats,
    /// Scores the forecasts made after each observation to calibrate the intervals.
    calibrator: Calibrator,
    // Scratch for one observation in model units (no allocation per observation).
    ys: Vec<f64>,
    xs: Vec<f64>,
    pred: Vec<f64>,
    path: Vec<f64>,
    roll: RollOut,
}

/// A stream's forecaster around its ensemble, as its options say.
pub fn forecaster(ensemble: AnyEnsemble, o: &Options) -> Mixture {
    let n_in = o.lags * o.outputs + o.inputs;
    Mixture::new(ensemble, n_in, o.outputs, o.lags > 0, o.mixture, o.horizon)
}

/// Scores the forecasts that predicted this observation `(x, y)` (model units; when the model
/// predicted it), then keeps the forecast made from here (once the lag buffer is full).
pub fn calibrate<L: Forecaster>(
    model: &mut OnlineModel<L>,
    calibrator: &mut Calibrator,
    predicted: bool,
    (x, y): (&[f64], &[f64]),
    path: &mut [f64],
    roll: &mut RollOut,
) {
    if predicted {
        calibrator.observe(y);
        model.learner.observe_paths(y);
    }
    if model.lags().is_full() {
        model.forecast_path(x, path, roll);
        model.learner.keep_paths();
        calibrator.push_path(path);
    }
}

/// The `auto` scale: the range of the first observations, widened by a quarter on each side so
/// that a series drifting a little past its opening range stays near `[0, 1]`. A constant
/// opening gets a width of its magnitude (or 1 around 0).
fn auto_scaler(values: impl Iterator<Item = f64>) -> Scaler {
    let mut span = Span::EMPTY;
    values.for_each(|v| span.add(v));
    span.auto_scaler()
}

/// The lowest and highest of some values.
#[derive(Debug, Clone, Copy)]
struct Span {
    lo: f64,
    hi: f64,
}

impl Span {
    const EMPTY: Span = Span {
        lo: f64::INFINITY,
        hi: f64::NEG_INFINITY,
    };

    fn add(&mut self, v: f64) {
        self.lo = self.lo.min(v);
        self.hi = self.hi.max(v);
    }

    fn auto_scaler(self) -> Scaler {
        let (lo, hi) = (self.lo, self.hi);
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
}

/// Whether a scale maps values to model units and back: finite ends and a finite, positive
/// width (an infinite one turns every prediction into infinity, or NaN).
fn usable(s: &Scaler) -> bool {
    s.min.is_finite() && s.max.is_finite() && s.width().is_finite() && s.width() > 0.0
}

/// Where planning a group of batches has got to, so that each batch is planned as if the ones
/// before it had been applied ([`Stream::cursor`], [`Stream::plan_next`]).
#[derive(Debug, Clone)]
pub struct PlanCursor {
    last_seq: u64,
    /// While an `auto` scale is not fixed: how many opening observations are held, and the
    /// range of each output (`y`) and input (`x`) over them.
    opening: Option<Opening>,
}

#[derive(Debug, Clone)]
struct Opening {
    held: usize,
    y: Vec<Span>,
    x: Vec<Span>,
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
        // The calibrator, its copy in a snapshot, and the path scratch (the mixture's members'
        // paths too); the autoregression and its copy; the mixture's kept paths and per-step
        // error moments and their copy.
        let f = std::mem::size_of::<f64>();
        let calibration = 2 * Calibrator::bytes(options.horizon, options.outputs)
            + 4 * options.horizon * options.outputs * f;
        let k = n_in + 1;
        let ar = 2 * (k * k + k * options.outputs + 2 * k) * f;
        let mixture = 2 * Mixture::bytes(options.horizon, options.outputs);
        (ensemble.resident + ensemble.snapshot + own + forecast + calibration + ar + mixture) as u64
    }

    pub fn new(options: Options) -> Self {
        let y_scale = match options.scale {
            ScaleOption::Fixed(r) => Some(vec![Scaler::new(r.min, r.max); options.outputs]),
            ScaleOption::Auto(_) => None,
        };
        let model = OnlineModel::new(
            forecaster(AnyEnsemble::new(&options), &options),
            options.lags,
            options.inputs,
            options.outputs,
        );
        Stream {
            ys: vec![0.0; options.outputs],
            xs: vec![0.0; options.inputs],
            pred: vec![0.0; options.outputs],
            path: vec![0.0; options.horizon * options.outputs],
            roll: RollOut::default(),
            calibrator: Calibrator::new(options.horizon, options.outputs),
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
        self.model.learner.ensemble.set_threads(threads);
    }

    /// Threads one step of this stream uses: 2 when its steps split, else 1.
    pub fn step_threads(&self) -> usize {
        if self.model.learner.ensemble.is_parallel() {
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
            ensemble: self.model.learner.ensemble.state(),
            stats: self.stats.clone(),
            calibrator: self.calibrator.clone(),
            mixture: self.model.learner.state(),
        }
    }

    /// Rebuilds a stream exactly as it was when `state` was taken.
    pub fn from_state(state: StreamState) -> Result<Stream, String> {
        let options = state.options.check().map_err(|e| e.to_string())?;
        let ensemble = AnyEnsemble::from_state(&options, state.ensemble)?;
        let mut learner = forecaster(ensemble, &options);
        learner.set_state(state.mixture)?;
        if state.lags.values().len() != options.lags * options.outputs {
            return Err("lag buffer does not match the options".into());
        }
        if !state.calibrator.fits(options.horizon, options.outputs) {
            return Err("calibrator does not match the options".into());
        }
        Ok(Stream {
            ys: vec![0.0; options.outputs],
            xs: vec![0.0; options.inputs],
            pred: vec![0.0; options.outputs],
            path: vec![0.0; options.horizon * options.outputs],
            roll: RollOut::default(),
            calibrator: state.calibrator,
            y_scale: state.y_scale,
            x_scale: state.x_scale,
            pending: state.pending,
            model: OnlineModel::with_lags(learner, state.lags, options.inputs),
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
        self.plan_next(batch, &mut self.cursor())
    }

    /// Where planning starts: this stream as it is.
    pub fn cursor(&self) -> PlanCursor {
        let opening = (self.y_scale.is_none() || self.x_scale.is_none()).then(|| {
            let mut o = Opening {
                held: self.pending.len(),
                y: vec![Span::EMPTY; self.options.outputs],
                x: vec![Span::EMPTY; self.options.inputs],
            };
            for p in &self.pending {
                o.y.iter_mut().zip(&p.y).for_each(|(r, &v)| r.add(v));
                o.x.iter_mut().zip(&p.x).for_each(|(r, &v)| r.add(v));
            }
            o
        });
        PlanCursor {
            last_seq: self.stats.last_seq,
            opening,
        }
    }

    /// Like [`Stream::plan`], as if the batches `cursor` has seen had already been applied (the
    /// owner plans a group of queued batches before applying any of them). On success the
    /// cursor moves past this batch; on an error it is unchanged.
    pub fn plan_next(
        &self,
        batch: &[Observation],
        cursor: &mut PlanCursor,
    ) -> Result<Plan, BatchError> {
        if batch.is_empty() {
            return Err(BatchError::Empty);
        }
        let mut expected = cursor.last_seq + 1;
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
        let opening = match cursor.opening.clone() {
            Some(o) => self.plan_opening(batch, &plan, o)?,
            None => None,
        };
        if !plan.accepted.is_empty() {
            cursor.last_seq = plan.last_seq();
        }
        cursor.opening = opening;
        Ok(plan)
    }

    /// Follows the opening observations through an accepted batch: once they are as many as
    /// the `auto` scales are fixed from, the scales they give must be usable, or the batch is
    /// refused. Returns the opening still to fill (None once the scales are fixed).
    fn plan_opening(
        &self,
        batch: &[Observation],
        plan: &Plan,
        mut o: Opening,
    ) -> Result<Option<Opening>, BatchError> {
        let need = self.options.lags.max(1);
        for (k, &index) in plan.accepted.iter().enumerate() {
            let obs = &batch[index];
            o.y.iter_mut().zip(&obs.y).for_each(|(r, &v)| r.add(v));
            o.x.iter_mut().zip(&obs.x).for_each(|(r, &v)| r.add(v));
            o.held += 1;
            if o.held < need {
                continue;
            }
            for (field, ranges, fixed) in [
                ("y", &o.y, self.y_scale.is_some()),
                ("x", &o.x, self.x_scale.is_some()),
            ] {
                if fixed {
                    continue;
                }
                if let Some((position, r)) = ranges
                    .iter()
                    .enumerate()
                    .find(|(_, r)| !usable(&r.auto_scaler()))
                {
                    return Err(BatchError::Scale {
                        index,
                        seq: plan.first_seq + k as u64,
                        field,
                        position,
                        min: r.lo,
                        max: r.hi,
                    });
                }
            }
            return Ok(None);
        }
        Ok(Some(o))
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
        self.stats.repaired = self.model.learner.ensemble.repaired();
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
        let predicted = self.model.observe(&self.xs, &self.ys, &mut self.pred);
        calibrate(
            &mut self.model,
            &mut self.calibrator,
            predicted,
            (&self.xs, &self.ys),
            &mut self.path,
            &mut self.roll,
        );
        if !predicted {
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
        let learner = &self.model.learner.ensemble;
        s.prediction_spread = capped(learner.prediction_variance().max(0.0).sqrt());
        let var_user: f64 = ysc
            .iter()
            .enumerate()
            .map(|(o, sc)| learner.prediction_variance_of(o).max(0.0) * sc.width() * sc.width())
            .sum();
        s.spread_user = capped(var_user.sqrt());
        done(Some(user), Some(e_user));
    }

    /// The running coverage of the stream's intervals, per report level and step.
    pub fn coverage(&self) -> Vec<Coverage> {
        self.calibrator.coverage()
    }

    /// What a forecast needs, or None until the lag buffer is full.
    pub fn forecast_state(&self) -> Option<ForecastState> {
        if !self.model.lags().is_full() {
            return None;
        }
        let (y_scale, x_scale) = (self.y_scale.clone()?, self.x_scale.clone()?);
        let e = &self.model.learner.ensemble;
        let calibration = self.calibrator.calibration();
        // The particles give the interval only until it is calibrated.
        let j = e.size();
        let k = if calibration.is_some() {
            0
        } else {
            interval_particles(j)
        };
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
            calibration,
            mixture: self.options.mixture.then(|| self.model.learner.forecast()),
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

    /// Each step ahead has its own weights, from its members' errors that many steps ahead;
    /// until a step's first forecast is scored, persistence alone.
    #[test]
    fn each_step_ahead_is_weighted_by_its_own_errors() {
        let o = Options {
            horizon: 5,
            ..stream().options().clone()
        };
        let lags = o.lags as u64;
        let mut s = Stream::new(o);
        let feed = |s: &mut Stream, from: usize, to: usize| {
            let batch: Vec<Observation> = (from..to)
                .map(|i| {
                    obs(
                        None,
                        5.0 + 3.0 * (i as f64 / 3.0).sin() + (i % 5) as f64 * 0.2,
                    )
                })
                .collect();
            let plan = s.plan(&batch).unwrap();
            s.apply(&batch, &plan, |_| {});
        };
        // The first path is made once the lags are full; its step h is scored h observations
        // later. Two observations after it only step 2 has been scored.
        feed(&mut s, 0, lags as usize + 2);
        let state = s.state().mixture;
        let scored: Vec<u64> = state.ahead.iter().map(|a| a.scored).collect();
        assert_eq!(scored, [1, 0, 0, 0]);
        let weights = s.forecast_state().unwrap().mixture.unwrap().weights;
        assert_eq!(weights.len(), 5);
        for w in &weights[2..] {
            assert_eq!(*w, [0.0, 0.0, 1.0], "unscored steps: persistence alone");
        }
        feed(&mut s, lags as usize + 2, 200);
        let state = s.state().mixture;
        let n = 200 - lags;
        for (i, a) in state.ahead.iter().enumerate() {
            assert_eq!(a.scored, n + 1 - (i as u64 + 2), "step {}", i + 2);
        }
        let weights = s.forecast_state().unwrap().mixture.unwrap().weights;
        for (h, w) in weights.iter().enumerate() {
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12 && w.iter().all(|&v| v >= 0.0));
            if h > 0 {
                assert_eq!(*w, state.ahead[h - 1].weights(3), "step {}", h + 1);
            }
        }
        assert_ne!(weights[0], weights[4], "step 5's errors are not step 1's");
    }

    /// A stream rebuilt from its state halfway goes on exactly as the one that never stopped:
    /// the calibrator (pending forecasts, scales, trackers, coverage) is part of the state.
    #[test]
    fn a_stream_rebuilt_from_its_state_calibrates_and_forecasts_identically() {
        let o = Options {
            horizon: 6,
            ..stream().options().clone()
        };
        let batch: Vec<Observation> = (0..300)
            .map(|i| {
                obs(
                    None,
                    5.0 + 3.0 * (i as f64 / 5.0).sin() + (i % 7) as f64 * 0.1,
                )
            })
            .collect();
        let (first, second) = batch.split_at(157);
        let mut whole = Stream::new(o.clone());
        let mut cut = Stream::new(o);
        for (s, part) in [(&mut whole, first), (&mut cut, first)] {
            let plan = s.plan(part).unwrap();
            s.apply(part, &plan, |_| {});
        }
        let mut cut = Stream::from_state(cut.state()).unwrap();
        for s in [&mut whole, &mut cut] {
            let plan = s.plan(second).unwrap();
            s.apply(second, &plan, |_| {});
        }
        assert_eq!(whole.state(), cut.state());
        let coverage = whole.coverage();
        assert!(
            coverage.iter().all(|c| c.steps.iter().all(Option::is_some)),
            "every step scored: {coverage:?}"
        );
        let f = |s: &Stream| s.forecast_state().unwrap().forecast(6, &[0.5, 0.9], &[]);
        assert_eq!(f(&whole), f(&cut));
        let steps = f(&whole);
        assert!(
            whole.forecast_state().unwrap().calibration.is_some(),
            "calibrated"
        );
        for step in &steps {
            let (narrow, wide) = (&step.intervals[0], &step.intervals[1]);
            assert!(wide.lower[0] <= narrow.lower[0] && narrow.upper[0] <= wide.upper[0]);
            assert_eq!(
                (step.lower.clone(), step.upper.clone()),
                (narrow.lower.clone(), narrow.upper.clone())
            );
        }
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

    #[test]
    fn an_auto_scale_that_would_not_be_finite_refuses_the_batch_that_fixes_it() {
        // lags 2: the scale is fixed from the first two observations.
        for values in [[1e308, -1e308], [1.7e308, 1.7e308], [-1.7e308, -1.7e308]] {
            let mut s = stream();
            let b = vec![obs(None, values[0]), obs(None, values[1])];
            let e = s.plan(&b).unwrap_err();
            assert!(
                matches!(
                    e,
                    BatchError::Scale {
                        index: 1,
                        seq: 2,
                        field: "y",
                        position: 0,
                        ..
                    }
                ),
                "{values:?}: {e:?}"
            );
            assert!(e.to_string().contains("`y[0]`"), "{e}");
            // Split over two batches planned as a group, the second is refused; applied one
            // after the other, the same.
            let mut c = s.cursor();
            let first = s.plan_next(&b[..1], &mut c).unwrap();
            let e = s.plan_next(&b[1..], &mut c).unwrap_err();
            assert_eq!((e.index(), e.field()), (Some(0), "y"));
            s.apply(&b[..1], &first, |_| {});
            assert!(s.plan(&b[1..]).is_err());
            assert!(s.y_scale().is_none(), "nothing fixed");
            // A value that leaves a finite range goes through, and predictions are numbers.
            let ok = vec![obs(None, values[0] * 0.95), obs(None, values[0] * 0.9)];
            let p = s.plan(&ok).unwrap();
            let mut preds = Vec::new();
            s.apply(&ok, &p, |a| preds.push(a));
            let sc = s.y_scale().unwrap()[0];
            assert!(usable(&sc), "{sc:?}");
            assert!(preds[1].prediction.as_ref().unwrap()[0].is_finite());
        }
        // Large but representable: fine.
        let s = stream();
        assert!(s.plan(&[obs(None, 1e307), obs(None, -1e307)]).is_ok());
    }

    #[test]
    fn an_exogenous_auto_scale_is_checked_too() {
        let s = Stream::new(
            Options {
                ensemble: 4,
                hidden: 2,
                lags: 1,
                inputs: 2,
                scale: ScaleOption::Fixed(crate::engine::options::Range { min: 0.0, max: 1.0 }),
                ..Options::default()
            }
            .check()
            .unwrap(),
        );
        let b = vec![Observation {
            seq: None,
            x: vec![0.0, 1.7e308],
            y: vec![0.5],
        }];
        let e = s.plan(&b).unwrap_err();
        assert!(
            matches!(
                e,
                BatchError::Scale {
                    field: "x",
                    position: 1,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
