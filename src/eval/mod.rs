//! The evaluation protocol (docs/EVALUATION.md), for EKI variants and the baselines, through the same
//! [`OnlineModel`] path the daemon uses.
//!
//! - `nmse_prequential`: one online pass over the whole series, test-then-train.
//! - `first` / `final`: passes over the first 80% (the training stream); after pass 1 and after
//!   pass P the parameters are frozen and the test segment (last 20%) is predicted one step
//!   ahead, the recurrent state carried on from the end of training and the inputs being the
//!   true past values. The best particle is the one with the least squared error over the
//!   training pass just finished; the test segment is never looked at to choose anything.

mod plot;
mod series;

#[cfg(test)]
mod golden;

pub use plot::write_svg;
pub use series::{DataError, Series, parse_series, read_series};

use std::time::Instant;

use serde::Serialize;

use crate::engine::AnyEnsemble;
use crate::engine::Ogd;
use crate::engine::Prior;
use crate::engine::{Calibrator, RollOut, StepDistribution, calibrate};
use crate::engine::{Forecaster, Learner, OnlineModel, Persistence, RlsAr, Scaler};
use crate::engine::{Method, Off, Options, Spread, SpreadOption};
use crate::engine::{Mixture, forecaster};

/// One row of the table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalResult {
    pub method: String,
    pub passes: usize,
    pub ensemble: Option<usize>,
    pub hidden: Option<usize>,
    pub first: f64,
    #[serde(rename = "final")]
    pub final_: f64,
    pub nmse_prequential: f64,
    pub obs_per_sec: f64,
    /// The best particle's test nMSE after pass 1 and pass P (EKI only).
    pub best_first: Option<f64>,
    pub best_final: Option<f64>,
    /// The calibrated intervals' scores over the prequential pass.
    #[serde(flatten)]
    pub intervals: IntervalScores,
    /// The options that produced this row (EKI only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<Options>,
}

/// The methods `--methods` can name.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalMethod {
    Persistence,
    /// The online autoregression on the same lags, fitted by recursive least squares.
    Ar,
    Ogd,
    /// An EKI variant: its table name and its options.
    Eki(String, Box<Options>),
}

pub const METHOD_NAMES: &[&str] = &[
    "persistence",
    "ar",
    "ogd",
    "eki",
    "eki-flow",
    "eki-momentum",
    "eki-spread",
    "eki-inflation",
];

impl EvalMethod {
    /// Resolves a method name against the base (default) EKI options.
    pub fn parse(name: &str, base: &Options) -> Option<EvalMethod> {
        let mut o = base.clone();
        match name {
            "persistence" => return Some(EvalMethod::Persistence),
            "ar" => return Some(EvalMethod::Ar),
            "ogd" => return Some(EvalMethod::Ogd),
            "eki" => {}
            "eki-flow" => o.method = Method::Flow,
            "eki-momentum" => {
                o.method = Method::Flow;
                o.momentum = true;
            }
            "eki-spread" => {
                o.spread = SpreadOption::On(Spread {
                    every: 500,
                    gamma: 0.3,
                    decay: 0.8,
                });
                o.inflation = 1.0;
            }
            "eki-inflation" => {
                if o.inflation == 1.0 {
                    o.inflation = 1.0001;
                }
                o.spread = SpreadOption::Off(Off::Off);
            }
            _ => return None,
        }
        Some(EvalMethod::Eki(name.to_owned(), Box::new(o)))
    }
}

/// Settings of the baselines that are not stream options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OgdSettings {
    pub lr: f64,
    pub window: usize,
}

impl Default for OgdSettings {
    fn default() -> Self {
        Self {
            lr: 0.01,
            window: 8,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub options: Options,
    pub passes: usize,
    pub methods: Vec<EvalMethod>,
    pub ogd: OgdSettings,
    pub train_fraction: f64,
    /// Threads one EKI step may use ([`crate::engine::Ensemble::set_threads`]; same results).
    pub step_threads: usize,
    /// The level of the intervals scored (the steps are the options' `horizon`).
    pub level: f64,
}

/// Mean squared error accumulator over the predicted positions.
#[derive(Debug, Clone, Copy, Default)]
struct Mse {
    sum: f64,
    n: usize,
}

impl Mse {
    fn add(&mut self, pred: &[f64], y: &[f64]) {
        for (p, t) in pred.iter().zip(y) {
            self.sum += (p - t) * (p - t);
            self.n += 1;
        }
    }
    fn value(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.sum / self.n as f64
        }
    }
}

/// The probabilistic scores of one method's prequential pass: the calibrated intervals the
/// daemon would have served, each scored when the observation it was made for arrives.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IntervalScores {
    /// The interval's level.
    pub level: f64,
    /// Per step ahead (step 1 first): the share of observations inside their interval.
    pub coverage: Vec<f64>,
    /// Per step ahead: the mean interval (Winkler) score, scaled units: the width, plus 2/α
    /// times the distance by which the observation falls outside.
    pub interval_score: Vec<f64>,
    /// The mean continuous ranked probability score of the step-1 forecast distribution.
    pub crps: f64,
}

