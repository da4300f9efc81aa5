//! The prior μ_0 the initial ensemble is drawn from, and the draws around a centre used by
//! EKI(R) re-spreading and by the repair of unhealthy particles.
//!
//! Why not independent zero-mean Glorot draws: the mean of J such networks has weights close
//! to zero, so the mean particle, which is what the product forecasts with, starts as a
//! near-constant network and the Kalman form learns slowly from there. Instead the prior is
//! centred on *one* Glorot draw `c` (biases 0) and the particles are `c + σ·s⊙ξ`, `ξ ~ N(0, I)`,
//! where `s` is each weight's Glorot scale and σ = `prior_spread`. The mean particle is then a
//! proper random network from the first observation on, and the ensemble explores around it.

use rand::Rng;
use rand_distr::StandardNormal;

use crate::network::Layout;

#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    /// The centre `c` of μ_0.
    pub centre: Vec<f64>,
    /// Per-parameter standard deviation of μ_0 around the centre (`σ·s`); 0 for frozen entries
    /// (the skip columns when the skip is off).
    pub scale: Vec<f64>,
}

impl Prior {
    pub fn new(layout: &Layout, prior_spread: f64, skip: bool, rng: &mut impl Rng) -> Self {
        let d = layout.dim();
        let k = layout.row();
        let cell_std = (2.0 / (k + layout.hidden) as f64).sqrt();
        let out_std = (2.0 / (k + layout.outputs) as f64).sqrt();
        let mut centre = vec![0.0; d];
        let mut scale = vec![0.0; d];
        for p in 0..d {
            let glorot = if p < layout.readout_offset() {
                cell_std
            } else {
                out_std
            };
            if layout.is_skip(p) && !skip {
                continue;
            }
            let z: f64 = rng.sample(StandardNormal);
            centre[p] = if layout.is_bias(p) { 0.0 } else { glorot * z };
            scale[p] = prior_spread * glorot;
        }
        Prior { centre, scale }
    }

    /// Writes `around + gamma·scale⊙ξ` into `out`.
    pub fn draw_around(&self, around: &[f64], gamma: f64, rng: &mut impl Rng, out: &mut [f64]) {
        for ((o, &c), &s) in out.iter_mut().zip(around).zip(&self.scale) {
            let z: f64 = rng.sample(StandardNormal);
            *o = c + gamma * s * z;
        }
    }
}
