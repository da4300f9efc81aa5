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
use crate::engine::{Learner, OnlineModel, Persistence, Scaler};
use crate::engine::{Method, Off, Options, Spread, SpreadOption};

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
    /// The options that produced this row (EKI only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<Options>,
}

/// The methods `--methods` can name.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalMethod {
    Persistence,
    Ogd,
    /// An EKI variant: its table name and its options.
    Eki(String, Options),
}

pub const METHOD_NAMES: &[&str] = &[
    "persistence",
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
        Some(EvalMethod::Eki(name.to_owned(), o))
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

/// One online pass; `sink(i, prediction)` sees every prediction (scaled units).
fn prequential<L: Learner>(
    model: &mut OnlineModel<L>,
    series: &[f64],
    mut sink: impl FnMut(usize, Option<f64>),
) -> f64 {
    let mut mse = Mse::default();
    let mut pred = [0.0];
    for (i, &y) in series.iter().enumerate() {
        if model.observe(&[], &[y], &mut pred) {
            mse.add(&pred, &[y]);
            sink(i, Some(pred[0]));
        } else {
            sink(i, None);
        }
    }
    mse.value()
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

fn eki_model(o: &Options, threads: usize) -> OnlineModel<AnyEnsemble> {
    let mut e = AnyEnsemble::new(o);
    e.set_threads(threads);
    OnlineModel::new(e, o.lags, 0, 1)
}

/// The OGD network starts where the EKI prior is centred for the same seed.
fn ogd_model(o: &Options, s: OgdSettings) -> OnlineModel<Ogd> {
    use rand::SeedableRng;
    let layout = o.layout();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    let prior = Prior::new(&layout, o.prior_spread, o.readout_spread, o.skip, &mut rng);
    OnlineModel::new(Ogd::new(layout, prior.centre, s.lr, s.window), o.lags, 0, 1)
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
    let timed = |f: &mut dyn FnMut() -> f64| {
        let t = Instant::now();
        let v = f();
        let secs = t.elapsed().as_secs_f64();
        (v, scaled.len() as f64 / secs.max(1e-12))
    };
    let mut predictions = predictions;
    match method {
        EvalMethod::Persistence => {
            // One lag: persistence needs only y_{t-1}, and predicts from the second value on.
            let persistence_lags = 1;
            let mut m = OnlineModel::new(Persistence, persistence_lags, 0, 1);
            let (preq, ops) = timed(&mut || prequential(&mut m, scaled, &mut predictions));
            let m = OnlineModel::new(Persistence, persistence_lags, 0, 1);
            // Persistence learns nothing: one pass, and `final` is `first`.
            let (first, ..) = passes(m, &split, 1, |_, _| None, |_| {});
            EvalResult {
                method: "persistence".into(),
                passes: 1,
                ensemble: None,
                hidden: None,
                first,
                final_: first,
                nmse_prequential: preq,
                obs_per_sec: ops,
                best_first: None,
                best_final: None,
                options: None,
            }
        }
        EvalMethod::Ogd => {
            let mut m = ogd_model(o, config.ogd);
            let (preq, ops) = timed(&mut || prequential(&mut m, scaled, &mut predictions));
            let (first, final_, ..) =
                passes(ogd_model(o, config.ogd), &split, p, |_, _| None, |_| {});
            EvalResult {
                method: "ogd".into(),
                passes: p,
                ensemble: None,
                hidden: Some(o.hidden),
                first,
                final_,
                nmse_prequential: preq,
                obs_per_sec: ops,
                best_first: None,
                best_final: None,
                options: None,
            }
        }
        EvalMethod::Eki(name, eo) => {
            let mut m = eki_model(eo, config.step_threads);
            // Steps that split run their fork-joins from the step pool's workers.
            let on_two = m.learner.is_parallel();
            let (preq, ops) = crate::engine::on_pool(on_two, || {
                timed(&mut || prequential(&mut m, scaled, &mut predictions))
            });
            let best = |model: &OnlineModel<AnyEnsemble>, test: &[f64]| {
                let index = model.learner.best_particle();
                let mut pm = model
                    .clone()
                    .map_learner(|ensemble| Particle { ensemble, index });
                Some(test_segment(&mut pm, test))
            };
            let (first, final_, best_first, best_final) = crate::engine::on_pool(on_two, || {
                passes(
                    eki_model(eo, config.step_threads),
                    &split,
                    p,
                    best,
                    |m: &mut OnlineModel<AnyEnsemble>| m.learner.reset_particle_errors(),
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
                options: Some(eo.clone()),
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

/// Formats the table as aligned text.
pub fn table(results: &[EvalResult]) -> String {
    let mut s = format!(
        "{:<14} {:>6} {:>6} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>10}\n",
        "method",
        "passes",
        "J",
        "hidden",
        "first",
        "final",
        "best_first",
        "best_final",
        "nmse_preq",
        "obs/s"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4e}"));
    let opt_n = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
    for r in results {
        s.push_str(&format!(
            "{:<14} {:>6} {:>6} {:>6} {:>11.4e} {:>11.4e} {:>11} {:>11} {:>11.4e} {:>10.0}\n",
            r.method,
            r.passes,
            opt_n(r.ensemble),
            opt_n(r.hidden),
            r.first,
            r.final_,
            opt(r.best_first),
            opt(r.best_final),
            r.nmse_prequential,
            r.obs_per_sec
        ));
    }
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
        let s = [0.0, 1.0, 0.0, 1.0, 1.0];
        let c = EvalConfig {
            methods: vec![EvalMethod::Persistence],
            train_fraction: 0.6,
            ..config(0)
        };
        let r = run_method(&c.methods[0], &c, &s, |_, _| {});
        // Steps 2..5 err by 1, 1, 1, 0.
        assert_eq!(r.nmse_prequential, 0.75);
        // Test segment [1, 1] after training on [0, 1, 0]: errors 1, 0.
        assert_eq!(r.first, 0.5);
    }
}
