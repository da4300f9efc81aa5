//! `Mixture`: the stream's forecaster. The EKI ensemble's mean particle, the online
//! autoregression ([`RlsAr`]) on the same inputs and persistence, combined with weights that
//! follow their recent errors, so that a stream is never much worse than the best of its
//! simple models and gains when they err differently.
//!
//! Every member predicts and learns from every observation (the ensemble by its EKI step). With
//! `L_i` the discounted sum of member i's squared errors (`L_i ← ρ L_i + ‖y − ŷ_i‖²`), the
//! weights are
//!
//! ```text
//! w_i ∝ exp(−η (L_i / min_k L_k − 1))
//! ```
//!
//! a ratio of the members' recent errors, so free of the series' scale: the best member has
//! the largest weight, one twice as bad over the last ~1/(1 − ρ) observations a factor e^{−η}
//! less. The prediction is `Σ w_i ŷ_i` with the weights of before the observation, and so is
//! every step of a forecast (each member rolled out on its own). Derivative-free, deterministic,
//! no allocation per step.

use serde::{Deserialize, Serialize};

use crate::engine::ar::{ArState, RlsAr};
use crate::engine::ensemble::AnyEnsemble;
use crate::engine::model::{Forecaster, LagBuffer, Learner};
use crate::engine::rollout::RollOut;

/// The discount ρ of the members' squared errors: about the last 200 observations count.
const DISCOUNT: f64 = 0.995;
/// η: how sharply the weights prefer the member with the least recent error. Chosen on the
/// validation collection (BENCHMARKS.md).
const SHARPNESS: f64 = 10.0;

/// What of a mixture evolves, besides its ensemble (a snapshot holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureState {
    pub ar: ArState,
    /// Discounted squared errors of the members.
    pub loss: [f64; 3],
}

impl MixtureState {
    /// The state of a mixture that has seen nothing (`inputs`: the length of the cell's input
    /// vector).
    pub fn new(inputs: usize, outputs: usize) -> Self {
        MixtureState {
            ar: RlsAr::new(inputs, outputs).state(),
            loss: [0.0; 3],
        }
    }
}

/// The weights and the autoregression's coefficients at one moment: what a forecast needs to
/// roll the mixture out.
#[derive(Debug, Clone, PartialEq)]
pub struct MixtureForecast {
    pub weights: [f64; 3],
    /// The autoregression's coefficients (`k × m`, the intercept last).
    pub ar: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct Mixture {
    pub ensemble: AnyEnsemble,
    ar: RlsAr,
    /// Whether the members are combined; when not, the ensemble's mean particle alone predicts
    /// (the autoregression still learns, so the choice can be compared).
    combine: bool,
    /// Whether the inputs start with each output's last value (`lags ≥ 1`), for persistence.
    has_lags: bool,
    loss: [f64; 3],
    // Scratch: each member's prediction (3 × m) and path (3 × horizon × m).
    preds: Vec<f64>,
    paths: Vec<f64>,
}

impl Mixture {
    /// `inputs`: the length of the cell's input vector `z`; `lags`: whether it starts with the
    /// outputs' last values.
    pub fn new(
        ensemble: AnyEnsemble,
        inputs: usize,
        outputs: usize,
        lags: bool,
        combine: bool,
    ) -> Self {
        Mixture {
            ensemble,
            ar: RlsAr::new(inputs, outputs),
            combine,
            has_lags: lags,
            loss: [0.0; 3],
            preds: vec![0.0; 3 * outputs],
            paths: Vec::new(),
        }
    }

    pub fn state(&self) -> MixtureState {
        MixtureState {
            ar: self.ar.state(),
            loss: self.loss,
        }
    }

    pub fn set_state(&mut self, s: MixtureState) -> Result<(), String> {
        self.ar.set_state(s.ar)?;
        self.loss = s.loss;
        Ok(())
    }

