//! The gradient baseline: online gradient descent on the same network (one particle, the
//! prior's centre), with truncated back-propagation through time over the last `window` steps.
//!
//! At step t the truncated objective is `½‖f_θ(h_{t−K}, z_{t−K+1..t}) − y_t‖²`: the window is
//! re-run forward from the stored hidden state `h_{t−K}` with the current θ, so the gradient is
//! the exact gradient of that objective (checked against finite differences in the tests).

use crate::engine::model::{Forecaster, LagBuffer, Learner};
use crate::engine::network::{self, Layout};
use crate::engine::rollout::RollOut;

#[derive(Debug, Clone)]
pub struct Ogd {
    layout: Layout,
    params: Vec<f64>,
    lr: f64,
    clip: f64,
    window: usize,
    /// Running hidden state for predictions.
    hidden: Vec<f64>,
    /// The last `window` inputs (`window × n_in`, oldest first) and the hidden states before
    /// each of them.
    zs: Vec<f64>,
    hs: Vec<f64>,
    len: usize,
    ws: BpttWorkspace,
}

/// Buffers for one truncated back-propagation (allocated once).
#[derive(Debug, Clone)]
pub struct BpttWorkspace {
    /// `window × k`: the vectors `[h_{s−1}; z_s; 1]`.
    a: Vec<f64>,
    /// `window × hidden`: the hidden states h_s.
    h: Vec<f64>,
    grad: Vec<f64>,
    delta: Vec<f64>,
    delta_prev: Vec<f64>,
    out: Vec<f64>,
    scratch: Vec<f64>,
}

impl BpttWorkspace {
    pub fn new(layout: &Layout, window: usize) -> Self {
        let (k, nh) = (layout.row(), layout.hidden);
        Self {
            a: vec![0.0; window * k],
            h: vec![0.0; window * nh],
            grad: vec![0.0; layout.dim()],
            delta: vec![0.0; nh],
            delta_prev: vec![0.0; nh],
            out: vec![0.0; layout.outputs],
            scratch: vec![0.0; k],
        }
    }
    #[cfg(test)]
    pub fn grad(&self) -> &[f64] {
        &self.grad
    }
}

/// Loss `½‖ŷ − y‖²` of the last step after running `zs` (`steps × n_in`) from `h0`.
#[cfg(test)]
pub fn window_loss(layout: &Layout, params: &[f64], h0: &[f64], zs: &[f64], y: &[f64]) -> f64 {
    let mut h = h0.to_vec();
    let mut scratch = vec![0.0; layout.row()];
    let mut out = vec![0.0; layout.outputs];
    for z in zs.chunks_exact(layout.n_in) {
        network::load_inputs(layout, &mut scratch, z);
        network::step(layout, params, &mut h, &mut scratch, &mut out);
    }
    0.5 * out
        .iter()
        .zip(y)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
}

/// Gradient of [`window_loss`] in the parameters, into `ws.grad`. Allocates nothing.
pub fn window_gradient(
    layout: &Layout,
    params: &[f64],
    h0: &[f64],
    zs: &[f64],
    y: &[f64],
    ws: &mut BpttWorkspace,
) {
    let (k, nh, m) = (layout.row(), layout.hidden, layout.outputs);
    let steps = zs.len() / layout.n_in.max(1);
    for (s, z) in zs.chunks_exact(layout.n_in).enumerate() {
        // h_{s-1}: h0 for the first step, else the previous row of `ws.h`.
        let (done, rest) = ws.h.split_at_mut(s * nh);
        let prev: &[f64] = if s == 0 { h0 } else { &done[(s - 1) * nh..] };
        let a = &mut ws.a[s * k..(s + 1) * k];
        a[..nh].copy_from_slice(prev);
        network::load_inputs(layout, a, z);
        ws.scratch.copy_from_slice(a);
        let h = &mut rest[..nh];
        h.copy_from_slice(prev);
        network::step(layout, params, h, &mut ws.scratch, &mut ws.out);
    }
    ws.grad.fill(0.0);
    if steps == 0 {
        return;
    }
    let ro = layout.readout_offset();
    // Read-out: dV = e bᵀ with b = [h_t; z_t; 1]; δh_t = V[:, :H]ᵀ e.
    let last = steps - 1;
    ws.delta.fill(0.0);
    for o in 0..m {
        let e = ws.out[o] - y[o];
        let row = &mut ws.grad[ro + o * k..ro + (o + 1) * k];
        let a = &ws.a[last * k..(last + 1) * k];
        let h = &ws.h[last * nh..(last + 1) * nh];
        for c in 0..k {
            let b = if c < nh { h[c] } else { a[c] };
            row[c] += e * b;
        }
        for i in 0..nh {
            ws.delta[i] += params[ro + o * k + i] * e;
        }
    }
    // Back through the cell: δpre = δh ⊙ (1 − h²); dW += δpre aᵀ; δh_{s−1} = W[:, :H]ᵀ δpre.
    for s in (0..steps).rev() {
        let h = &ws.h[s * nh..(s + 1) * nh];
        let a = &ws.a[s * k..(s + 1) * k];
        ws.delta_prev.fill(0.0);
        for i in 0..nh {
            let dp = ws.delta[i] * (1.0 - h[i] * h[i]);
            let row = &mut ws.grad[i * k..(i + 1) * k];
            for c in 0..k {
                row[c] += dp * a[c];
            }
            for c in 0..nh {
                ws.delta_prev[c] += params[i * k + c] * dp;
            }
        }
        std::mem::swap(&mut ws.delta, &mut ws.delta_prev);
    }
}

