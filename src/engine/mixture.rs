//! `Mixture`: the stream's forecaster. The EKI ensemble's mean particle, the online
//! autoregression ([`RlsAr`]) on the same inputs and persistence, combined with the weights
//! that would have made the least recent squared error, so that a stream is never much worse
//! than the best of its simple models and gains when they err differently.
//!
//! Every member predicts and learns from every observation (the ensemble by its EKI step). With
//! `e_i` member i's error, the mixture keeps the discounted second moments of the errors,
//! `S_ij ← ρ S_ij + e_i·e_j`, and combines with the weights on the simplex that minimise the
//! squared error of the combination over that window (Bates & Granger's optimal combination,
//! kept convex so that it never extrapolates):
//!
//! ```text
//! w = argmin { wᵀ (S + δ·tr(S)/n·I) w : w ≥ 0, Σ w_i = 1 }
//! ```
//!
//! found exactly by trying every support (seven for three members): on a support T the
//! minimiser is `S_T⁻¹1 / 1ᵀS_T⁻¹1`, kept when all its weights are positive; the least of
//! those is the minimum. When the members err alike it is the best of them; when their errors
//! partly cancel it is a blend better than each. The small ridge δ keeps `S` invertible when
//! two members agree. Before any error is seen, persistence alone predicts (the other members
//! know nothing yet). The prediction is `Σ w_i ŷ_i` with the weights of before the observation.
//!
//! Each step h ahead of a forecast has weights of its own, from the same moments of the
//! members' h-step errors: the mixture keeps each member's roll-out at the last `horizon`
//! origins (the stream's calibration makes one per observation) and scores it as the
//! observations it forecast arrive. A member that is right one step ahead can be far off
//! twenty steps ahead (an autoregression fitted on few values may be explosive), so a step
//! whose forecasts have not been scored yet is persistence's alone. Derivative-free,
//! deterministic, no allocation per step.

use serde::{Deserialize, Serialize};

use crate::engine::ar::{ArState, RlsAr};
use crate::engine::ensemble::AnyEnsemble;
use crate::engine::model::{Forecaster, LagBuffer, Learner};
use crate::engine::rollout::RollOut;

/// The discount ρ of the members' errors: about the last 200 observations count. Chosen on the
/// validation collection (BENCHMARKS.md).
const DISCOUNT: f64 = 0.995;
/// δ: the ridge on the error moments, relative to their mean diagonal. Chosen on the validation
/// collection (BENCHMARKS.md).
const RIDGE: f64 = 1e-3;
/// The members: the ensemble, the autoregression, persistence.
const MEMBERS: usize = 3;
/// The off-diagonal pairs of the members' error moments, in [`ErrorMoments::cross`]'s order.
const PAIRS: [(usize, usize); 3] = [(0, 1), (0, 2), (1, 2)];

/// The discounted second moments of the members' errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorMoments {
    /// `S_ii`: the discounted squared errors of each member.
    pub squared: [f64; MEMBERS],
    /// `S_ij` for the pairs (0, 1), (0, 2), (1, 2).
    pub cross: [f64; MEMBERS],
    /// Observations scored so far.
    pub scored: u64,
}

impl ErrorMoments {
    /// `S_ij`.
    #[cfg(test)]
    fn at(&self, i: usize, j: usize) -> f64 {
        if i == j {
            return self.squared[i];
        }
        let pair = (i.min(j), i.max(j));
        let k = PAIRS.iter().position(|&p| p == pair).unwrap_or(0);
        self.cross[k]
    }

    /// Adds one observation's errors (`MEMBERS × m`, member-major), discounting the past. A
    /// finite product that overflows stays the largest number, not infinity.
    fn add(&mut self, errors: &[f64], m: usize) {
        let dot = |i: usize, j: usize| -> f64 {
            (0..m).map(|o| errors[i * m + o] * errors[j * m + o]).sum()
        };
        for i in 0..MEMBERS {
            self.squared[i] = (DISCOUNT * self.squared[i] + dot(i, i)).min(f64::MAX);
        }
        for (c, &(i, j)) in self.cross.iter_mut().zip(&PAIRS) {
            *c = (DISCOUNT * *c + dot(i, j)).clamp(-f64::MAX, f64::MAX);
        }
        self.scored += 1;
    }

