//! Calibrated forecast intervals: online quantile tracking of each horizon step's errors.
//!
//! After every observation a stream's forecaster rolls out its point forecast for the next
//! `steps` steps (a *path*). When `y_t` arrives, each of the last `steps` paths has a forecast
//! for it, made `h` steps earlier: its error `e = y_t − ŷ_{t|t−h}`, divided by the error scale
//! of step `h` at the origin `σ_h(t−h)` (a running mean of step `h`'s `|e|`), is the *score*
//! of step `h`. For every step and output the calibrator tracks the quantiles of the scores at
//! the probabilities [`TAUS`] with the quantile tracker (online gradient descent on the pinball
//! loss)
//!
//! ```text
//! q_τ ← q_τ + η g_τ (τ − 1{s < q̂_τ}),   η = max(γ, 1/√((n + 1) h)) after n scores of step h,
//!                                         g_τ = max(1, 0.05 / min(τ, 1 − τ))
//! ```
//!
//! where `q̂_τ` is the quantile the interval *served* at the score's origin was read from, h
//! steps earlier, not the tracker's value now. The identity `Σ (τ − 1{s < q̂}) = Σ Δq / (η g)`
//! then makes the long-run frequency of `s < q̂_τ`, the served interval's, τ on any sequence of
//! bounded scores: after T scores within about `(|Δq| + η g)/(γ g T)` of τ, whatever the series
//! does (Gibbs & Candès 2021, Angelopoulos et al. 2023), where `|Δq|` is how far the quantile
//! had to travel. The far tails' larger steps `g` keep that bound as tight for them as for the
//! levels up to 0.9 ([`TAIL_STEP`]). Feedback from the current value instead would count a
//! burst of misses against a quantile that has already risen while the burst was on its way,
//! leaving far steps 2–3 points short of the level on series of thousands of values. The
//! feedback of step h is h observations late, so its first steps shrink as `1/√h` (larger ones
//! overshoot before the misses they caused come back); the served value is the tracker's now
//! less its last `h − 1` updates, which the calibrator keeps. The central interval at level L
//! of step h is then `ŷ_h + σ_h·[Q((1−L)/2), Q((1+L)/2)]`, with Q the tracked quantiles
//! sorted (so bounds never cross between levels) and interpolated linearly in τ between the
//! grid's points. Beyond the grid (levels above 0.99) the tails are extended in the shape of a
//! normal distribution, and beyond the calibrated steps the last step's interval grows as √h:
//! both are extrapolations, not calibrated.
//!
//! Dividing by each step's own error scale makes the scores unit-free (one step size γ and one
//! start, the normal quantiles, fit every series and every step, however fast its errors grow
//! with the horizon), while the trackers learn the shape: skew, heavy tails, bias. Everything is
//! plain arithmetic on the state below, so a snapshot holds it exactly and recovery continues
//! it bit for bit.

use serde::{Deserialize, Serialize};

use crate::engine::forecast::normal_quantile;

/// The probabilities whose quantiles are tracked: the central levels 0.1 to 0.9 in steps of
/// 0.1, and 0.95, 0.98, 0.99, as pairs of tails, with the median.
pub const TAUS: [f64; 25] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65,
    0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 0.995,
];
const MEDIAN: usize = 12;
// Which scores fell below each quantile fits one `u32` per update.
const _: () = assert!(TAUS.len() <= 32);

/// The levels whose running coverage a stream reports.
pub const REPORT_LEVELS: [f64; 4] = [0.5, 0.8, 0.9, 0.95];

/// The quantile tracker's smallest step γ, in units of the error scale. Chosen on the
/// validation collection (BENCHMARKS.md).
const TRACKER_STEP: f64 = 0.03;

/// How much further than the others each tracker steps: `0.05 / min(τ, 1 − τ)`, at least 1.
/// A tracker's score moves by the misses it sees, and a miss of the 0.005 quantile is ten
/// times rarer than one of the 0.05: with one step for all, the far tails took ten times as
/// many observations to follow a change in the scores' spread, and the intervals of levels
/// above 0.9 covered up to 0.04 less than their level on long series (the ECG, the
/// NASDAQ-100; BENCHMARKS.md). The trackers of levels up to 0.9 keep the common step.
const TAIL_STEP: [f64; TAUS.len()] = [
    10.0, 5.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 2.0, 5.0, 10.0,
];

/// Tracker k's update after a score below its value (`below`) or not, at step `eta`.
#[inline]
fn tracker_update(eta: f64, k: usize, below: bool) -> f64 {
    eta * TAIL_STEP[k] * (TAUS[k] - f64::from(u8::from(below)))
}

/// Each step's error scale averages its `|e|` over about this many observations (fewer at the
/// start: a plain mean until then).
const SCALE_WINDOW: f64 = 30.0;

/// Errors below this (scaled units: the series spans about 1) are treated as no error scale at
/// all: a perfect fit so far gives no calibrated interval until it errs.
const MIN_SCALE: f64 = 1e-12;