/// The Winkler score of interval `(lo, hi)` at level `1 − alpha` for `y`.
fn winkler(lo: f64, hi: f64, alpha: f64, y: f64) -> f64 {
    let miss = if y < lo {
        lo - y
    } else if y > hi {
        y - hi
    } else {
        0.0
    };
    (hi - lo) + 2.0 / alpha * miss
}

/// Accumulates the scores of the intervals served after each observation.
struct Scorer {
    horizon: usize,
    level: f64,
    /// The intervals served at each of the last `horizon` origins (`horizon × 2` each), NaN
    /// where none was (before the first error scale).
    served: Vec<f64>,
    origins: usize,
    /// The step-1 distribution served at the last origin, and its centre.
    step1: Option<(StepDistribution, f64)>,
    hits: Vec<u64>,
    scored: Vec<u64>,
    winkler: Vec<f64>,
    crps: Mse,
}

impl Scorer {
    fn new(horizon: usize, level: f64) -> Self {
        Scorer {
            horizon,
            level,
            served: vec![f64::NAN; horizon * horizon * 2],
            origins: 0,
            step1: None,
            hits: vec![0; horizon],
            scored: vec![0; horizon],
            winkler: vec![0.0; horizon],
            crps: Mse::default(),
        }
    }

    /// Scores the intervals served for `y` (before anything learns from it).
    fn score(&mut self, y: f64) {
        let hz = self.horizon;
        for h in 1..=hz.min(self.origins) {
            let slot = (self.origins - h) % hz;
            let lo = self.served[(slot * hz + h - 1) * 2];
            let hi = self.served[(slot * hz + h - 1) * 2 + 1];
            if lo.is_nan() {
                continue;
            }
            self.scored[h - 1] += 1;
            if lo <= y && y <= hi {
                self.hits[h - 1] += 1;
            }
            self.winkler[h - 1] += winkler(lo, hi, 1.0 - self.level, y);
        }
        if let Some((d, centre)) = self.step1.take() {
            self.crps.sum += d.crps(centre, y);
            self.crps.n += 1;
        }
    }

    /// Keeps the intervals served now (the path just pushed into `calibrator`).
    fn serve(&mut self, calibrator: &Calibrator, path: &[f64]) {
        let hz = self.horizon;
        let slot = self.origins % hz;
        for h in 1..=hz {
            let at = (slot * hz + h - 1) * 2;
            let (lo, hi) = calibrator
                .distribution(h, 0)
                .map_or((f64::NAN, f64::NAN), |d| {
                    d.interval(self.level, path[h - 1])
                });
            self.served[at] = lo;
            self.served[at + 1] = hi;
        }
        self.step1 = calibrator.distribution(1, 0).map(|d| (d, path[0]));
        self.origins += 1;
    }

    fn scores(&self) -> IntervalScores {
        let per_step = |v: &dyn Fn(usize) -> f64| -> Vec<f64> {
            (0..self.horizon)
                .map(|h| {
                    if self.scored[h] == 0 {
                        f64::NAN
                    } else {
                        v(h) / self.scored[h] as f64
                    }
                })
                .collect()
        };
        IntervalScores {
            level: self.level,
            coverage: per_step(&|h| self.hits[h] as f64),
            interval_score: per_step(&|h| self.winkler[h]),
            crps: self.crps.value(),
        }
    }
}

