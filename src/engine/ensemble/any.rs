//! A stream's ensemble in the precision its options name: one type for the stream, `ekid eval`
//! and snapshots, dispatching to [`Ensemble<f64>`] or [`Ensemble<f32>`].

use super::{Ensemble, EnsembleState, Footprint, StepReport, widen};
use crate::engine::model::{Forecaster, LagBuffer, Learner};
use crate::engine::network::Layout;
use crate::engine::options::Options;
use crate::engine::real::{Precision, Real};
use crate::engine::rollout::RollOut;

#[derive(Debug, Clone)]
pub enum AnyEnsemble {
    F64(Ensemble<f64>),
    F32(Ensemble<f32>),
}

/// Runs `$body` with `$e` bound to the ensemble, whichever precision it has.
macro_rules! each {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            AnyEnsemble::F64($e) => $body,
            AnyEnsemble::F32($e) => $body,
        }
    };
}

/// The values of one particle-sized slice, widened to `f64` (exact).
fn extend_f64<T: Real>(out: &mut Vec<f64>, v: &[T]) {
    out.extend(v.iter().map(|x| x.to_f64()));
}

impl AnyEnsemble {
    pub fn new(options: &Options) -> Self {
        match options.precision {
            Precision::F64 => AnyEnsemble::F64(Ensemble::new(options)),
            Precision::F32 => AnyEnsemble::F32(Ensemble::new(options)),
        }
    }

    /// [`Ensemble::footprint`] for the precision the options name.
    pub fn footprint(options: &Options) -> Footprint {
        match options.precision {
            Precision::F64 => Ensemble::<f64>::footprint(options),
            Precision::F32 => Ensemble::<f32>::footprint(options),
        }
    }

    pub fn from_state(options: &Options, state: EnsembleState) -> Result<Self, String> {
        Ok(match options.precision {
            Precision::F64 => AnyEnsemble::F64(Ensemble::from_state(options, state)?),
            Precision::F32 => AnyEnsemble::F32(Ensemble::from_state(options, state)?),
        })
    }

    pub fn state(&self) -> EnsembleState {
        each!(self, e => e.state())
    }
    pub fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) -> StepReport {
        each!(self, e => e.step(z, y, pred))
    }
    pub fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        each!(self, e => e.predict_frozen(z, pred))
    }
    pub fn predict_particle_frozen(&mut self, j: usize, z: &[f64], pred: &mut [f64]) {
        each!(self, e => e.predict_particle_frozen(j, z, pred))
    }
    pub fn reset_hidden(&mut self) {
        each!(self, e => e.reset_hidden())
    }
    pub fn reset_particle_errors(&mut self) {
        each!(self, e => e.reset_particle_errors())
    }
    pub fn best_particle(&self) -> usize {
        each!(self, e => e.best_particle())
    }
    pub fn set_threads(&mut self, threads: usize) {
        each!(self, e => e.set_threads(threads))
    }
    pub fn is_parallel(&self) -> bool {
        each!(self, e => e.is_parallel())
    }
    pub fn repaired(&self) -> u64 {
        each!(self, e => e.repaired())
    }
    pub fn prediction_variance(&self) -> f64 {
        each!(self, e => e.prediction_variance())
    }
    pub fn prediction_variance_of(&self, o: usize) -> f64 {
        each!(self, e => e.prediction_variance_of(o))
    }
    pub fn size(&self) -> usize {
        each!(self, e => e.size())
    }
    pub fn dim(&self) -> usize {
        each!(self, e => e.dim())
    }
    pub fn layout(&self) -> &Layout {
        each!(self, e => e.layout())
    }

    /// Appends particle `j`'s parameters and hidden state, as `f64`.
    pub fn copy_particle(&self, j: usize, params: &mut Vec<f64>, hidden: &mut Vec<f64>) {
        each!(self, e => {
            let (u0, u1) = e.particle_parts(j);
            extend_f64(params, u0);
            extend_f64(params, u1);
            extend_f64(hidden, e.hidden(j));
        })
    }

    /// The mean particle and its hidden state, as `f64`.
    pub fn mean_f64(&self) -> (Vec<f64>, Vec<f64>) {
        each!(self, e => (widen(e.mean()), widen(e.mean_hidden())))
    }
}

/// The mean particle's forecast, as a forecast of the stream rolls it out.
impl Forecaster for AnyEnsemble {
    fn forecast_path(&mut self, lags: &LagBuffer, x: &[f64], out: &mut [f64], roll: &mut RollOut) {
        each!(self, e => roll.path(e.layout(), e.mean(), e.mean_hidden(), lags.values(), x, out))
    }
}

/// The ensemble as `OnlineModel` drives it, whatever its precision.
impl Learner for AnyEnsemble {
    fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) {
        AnyEnsemble::step(self, z, y, pred);
    }
    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        AnyEnsemble::predict_frozen(self, z, pred);
    }
    fn reset_state(&mut self) {
        self.reset_hidden();
    }
}