    /// The convex weights of the least discounted squared error of the first `members`
    /// members (those with a finite error only).
    pub fn weights(&self, members: usize) -> [f64; MEMBERS] {
        let finite = |i: usize| self.squared[i].is_finite();
        let mean = (0..members)
            .filter(|&i| finite(i))
            .map(|i| self.squared[i])
            .sum::<f64>()
            / members as f64;
        let ridge = RIDGE * mean;
        let mut s = [[0.0; MEMBERS]; MEMBERS];
        for (i, row) in s.iter_mut().enumerate() {
            row[i] = self.squared[i] + ridge;
        }
        for (&c, &(i, j)) in self.cross.iter().zip(&PAIRS) {
            (s[i][j], s[j][i]) = (c, c);
        }
        let mut w = [0.0; MEMBERS];
        let mut best = f64::INFINITY;
        let mut consider = |candidate: Option<([f64; MEMBERS], f64)>| {
            if let Some((c, value)) = candidate
                && value < best
            {
                (best, w) = (value, c);
            }
        };
        for i in (0..members).filter(|&i| finite(i)) {
            consider(single(&s, i));
            for j in (i + 1..members).filter(|&j| finite(j)) {
                consider(pair(&s, i, j));
            }
        }
        if members == MEMBERS && (0..MEMBERS).all(finite) {
            consider(triple(&s));
        }
        if best == f64::INFINITY {
            // Every member's error overflowed: the last member (persistence, or the
            // autoregression without lags) alone.
            w[members - 1] = 1.0;
        }
        w
    }
}

// The minimiser of `wᵀSw` with `Σ w = 1` on one support is `S_T⁻¹1 / 1ᵀS_T⁻¹1`, of value
// `1 / 1ᵀS_T⁻¹1`; each function below gives it, and its value, when S_T is positive definite
// and every weight positive (else the minimum over the simplex lies on a smaller support).

fn single(s: &[[f64; MEMBERS]; MEMBERS], i: usize) -> Option<([f64; MEMBERS], f64)> {
    let a = s[i][i];
    if !(a > 0.0 && a.is_finite()) {
        return None;
    }
    let mut w = [0.0; MEMBERS];
    w[i] = 1.0;
    Some((w, a))
}

fn pair(s: &[[f64; MEMBERS]; MEMBERS], i: usize, j: usize) -> Option<([f64; MEMBERS], f64)> {
    let (a, b, d) = (s[i][i], s[i][j], s[j][j]);
    let det = a * d - b * b;
    // S_T⁻¹1 = (d − b, a − b) / det.
    let (ui, uj) = (d - b, a - b);
    let total = ui + uj;
    if !(det > 0.0 && det.is_finite() && ui > 0.0 && uj > 0.0 && total.is_finite()) {
        return None;
    }
    let mut w = [0.0; MEMBERS];
    (w[i], w[j]) = (ui / total, uj / total);
    Some((w, det / total))
}

fn triple(s: &[[f64; MEMBERS]; MEMBERS]) -> Option<([f64; MEMBERS], f64)> {
    // S⁻¹1 = adj(S)·1 / det(S), the adjugate's rows summed.
    let cof = |r: usize, c: usize| {
        let (r1, r2) = ((r + 1) % 3, (r + 2) % 3);
        let (c1, c2) = ((c + 1) % 3, (c + 2) % 3);
        s[r1][c1] * s[r2][c2] - s[r1][c2] * s[r2][c1]
    };
    let det = s[0][0] * cof(0, 0) + s[0][1] * cof(0, 1) + s[0][2] * cof(0, 2);
    let mut u = [0.0; MEMBERS];
    for (i, ui) in u.iter_mut().enumerate() {
        *ui = cof(0, i) + cof(1, i) + cof(2, i);
    }
    let total = u[0] + u[1] + u[2];
    if !(det > 0.0 && det.is_finite() && total.is_finite() && u.iter().all(|&v| v > 0.0)) {
        return None;
    }
    Some((u.map(|v| v / total), det / total))
}