/// One online pass; `sink(i, prediction)` sees every prediction (scaled units). Every
/// forecast the model makes on the way is scored as the daemon's calibrated intervals are.
fn prequential<L: Forecaster>(
    model: &mut OnlineModel<L>,
    series: &[f64],
    (horizon, level): (usize, f64),
    mut sink: impl FnMut(usize, Option<f64>),
) -> (f64, IntervalScores) {
    let mut mse = Mse::default();
    let mut pred = [0.0];
    let mut calibrator = Calibrator::new(horizon, 1);
    let mut scorer = Scorer::new(horizon, level);
    let mut path = vec![0.0; horizon];
    let mut roll = RollOut::default();
    for (i, &y) in series.iter().enumerate() {
        scorer.score(y);
        let predicted = model.observe(&[], &[y], &mut pred);
        if predicted {
            mse.add(&pred, &[y]);
            sink(i, Some(pred[0]));
        } else {
            sink(i, None);
        }
        let origin = calibrator.origins();
        calibrate(
            model,
            &mut calibrator,
            predicted,
            (&[], &[y]),
            &mut path,
            &mut roll,
        );
        if calibrator.origins() > origin {
            scorer.serve(&calibrator, &path);
        }
    }
    (mse.value(), scorer.scores())
}

fn test_segment<L: Learner>(model: &mut OnlineModel<L>, test: &[f64]) -> f64 {
    let mut mse = Mse::default();
    let mut pred = [0.0];
    for &y in test {
        if model.observe_frozen(&[], &[y], &mut pred) {
            mse.add(&pred, &[y]);
        }
    }
    mse.value()
}

/// Predicts with one chosen particle of an ensemble (frozen), for the best-particle column.
struct Particle {
    ensemble: AnyEnsemble,
    index: usize,
}

impl Learner for Particle {
    fn step(&mut self, z: &[f64], _y: &[f64], pred: &mut [f64]) {
        self.predict_frozen(z, pred);
    }
    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        self.ensemble.predict_particle_frozen(self.index, z, pred);
    }
    fn reset_state(&mut self) {
        self.ensemble.reset_hidden();
    }
}

struct Split<'a> {
    train: &'a [f64],
    test: &'a [f64],
}

/// `first`, `final` and, for ensembles, the best particle's pair.
fn passes<L: Learner + Clone>(
    mut model: OnlineModel<L>,
    split: &Split,
    passes: usize,
    mut best: impl FnMut(&OnlineModel<L>, &[f64]) -> Option<f64>,
    mut on_pass_start: impl FnMut(&mut OnlineModel<L>),
) -> (f64, f64, Option<f64>, Option<f64>) {
    let mut out = (f64::NAN, f64::NAN, None, None);
    let mut pred = [0.0];
    for pass in 1..=passes {
        model.reset_state();
        on_pass_start(&mut model);
        for &y in split.train {
            model.observe(&[], &[y], &mut pred);
        }
        if pass == 1 || pass == passes {
            let mut frozen = model.clone();
            let mse = test_segment(&mut frozen, split.test);
            let b = best(&model, split.test);
            if pass == 1 {
                out.0 = mse;
                out.2 = b;
            }
            if pass == passes {
                out.1 = mse;
                out.3 = b;
            }
        }
    }
    out
}

/// The stream's forecaster: the ensemble, alone or in its mixture as the options say.
fn eki_model(o: &Options, threads: usize) -> OnlineModel<Mixture> {
    let mut e = AnyEnsemble::new(o);
    e.set_threads(threads);
    OnlineModel::new(forecaster(e, o), o.lags, 0, 1)
}

/// The OGD network starts where the EKI prior is centred for the same seed.
fn ogd_model(o: &Options, s: OgdSettings) -> OnlineModel<Ogd> {
    use rand::SeedableRng;
    let layout = o.layout();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    let prior = Prior::new(&layout, o.prior_spread, o.readout_spread, o.skip, &mut rng);
    OnlineModel::new(Ogd::new(layout, prior.centre, s.lr, s.window), o.lags, 0, 1)
}

/// A baseline's row: the prequential pass of one model, then `passes` passes of a fresh one.
#[allow(clippy::too_many_arguments)]
fn baseline<L: Forecaster + Clone>(
    method: &str,
    passes_: usize,
    hidden: Option<usize>,
    split: &Split,
    scaled: &[f64],
    scoring: (usize, f64),
    mut predictions: impl FnMut(usize, Option<f64>),
    model: impl Fn() -> OnlineModel<L>,
) -> EvalResult {
    let mut online = model();
    let t = Instant::now();
    let (preq, intervals) = prequential(&mut online, scaled, scoring, &mut predictions);
    let secs = t.elapsed().as_secs_f64();
    let (first, final_, ..) = passes(model(), split, passes_, |_, _| None, |_| {});
    EvalResult {
        method: method.into(),
        passes: passes_,
        ensemble: None,
        hidden,
        first,
        final_,
        nmse_prequential: preq,
        obs_per_sec: scaled.len() as f64 / secs.max(1e-12),
        best_first: None,
        best_final: None,
        intervals,
        options: None,
    }
}

