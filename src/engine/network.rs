//! The Elman cell with a linear read-out: parameter layout and the forward step of one particle.
//!
//! One particle is a flat `[f64]` of length `d = (hidden + outputs) * k`, `k = hidden + n_in + 1`,
//! laid out as `hidden` rows of the cell followed by `outputs` rows of the read-out, every row of
//! length `k`. A cell row dots with `a = [h_prev; z; 1]` and a read-out row with
//! `b = [h_new; z; 1]`, so both layers share one row shape and one scratch vector: the read-out
//! sees the cell's inputs `z` directly (a linear skip), which makes the network contain AR(lags).
//! When the skip is switched off those columns are simply held at zero by the prior.

/// Shapes of one network. Built only from validated options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub hidden: usize,
    /// Inputs to the cell: `lags * outputs` past values followed by `inputs` exogenous values.
    pub n_in: usize,
    pub outputs: usize,
}

impl Layout {
    pub fn new(hidden: usize, n_in: usize, outputs: usize) -> Self {
        Self {
            hidden,
            n_in,
            outputs,
        }
    }

    /// Length of one row (and of the scratch vector `[h; z; 1]`).
    pub fn row(&self) -> usize {
        self.hidden + self.n_in + 1
    }

    /// Number of parameters of one particle.
    pub fn dim(&self) -> usize {
        (self.hidden + self.outputs) * self.row()
    }

    /// Offset of the read-out rows inside a particle.
    pub fn readout_offset(&self) -> usize {
        self.hidden * self.row()
    }

    /// Is parameter `p` a read-out weight on a cell input (the linear skip)?
    pub fn is_skip(&self, p: usize) -> bool {
        let k = self.row();
        p >= self.readout_offset() && {
            let c = p % k;
            c >= self.hidden && c < self.hidden + self.n_in
        }
    }

    /// Is parameter `p` a bias (last column of its row)?
    pub fn is_bias(&self, p: usize) -> bool {
        p % self.row() == self.row() - 1
    }
}

use crate::engine::real::{Param, Real};

/// Writes `z` and the constant 1 into the tail of a scratch vector of length `layout.row()`.
#[inline]
pub fn load_inputs<T: Real>(layout: &Layout, scratch: &mut [T], z: &[f64]) {
    let h = layout.hidden;
    for (s, &v) in scratch[h..h + layout.n_in].iter_mut().zip(z) {
        *s = T::from_f64(v);
    }
    scratch[h + layout.n_in] = T::ONE;
}

/// `Σ a[i]·b[i]` with four interleaved accumulators, combined as `(s0 + s2) + (s1 + s3) + tail`.
/// The order is fixed (it is the engine's numerical contract: results are bit-identical
/// across versions), so the compiler vectorises across the accumulators but never
/// reassociates. `dot4` computes four of these at once with the same per-row order.
#[inline]
pub fn dot<T: Real, P: Param<T>>(a: &[P], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut s = [T::ZERO; 4];
    let chunks = n / 4;
    for i in 0..chunks {
        let o = 4 * i;
        s[0] += a[o].widen() * b[o];
        s[1] += a[o + 1].widen() * b[o + 1];
        s[2] += a[o + 2].widen() * b[o + 2];
        s[3] += a[o + 3].widen() * b[o + 3];
    }
    let mut tail = T::ZERO;
    for i in 4 * chunks..n {
        tail += a[i].widen() * b[i];
    }
    (s[0] + s[2]) + (s[1] + s[3]) + tail
}

/// Four rows (`rows` holds them back to back, `4·b.len()` values) dotted with the same `b`:
/// each result is bit-identical to [`dot`] of that row. Sharing the loads of `b` and running
/// sixteen independent accumulators takes the forward from add-latency-bound to load-bound.
///
/// Each row's four accumulators are one explicit vector ([`Real::X4`]), so the loop is one
/// load of `b`, four row loads, four multiplies and four adds per chunk of four columns. With
/// plain arrays the compiler vectorised across the rows instead (to make the final fold a
/// vector operation) and spent the loop transposing: three shuffles per row per chunk. Here
/// the transpose happens once, at the end, for the fold.
#[inline]
fn dot4<T: Real, P: Param<T>>(rows: &[P], b: &[T]) -> [T; 4] {
    let n = b.len();
    let (r0, rest) = rows.split_at(n);
    let (r1, rest) = rest.split_at(n);
    let (r2, r3) = rest.split_at(n);
    let r3 = &r3[..n];
    let zero = T::x4([T::ZERO; 4]);
    let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
    let chunks = n / 4;
    let lanes = |c: &[T]| T::x4([c[0], c[1], c[2], c[3]]);
    let row = |c: &[P]| T::x4([c[0].widen(), c[1].widen(), c[2].widen(), c[3].widen()]);
    for ((((x, a0), a1), a2), a3) in b
        .chunks_exact(4)
        .zip(r0.chunks_exact(4))
        .zip(r1.chunks_exact(4))
        .zip(r2.chunks_exact(4))
        .zip(r3.chunks_exact(4))
    {
        let x = lanes(x);
        s0 = s0 + row(a0) * x;
        s1 = s1 + row(a1) * x;
        s2 = s2 + row(a2) * x;
        s3 = s3 + row(a3) * x;
    }
    let mut t = [T::ZERO; 4];
    for i in 4 * chunks..n {
        let x = b[i];
        t[0] += r0[i].widen() * x;
        t[1] += r1[i].widen() * x;
        t[2] += r2[i].widen() * x;
        t[3] += r3[i].widen() * x;
    }
    // Per row `(s[0] + s[2]) + (s[1] + s[3]) + t`, as `dot` folds, for the four rows at once:
    // after the transpose `lk` holds accumulator k of every row.
    let [l0, l1, l2, l3] = T::x4_transpose([s0, s1, s2, s3]);
    T::x4_array(((l0 + l2) + (l1 + l3)) + T::x4(t))
}