/// What of a mixture evolves, besides its ensemble (a snapshot holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureState {
    pub ar: ArState,
    /// The moments of the members' 1-step errors (their predictions').
    pub errors: ErrorMoments,
    /// The moments of the members' h-step errors, h = 2..=horizon (one each).
    pub ahead: Vec<ErrorMoments>,
    /// Each member's forecast path at the last `horizon` origins, a ring indexed by origin
    /// number modulo `horizon` (`horizon × MEMBERS × horizon × m`), kept until scored.
    pub paths: Vec<f64>,
    /// Paths kept so far.
    pub origins: u64,
}

impl MixtureState {
    /// The state of a mixture that has seen nothing (`inputs`: the length of the cell's input
    /// vector; `horizon`: the steps its forecasts are scored at).
    pub fn new(inputs: usize, outputs: usize, horizon: usize) -> Self {
        MixtureState {
            ar: RlsAr::new(inputs, outputs).state(),
            errors: ErrorMoments::default(),
            ahead: vec![ErrorMoments::default(); horizon.saturating_sub(1)],
            paths: vec![0.0; horizon * MEMBERS * horizon * outputs],
            origins: 0,
        }
    }
}

/// The weights and the autoregression's coefficients at one moment: what a forecast needs to
/// roll the mixture out.
#[derive(Debug, Clone, PartialEq)]
pub struct MixtureForecast {
    /// Per step ahead (1, 2, …, horizon); steps beyond take the last.
    pub weights: Vec<[f64; 3]>,
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
    errors: ErrorMoments,
    horizon: usize,
    outputs: usize,
    ahead: Vec<ErrorMoments>,
    /// The weights of steps 2..=horizon ahead from `ahead` (recomputed as they are scored).
    ahead_weights: Vec<[f64; MEMBERS]>,
    kept: Vec<f64>,
    origins: u64,
    // Scratch: each member's prediction and then error (3 × m), and path (3 × horizon × m).
    preds: Vec<f64>,
    paths: Vec<f64>,
}

impl Mixture {
    /// `inputs`: the length of the cell's input vector `z`; `lags`: whether it starts with the
    /// outputs' last values; `horizon`: the steps ahead whose weights it learns.
    pub fn new(
        ensemble: AnyEnsemble,
        inputs: usize,
        outputs: usize,
        lags: bool,
        combine: bool,
        horizon: usize,
    ) -> Self {
        let fresh = MixtureState::new(inputs, outputs, horizon);
        Mixture {
            ensemble,
            ar: RlsAr::new(inputs, outputs),
            combine,
            has_lags: lags,
            errors: ErrorMoments::default(),
            horizon,
            outputs,
            ahead_weights: vec![[0.0; MEMBERS]; fresh.ahead.len()],
            ahead: fresh.ahead,
            kept: fresh.paths,
            origins: 0,
            preds: vec![0.0; MEMBERS * outputs],
            paths: Vec::new(),
        }
    }

    pub fn state(&self) -> MixtureState {
        MixtureState {
            ar: self.ar.state(),
            errors: self.errors,
            ahead: self.ahead.clone(),
            paths: self.kept.clone(),
            origins: self.origins,
        }
    }

    pub fn set_state(&mut self, s: MixtureState) -> Result<(), String> {
        let (h, m) = (self.horizon, self.outputs);
        if s.ahead.len() != h.saturating_sub(1) || s.paths.len() != h * MEMBERS * h * m {
            return Err("the mixture's state does not fit its horizon and outputs".into());
        }
        self.ar.set_state(s.ar)?;
        self.errors = s.errors;
        self.ahead = s.ahead;
        self.kept = s.paths;
        self.origins = s.origins;
        for i in 0..self.ahead.len() {
            self.ahead_weights[i] = self.ahead[i].weights(self.members());
        }
        Ok(())
    }

