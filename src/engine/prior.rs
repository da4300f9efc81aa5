//! The prior μ_0 the initial ensemble is drawn from, and the draws around a centre used by
//! EKI(R) re-spreading and by the repair of unhealthy particles.
//!
//! The cell and the read-out get different priors, for different reasons:
//!
//! - Cell weights: centred on *one* Glorot draw `c` (biases 0), particles `c + σ·s⊙ξ` with
//!   `ξ ~ N(0, I)`, `s` the Glorot scale, σ = `prior_spread` (small). Independent zero-mean
//!   Glorot draws would give a mean particle with near-zero cell weights, a near-constant
//!   network that the Kalman form learns slowly from (prequential nMSE ≈ 0.04 on the
//!   temperatures against ≈ 0.009 centred). Centred, the mean particle has a proper random
//!   feature map from the first observation on.
//! - Read-out weights (hidden → output, the linear skip, the output bias): centred at *zero* with
//!   the full Glorot scale times `readout_spread`. The output is linear in them, so the ensemble
//!   learns them like recursive least squares; a random read-out centre would only add an O(1)
//!   error that the first hundreds of observations must undo (trials on the training parts:
//!   prequential nMSE 9.5e-3 centred at zero with spread 1 against 1.28e-2 with a Glorot centre
//!   and spread 0.1, see BENCHMARKS.md).

use crate::engine::real::Real;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::engine::network::Layout;

#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    /// The centre `c` of μ_0.
    pub centre: Vec<f64>,
    /// Per-parameter standard deviation of μ_0 around the centre (`σ·s`); 0 for frozen entries
    /// (the skip columns when the skip is off).
    pub scale: Vec<f64>,
}

impl Prior {
    pub fn new(
        layout: &Layout,
        prior_spread: f64,
        readout_spread: f64,
        skip: bool,
        rng: &mut impl Rng,
    ) -> Self {
        let d = layout.dim();
        let k = layout.row();
        let cell_std = (2.0 / (k + layout.hidden) as f64).sqrt();
        let out_std = (2.0 / (k + layout.outputs) as f64).sqrt();
        let mut centre = vec![0.0; d];
        let mut scale = vec![0.0; d];
        for p in 0..d {
            if layout.is_skip(p) && !skip {
                continue;
            }
            let z: f64 = rng.sample(StandardNormal);
            if p < layout.readout_offset() {
                centre[p] = if layout.is_bias(p) { 0.0 } else { cell_std * z };
                scale[p] = prior_spread * cell_std;
            } else {
                scale[p] = readout_spread * out_std;
            }
        }
        Prior { centre, scale }
    }

    /// Writes `around + gamma·scale⊙ξ` into `out`.
    /// (Drawn in `f64` whatever the storage type, so `f32` ensembles see the same draws.)
    pub fn draw_around<A: Real, T: Real>(
        &self,
        around: &[A],
        gamma: f64,
        rng: &mut impl Rng,
        out: &mut [T],
    ) {
        for ((o, &c), &s) in out.iter_mut().zip(around).zip(&self.scale) {
            let z: f64 = rng.sample(StandardNormal);
            *o = T::from_f64(c.to_f64() + gamma * s * z);
        }
    }
}
