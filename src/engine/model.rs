//! A forecasting model as a stream sees it: the lag buffer that turns observations into the
//! cell's inputs, the scaling between the user's units and the model's, and a [`Learner`]
//! (EKI ensemble, OGD or persistence) behind one interface. `ekid eval` and the daemon both go
//! through [`OnlineModel::observe`], so they produce the same predictions bit for bit.

use serde::{Deserialize, Serialize};

use crate::engine::rollout::RollOut;

/// A one-step-ahead learner working in scaled units.
pub trait Learner {
    /// Predicts `y` from inputs `z` into `pred`, then learns from `y` (test, then train).
    fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]);
    /// Predicts from `z` with frozen parameters, advancing only the recurrent state.
    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]);
    /// Forgets the recurrent state (not the parameters): the start of a new pass.
    fn reset_state(&mut self);
}

/// A learner that can roll its point forecast forward from where it stands, so that the
/// errors of its multi-step forecasts can calibrate intervals ([`crate::engine::Calibrator`]).
pub trait Forecaster: Learner {
    /// The forecast of the next `out.len() / m` steps made now, after the last step: the
    /// learner's own predictions fed back as lags (starting from the lag buffer `lags`), the
    /// exogenous inputs held at `x`. Changes nothing its predictions depend on; `roll` is the
    /// caller's scratch (no allocation once warm).
    fn forecast_path(&mut self, lags: &LagBuffer, x: &[f64], out: &mut [f64], roll: &mut RollOut);

    /// Scores the forecasts of earlier calibration paths against `y` (scaled units), for a
    /// forecaster that learns from its own multi-step errors.
    fn observe_paths(&mut self, _y: &[f64]) {}

    /// Keeps what the last [`Forecaster::forecast_path`] (a calibration path) forecast, for
    /// [`Forecaster::observe_paths`] to score.
    fn keep_paths(&mut self) {}
}

/// Predicts the previous value (needs `lags ≥ 1`: the first `outputs` inputs are `y_{t−1}`).
#[derive(Debug, Clone, Default)]
pub struct Persistence;

impl Learner for Persistence {
    fn step(&mut self, z: &[f64], _y: &[f64], pred: &mut [f64]) {
        self.predict_frozen(z, pred);
    }
    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        let m = pred.len();
        pred.copy_from_slice(&z[..m]);
    }
    fn reset_state(&mut self) {}
}

impl Forecaster for Persistence {
    fn forecast_path(&mut self, lags: &LagBuffer, _x: &[f64], out: &mut [f64], _: &mut RollOut) {
        let last = &lags.values()[..lags.outputs.min(lags.values().len())];
        if last.is_empty() {
            return;
        }
        for o in out.chunks_exact_mut(last.len()) {
            o.copy_from_slice(last);
        }
    }
}

/// The last `lags` observations, newest first, as the cell's autoregressive inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LagBuffer {
    lags: usize,
    outputs: usize,
    /// `lags × outputs`, newest first.
    values: Vec<f64>,
    filled: usize,
}