    /// The bytes of the per-step state of a mixture of this shape (its kept paths, per-step
    /// moments and weights), for the memory budget.
    pub fn bytes(horizon: usize, outputs: usize) -> usize {
        horizon * MEMBERS * horizon * outputs * std::mem::size_of::<f64>()
            + horizon
                * (std::mem::size_of::<ErrorMoments>() + std::mem::size_of::<[f64; MEMBERS]>())
    }

    /// The weights of step `step` ahead (1-based) given step 1's: each step's own from its
    /// members' errors that many steps ahead, persistence's before its first scored forecast
    /// (a member right one step ahead may still be explosive when rolled out); beyond the
    /// horizon, the last step's.
    fn weights_at(&self, step: usize, first: &[f64; MEMBERS]) -> [f64; MEMBERS] {
        if !self.combine || step <= 1 || self.ahead.is_empty() {
            return *first;
        }
        let i = (step - 2).min(self.ahead.len() - 1);
        if self.ahead[i].scored == 0 {
            self.unscored()
        } else {
            self.ahead_weights[i]
        }
    }

    /// Scores `y` (scaled units) against every kept path that forecast it 2 or more steps
    /// ahead, and updates those steps' weights. Call once per predicted observation, before the
    /// next path is kept.
    pub fn observe_paths(&mut self, y: &[f64]) {
        if !self.combine {
            return;
        }
        let (hz, m) = (self.horizon, self.outputs);
        let used = self.members() * m;
        for h in 2..=hz.min(self.origins as usize) {
            let slot = ((self.origins - h as u64) % hz as u64) as usize;
            let path = &self.kept[slot * MEMBERS * hz * m..(slot + 1) * MEMBERS * hz * m];
            for k in 0..MEMBERS {
                for o in 0..m {
                    let i = k * m + o;
                    self.preds[i] = if i < used {
                        path[k * hz * m + (h - 1) * m + o] - y[o]
                    } else {
                        0.0
                    };
                }
            }
            self.ahead[h - 2].add(&self.preds, m);
            self.ahead_weights[h - 2] = self.ahead[h - 2].weights(self.members());
        }
    }

    /// Keeps the members' paths of the last [`Forecaster::forecast_path`] (of `horizon` steps)
    /// until the observations they forecast arrive.
    pub fn keep_paths(&mut self) {
        let (hz, m) = (self.horizon, self.outputs);
        let n = hz * m;
        if !self.combine || hz == 0 || self.paths.len() != MEMBERS * n {
            return;
        }
        let slot = (self.origins % hz as u64) as usize;
        self.kept[slot * MEMBERS * n..(slot + 1) * MEMBERS * n].copy_from_slice(&self.paths);
        self.origins += 1;
    }

    /// The members' weights now (the ensemble's is 1 when the mixture does not combine).
    pub fn weights(&self) -> [f64; 3] {
        if !self.combine {
            return [1.0, 0.0, 0.0];
        }
        if self.errors.scored == 0 {
            return self.unscored();
        }
        self.errors.weights(self.members())
    }

    /// The weights of a step whose forecasts have not been scored yet: persistence, or (without
    /// lags) an even split.
    fn unscored(&self) -> [f64; MEMBERS] {
        let mut w = [0.0; MEMBERS];
        if self.has_lags {
            w[MEMBERS - 1] = 1.0;
        } else {
            let members = self.members();
            w[..members].fill(1.0 / members as f64);
        }
        w
    }

    /// The members this stream has: persistence only with lags.
    fn members(&self) -> usize {
        if self.has_lags { MEMBERS } else { MEMBERS - 1 }
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
        let first = self.weights();
        MixtureForecast {
            weights: (1..=self.horizon.max(1))
                .map(|h| self.weights_at(h, &first))
                .collect(),
            ar: self.ar.coefficients().to_vec(),
        }
    }
}

