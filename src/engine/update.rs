//! The small, output-space half of one EKI step: from the particles' predictions `w_j` and the
//! observation `y`, the coefficients `q_j ∈ R^m` such that the parameter update is
//! `u_j ← u_j + C^{uw} q_j`.
//!
//! - Kalman form: `q_j = (C^{ww} + Γ)^{-1}(y − w_j)`.
//! - Flow form: `D^{jk} = (1/J)⟨w_k − w̄, g_j⟩` with `g_j = ∇_z Ψ(w_j, y)`, so
//!   `Σ_k D^{jk} u_k = C^{uw} g_j` (because `Σ_k (w_k − w̄) = 0`) and the step
//!   `u_j ← u_j − h_n C^{uw} g_j` has `q_j = −h_n g_j`, `h_n = h/(‖D‖_F + ε)`, where
//!   `‖D‖_F² = (1/J²) Σ_j g_jᵀ (Σ_k a_k a_kᵀ) g_j = (1/J) Σ_j g_jᵀ C^{ww} g_j`.
//!
//! Everything here is O(J·m²) and works in caller-provided buffers: no allocation.

use crate::engine::options::{Loss, Method};

/// Settings of the output-space step, copied from validated options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KalmanUpdate {
    pub method: Method,
    pub noise: f64,
    pub h: f64,
    pub eps: f64,
    pub loss: Loss,
    pub huber_delta: f64,
}

/// Gradient of the loss Ψ(z, y) in z, for one component.
#[inline]
pub fn loss_gradient(loss: Loss, delta: f64, z: f64, y: f64) -> f64 {
    let r = z - y;
    match loss {
        Loss::Squared => r,
        Loss::Absolute => {
            if r > 0.0 {
                1.0
            } else if r < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        Loss::Huber => r.clamp(-delta, delta),
    }
}

/// In-place Cholesky factorisation of the SPD `m×m` row-major matrix `a` (lower triangle).
/// Returns false if `a` is not numerically positive definite.
pub fn cholesky_in_place(a: &mut [f64], m: usize) -> bool {
    for j in 0..m {
        let mut s = a[j * m + j];
        for k in 0..j {
            s -= a[j * m + k] * a[j * m + k];
        }
        if !(s > 0.0 && s.is_finite()) {
            return false;
        }
        let l = s.sqrt();
        a[j * m + j] = l;
        for i in j + 1..m {
            let mut t = a[i * m + j];
            for k in 0..j {
                t -= a[i * m + k] * a[j * m + k];
            }
            a[i * m + j] = t / l;
        }
    }
    true
}

/// Solves `L Lᵀ x = b` in place given the factor from [`cholesky_in_place`].
pub fn cholesky_solve(l: &[f64], m: usize, b: &mut [f64]) {
    for i in 0..m {
        let mut t = b[i];
        for k in 0..i {
            t -= l[i * m + k] * b[k];
        }
        b[i] = t / l[i * m + i];
    }
    for i in (0..m).rev() {
        let mut t = b[i];
        for k in i + 1..m {
            t -= l[k * m + i] * b[k];
        }
        b[i] = t / l[i * m + i];
    }
}

impl KalmanUpdate {
    /// Fills `q` (J×m) from the predictions `w` (J×m), their covariance `cww` (m×m, destroyed:
    /// it is used as factor workspace) and the observation `y`. Returns the step size used
    /// (1 for the Kalman form, `h_n` for the flow).
    pub fn coefficients(&self, w: &[f64], cww: &mut [f64], y: &[f64], q: &mut [f64]) -> f64 {
        let m = y.len();
        let j = w.len() / m;
        match self.method {
            Method::Kalman => {
                for o in 0..m {
                    cww[o * m + o] += self.noise;
                }
                let ok = cholesky_in_place(cww, m);
                // C^{ww} is PSD by construction and Γ > 0, so this only fails on non-finite input,
                // which the caller has already repaired; fall back to Γ alone to stay total.
                if !ok {
                    cww.fill(0.0);
                    for o in 0..m {
                        cww[o * m + o] = self.noise.sqrt();
                    }
                }
                for (qj, wj) in q.chunks_exact_mut(m).zip(w.chunks_exact(m)) {
                    for o in 0..m {
                        qj[o] = y[o] - wj[o];
                    }
                    cholesky_solve(cww, m, qj);
                }
                1.0
            }
            Method::Flow => {
                let mut norm2 = 0.0;
                for (qj, wj) in q.chunks_exact_mut(m).zip(w.chunks_exact(m)) {
                    for o in 0..m {
                        qj[o] = loss_gradient(self.loss, self.huber_delta, wj[o], y[o]);
                    }
                    for a in 0..m {
                        for b in 0..m {
                            norm2 += qj[a] * cww[a * m + b] * qj[b];
                        }
                    }
                }
                let d_norm = (norm2.max(0.0) / j as f64).sqrt();
                let h_n = self.h / (d_norm + self.eps);
                for v in q.iter_mut() {
                    *v *= -h_n;
                }
                h_n
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_spd_system() {
        let mut a = vec![4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let orig = a.clone();
        assert!(cholesky_in_place(&mut a, 3));
        let mut x = vec![1.0, -2.0, 0.5];
        let b = x.clone();
        cholesky_solve(&a, 3, &mut x);
        for i in 0..3 {
            let r: f64 = (0..3).map(|k| orig[i * 3 + k] * x[k]).sum();
            assert!((r - b[i]).abs() < 1e-12);
        }
    }

    #[test]
    fn loss_gradients() {
        assert_eq!(loss_gradient(Loss::Squared, 0.1, 2.0, 0.5), 1.5);
        assert_eq!(loss_gradient(Loss::Absolute, 0.1, 2.0, 0.5), 1.0);
        assert_eq!(loss_gradient(Loss::Huber, 0.1, 2.0, 0.5), 0.1);
        assert_eq!(loss_gradient(Loss::Huber, 0.1, 0.45, 0.5), 0.45 - 0.5);
    }
}