    /// The members' weights now (the ensemble's is 1 when the mixture does not combine).
    pub fn weights(&self) -> [f64; 3] {
        if !self.combine {
            return [1.0, 0.0, 0.0];
        }
        let members = if self.has_lags { 3 } else { 2 };
        let best = self.loss[..members]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let mut w = [0.0; 3];
        if !(best > 0.0 && best.is_finite()) {
            // No error yet (or a perfect member): equal weights.
            w[..members].fill(1.0 / members as f64);
            return w;
        }
        for (wi, &li) in w.iter_mut().zip(&self.loss).take(members) {
            let excess = if li.is_finite() {
                li / best - 1.0
            } else {
                f64::INFINITY
            };
            *wi = (-SHARPNESS * excess).exp();
        }
        let total: f64 = w.iter().sum();
        for wi in &mut w {
            *wi /= total;
        }
        w
    }

    /// The prediction from the members' (the ensemble's and the autoregression's already in
    /// `preds`; persistence's is the last value in `z`).
    fn mix(&mut self, weights: &[f64; 3], z: &[f64], pred: &mut [f64]) {
        let m = pred.len();
        if self.has_lags {
            self.preds[2 * m..].copy_from_slice(&z[..m]);
        }
        if self.combine {
            for (o, p) in pred.iter_mut().enumerate() {
                *p = combine(weights, &self.preds, m, o);
            }
        } else {
            pred.copy_from_slice(&self.preds[..m]);
        }
    }

    pub fn forecast(&self) -> MixtureForecast {
        MixtureForecast {
            weights: self.weights(),
            ar: self.ar.coefficients().to_vec(),
        }
    }
}

/// `Σ w_i x_i` over the members' values at `at` in `members` (`3 × n` values): the one order of
/// summation used by predictions and forecasts alike.
pub fn combine(weights: &[f64; 3], members: &[f64], n: usize, at: usize) -> f64 {
    let mut v = 0.0;
    for (k, w) in weights.iter().enumerate() {
        if *w != 0.0 {
            v += w * members[k * n + at];
        }
    }
    v
}

impl Learner for Mixture {
    fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) {
        let m = pred.len();
        let weights = self.weights();
        let (pe, rest) = self.preds.split_at_mut(m);
        let (pa, _) = rest.split_at_mut(m);
        self.ensemble.step(z, y, pe);
        self.ar.step(z, y, pa);
        self.mix(&weights, z, pred);
        for (k, l) in self.loss.iter_mut().enumerate() {
            let e: f64 = self.preds[k * m..(k + 1) * m]
                .iter()
                .zip(y)
                .map(|(p, t)| (p - t) * (p - t))
                .sum();
            *l = (DISCOUNT * *l + e).min(f64::MAX);
        }
    }

    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        let m = pred.len();
        let weights = self.weights();
        let (pe, rest) = self.preds.split_at_mut(m);
        let (pa, _) = rest.split_at_mut(m);
        self.ensemble.predict_frozen(z, pe);
        self.ar.predict_frozen(z, pa);
        self.mix(&weights, z, pred);
    }

    fn reset_state(&mut self) {
        self.ensemble.reset_hidden();
    }
}

impl Forecaster for Mixture {
    fn forecast_path(&mut self, lags: &LagBuffer, x: &[f64], out: &mut [f64], roll: &mut RollOut) {
        if !self.combine {
            return self.ensemble.forecast_path(lags, x, out, roll);
        }
        let n = out.len();
        let weights = self.weights();
        self.paths.resize(3 * n, 0.0);
        let (pe, rest) = self.paths.split_at_mut(n);
        let (pa, pp) = rest.split_at_mut(n);
        self.ensemble.forecast_path(lags, x, pe, roll);
        self.ar.forecast_path(lags, x, pa, roll);
        if self.has_lags {
            let last = &lags.values()[..lags.outputs()];
            for o in pp.chunks_exact_mut(last.len()) {
                o.copy_from_slice(last);
            }
        }
        for (i, v) in out.iter_mut().enumerate() {
            *v = combine(&weights, &self.paths, n, i);
        }
    }
}