/// The ratio of a normal distribution's standard deviation to its mean absolute deviation:
/// the start of every tracker is the normal quantile of scores scaled by the mean error.
const SD_PER_MAD: f64 = 1.253_314_137_315_500_3;

/// The calibrator of one stream: pending paths, error scales, tracked quantiles, coverage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibrator {
    steps: usize,
    outputs: usize,
    /// The paths of the last `steps` origins (`steps × m` each, scaled units), a ring indexed
    /// by origin number modulo `steps`.
    paths: Vec<f64>,
    /// The error scales at each of those origins (`steps × m` each): their scores' divisors.
    origin_scale: Vec<f64>,
    /// Paths pushed so far.
    origins: u64,
    /// `steps × m`: the running mean of each step's `|e|`; 0 until its first error.
    scale: Vec<f64>,
    /// `steps × m × TAUS.len()`: the tracked quantiles of the scores.
    quantiles: Vec<f64>,
    /// Per step: errors seen (each counts once per output).
    errors: Vec<u64>,
    /// Per step: scores seen (errors of forecasts whose origin had a scale).
    scored: Vec<u64>,
    /// `steps × REPORT_LEVELS.len()`: scores inside the interval at that level.
    hits: Vec<u64>,
    /// The last `h − 1` updates of each tracker of step h (output-major rings, step h's at
    /// [`ring_start`]`(h)`, written at `errors[h − 1] mod (h − 1)`): their step η (0: none)...
    recent_step: Vec<f64>,
    /// ... and which scores were below each of the `TAUS.len()` quantiles (bit k for τ_k).
    recent_below: Vec<u32>,
    /// `steps × m × TAUS.len()`: the sum of the updates in each tracker's ring, so that the
    /// value an interval was served from is the tracker's less this. Kept rather than summed
    /// afresh: it is updated in place (the new update in, the oldest out), and a fresh sum would
    /// round differently, so recovery would not continue bit for bit.
    since_served: Vec<f64>,
}

/// Where the update ring of step `h`'s trackers starts, per output (step 1 has none: its
/// feedback arrives before the next interval is served).
const fn ring_start(h: usize) -> usize {
    (h - 1) * h.saturating_sub(2) / 2
}

/// The update entries per output: `Σ (h − 1)` over the steps.
const fn ring_len(steps: usize) -> usize {
    ring_start(steps + 1)
}

/// A calibrator as snapshot formats 3 and 4 hold it: without the trackers' recent updates.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub struct CalibratorV4 {
    steps: usize,
    outputs: usize,
    paths: Vec<f64>,
    origin_scale: Vec<f64>,
    origins: u64,
    scale: Vec<f64>,
    quantiles: Vec<f64>,
    errors: Vec<u64>,
    scored: Vec<u64>,
    hits: Vec<u64>,
}

impl From<CalibratorV4> for Calibrator {
    /// Empty update rings: for its next `h − 1` scores, step h's feedback reads the trackers'
    /// values now, as format 4's calibrator did, then the values served.
    fn from(v: CalibratorV4) -> Self {
        let entries = ring_len(v.steps) * v.outputs;
        Calibrator {
            steps: v.steps,
            outputs: v.outputs,
            paths: v.paths,
            origin_scale: v.origin_scale,
            origins: v.origins,
            scale: v.scale,
            quantiles: v.quantiles,
            errors: v.errors,
            scored: v.scored,
            hits: v.hits,
            recent_step: vec![0.0; entries],
            recent_below: vec![0; entries],
            since_served: vec![0.0; v.steps * v.outputs * TAUS.len()],
        }
    }
}

#[cfg(test)]
impl CalibratorV4 {
    /// What a format-4 daemon would have saved of `c`.
    pub fn of(c: &Calibrator) -> Self {
        CalibratorV4 {
            steps: c.steps,
            outputs: c.outputs,
            paths: c.paths.clone(),
            origin_scale: c.origin_scale.clone(),
            origins: c.origins,
            scale: c.scale.clone(),
            quantiles: c.quantiles.clone(),
            errors: c.errors.clone(),
            scored: c.scored.clone(),
            hits: c.hits.clone(),
        }
    }
}

/// The calibrated intervals of a forecast: a copy of the quantiles (sorted) and the current
/// error scales, immutable, as a forecast state carries them.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    steps: usize,
    outputs: usize,
    /// `steps × m × TAUS.len()`, each run of `TAUS.len()` non-decreasing.
    quantiles: Vec<f64>,
    /// `steps × m`, every one positive (see [`Calibrator::calibration`]).
    scale: Vec<f64>,
}

/// The forecast distribution of one step and output as served: its quantiles at [`TAUS`]
/// (sorted, in units of the error scale) and the scale, around a centre given by the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDistribution {
    q: [f64; TAUS.len()],
    sigma: f64,
}

impl StepDistribution {
    /// The central interval at `level` around `centre`.
    pub fn interval(&self, level: f64, centre: f64) -> (f64, f64) {
        (
            self.quantile((1.0 - level) / 2.0, centre),
            self.quantile((1.0 + level) / 2.0, centre),
        )
    }