impl MixtureForecast {
    /// The weights of step `step` ahead (1-based); beyond the horizon, the last step's.
    pub fn weights_at(&self, step: usize) -> &[f64; 3] {
        &self.weights[(step.max(1) - 1).min(self.weights.len() - 1)]
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
        // The errors in place of the predictions; a member the stream lacks errs by nothing.
        let used = self.members() * m;
        for (k, e) in self.preds[..used].iter_mut().enumerate() {
            *e -= y[k % m];
        }
        self.preds[used..].fill(0.0);
        self.errors.add(&self.preds, m);
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
    fn observe_paths(&mut self, y: &[f64]) {
        Mixture::observe_paths(self, y);
    }

    fn keep_paths(&mut self) {
        Mixture::keep_paths(self);
    }

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
        let m = self.outputs;
        for (i, v) in out.iter_mut().enumerate() {
            let w = self.weights_at(i / m + 1, &weights);
            *v = combine(&w, &self.paths, n, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moments from a few rounds of given error vectors (one value per member, one output).
    fn moments(rounds: &[[f64; MEMBERS]]) -> ErrorMoments {
        let mut s = ErrorMoments::default();
        for e in rounds {
            s.add(e, 1);
        }
        s
    }

    fn value(s: &ErrorMoments, w: &[f64; MEMBERS], members: usize) -> f64 {
        let mut v = 0.0;
        for i in 0..members {
            for j in 0..members {
                v += w[i] * w[j] * s.at(i, j);
            }
        }
        v
    }

    #[test]
    fn members_that_err_alike_leave_the_best_alone() {
        // Every error is the same sign and shape, member 1 smallest: a blend only adds error.
        let rounds: Vec<[f64; 3]> = (0..50)
            .map(|t| {
                let e = (t as f64 * 0.7).sin();
                [3.0 * e, e, 2.0 * e]
            })
            .collect();
        let w = moments(&rounds).weights(3);
        assert!(w[1] > 0.999, "{w:?}");
    }

    #[test]
    fn errors_that_cancel_are_blended() {
        // Members 0 and 1 err by opposite amounts: their even blend is perfect.
        let rounds: Vec<[f64; 3]> = (0..50)
            .map(|t| {
                let e = (t as f64 * 0.7).sin();
                [e, -e, 0.5 + e]
            })
            .collect();
        let w = moments(&rounds).weights(3);
        // (The ridge leaves the third a trace.)
        assert!((w[0] - 0.5).abs() < 0.01, "{w:?}");
        assert!((w[1] - 0.5).abs() < 0.01, "{w:?}");
        assert!(w[2] < 0.01, "{w:?}");
    }

    #[test]
    fn the_weights_are_the_least_error_on_the_simplex() {
        // Against a fine grid over the simplex, on pseudo-random correlated errors.
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for case in 0..50 {
            let (a, b) = (next() * 2.0, next() * 2.0);
            let rounds: Vec<[f64; 3]> = (0..40)
                .map(|_| {
                    let (u, v, w) = (next(), next(), next());
                    [u, a * u + 0.3 * v, b * v + 0.2 * w + 0.1 * u]
                })
                .collect();
            let s = moments(&rounds);
            let members = 2 + case % 2;
            let w = s.weights(members);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
            assert!(w.iter().all(|&v| v >= 0.0), "{w:?}");
            assert!(w[members..].iter().all(|&v| v == 0.0), "{w:?}");
            let ridge = RIDGE * (0..members).map(|i| s.squared[i]).sum::<f64>() / members as f64;
            let with_ridge =
                |w: &[f64; 3]| value(&s, w, members) + ridge * w.iter().map(|v| v * v).sum::<f64>();
            let got = with_ridge(&w);
            let n = 200;
            for i in 0..=n {
                for j in 0..=(n - i) {
                    let mut g = [i as f64 / n as f64, j as f64 / n as f64, 0.0];
                    if members == 3 {
                        g[2] = 1.0 - g[0] - g[1];
                    } else if i + j != n {
                        continue;
                    }
                    assert!(
                        got <= with_ridge(&g) + 1e-12,
                        "case {case}: {w:?} worse than {g:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_member_whose_error_overflowed_gets_no_weight() {
        let mut s = moments(&[[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]);
        s.squared[0] = f64::INFINITY;
        let w = s.weights(3);
        assert_eq!(w[0], 0.0);
        assert!((w[1] + w[2] - 1.0).abs() < 1e-12);
        s.squared = [f64::INFINITY; 3];
        assert_eq!(s.weights(3), [0.0, 0.0, 1.0]);
    }
}
