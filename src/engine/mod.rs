//! The numerical engine: one stream's learning state and everything it computes, with no I/O,
//! no clock and no threads but the step pool it declares (`on_pool`).
//!
//! - [`Options`]: what a stream is (raw options checked into validated ones);
//! - [`Ensemble`] / [`AnyEnsemble`]: the EKI ensemble of recurrent networks and its step
//!   (`network` is one particle's forward, `prior` the initial draw, `update` the output-space
//!   Kalman/flow algebra, `real` the storage precision);
//! - [`OnlineModel`] and the [`Learner`]s (the ensemble, [`Ogd`], [`RlsAr`], [`Persistence`]): the
//!   test-then-train loop with its lag buffer and [`Scaler`];
//! - [`Stream`]: a stream's whole state (plan a batch, then apply it) and its statistics;
//! - [`ForecastState`]: the immutable copy a forecast rolls out;
//! - [`Calibrator`]: the online calibration of a stream's forecast intervals.

mod ar;
mod calibration;
mod ensemble;
mod forecast;
mod mixture;
mod model;
mod network;
mod ogd;
mod options;
mod prior;
mod real;
mod rollout;
mod stream;
mod update;

pub use ar::{ArState, RlsAr};
pub use calibration::{
    Calibration, Calibrator, CalibratorV4, Coverage, REPORT_LEVELS, StepDistribution, TAUS,
};
pub use ensemble::{
    AnyEnsemble, Ensemble, EnsembleState, Footprint, ParticleBuf, StepReport, on_pool,
    parallel_min_work,
};
pub use forecast::{ForecastState, ForecastStep, Interval, interval_particles, normal_quantile};
pub use mixture::{ErrorMoments, Mixture, MixtureForecast, MixtureState};
pub use model::{Forecaster, LagBuffer, Learner, OnlineModel, Persistence, Scaler};
pub use network::Layout;
pub use ogd::Ogd;
pub use options::json_text as options_json_text;
pub use options::{
    Auto, Cell, Loss, Method, Off, Options, OptionsError, Range, RawOptions, ScaleOption, Spread,
    SpreadOption, Step,
};
pub use prior::Prior;
pub use real::{Param, Precision, Real};
pub use rollout::{FutureInputs, ROLL_OUT_BOUND, RollOut};
pub use stream::{
    Applied, BatchError, Observation, Plan, PlanCursor, Stats, Stream, StreamState, calibrate,
    forecaster,
};
