//! Rolling a forecaster out: a network (or a linear autoregression) fed its own outputs as
//! lags for a number of steps, with the scratch that keeps it allocation-free.

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::engine::network::{self, Layout};
use crate::engine::real::{Param, Real};

/// How far a roll-out may stray, in the model's scaled units (the training range is [0, 1]):
/// a trillion ranges, beyond any forecast worth reading, and far enough below `f64::MAX` that
/// squares of a thousand steps' differences stay finite in user units of any sane scale.
pub const ROLL_OUT_BOUND: f64 = 1e12;

/// The exogenous inputs of a roll-out's steps (model units).
#[derive(Debug, Clone, Copy)]
pub enum FutureInputs<'a> {
    /// `horizon × inputs` values, one row per step (what a forecast request supplies).
    PerStep(&'a [f64]),
    /// The last observed inputs, held for every step (what calibration assumes: the future
    /// inputs are not known when the forecast it scores is made).
    Held(&'a [f64]),
}

impl FutureInputs<'_> {
    pub fn at(&self, step: usize, inputs: usize) -> &[f64] {
        match *self {
            FutureInputs::PerStep(x) => &x[step * inputs..(step + 1) * inputs],
            FutureInputs::Held(x) => x,
        }
    }
}

/// The scratch of a roll-out (copies of the recurrent state and the lags, the cell's input
/// vector), kept by its owner so that rolling out allocates nothing once warm.
#[derive(Debug, Clone, Default)]
pub struct RollOut {
    hidden: Vec<f64>,
    lag_values: Vec<f64>,
    z: Vec<f64>,
    row: Vec<f64>,
}

fn refill(v: &mut Vec<f64>, from: &[f64]) {
    v.clear();
    v.extend_from_slice(from);
}

impl RollOut {
    /// A working copy of `lag_values` for a roll-out that feeds its own outputs back.
    pub fn lags_scratch(&mut self, lag_values: &[f64]) -> &mut [f64] {
        refill(&mut self.lag_values, lag_values);
        &mut self.lag_values
    }

    /// The point forecast of one network (its parameters and recurrent state in any precision,
    /// computed in `f64` as forecasts are) for `out.len() / m` steps, inputs held at `x`: what
    /// the calibration of a stream's intervals scores.
    pub fn path<T: Real + Param<f64>>(
        &mut self,
        layout: &Layout,
        params: &[T],
        hidden: &[T],
        lag_values: &[f64],
        x: &[f64],
        out: &mut [f64],
    ) {
        // The network's own parameters, widened as they are read: no copy per observation.
        let lags = lag_values.len() / layout.outputs.max(1);
        self.run(
            layout,
            lags,
            params,
            hidden,
            lag_values,
            FutureInputs::Held(x),
            None,
            out,
            &mut || true,
        );
    }

    /// One network rolled forward from `hidden` and `lag_values` (neither changed) feeding back
    /// its own outputs (plus noise, when given), writing the scaled outputs of each step into
    /// `out` (`horizon × m`). Asks `keep_going` before every step and stops (returning false)
    /// when it says no.
    #[allow(clippy::too_many_arguments)]
    pub fn run<P: Param<f64>>(
        &mut self,
        layout: &Layout,
        lags: usize,
        params: &[P],
        hidden: &[P],
        lag_values: &[f64],
        future_x: FutureInputs,
        mut noise: Option<(f64, &mut ChaCha8Rng)>,
        out: &mut [f64],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> bool {
        let m = layout.outputs;
        let nl = lags * m;
        let ni = layout.n_in - nl;
        self.hidden.clear();
        self.hidden.extend(hidden.iter().map(|h| h.widen()));
        refill(&mut self.lag_values, lag_values);
        self.z.resize(layout.n_in, 0.0);
        self.row.resize(layout.row(), 0.0);
        for (s, o) in out.chunks_exact_mut(m).enumerate() {
            if !keep_going() {
                return false;
            }
            self.z[..nl].copy_from_slice(&self.lag_values);
            self.z[nl..].copy_from_slice(future_x.at(s, ni));
            network::load_inputs(layout, &mut self.row, &self.z);
            network::step(layout, params, &mut self.hidden, &mut self.row, o);
            if let Some((sd, rng)) = noise.as_mut() {
                for v in o.iter_mut() {
                    let e: f64 = StandardNormal.sample(*rng);
                    *v += *sd * e;
                }
            }
            // An explosive model (its skip from the lags has a root beyond the unit circle) grows
            // geometrically over long horizons; held within ±ROLL_OUT_BOUND it stays finite, and
            // so do the interval's sums, where it would overflow to infinity and then NaN.
            // (NaN cannot come from finite parameters and inputs; stay total anyway.)
            for v in o.iter_mut() {
                *v = if v.is_nan() {
                    0.0
                } else {
                    v.clamp(-ROLL_OUT_BOUND, ROLL_OUT_BOUND)
                };
            }
            if lags > 0 {
                self.lag_values.copy_within(0..(lags - 1) * m, m);
                self.lag_values[..m].copy_from_slice(o);
            }
        }
        true
    }
}