/// One step of one particle: `scratch` holds `[h_prev; z; 1]` on entry (z loaded by
/// [`load_inputs`]), `hidden` is the particle's state (read and overwritten with `h_new`), `out`
/// receives the read-out. On exit `scratch[..hidden]` holds `h_new`. Allocates nothing.
///
/// The cell's pre-activations are computed four rows at a time into `hidden`, then `tanh` runs
/// over them in one tight loop: the calls are independent, so they overlap in the pipeline
/// instead of each waiting behind the next row's dot product. `tanh` is [`Real::tanh`], the
/// engine's own in both precisions (no libm): branch-free, so the compiler vectorises it.
///
/// `params` may be narrower than the computation (an `f32` network rolled out in `f64`): each
/// is widened exactly as it is loaded ([`Param`]).
#[inline]
pub fn step<T: Real, P: Param<T>>(
    layout: &Layout,
    params: &[P],
    hidden: &mut [T],
    scratch: &mut [T],
    out: &mut [T],
) {
    let k = layout.row();
    let nh = layout.hidden;
    let x = &mut scratch[..k];
    x[..nh].copy_from_slice(hidden);
    preactivations(&params[..nh * k], x, hidden);
    // The new state goes to the particle and, for the read-out, into the scratch row at once
    // (a second copy was a `memmove` call per particle).
    for (h, xv) in hidden.iter_mut().zip(x[..nh].iter_mut()) {
        let t = h.tanh();
        *h = t;
        *xv = t;
    }
    readout(&params[layout.readout_offset()..], x, out);
}

/// Some cell rows of one particle (`rows`: rows of `x.len()` back to back): `h[i] =
/// tanh(row_i · x)` with `x = [h_prev; z; 1]`, each value bit-identical to what [`step`]
/// computes for that row. A two-thread step cuts every particle's rows between its threads.
#[inline]
pub fn cell_rows<T: Real, P: Param<T>>(rows: &[P], x: &[T], h: &mut [T]) {
    preactivations(rows, x, h);
    for v in h.iter_mut() {
        *v = v.tanh();
    }
}

/// `out[i] = row_i · x` for the rows `w` holds back to back (rows of `x.len()`), four at a
/// time. A row's value does not depend on which group of four it falls in ([`dot4`] = [`dot`]
/// per row).
#[inline]
fn preactivations<T: Real, P: Param<T>>(w: &[P], x: &[T], out: &mut [T]) {
    let k = x.len();
    let mut groups = w.chunks_exact(4 * k);
    for (o, rows) in out.chunks_exact_mut(4).zip(&mut groups) {
        o.copy_from_slice(&dot4(rows, x));
    }
    let full = w.len() / (4 * k) * 4;
    for (o, row) in out[full..]
        .iter_mut()
        .zip(groups.remainder().chunks_exact(k))
    {
        *o = dot(row, x);
    }
}

/// The read-out of one particle: `out[o] = row_o · x` with `x = [h_new; z; 1]` and `rows` the
/// read-out rows back to back.
#[inline]
pub fn readout<T: Real, P: Param<T>>(rows: &[P], x: &[T], out: &mut [T]) {
    let k = x.len();
    for (y, row) in out.iter_mut().zip(rows.chunks_exact(k)) {
        *y = dot(row, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_rows_and_skip_columns() {
        let l = Layout::new(2, 3, 1);
        assert_eq!(l.row(), 6);
        assert_eq!(l.dim(), 18);
        let skips: Vec<usize> = (0..l.dim()).filter(|&p| l.is_skip(p)).collect();
        assert_eq!(skips, vec![14, 15, 16]);
        let biases: Vec<usize> = (0..l.dim()).filter(|&p| l.is_bias(p)).collect();
        assert_eq!(biases, vec![5, 11, 17]);
    }

    #[test]
    fn step_matches_hand_computation() {
        // hidden 1, one input, one output: h' = tanh(w_h h + w_x z + b), y = v h' + s z + c
        let l = Layout::new(1, 1, 1);
        let p = [0.5, -0.25, 0.1, 2.0, 0.75, -0.3];
        let mut h = [0.2];
        let mut scratch = vec![0.0; l.row()];
        load_inputs(&l, &mut scratch, &[0.4]);
        let mut out = [0.0];
        step(&l, &p, &mut h, &mut scratch, &mut out);
        let h1 = (0.5f64 * 0.2 - 0.25 * 0.4 + 0.1).tanh();
        assert!((h[0] - h1).abs() < 1e-15);
        assert!((out[0] - (2.0 * h1 + 0.75 * 0.4 - 0.3)).abs() < 1e-15);
    }
}
