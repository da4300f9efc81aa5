//! `RlsAr`: the online autoregression baseline. A linear model of the cell's own inputs
//! `z = [y_{t−1}, …, y_{t−L}; x_t]` plus an intercept, fitted by recursive least squares one
//! observation at a time: the simple model every EKI stream has to beat.
//!
//! With regressors `φ = [z; 1]`, coefficients `Θ` (`(n+1)×m`, one column per output) and the
//! inverse information matrix `P` (`(n+1)×(n+1)`, shared by the outputs, whose regressors are
//! the same), one step is
//!
//! ```text
//! ŷ = Θᵀφ                      (the prediction, made before y is seen)
//! g = Pφ,  k = g / (λ + φᵀg)
//! Θ ← Θ + k (y − ŷ)ᵀ
//! P ← (P − k gᵀ) / λ
//! ```
//!
//! It starts from persistence, `Θ₀` = 1 on each output's own last value and 0 elsewhere, with
//! `P = I/δ` and `λ = 1`: `Θ` after n observations is exactly the ridge fit shrunk towards
//! persistence, `(ΦᵀΦ + δI)⁻¹(Φᵀy + δΘ₀)` (up to rounding), least squares with a penalty too
//! small to matter once a few observations are in, and persistence before them. No allocation
//! per step.

use serde::{Deserialize, Serialize};

use super::model::{Forecaster, LagBuffer, Learner};
use super::rollout::{FutureInputs, ROLL_OUT_BOUND, RollOut};

/// The ridge penalty δ of the start, `P = I/δ` (scaled units: the series lies in [0, 1]).
/// Chosen on the validation collection (BENCHMARKS.md): it gave the least prequential error.
const RIDGE: f64 = 1e-3;
/// The forgetting factor λ: 1 weighs every observation alike, as a least-squares fit does.
const FORGET: f64 = 1.0;

/// Recursive least squares on the lagged values (and exogenous inputs) with an intercept.
#[derive(Debug, Clone)]
pub struct RlsAr {
    /// Regressors per step, `n + 1` (the inputs and the intercept).
    k: usize,
    outputs: usize,
    /// `k×m`, row-major.
    theta: Vec<f64>,
    /// `k×k`, row-major, symmetric.
    p: Vec<f64>,
    // Scratch: φ and g = Pφ.
    phi: Vec<f64>,
    g: Vec<f64>,
}

impl RlsAr {
    /// A model of `inputs` regressors (the length of `z`, whose first `outputs` values are the
    /// outputs' last values when `lags ≥ 1`) and `outputs` values, starting from persistence.
    pub fn new(inputs: usize, outputs: usize) -> Self {
        let k = inputs + 1;
        let mut p = vec![0.0; k * k];
        for i in 0..k {
            p[i * k + i] = 1.0 / RIDGE;
        }
        let mut theta = vec![0.0; k * outputs];
        for o in 0..outputs.min(inputs) {
            theta[o * outputs + o] = 1.0;
        }
        RlsAr {
            k,
            outputs,
            theta,
            p,
            phi: vec![0.0; k],
            g: vec![0.0; k],
        }
    }

    /// The coefficients, `k×m` row-major: one row per regressor (the intercept last).
    pub fn coefficients(&self) -> &[f64] {
        &self.theta
    }

    fn load(&mut self, z: &[f64]) {
        debug_assert_eq!(z.len() + 1, self.k);
        self.phi[..z.len()].copy_from_slice(z);
        self.phi[z.len()] = 1.0;
    }

    fn predict(&self, pred: &mut [f64]) {
        let m = self.outputs;
        pred.fill(0.0);
        for (row, &f) in self.theta.chunks_exact(m).zip(&self.phi) {
            for (p, &t) in pred.iter_mut().zip(row) {
                *p += t * f;
            }
        }
    }
}

impl Forecaster for RlsAr {
    fn forecast_path(&mut self, lags: &LagBuffer, x: &[f64], out: &mut [f64], roll: &mut RollOut) {
        let lagged = roll.lags_scratch(lags.values());
        ar_path(
            &self.theta,
            self.outputs,
            lagged,
            FutureInputs::Held(x),
            &mut self.phi,
            out,
        );
    }
}

/// An autoregression of coefficients `theta` (`k × m`, the intercept last) rolled out from the
/// lags in `lagged` (newest first; used as scratch), its outputs fed back, writing
/// `out.len() / m` steps. `phi`: scratch of length `k`.
pub fn ar_path(
    theta: &[f64],
    m: usize,
    lagged: &mut [f64],
    future_x: FutureInputs,
    phi: &mut [f64],
    out: &mut [f64],
) {
    let nl = lagged.len();
    let ni = phi.len() - 1 - nl;
    for (s, o) in out.chunks_exact_mut(m).enumerate() {
        phi[..nl].copy_from_slice(lagged);
        phi[nl..nl + ni].copy_from_slice(future_x.at(s, ni));
        phi[nl + ni] = 1.0;
        o.fill(0.0);
        for (row, &f) in theta.chunks_exact(m).zip(phi.iter()) {
            for (p, &t) in o.iter_mut().zip(row) {
                *p += t * f;
            }
        }
        for v in o.iter_mut() {
            *v = if v.is_nan() {
                0.0
            } else {
                v.clamp(-ROLL_OUT_BOUND, ROLL_OUT_BOUND)
            };
        }
        if nl > 0 {
            lagged.copy_within(0..nl - m, m);
            lagged[..m].copy_from_slice(o);
        }
    }
}