    /// The quantile at probability `tau`.
    pub fn quantile(&self, tau: f64, centre: f64) -> f64 {
        centre + self.sigma * interpolate(&self.q, tau)
    }

    /// The continuous ranked probability score of `y`, `∫ 2 ρ_τ(y − Q(τ)) dτ`, by the midpoint
    /// rule on [`CRPS_POINTS`] probabilities. Each Q(τ) is [`StepDistribution::quantile`]'s, the
    /// grid interval of each τ found once ([`CRPS_RANKS`]) rather than searched per call.
    pub fn crps(&self, centre: f64, y: f64) -> f64 {
        const N: usize = CRPS_POINTS;
        let last = TAUS.len() - 1;
        let sum: f64 = (0..N)
            .map(|k| {
                let tau = (k as f64 + 0.5) / N as f64;
                let at = if tau <= TAUS[0] || tau >= TAUS[last] {
                    interpolate(&self.q, tau)
                } else {
                    between(&self.q, tau, CRPS_RANKS[k])
                };
                let d = y - (centre + self.sigma * at);
                2.0 * if d >= 0.0 { tau * d } else { (tau - 1.0) * d }
            })
            .sum();
        sum / N as f64
    }
}

/// The running coverage of one report level: per step, the share of scores inside.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Coverage {
    pub level: f64,
    /// One entry per calibrated step (step 1 first); `None` before the step's first score.
    pub steps: Vec<Option<f64>>,
}

/// Writes the scales of `steps × m` into `out` with every step that has none yet (no error so
/// far) filled from the nearest shorter step that has one, grown as √h; false (and `out` all
/// zero) while step 1 has none.
fn fill_scales(scale: &[f64], steps: usize, m: usize, out: &mut [f64]) -> bool {
    out.copy_from_slice(scale);
    for o in 0..m {
        if out[o] < MIN_SCALE {
            out.fill(0.0);
            return false;
        }
        let mut known = 1;
        for h in 2..=steps {
            let i = (h - 1) * m + o;
            if out[i] < MIN_SCALE {
                out[i] = out[(known - 1) * m + o] * (h as f64 / known as f64).sqrt();
            } else {
                known = h;
            }
        }
    }
    true
}

impl Calibrator {
    pub fn new(steps: usize, outputs: usize) -> Self {
        let steps = steps.max(1);
        let start: Vec<f64> = TAUS
            .iter()
            .map(|&t| normal_quantile(t) * SD_PER_MAD)
            .collect();
        Calibrator {
            steps,
            outputs,
            paths: vec![0.0; steps * steps * outputs],
            origin_scale: vec![0.0; steps * steps * outputs],
            origins: 0,
            scale: vec![0.0; steps * outputs],
            quantiles: start.repeat(steps * outputs),
            errors: vec![0; steps],
            scored: vec![0; steps],
            hits: vec![0; steps * REPORT_LEVELS.len()],
            recent_step: vec![0.0; ring_len(steps) * outputs],
            recent_below: vec![0; ring_len(steps) * outputs],
            since_served: vec![0.0; steps * outputs * TAUS.len()],
        }
    }

    /// Paths pushed so far.
    pub fn origins(&self) -> u64 {
        self.origins
    }

