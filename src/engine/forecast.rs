//! Multi-step forecasts: the mean particle rolled out autoregressively for the point forecast,
//! and a predictive interval from a fixed subset of particles rolled out with the estimated
//! observation noise injected (so parameter spread and noise both widen it with the horizon).
//!
//! A [`ForecastState`] is an immutable copy of what a forecast needs, published by the stream's
//! owner after each batch, so forecasts never wait behind updates. The noise draws come from a
//! ChaCha RNG seeded by (stream seed, last seq): the same state gives the same forecast.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::engine::ar::ar_path;
use crate::engine::calibration::Calibration;
use crate::engine::mixture::{MixtureForecast, combine};
use crate::engine::model::Scaler;
use crate::engine::network::Layout;
use crate::engine::rollout::{FutureInputs, RollOut};

/// Particles used for the interval (evenly spaced through the ensemble): a quarter of the
/// ensemble, at least 8 (or all of a smaller one) and at most 64. The forecast state is copied
/// at every publish, so this bounds that copy to J·d/4 (and a stream's memory to about 1.25×
/// its ensemble) while 8–64 noisy roll-outs still estimate a spread.
pub fn interval_particles(ensemble: usize) -> usize {
    (ensemble / 4).clamp(8.min(ensemble), 64)
}

#[derive(Debug, Clone)]
pub struct ForecastState {
    pub layout: Layout,
    pub lags: usize,
    pub inputs: usize,
    pub mean: Vec<f64>,
    pub mean_hidden: Vec<f64>,
    /// `K×d` and `K×hidden`.
    pub particles: Vec<f64>,
    pub hidden: Vec<f64>,
    /// Scaled past values, newest first (`lags × outputs`).
    pub lag_values: Vec<f64>,
    pub y_scale: Vec<Scaler>,
    pub x_scale: Vec<Scaler>,
    /// Estimated one-step noise variance, scaled units.
    pub noise_var: f64,
    pub seed: u64,
    pub seq: u64,
    /// The stream's calibrated intervals; `None` until it has forecast errors to calibrate on
    /// (the particles then give the interval).
    pub calibration: Option<Calibration>,
    /// The weights and autoregression of the stream's mixture, when it combines its members.
    pub mixture: Option<MixtureForecast>,
}