impl Ogd {
    pub fn new(layout: Layout, params: Vec<f64>, lr: f64, window: usize) -> Self {
        let window = window.max(1);
        Self {
            ws: BpttWorkspace::new(&layout, window),
            hidden: vec![0.0; layout.hidden],
            zs: vec![0.0; window * layout.n_in],
            hs: vec![0.0; window * layout.hidden],
            len: 0,
            layout,
            params,
            lr,
            clip: 1.0,
            window,
        }
    }

    pub fn params(&self) -> &[f64] {
        &self.params
    }
}

impl Forecaster for Ogd {
    fn forecast_path(&mut self, lags: &LagBuffer, x: &[f64], out: &mut [f64], roll: &mut RollOut) {
        roll.path(
            &self.layout,
            &self.params,
            &self.hidden,
            lags.values(),
            x,
            out,
        );
    }
}

impl Learner for Ogd {
    fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) {
        let (ni, nh, w) = (self.layout.n_in, self.layout.hidden, self.window);
        // The window, oldest first: when full, drop the oldest step (a shift of a few hundred
        // doubles, cheaper than the gradient it feeds).
        if self.len == w {
            self.zs.copy_within(ni.., 0);
            self.hs.copy_within(nh.., 0);
        } else {
            self.len += 1;
        }
        let slot = self.len - 1;
        self.zs[slot * ni..(slot + 1) * ni].copy_from_slice(z);
        self.hs[slot * nh..(slot + 1) * nh].copy_from_slice(&self.hidden);
        self.predict_frozen(z, pred);
        let h0 = &self.hs[..nh];
        window_gradient(
            &self.layout,
            &self.params,
            h0,
            &self.zs[..self.len * ni],
            y,
            &mut self.ws,
        );
        let norm = self.ws.grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        let scale = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        if norm.is_finite() {
            for (p, g) in self.params.iter_mut().zip(&self.ws.grad) {
                *p -= self.lr * scale * g;
            }
        }
    }

    fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        network::load_inputs(&self.layout, &mut self.ws.scratch, z);
        network::step(
            &self.layout,
            &self.params,
            &mut self.hidden,
            &mut self.ws.scratch,
            pred,
        );
    }

    fn reset_state(&mut self) {
        self.hidden.fill(0.0);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn bptt_gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(nh, ni, m, steps) in &[(3, 2, 1, 4), (5, 3, 2, 6), (1, 1, 1, 1)] {
            let layout = Layout::new(nh, ni, m);
            let params: Vec<f64> = (0..layout.dim())
                .map(|_| rng.random_range(-0.8..0.8))
                .collect();
            let h0: Vec<f64> = (0..nh).map(|_| rng.random_range(-0.5..0.5)).collect();
            let zs: Vec<f64> = (0..steps * ni)
                .map(|_| rng.random_range(0.0..1.0))
                .collect();
            let y: Vec<f64> = (0..m).map(|_| rng.random_range(0.0..1.0)).collect();
            let mut ws = BpttWorkspace::new(&layout, steps);
            window_gradient(&layout, &params, &h0, &zs, &y, &mut ws);
            let eps = 1e-6;
            for p in 0..layout.dim() {
                let mut plus = params.clone();
                plus[p] += eps;
                let mut minus = params.clone();
                minus[p] -= eps;
                let fd = (window_loss(&layout, &plus, &h0, &zs, &y)
                    - window_loss(&layout, &minus, &h0, &zs, &y))
                    / (2.0 * eps);
                let g = ws.grad()[p];
                assert!(
                    (fd - g).abs() <= 1e-7 * (1.0 + fd.abs()),
                    "param {p} of {layout:?}: bptt {g} vs fd {fd}"
                );
            }
        }
    }
}