/// Runs one method on a scaled series. `predictions` receives the prequential predictions.
pub fn run_method(
    method: &EvalMethod,
    config: &EvalConfig,
    scaled: &[f64],
    predictions: impl FnMut(usize, Option<f64>) + Send,
) -> EvalResult {
    let n_train = ((scaled.len() as f64) * config.train_fraction).round() as usize;
    let split = Split {
        train: &scaled[..n_train],
        test: &scaled[n_train..],
    };
    let o = &config.options;
    let p = config.passes.max(1);
    let scoring = (o.horizon, config.level);
    let mut predictions = predictions;
    match method {
        // Persistence learns nothing: one pass, and `final` is `first`. It needs only y_{t-1},
        // but holds as many lags as the other methods so that it predicts, and is scored on,
        // the same observations: compared over a set that also held the series' first values,
        // its mean error would be another series' than theirs.
        EvalMethod::Persistence => baseline(
            "persistence",
            1,
            None,
            &split,
            scaled,
            scoring,
            predictions,
            || OnlineModel::new(Persistence, o.lags.max(1), 0, 1),
        ),
        EvalMethod::Ar => baseline("ar", p, None, &split, scaled, scoring, predictions, || {
            OnlineModel::new(RlsAr::new(o.lags, 1), o.lags, 0, 1)
        }),
        EvalMethod::Ogd => baseline(
            "ogd",
            p,
            Some(o.hidden),
            &split,
            scaled,
            scoring,
            predictions,
            || ogd_model(o, config.ogd),
        ),
        EvalMethod::Eki(name, eo) => {
            let mut m = eki_model(eo, config.step_threads);
            // Steps that split run their fork-joins from the step pool's workers.
            let on_two = m.learner.ensemble.is_parallel();
            let t = Instant::now();
            let (preq, intervals) = crate::engine::on_pool(on_two, || {
                prequential(&mut m, scaled, (eo.horizon, config.level), &mut predictions)
            });
            let ops = scaled.len() as f64 / t.elapsed().as_secs_f64().max(1e-12);
            let best = |model: &OnlineModel<Mixture>, test: &[f64]| {
                let index = model.learner.ensemble.best_particle();
                let mut pm = model.clone().map_learner(|mixture| Particle {
                    ensemble: mixture.ensemble,
                    index,
                });
                Some(test_segment(&mut pm, test))
            };
            let (first, final_, best_first, best_final) = crate::engine::on_pool(on_two, || {
                passes(
                    eki_model(eo, config.step_threads),
                    &split,
                    p,
                    best,
                    |m: &mut OnlineModel<Mixture>| m.learner.ensemble.reset_particle_errors(),
                )
            });
            EvalResult {
                method: name.clone(),
                passes: p,
                ensemble: Some(eo.ensemble),
                hidden: Some(eo.hidden),
                first,
                final_,
                nmse_prequential: preq,
                obs_per_sec: ops,
                best_first,
                best_final,
                intervals,
                options: Some((**eo).clone()),
            }
        }
    }
}

/// The whole table for one series (original units in, scaled internally by min-max).
pub fn evaluate(config: &EvalConfig, values: &[f64]) -> (Scaler, Vec<EvalResult>) {
    let scaler = Scaler::fit(values);
    let scaled: Vec<f64> = values.iter().map(|&v| scaler.to_model(v)).collect();
    let results = config
        .methods
        .iter()
        .map(|m| run_method(m, config, &scaled, |_, _| {}))
        .collect();
    (scaler, results)
}