/// What of an autoregression evolves (a snapshot holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArState {
    pub theta: Vec<f64>,
    pub p: Vec<f64>,
}

impl RlsAr {
    pub fn state(&self) -> ArState {
        ArState {
            theta: self.theta.clone(),
            p: self.p.clone(),
        }
    }

    pub fn set_state(&mut self, s: ArState) -> Result<(), String> {
        if s.theta.len() != self.theta.len() || s.p.len() != self.p.len() {
            return Err("autoregression state does not match the options".into());
        }
        self.theta = s.theta;
        self.p = s.p;
        Ok(())
    }
}

impl Learner for RlsAr {
    fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) {
        let (k, m) = (self.k, self.outputs);
        self.load(z);
        self.predict(pred);
        let mut denom = FORGET;
        for (gi, row) in self.g.iter_mut().zip(self.p.chunks_exact(k)) {
            *gi = row.iter().zip(&self.phi).map(|(a, b)| a * b).sum();
        }
        for (gi, fi) in self.g.iter().zip(&self.phi) {
            denom += gi * fi;
        }
        for (row, gi) in self.theta.chunks_exact_mut(m).zip(&self.g) {
            let ki = gi / denom;
            for ((t, yo), po) in row.iter_mut().zip(y).zip(pred.iter()) {
                *t += ki * (yo - po);
            }
        }
        for (i, row) in self.p.chunks_exact_mut(k).enumerate() {
            let ki = self.g[i] / denom;
            for (pij, gj) in row.iter_mut().zip(&self.g) {
                *pij = (*pij - ki * gj) / FORGET;
            }
        }
    }

    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        self.load(z);
        self.predict(pred);
    }

    /// No recurrent state: the lag buffer is the model's whole memory of the past.
    fn reset_state(&mut self) {}
}

#[cfg(test)]
mod tests {
    use nalgebra::{DMatrix, DVector};

    use super::*;

    /// The RLS coefficients after n steps against the direct fit of the same rows: ridge,
    /// shrunk towards persistence.
    #[test]
    fn rls_matches_a_direct_least_squares_fit() {
        let (n, lags) = (60, 3);
        let series: Vec<f64> = (0..n + lags)
            .map(|t| 0.5 + 0.3 * (t as f64 * 0.37).sin() + 0.05 * ((t * 7919 % 13) as f64 / 13.0))
            .collect();
        let mut ar = RlsAr::new(lags, 1);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut pred = [0.0];
        for t in lags..n + lags {
            let z: Vec<f64> = (1..=lags).map(|l| series[t - l]).collect();
            ar.step(&z, &[series[t]], &mut pred);
            rows.extend(z.iter().copied().chain([1.0]));
            targets.push(series[t]);
        }
        let phi = DMatrix::from_row_slice(n, lags + 1, &rows);
        let y = DVector::from_vec(targets);
        let a = phi.transpose() * &phi + DMatrix::identity(lags + 1, lags + 1) * RIDGE;
        let mut start = DVector::zeros(lags + 1);
        start[0] = 1.0;
        let b = phi.transpose() * y + start * RIDGE;
        let direct = a.lu().solve(&b).expect("solvable");
        for (i, (r, d)) in ar.coefficients().iter().zip(direct.iter()).enumerate() {
            assert!((r - d).abs() < 1e-8, "coefficient {i}: rls {r}, direct {d}");
        }
    }

    /// An exact AR(2) process is learned to its coefficients, each output on its own column.
    #[test]
    fn two_outputs_each_learn_their_own_coefficients() {
        let mut ar = RlsAr::new(2, 2);
        let mut pred = [0.0; 2];
        let (mut a1, mut a2) = (0.3, 0.1);
        for t in 0..200 {
            let z = [a1, a2];
            let u = (t as f64 * 0.61).sin();
            let y = [0.6 * z[0] - 0.2 * z[1] + 0.1 * u, 0.4 * z[0] + 0.25];
            ar.step(&z, &y, &mut pred);
            (a2, a1) = (a1, y[0] + 0.1 * (t as f64 * 1.3).cos());
        }
        let c = ar.coefficients();
        assert!(
            (c[2 * 2 + 1] - 0.25).abs() < 1e-3,
            "intercept of output 2: {}",
            c[5]
        );
        assert!(
            (c[1] - 0.4).abs() < 1e-3,
            "lag-1 weight of output 2: {}",
            c[1]
        );
    }
}