    /// Recounts each tracker's sum of its recent updates from its ring, with the current
    /// steps: for a snapshot whose trackers stepped otherwise (format 5: the far tails' steps
    /// were the others'). A calibrator of the wrong shape is left as it is, for
    /// [`Calibrator::fits`] to refuse.
    pub fn recount_since_served(&mut self) {
        let (s, m, t) = (self.steps, self.outputs, TAUS.len());
        let ring = ring_len(s);
        if self.since_served.len() != s * m * t
            || self.recent_step.len() != ring * m
            || self.recent_below.len() != ring * m
        {
            return;
        }
        self.since_served.fill(0.0);
        for h in 2..=s {
            for o in 0..m {
                let i = (h - 1) * m + o;
                let since = &mut self.since_served[i * t..(i + 1) * t];
                let first = o * ring + ring_start(h);
                let entries = first..first + h - 1;
                for (&eta, &below) in self.recent_step[entries.clone()]
                    .iter()
                    .zip(&self.recent_below[entries])
                {
                    for (k, d) in since.iter_mut().enumerate() {
                        *d += tracker_update(eta, k, (below >> k) & 1 == 1);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub fn since_served(&self) -> &[f64] {
        &self.since_served
    }

    #[cfg(test)]
    pub fn clear_since_served(&mut self) {
        self.since_served.fill(0.0);
    }

    /// Whether this calibrator (from a snapshot) has the shape these options give.
    pub fn fits(&self, steps: usize, outputs: usize) -> bool {
        let (s, m, t, r) = (steps, outputs, TAUS.len(), REPORT_LEVELS.len());
        self.steps == s
            && self.outputs == m
            && self.paths.len() == s * s * m
            && self.origin_scale.len() == s * s * m
            && self.scale.len() == s * m
            && self.quantiles.len() == s * m * t
            && self.errors.len() == s
            && self.scored.len() == s
            && self.hits.len() == s * r
            && self.recent_step.len() == ring_len(s) * m
            && self.recent_below.len() == ring_len(s) * m
            && self.since_served.len() == s * m * t
    }

    /// The bytes of a calibrator of this shape (its vectors), for the memory budget.
    pub fn bytes(steps: usize, outputs: usize) -> usize {
        let (s, m) = (steps, outputs);
        (2 * s * s * m + s * m + 2 * s * m * TAUS.len() + 2 * s + s * REPORT_LEVELS.len())
            * std::mem::size_of::<f64>()
            + ring_len(s) * m * (std::mem::size_of::<f64>() + std::mem::size_of::<u32>())
    }

    /// Scores `y` (scaled units) against every pending path that forecast it, then updates
    /// each step's error scale. Call once per observation, before [`Calibrator::push_path`]
    /// for the same observation.
    pub fn observe(&mut self, y: &[f64]) {
        let (s, m, t) = (self.steps, self.outputs, TAUS.len());
        let ring = ring_len(s);
        for h in 1..=s.min(self.origins as usize) {
            let origin = (self.origins - h as u64) as usize % s;
            let at = origin * s * m + (h - 1) * m;
            let n = (self.scored[h - 1] + 1) as f64;
            let eta = TRACKER_STEP.max(1.0 / (n * h as f64).sqrt());
            // This observation's entry of each of step h's update rings.
            let slot = (h > 1).then(|| ring_start(h) + (self.errors[h - 1] as usize) % (h - 1));
            let mut counted = false;
            for (o, &yo) in y.iter().enumerate() {
                let e = yo - self.paths[at + o];
                let sigma = self.origin_scale[at + o];
                let i = (h - 1) * m + o;
                let q = &mut self.quantiles[i * t..(i + 1) * t];
                let since = &mut self.since_served[i * t..(i + 1) * t];
                let mut update = (0.0, 0);
                if sigma >= MIN_SCALE {
                    let score = e / sigma;
                    let mut served = [0.0; TAUS.len()];
                    for ((v, &qk), &d) in served.iter_mut().zip(q.iter()).zip(since.iter()) {
                        *v = qk - d;
                    }
                    let r = REPORT_LEVELS.len();
                    count_hits(&served, score, &mut self.hits[(h - 1) * r..h * r]);
                    let mut below = 0u32;
                    for (k, (qk, &v)) in q.iter_mut().zip(&served).enumerate() {
                        let b = score < v;
                        below |= u32::from(b) << k;
                        *qk += tracker_update(eta, k, b);
                    }
                    update = (eta, below);
                    counted = true;
                }
                if let Some(slot) = slot {
                    // The ring trades its oldest update for this one; its sum follows.
                    let j = o * ring + slot;
                    let old = (self.recent_step[j], self.recent_below[j]);
                    if old.0 != 0.0 || update.0 != 0.0 {
                        for (k, d) in since.iter_mut().enumerate() {
                            let bit = |bits: u32| (bits >> k) & 1 == 1;
                            *d += tracker_update(update.0, k, bit(update.1))
                                - tracker_update(old.0, k, bit(old.1));
                        }
                    }
                    (self.recent_step[j], self.recent_below[j]) = update;
                }
                let w = 1.0 / ((self.errors[h - 1] + 1) as f64).min(SCALE_WINDOW);
                let sc = &mut self.scale[(h - 1) * m + o];
                // A finite error that overflows stays the largest number, not infinity.
                *sc = (*sc + w * (e.abs() - *sc)).min(f64::MAX);
            }
            self.errors[h - 1] += 1;
            if counted {
                self.scored[h - 1] += 1;
            }
        }
    }

    /// Keeps the forecast made now (`steps × m`, scaled units) until the observations it
    /// forecast arrive.
    pub fn push_path(&mut self, path: &[f64]) {
        let (s, m) = (self.steps, self.outputs);
        let slot = self.origins as usize % s;
        self.paths[slot * s * m..(slot + 1) * s * m].copy_from_slice(path);
        fill_scales(
            &self.scale,
            s,
            m,
            &mut self.origin_scale[slot * s * m..(slot + 1) * s * m],
        );
        self.origins += 1;
    }

    /// The current quantiles and error scales for a forecast, or `None` until the stream has
    /// an error scale (its first 1-step error).
    pub fn calibration(&self) -> Option<Calibration> {
        let mut scale = vec![0.0; self.scale.len()];
        if !fill_scales(&self.scale, self.steps, self.outputs, &mut scale) {
            return None;
        }
        let mut quantiles = self.quantiles.clone();
        for q in quantiles.chunks_exact_mut(TAUS.len()) {
            sort(q);
        }
        Some(Calibration {
            steps: self.steps,
            outputs: self.outputs,
            quantiles,
            scale,
        })
    }

    /// The distribution served now for step `step` (1-based, at most `steps`) of output `o`,
    /// or `None` before the stream has an error scale.
    pub fn distribution(&self, step: usize, o: usize) -> Option<StepDistribution> {
        let (s, m, t) = (self.steps, self.outputs, TAUS.len());
        let h = step.clamp(1, s);
        if self.scale[o] < MIN_SCALE {
            return None;
        }
        let mut known = 1;
        for k in 1..=h {
            if self.scale[(k - 1) * m + o] >= MIN_SCALE {
                known = k;
            }
        }
        let sigma = self.scale[(known - 1) * m + o] * (h as f64 / known as f64).sqrt();
        let i = (h - 1) * m + o;
        let mut q = [0.0; TAUS.len()];
        q.copy_from_slice(&self.quantiles[i * t..(i + 1) * t]);
        sort(&mut q);
        Some(StepDistribution { q, sigma })
    }

    /// The running coverage of each report level per step.
    pub fn coverage(&self) -> Vec<Coverage> {
        let r = REPORT_LEVELS.len();
        REPORT_LEVELS
            .iter()
            .enumerate()
            .map(|(k, &level)| Coverage {
                level,
                steps: (0..self.steps)
                    .map(|h| {
                        let n = self.scored[h] * self.outputs as u64;
                        (n > 0).then(|| self.hits[h * r + k] as f64 / n as f64)
                    })
                    .collect(),
            })
            .collect()
    }
}

impl Calibration {
    /// The distribution of step `step` (1-based) of output `o`: beyond the calibrated steps,
    /// the last one's, its scale grown as √step.
    fn distribution(&self, step: usize, o: usize) -> StepDistribution {
        let h = step.clamp(1, self.steps);
        let t = TAUS.len();
        let i = (h - 1) * self.outputs + o;
        let mut q = [0.0; TAUS.len()];
        q.copy_from_slice(&self.quantiles[i * t..(i + 1) * t]);
        let grow = (step.max(1) as f64 / h as f64).sqrt();
        StepDistribution {
            q,
            sigma: self.scale[i] * grow,
        }
    }

    /// The interval at `level` of step `step` (1-based) around `centre`, output `o`, in scaled
    /// units.
    pub fn interval(&self, step: usize, o: usize, level: f64, centre: f64) -> (f64, f64) {
        self.distribution(step, o).interval(level, centre)
    }

    /// The quantile at probability `tau` of step `step`'s forecast distribution around
    /// `centre` (scaled units), as [`Calibration::interval`] reads it.
    pub fn quantile(&self, step: usize, o: usize, tau: f64, centre: f64) -> f64 {
        self.distribution(step, o).quantile(tau, centre)
    }
}

/// Where [`interpolate`] reads each report level's bounds: the lower bound of level k lies
/// between the sorted quantiles `REPORT_RANKS[k].0 − 1` and `.0`, the upper one between
/// `.1 − 1` and `.1` (a test checks them against `interpolate`'s own search).
const REPORT_RANKS: [(usize, usize); 4] = [(8, 18), (4, 21), (3, 22), (3, 23)];

/// Adds 1 to `hits[k]` for each report level k whose interval, read from the quantiles `q` as
/// [`interpolate`] reads them from the sorted quantiles, holds `score`: the same counts as
/// sorting and interpolating, mostly without either.
///
/// A bound interpolated between the sorted values `s[k−1]` and `s[k]` lies in `[s[k−1], s[k]]`
/// (its fraction `(τ − τ₀)/(τ₁ − τ₀)` is below 1 − 2ε, a test checks it, so the rounded sum
/// stays at most `s[k]`; two distinct quantiles, sums of tracker steps of at least 1e-4, are
/// never a subnormal apart). With `le` values `≤ score` and `lt` values `< score`, the score is
/// certainly above a lower bound when `le > k` (`s[k] ≤ score`) and certainly below it when
/// `le < k`; certainly below an upper bound when `le < k` and certainly above it when `lt > k`.
/// Only a score that falls between the two quantiles around a bound needs the bound itself:
/// then the quantiles are sorted and the bound interpolated, as before.
fn count_hits(q: &[f64], score: f64, hits: &mut [u64]) {
    let (mut le, mut lt) = (0, 0);
    for &v in q {
        le += usize::from(v <= score);
        lt += usize::from(v < score);
    }
    let mut sorted: Option<[f64; TAUS.len()]> = None;
    let mut exact = |tau: f64| {
        let s = sorted.get_or_insert_with(|| {
            let mut s = [0.0; TAUS.len()];
            s.copy_from_slice(q);
            sort(&mut s);
            s
        });
        interpolate(s, tau)
    };
    for ((hit, &level), &(lo, hi)) in hits.iter_mut().zip(&REPORT_LEVELS).zip(&REPORT_RANKS) {
        let above_lo = if le > lo {
            true
        } else if le < lo {
            false
        } else {
            exact((1.0 - level) / 2.0) <= score
        };
        if !above_lo {
            continue;
        }
        let below_hi = if le < hi {
            true
        } else if lt > hi {
            false
        } else {
            score <= exact((1.0 + level) / 2.0)
        };
        if below_hi {
            *hit += 1;
        }
    }
}

/// Insertion sort: 25 values, nearly sorted already (the trackers rarely cross).
fn sort(q: &mut [f64]) {
    for i in 1..q.len() {
        let v = q[i];
        let mut j = i;
        while j > 0 && q[j - 1] > v {
            q[j] = q[j - 1];
            j -= 1;
        }
        q[j] = v;
    }
}

/// The quantile at `tau` from sorted quantiles at [`TAUS`]: linear in τ inside the grid, a
/// normal tail around the median outside it.
fn interpolate(q: &[f64], tau: f64) -> f64 {
    let last = TAUS.len() - 1;
    if tau <= TAUS[0] {
        let z = normal_quantile(tau.max(f64::MIN_POSITIVE)) / normal_quantile(TAUS[0]);
        return q[MEDIAN] + (q[0] - q[MEDIAN]) * z;
    }
    if tau >= TAUS[last] {
        let z = normal_quantile((1.0 - tau).max(f64::MIN_POSITIVE)) / normal_quantile(TAUS[0]);
        return q[MEDIAN] + (q[last] - q[MEDIAN]) * z;
    }
    between(q, tau, TAUS.partition_point(|&t| t <= tau).clamp(1, last))
}

/// [`interpolate`] inside the grid, with τ's interval `TAUS[k − 1] ≤ τ < TAUS[k]` given.
fn between(q: &[f64], tau: f64, k: usize) -> f64 {
    let (t0, t1) = (TAUS[k - 1], TAUS[k]);
    q[k - 1] + (q[k] - q[k - 1]) * (tau - t0) / (t1 - t0)
}

/// The probabilities the CRPS integrates over: `(k + 0.5)/CRPS_POINTS`.
const CRPS_POINTS: usize = 100;

/// For each of them, the `k` [`interpolate`] would search for ([`between`]; the two outside
/// the grid are not read).
const CRPS_RANKS: [usize; CRPS_POINTS] = crps_ranks();

const fn crps_ranks() -> [usize; CRPS_POINTS] {
    let mut ranks = [0; CRPS_POINTS];
    let mut k = 0;
    while k < CRPS_POINTS {
        let tau = (k as f64 + 0.5) / CRPS_POINTS as f64;
        let mut i = 0;
        while i < TAUS.len() && TAUS[i] <= tau {
            i += 1;
        }
        ranks[k] = if i < 1 {
            1
        } else if i > TAUS.len() - 1 {
            TAUS.len() - 1
        } else {
            i
        };
        k += 1;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal, StudentT};

    use super::*;

    fn normal(rng: &mut ChaCha8Rng) -> f64 {
        StandardNormal.sample(rng)
    }

    /// A forecaster that predicts 0 for every step, against `y_t = noise_t`: every step's
    /// error is the noise itself.
    fn run(noise: &mut dyn FnMut() -> f64, n: usize, steps: usize) -> Calibrator {
        let mut c = Calibrator::new(steps, 1);
        let path = vec![0.0; steps];
        for _ in 0..n {
            c.observe(&[noise()]);
            c.push_path(&path);
        }
        c
    }

    fn assert_covers(c: &Calibrator, tol: f64, what: &str) {
        for cov in c.coverage() {
            for (h, v) in cov.steps.iter().enumerate() {
                let v = v.expect("scored");
                assert!(
                    (v - cov.level).abs() <= tol,
                    "{what}: level {} step {}: coverage {v}",
                    cov.level,
                    h + 1
                );
            }
        }
    }

    #[test]
    fn gaussian_noise_is_covered_at_every_level_and_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut noise = || 0.3 * normal(&mut rng);
        let c = run(&mut noise, 20_000, 4);
        assert_covers(&c, 0.01, "gaussian");
    }

    #[test]
    fn heavy_tailed_noise_is_covered_too() {
        // Student's t with 2 degrees of freedom: infinite variance.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let t = StudentT::new(2.0).expect("valid");
        let mut noise = || 0.1 * t.sample(&mut rng);
        let c = run(&mut noise, 20_000, 3);
        assert_covers(&c, 0.01, "student t(2)");
    }

    #[test]
    fn coverage_holds_when_the_noise_changes_size() {
        // Quiet, then ten times louder, then quiet again: the scale follows, the trackers
        // correct the rest.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut i = 0;
        let mut noise = || {
            i += 1;
            let s = if (5_000..10_000).contains(&i) {
                1.0
            } else {
                0.1
            };
            s * normal(&mut rng)
        };
        let c = run(&mut noise, 15_000, 2);
        assert_covers(&c, 0.02, "changing noise");
    }

    #[test]
    fn the_far_tails_follow_a_tail_that_grows() {
        // Quiet noise with outliers thirty times its size, ever more of them (none at first,
        // one in 20 at the end), forecast 12 steps ahead: the scores' far quantiles grow
        // several-fold against their mean size, and the intervals of 0.98 and 0.99 served at
        // each origin must follow them.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, h) = (20_000, 12);
        let mut c = Calibrator::new(h, 1);
        let levels = [0.9, 0.95, 0.98, 0.99];
        let mut inside = [0usize; 4];
        let mut served = 0;
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let outlier = rand::Rng::random_bool(&mut rng, 0.05 * i as f64 / n as f64);
            let y = if outlier { 30.0 } else { 1.0 } * normal(&mut rng);
            // The interval served h observations ago, for this one.
            if pending.len() == h
                && let Some(bounds) = pending.pop_front().flatten()
            {
                served += 1;
                let bounds: [(f64, f64); 4] = bounds;
                for (count, (lo, hi)) in inside.iter_mut().zip(bounds) {
                    *count += usize::from(lo <= y && y <= hi);
                }
            }
            c.observe(&[y]);
            c.push_path(&[0.0; 12]);
            pending.push_back(
                c.distribution(h, 0)
                    .map(|d| levels.map(|level| d.interval(level, 0.0))),
            );
        }
        for (&count, level) in inside.iter().zip(levels) {
            let cover = count as f64 / served as f64;
            assert!((cover - level).abs() <= 0.01, "level {level}: {cover}");
        }
    }

    /// Persistence on a random walk: the error of step h is the sum of the next h steps of the
    /// walk, so each step's errors are strongly correlated from one origin to the next and
    /// its misses come in bursts, h observations before they are scored.
    fn random_walk(
        seed: u64,
        n: usize,
        steps: usize,
        step: &mut dyn FnMut(&mut ChaCha8Rng) -> f64,
    ) -> Calibrator {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut c = Calibrator::new(steps, 1);
        let mut y = 0.0;
        for _ in 0..n {
            y += step(&mut rng);
            c.observe(&[y]);
            c.push_path(&vec![y; steps]);
        }
        c
    }

    #[test]
    fn far_steps_of_a_random_walk_are_covered() {
        let c = random_walk(5, 4_000, 24, &mut |rng| 0.01 * normal(rng));
        assert_covers(&c, 0.02, "gaussian random walk");
        let t = StudentT::new(3.0).expect("valid");
        let c = random_walk(6, 4_000, 24, &mut |rng| 0.01 * t.sample(rng));
        assert_covers(&c, 0.02, "student t(3) random walk");
        // Volatility that moves in regimes of a few hundred observations.
        let mut i = 0usize;
        let c = random_walk(8, 4_000, 24, &mut |rng| {
            i += 1;
            let vol = if (i / 300).is_multiple_of(3) {
                0.03
            } else {
                0.01
            };
            vol * normal(rng)
        });
        assert_covers(&c, 0.02, "random walk with volatility regimes");
        // A season that persistence forecasts poorly at some phases and well at others.
        let mut i = 0usize;
        let mut last = 0.0;
        let c = random_walk(9, 4_000, 24, &mut |rng| {
            i += 1;
            let y = (i as f64 * std::f64::consts::TAU / 97.0).sin() + 0.05 * normal(rng);
            let d = y - last;
            last = y;
            d
        });
        assert_covers(&c, 0.02, "a season");
    }

    #[test]
    fn the_feedback_reads_the_quantiles_the_interval_was_served_from() {
        let (steps, outputs, t) = (6, 2, TAUS.len());
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut c = Calibrator::new(steps, outputs);
        let mut served_at: Vec<Vec<f64>> = Vec::new();
        for n in 0..500 {
            let y = [normal(&mut rng), 3.0 * normal(&mut rng)];
            // Each step's tracker now, less its ring, is its value when the path it scores
            // next was pushed.
            for h in 2..=steps.min(n) {
                for o in 0..outputs {
                    let i = (h - 1) * outputs + o;
                    let served: Vec<f64> = c.quantiles[i * t..(i + 1) * t]
                        .iter()
                        .zip(&c.since_served[i * t..(i + 1) * t])
                        .map(|(q, d)| q - d)
                        .collect();
                    let then = &served_at[n - h][i * t..(i + 1) * t];
                    for (a, b) in served.iter().zip(then) {
                        assert!(
                            (a - b).abs() < 1e-9,
                            "obs {n} step {h} output {o}: {a} vs {b}"
                        );
                    }
                }
            }
            c.observe(&y);
            c.push_path(&[0.1; 12]);
            served_at.push(c.quantiles.clone());
        }
    }

    #[test]
    fn intervals_are_nested_in_level_and_contain_the_median() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut noise = || 0.2 * normal(&mut rng) + 0.05;
        let c = run(&mut noise, 300, 5).calibration().expect("has a scale");
        for step in 1..=8 {
            let mut last = (f64::INFINITY, f64::NEG_INFINITY);
            for k in 1..=999 {
                let level = k as f64 / 1000.0;
                let (lo, hi) = c.interval(step, 0, level, 1.0);
                assert!(lo <= hi, "step {step} level {level}: {lo} > {hi}");
                assert!(
                    lo <= last.0 && hi >= last.1,
                    "step {step}: level {level} gives {lo}..{hi}, inside {last:?}"
                );
                last = (lo, hi);
            }
            let (lo, hi) = c.interval(step, 0, 0.9999999, 1.0);
            assert!(lo.is_finite() && hi.is_finite() && lo < last.0 && hi > last.1);
        }
    }

    /// `REPORT_RANKS` are where `interpolate` reads each bound, and each bound's fraction of
    /// the way between its two quantiles is below 1 − 2ε (what `count_hits` relies on).
    #[test]
    fn report_ranks_are_where_interpolate_reads() {
        let last = TAUS.len() - 1;
        for (&level, &(lo, hi)) in REPORT_LEVELS.iter().zip(&REPORT_RANKS) {
            for (tau, k) in [((1.0 - level) / 2.0, lo), ((1.0 + level) / 2.0, hi)] {
                assert!(
                    tau > TAUS[0] && tau < TAUS[last],
                    "{level}: inside the grid"
                );
                assert_eq!(
                    TAUS.partition_point(|&t| t <= tau).clamp(1, last),
                    k,
                    "{tau}"
                );
                let fraction = (tau - TAUS[k - 1]) / (TAUS[k] - TAUS[k - 1]);
                assert!(
                    (0.0..=1.0 - 2.0 * f64::EPSILON).contains(&fraction),
                    "{tau}"
                );
            }
        }
    }

    /// The hits `count_hits` counts are the ones the sorted quantiles' interpolated bounds
    /// give, crossed trackers, ties and bounds falling between two quantiles included.
    #[test]
    fn counting_hits_matches_sorting_and_interpolating() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut seen = [0u64; 2];
        for round in 0..20_000 {
            let mut q = [0.0; TAUS.len()];
            let grain = if round % 2 == 0 { 2.0 } else { 1e6 };
            for v in q.iter_mut() {
                // Coarse values half the time, so that ties and crossings are common.
                *v = (normal(&mut rng) * 3.0 * grain).round() / grain;
            }
            let pick = (normal(&mut rng).abs() * 7.0) as usize % TAUS.len();
            let score = match round % 3 {
                0 => q[pick],
                _ => (normal(&mut rng) * 3.0 * grain).round() / grain,
            };
            let mut sorted = q;
            sort(&mut sorted);
            let mut want = [0u64; REPORT_LEVELS.len()];
            for (w, &level) in want.iter_mut().zip(&REPORT_LEVELS) {
                let lo = interpolate(&sorted, (1.0 - level) / 2.0);
                let hi = interpolate(&sorted, (1.0 + level) / 2.0);
                *w = u64::from(lo <= score && score <= hi);
            }
            let mut got = [0u64; REPORT_LEVELS.len()];
            count_hits(&q, score, &mut got);
            assert_eq!(got, want, "{q:?} {score}");
            seen[usize::from(want.contains(&1))] += 1;
        }
        assert!(seen[0] > 1000 && seen[1] > 1000, "{seen:?}");
    }

    /// The CRPS with its grid intervals found once is the one that searches for them, bit for
    /// bit.
    #[test]
    fn crps_reads_the_quantiles_as_interpolate_does() {
        let last = TAUS.len() - 1;
        for (k, &rank) in CRPS_RANKS.iter().enumerate() {
            let tau = (k as f64 + 0.5) / CRPS_POINTS as f64;
            assert_eq!(TAUS.partition_point(|&t| t <= tau).clamp(1, last), rank);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for _ in 0..500 {
            let mut q = [0.0; TAUS.len()];
            for v in q.iter_mut() {
                *v = normal(&mut rng);
            }
            sort(&mut q);
            let d = StepDistribution {
                q,
                sigma: normal(&mut rng).abs(),
            };
            let (centre, y) = (normal(&mut rng), normal(&mut rng));
            let searched: f64 = (0..CRPS_POINTS)
                .map(|k| {
                    let tau = (k as f64 + 0.5) / CRPS_POINTS as f64;
                    let e = y - d.quantile(tau, centre);
                    2.0 * if e >= 0.0 { tau * e } else { (tau - 1.0) * e }
                })
                .sum::<f64>()
                / CRPS_POINTS as f64;
            assert_eq!(d.crps(centre, y).to_bits(), searched.to_bits());
        }
    }

    #[test]
    fn a_path_is_scored_against_the_observation_it_forecast() {
        // Paths that are exactly right at step 2 and wrong by 1 at step 1.
        let mut c = Calibrator::new(2, 1);
        let ys: Vec<f64> = (0..50).map(|t| t as f64).collect();
        for (t, &y) in ys.iter().enumerate() {
            c.observe(&[y]);
            c.push_path(&[t as f64 + 2.0, t as f64 + 2.0]);
        }
        let (s1, s2) = (c.scale[0], c.scale[1]);
        assert!((s1 - 1.0).abs() < 1e-12, "1-step errors are all 1: {s1}");
        assert!(s2.abs() < 1e-12, "2-step errors are all 0: {s2}");
        let q = c.calibration().expect("scaled");
        // Step 2 errs by 0: its median moves towards 0, step 1's towards -1 (y - ŷ = -1).
        let m1 = q.quantile(1, 0, 0.5, 0.0);
        let m2 = q.quantile(2, 0, 0.5, 0.0);
        assert!(m1 < m2, "step 1 median {m1}, step 2 median {m2}");
    }
}