/// Formats the table as aligned text: the point forecasts' errors, then the calibrated
/// intervals' coverage and interval score at step 1 and at the last step, and the step-1 CRPS.
pub fn table(results: &[EvalResult]) -> String {
    let last = results
        .first()
        .map_or(1, |r| r.intervals.coverage.len().max(1));
    let level = results.first().map_or(0.9, |r| r.intervals.level);
    let mut s = format!(
        "{:<14} {:>6} {:>6} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>10} {:>7} {:>7} {:>9} {:>9} {:>9}\n",
        "method",
        "passes",
        "J",
        "hidden",
        "first",
        "final",
        "best_first",
        "best_final",
        "nmse_preq",
        "obs/s",
        "cov@1",
        format!("cov@{last}"),
        "is@1",
        format!("is@{last}"),
        "crps@1",
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4e}"));
    let opt_n = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
    let at = |v: &[f64], i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    for r in results {
        let iv = &r.intervals;
        s.push_str(&format!(
            "{:<14} {:>6} {:>6} {:>6} {:>11.4e} {:>11.4e} {:>11} {:>11} {:>11.4e} {:>10.0} {:>7.3} {:>7.3} {:>9.3e} {:>9.3e} {:>9.3e}\n",
            r.method,
            r.passes,
            opt_n(r.ensemble),
            opt_n(r.hidden),
            r.first,
            r.final_,
            opt(r.best_first),
            opt(r.best_final),
            r.nmse_prequential,
            r.obs_per_sec,
            at(&iv.coverage, 0),
            at(&iv.coverage, last - 1),
            at(&iv.interval_score, 0),
            at(&iv.interval_score, last - 1),
            iv.crps,
        ));
    }
    s.push_str(&format!(
        "cov: share inside the {level} interval served for it; is: interval (Winkler) score; crps: step-1 CRPS (scaled units)\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A noisy seasonal series, reproducible without any file.
    fn series(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let t = i as f64;
                0.5 + 0.3 * (t / 9.0).sin() + 0.05 * ((t * 12.9898).sin() * 43758.5453).fract()
            })
            .collect()
    }

    fn config(seed: u64) -> EvalConfig {
        let options = Options {
            ensemble: 20,
            hidden: 4,
            lags: 3,
            seed,
            ..Options::default()
        };
        EvalConfig {
            methods: vec![EvalMethod::parse("eki", &options).expect("known")],
            options,
            passes: 2,
            ogd: OgdSettings::default(),
            train_fraction: 0.8,
            step_threads: 1,
            level: 0.9,
        }
    }

    fn predictions(config: &EvalConfig, s: &[f64]) -> (Vec<Option<f64>>, EvalResult) {
        let mut p = Vec::new();
        let r = run_method(&config.methods[0], config, s, |_, v| p.push(v));
        (p, r)
    }

    #[test]
    fn same_seed_same_predictions_bit_for_bit_other_seed_differs() {
        let s = series(300);
        let (a, ra) = predictions(&config(1), &s);
        let (b, rb) = predictions(&config(1), &s);
        let (c, _) = predictions(&config(2), &s);
        let bits = |v: &[Option<f64>]| v.iter().map(|p| p.map(f64::to_bits)).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(ra.final_.to_bits(), rb.final_.to_bits());
        assert_ne!(bits(&a), bits(&c));
        assert_eq!(
            a.iter().filter(|p| p.is_none()).count(),
            3,
            "the lag buffer fills first"
        );
    }

    #[test]
    fn changing_a_value_changes_no_earlier_or_same_position_prediction() {
        let s = series(200);
        let (base, _) = predictions(&config(7), &s);
        for k in [3usize, 50, 120, 199] {
            let mut t = s.clone();
            t[k] += 0.25;
            let (moved, _) = predictions(&config(7), &t);
            for i in 0..=k {
                assert_eq!(
                    base[i].map(f64::to_bits),
                    moved[i].map(f64::to_bits),
                    "prediction {i} changed when value {k} did"
                );
            }
            if k + 1 < s.len() {
                assert_ne!(
                    base[k + 1],
                    moved[k + 1],
                    "the change must reach position {}",
                    k + 1
                );
            }
        }
    }

    #[test]
    fn persistence_scores_the_lag_one_error() {
        let s = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let c = EvalConfig {
            methods: vec![EvalMethod::Persistence],
            train_fraction: 4.0 / 6.0,
            ..config(0)
        };
        let mut predicted = Vec::new();
        let r = run_method(&c.methods[0], &c, &s, |i, p| {
            if p.is_some() {
                predicted.push(i)
            }
        });
        // Scored where the other methods (3 lags) predict: values 4..6 err by 1, 0, 1.
        assert_eq!(c.options.lags, 3);
        assert_eq!(predicted, [3, 4, 5]);
        assert_eq!(r.nmse_prequential, 2.0 / 3.0);
        // Test segment [1, 0] after training on [0, 1, 0, 1]: errors 0, 1.
        assert_eq!(r.first, 0.5);
    }
}