impl LagBuffer {
    pub fn new(lags: usize, outputs: usize) -> Self {
        Self {
            lags,
            outputs,
            values: vec![0.0; lags * outputs],
            filled: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.filled >= self.lags
    }

    pub fn values(&self) -> &[f64] {
        &self.values
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Pushes `y` as the newest value (a shift of `lags·outputs` doubles, no allocation).
    pub fn push(&mut self, y: &[f64]) {
        let m = self.outputs;
        if self.lags == 0 {
            return;
        }
        self.values.copy_within(0..(self.lags - 1) * m, m);
        self.values[..m].copy_from_slice(y);
        self.filled = (self.filled + 1).min(self.lags);
    }

    pub fn clear(&mut self) {
        self.values.fill(0.0);
        self.filled = 0;
    }
}

/// Lag buffer + learner, in scaled units. Owns the input vector `z = [lags; x]`.
#[derive(Debug, Clone)]
pub struct OnlineModel<L> {
    pub learner: L,
    lags: LagBuffer,
    inputs: usize,
    z: Vec<f64>,
}

impl<L: Learner> OnlineModel<L> {
    pub fn new(learner: L, lags: usize, inputs: usize, outputs: usize) -> Self {
        Self {
            learner,
            lags: LagBuffer::new(lags, outputs),
            inputs,
            z: vec![0.0; lags * outputs + inputs],
        }
    }

    fn load(&mut self, x: &[f64]) {
        let nl = self.lags.values().len();
        self.z[..nl].copy_from_slice(self.lags.values());
        self.z[nl..nl + self.inputs].copy_from_slice(x);
    }

    /// Test, then train. Returns whether a prediction was made (false while the lag buffer
    /// fills; the observation then only enters the buffer).
    pub fn observe(&mut self, x: &[f64], y: &[f64], pred: &mut [f64]) -> bool {
        let ready = self.lags.is_full();
        if ready {
            self.load(x);
            self.learner.step(&self.z, y, pred);
        }
        self.lags.push(y);
        ready
    }

    /// Predicts with frozen parameters, then pushes the true `y` into the lag buffer.
    pub fn observe_frozen(&mut self, x: &[f64], y: &[f64], pred: &mut [f64]) -> bool {
        let ready = self.lags.is_full();
        if ready {
            self.load(x);
            self.learner.predict_frozen(&self.z, pred);
        }
        self.lags.push(y);
        ready
    }

    /// The lag buffer (newest first) and whether it is full.
    pub fn lags(&self) -> &LagBuffer {
        &self.lags
    }

    /// Rebuilds a model from a learner and a saved lag buffer.
    pub fn with_lags(learner: L, lags: LagBuffer, inputs: usize) -> Self {
        let n = lags.values().len() + inputs;
        Self {
            learner,
            lags,
            inputs,
            z: vec![0.0; n],
        }
    }

    /// The same model with its learner transformed (e.g. to predict with one particle).
    pub fn map_learner<M>(self, f: impl FnOnce(L) -> M) -> OnlineModel<M> {
        OnlineModel {
            learner: f(self.learner),
            lags: self.lags,
            inputs: self.inputs,
            z: self.z,
        }
    }

    /// The learner's forecast of the next `out.len() / m` steps from here, inputs held at `x`.
    pub fn forecast_path(&mut self, x: &[f64], out: &mut [f64], roll: &mut RollOut)
    where
        L: Forecaster,
    {
        self.learner.forecast_path(&self.lags, x, out, roll);
    }

    /// Starts a new pass over a series: empty lag buffer, fresh recurrent state.
    pub fn reset_state(&mut self) {
        self.lags.clear();
        self.learner.reset_state();
    }
}

/// Maps the user's units to the model's `[0, 1]` range and back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    pub min: f64,
    pub max: f64,
}

impl Scaler {
    pub fn new(min: f64, max: f64) -> Self {
        Self { min, max }
    }
    /// Over a series; a constant series maps to 0 with unit width so nothing divides by zero.
    pub fn fit(values: &[f64]) -> Self {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !(min.is_finite() && max.is_finite()) || max <= min {
            let min = if min.is_finite() { min } else { 0.0 };
            return Self {
                min,
                max: min + 1.0,
            };
        }
        Self { min, max }
    }
    /// One model unit in the user's units.
    #[inline]
    pub fn width(&self) -> f64 {
        self.max - self.min
    }
    #[inline]
    pub fn to_model(&self, v: f64) -> f64 {
        (v - self.min) / (self.max - self.min)
    }
    #[inline]
    pub fn to_user(&self, v: f64) -> f64 {
        v * (self.max - self.min) + self.min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_buffer_keeps_newest_first() {
        let mut b = LagBuffer::new(3, 1);
        for v in [1.0, 2.0] {
            b.push(&[v]);
        }
        assert!(!b.is_full());
        b.push(&[3.0]);
        b.push(&[4.0]);
        assert!(b.is_full());
        assert_eq!(b.values(), &[4.0, 3.0, 2.0]);
    }

    #[test]
    fn first_lags_observations_only_fill_the_buffer() {
        let mut m = OnlineModel::new(Persistence, 2, 0, 1);
        let mut p = [0.0];
        assert!(!m.observe(&[], &[1.0], &mut p));
        assert!(!m.observe(&[], &[2.0], &mut p));
        assert!(m.observe(&[], &[3.0], &mut p));
        assert_eq!(p, [2.0]);
    }

    #[test]
    fn scaler_round_trips() {
        let s = Scaler::fit(&[2.0, 6.0, 4.0]);
        assert_eq!(s.to_model(4.0), 0.5);
        assert_eq!(s.to_user(0.5), 4.0);
        let c = Scaler::fit(&[3.0, 3.0]);
        assert_eq!(c.to_model(3.0), 0.0);
    }
}