impl ForecastState {
    /// The bytes of the state [`crate::engine::stream::Stream::forecast_state`] builds for these options
    /// (the mean and [`interval_particles`] particles with their hidden states, the lag values,
    /// the calibration's quantiles and scales, the mixture's autoregression and per-step weights), for the memory
    /// budget. Keep it next to the fields it counts.
    pub fn bytes(options: &crate::engine::options::Options) -> usize {
        let layout = options.layout();
        let (s, m) = (options.horizon, options.outputs);
        ((interval_particles(options.ensemble) + 1) * (layout.dim() + layout.hidden)
            + options.lags * m
            + s * m * (crate::engine::calibration::TAUS.len() + 1)
            + (layout.n_in + 1) * m
            + 3 * s)
            * std::mem::size_of::<f64>()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ForecastStep {
    pub step: usize,
    pub mean: Vec<f64>,
    /// The interval at the first requested level (repeated from `intervals`).
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
    /// One interval per requested level, in the order requested; nested (a higher level's
    /// interval contains a lower one's).
    pub intervals: Vec<Interval>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Interval {
    pub level: f64,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
}

/// The standard normal quantile Φ⁻¹(p); ±∞ outside (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal};
    if p.is_nan() || p <= 0.0 {
        f64::NEG_INFINITY
    } else if p >= 1.0 {
        f64::INFINITY
    } else {
        Normal::standard().inverse_cdf(p)
    }
}

impl ForecastState {
    /// `future_x`: `horizon × inputs` values in the user's units (empty when `inputs` is 0).
    /// Returns the steps in the user's units, with one interval per level of `levels`.
    pub fn forecast(&self, horizon: usize, levels: &[f64], future_x: &[f64]) -> Vec<ForecastStep> {
        self.forecast_while(horizon, levels, future_x, &mut || true)
            .unwrap_or_default()
    }

    /// [`ForecastState::forecast`], asking `keep_going` before each step of each roll-out
    /// (`horizon` calls once calibrated, `horizon` × (interval particles + 1) before; each step
    /// O(d)): `None` as soon as it says no. The caller decides what stops a forecast (a
    /// cancelled request) and may block in it (to share the cores); this code reads no clock
    /// and waits for nothing.
    pub fn forecast_while(
        &self,
        horizon: usize,
        levels: &[f64],
        future_x: &[f64],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Option<Vec<ForecastStep>> {
        let m = self.layout.outputs;
        let xs: Vec<f64> = future_x
            .iter()
            .enumerate()
            .map(|(i, &v)| self.x_scale[i % self.inputs.max(1)].to_model(v))
            .collect();
        let mut roll = RollOut::default();
        let mut mean_out = vec![0.0; horizon * m];
        if !roll.run(
            &self.layout,
            self.lags,
            &self.mean,
            &self.mean_hidden,
            &self.lag_values,
            FutureInputs::PerStep(&xs),
            None,
            &mut mean_out,
            keep_going,
        ) {
            return None;
        }
        if let Some(mx) = &self.mixture {
            mean_out = self.mixture_path(mx, &mean_out, &xs);
        }
        let bounds = match &self.calibration {
            Some(c) => Bounds::Calibrated(c),
            None => Bounds::Spread(
                self.spread(horizon, &xs, &mean_out, &mut roll, keep_going)?,
                m,
            ),
        };
        let steps = (0..horizon)
            .map(|s| {
                let mut step = ForecastStep {
                    step: s + 1,
                    mean: Vec::with_capacity(m),
                    lower: Vec::new(),
                    upper: Vec::new(),
                    intervals: Vec::with_capacity(levels.len()),
                };
                for o in 0..m {
                    step.mean.push(self.to_user(o, mean_out[s * m + o]));
                }
                for &level in levels {
                    let mut interval = Interval {
                        level,
                        lower: Vec::with_capacity(m),
                        upper: Vec::with_capacity(m),
                    };
                    for o in 0..m {
                        let (lo, hi) = bounds.interval(s + 1, o, level, mean_out[s * m + o]);
                        interval.lower.push(self.to_user(o, lo));
                        interval.upper.push(self.to_user(o, hi));
                    }
                    step.intervals.push(interval);
                }
                if let Some(first) = step.intervals.first() {
                    step.lower = first.lower.clone();
                    step.upper = first.upper.clone();
                }
                step
            })
            .collect();
        Some(steps)
    }

    /// The mixture's forecast: the ensemble's `path` combined, step by step, with the
    /// autoregression's and persistence's, as the stream's calibration rolls it out.
    fn mixture_path(&self, mx: &MixtureForecast, path: &[f64], xs: &[f64]) -> Vec<f64> {
        let (n, m) = (path.len(), self.layout.outputs);
        let mut members = vec![0.0; 3 * n];
        members[..n].copy_from_slice(path);
        let mut lagged = self.lag_values.clone();
        let mut phi = vec![0.0; self.layout.n_in + 1];
        ar_path(
            &mx.ar,
            m,
            &mut lagged,
            FutureInputs::PerStep(xs),
            &mut phi,
            &mut members[n..2 * n],
        );
        if self.lags > 0 {
            for o in members[2 * n..].chunks_exact_mut(m) {
                o.copy_from_slice(&self.lag_values[..m]);
            }
        }
        (0..n)
            .map(|i| combine(mx.weights_at(i / m + 1), &members, n, i))
            .collect()
    }

    /// A scaled value in the user's units of output `o`. A scale wider than ~1e296 could still
    /// overflow here: JSON has no infinity, so the bound is the largest number.
    fn to_user(&self, o: usize, v: f64) -> f64 {
        self.y_scale[o].to_user(v).clamp(-f64::MAX, f64::MAX)
    }

    /// Before the stream's intervals are calibrated: the standard deviation of the particles'
    /// noisy paths around the mean particle's (`horizon × m`), at least the noise's.
    fn spread(
        &self,
        horizon: usize,
        xs: &[f64],
        mean_out: &[f64],
        roll: &mut RollOut,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Option<Vec<f64>> {
        let m = self.layout.outputs;
        let d = self.layout.dim();
        let nh = self.layout.hidden;
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ self.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let k = self.particles.len() / d;
        let noise_sd = self.noise_var.max(0.0).sqrt();
        let mut paths = vec![0.0; k * horizon * m];
        for (i, path) in paths.chunks_exact_mut(horizon * m).enumerate() {
            if !roll.run(
                &self.layout,
                self.lags,
                &self.particles[i * d..(i + 1) * d],
                &self.hidden[i * nh..(i + 1) * nh],
                &self.lag_values,
                FutureInputs::PerStep(xs),
                Some((noise_sd, &mut rng)),
                path,
                keep_going,
            ) {
                return None;
            }
        }
        let sd = (0..horizon * m)
            .map(|i| {
                let (s, o) = (i / m, i % m);
                let centre = mean_out[i];
                // With a single particle, the noise alone.
                let var = if k > 0 {
                    paths
                        .chunks_exact(horizon * m)
                        .map(|p| (p[s * m + o] - centre).powi(2))
                        .sum::<f64>()
                        / k as f64
                } else {
                    self.noise_var * (s + 1) as f64
                };
                var.max(self.noise_var).sqrt()
            })
            .collect();
        Some(sd)
    }
}

/// Where a forecast's intervals come from.
enum Bounds<'a> {
    /// The stream's calibrated quantiles of its forecast errors.
    Calibrated(&'a Calibration),
    /// Before the first error: a normal interval from the spread of the particles' noisy
    /// roll-outs: `horizon × m` standard deviations, and `m`.
    Spread(Vec<f64>, usize),
}

impl Bounds<'_> {
    fn interval(&self, step: usize, o: usize, level: f64, centre: f64) -> (f64, f64) {
        match self {
            Bounds::Calibrated(c) => c.interval(step, o, level, centre),
            Bounds::Spread(sd, m) => {
                let half = interval_quantile(level) * sd[(step - 1) * m + o];
                (centre - half, centre + half)
            }
        }
    }
}

/// The standard normal quantile of a central interval of coverage `level` in (0, 1). From the
/// tail probability: 0.5 + level/2 rounds to 1 (an infinite quantile) for levels within 1e-16
/// of 1, while (1 − level)/2 stays positive for every level < 1.
fn interval_quantile(level: f64) -> f64 {
    -normal_quantile((1.0 - level) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state of one lag of one output, before calibration: every weight of the mean `mean`,
    /// of four particles `particle`, hidden states zero, the last value 0.5, outputs on a scale
    /// of `0..scale_max`.
    fn uncalibrated(layout: Layout, mean: f64, particle: f64, scale_max: f64) -> ForecastState {
        let (d, nh) = (layout.dim(), layout.hidden);
        ForecastState {
            layout,
            lags: 1,
            inputs: 0,
            mean: vec![mean; d],
            mean_hidden: vec![0.0; nh],
            particles: vec![particle; 4 * d],
            hidden: vec![0.0; 4 * nh],
            lag_values: vec![0.5],
            y_scale: vec![Scaler::new(0.0, scale_max)],
            x_scale: vec![],
            noise_var: 0.01,
            seed: 1,
            seq: 1,
            calibration: None,
            mixture: None,
        }
    }

    #[test]
    fn levels_next_to_one_give_finite_intervals() {
        for level in [0.9999999999999999, 1.0 - 1e-12, 0.5, 1e-300] {
            let z = interval_quantile(level);
            assert!(z.is_finite() && z >= 0.0, "{level}: {z}");
        }
    }

    #[test]
    fn an_explosive_model_forecasts_finite_numbers() {
        // Every weight 2: the output feeds back through the lag with weight 2 and doubles each
        // step, past f64::MAX by step ~1030.
        let state = uncalibrated(Layout::new(1, 1, 1), 2.0, 2.0, 1e6);
        let steps = state.forecast(2000, &[0.9], &[]);
        let last = &steps[1999];
        for v in steps
            .iter()
            .flat_map(|s| s.mean.iter().chain(&s.lower).chain(&s.upper))
        {
            assert!(v.is_finite(), "{v} in {last:?}");
        }
        assert!(
            last.mean[0] > 1e17,
            "it still says the forecast exploded: {last:?}"
        );
        assert!(
            last.lower[0] < last.mean[0] && last.mean[0] < last.upper[0],
            "an interval, not three copies of the largest number: {last:?}"
        );
    }

    #[test]
    fn a_forecast_stops_when_told_and_is_the_same_when_not() {
        // Two hidden units, one lag of one output.
        let state = uncalibrated(Layout::new(2, 1, 1), 0.1, 0.2, 1.0);
        let mut calls = 0;
        let stopped = state.forecast_while(100, &[0.9], &[], &mut || {
            calls += 1;
            calls <= 150
        });
        assert_eq!(
            (stopped, calls),
            (None, 151),
            "asked before each step, stops at once"
        );
        let mut calls = 0;
        let whole = state.forecast_while(100, &[0.9], &[], &mut || {
            calls += 1;
            true
        });
        assert_eq!(
            calls,
            100 * 5,
            "the mean and four particles, 100 steps each"
        );
        assert_eq!(whole, Some(state.forecast(100, &[0.9], &[])));
    }

    #[test]
    fn normal_quantiles() {
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_quantile(0.95) - 1.6448536269514722).abs() < 1e-8);
        assert!((normal_quantile(0.5)).abs() < 1e-12);
        assert!((normal_quantile(0.01) + 2.3263478740408408).abs() < 1e-8);
    }
}
