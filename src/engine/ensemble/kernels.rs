//! The ensemble's inner loops over parameters, shared by the serial and the two-thread step.
//!
//! Every function keeps the floating-point operations of the original one-particle-at-a-time
//! loops, element by element and in the same order: for each parameter p, sums over particles
//! run j = 0, 1, …, J−1, one addition at a time. What changes is only how many particles one
//! pass over a row touches: blocks of [`BLOCK`] particles (C^{uw}) or [`UPDATE_BLOCK`] (the
//! update) load and store the d-long accumulator (C^{uw} row, mean sum) once per block instead
//! of once per particle, and every loop runs over slices of one length, so the compiler
//! vectorises across parameters without bounds checks. Vectorising across p never reorders a sum over j, so results stay bit-identical.

use crate::engine::real::Real;

/// Particles per block of the forward and the C^{uw} sums: four particle rows plus the
/// accumulator and the mean stay in L1/L2 (4 × 12 kB at hidden 32).
pub const BLOCK: usize = 4;

/// `acc[p] += u[p]·e`: one particle's term of the (unscaled, uncentred) cross-covariance; the
/// centring `− ū Σ e` comes once per step ([`scale_and_next_mean`]).
#[inline]
pub fn accumulate1<T: Real>(acc: &mut [T], u: &[T], e: T) {
    let n = acc.len();
    let u = &u[..n];
    for p in 0..n {
        acc[p] += u[p] * e;
    }
}

/// [`accumulate1`] for four consecutive particles, in their order, per element.
#[inline]
pub fn accumulate4<T: Real>(acc: &mut [T], terms: [(&[T], T); BLOCK]) {
    let n = acc.len();
    let [(u0, e0), (u1, e1), (u2, e2), (u3, e3)] = terms;
    let e = [e0, e1, e2, e3];
    let (u0, u1, u2, u3) = (&u0[..n], &u1[..n], &u2[..n], &u3[..n]);
    for p in 0..n {
        let mut a = acc[p];
        a += u0[p] * e[0];
        a += u1[p] * e[1];
        a += u2[p] * e[2];
        a += u3[p] * e[3];
        acc[p] = a;
    }
}

/// The term of particle prediction `w_o` in output o's sums: `e = w_o − ŷ_o`, rounded to `T`.
/// [`accumulate_rows`] and [`prediction_sums`] take the same values.
#[inline]
pub fn term<T: Real>(w_o: f64, pred_o: f64) -> T {
    T::from_f64(w_o - pred_o)
}

/// `Σ_j e_j` per output o, in particle order from zero: the sums [`scale_and_next_mean`]
/// centres C^{uw} with.
pub fn prediction_sums<T: Real>(w: &[f64], pred: &[f64], sums: &mut [T]) {
    let m = pred.len();
    for (o, s) in sums.iter_mut().enumerate() {
        *s = w
            .chunks_exact(m)
            .fold(T::ZERO, |s, wj| s + term::<T>(wj[o], pred[o]));
    }
}

/// Accumulates output `o`'s row over consecutive particles: `rows` yields each particle's
/// columns (a particle-major buffer's `chunks_exact(d)`, or a panel's rows), `w` holds their
/// predictions (`m` apart), `acc` the same columns. Four particles at a time
/// ([`accumulate4`]), the rest one by one.
pub fn accumulate_rows<'r, T: Real>(
    acc: &mut [T],
    rows: impl Iterator<Item = &'r [T]>,
    w: &[f64],
    m: usize,
    o: usize,
    pred_o: f64,
) {
    let terms = rows.zip(w.chunks_exact(m).map(|wj| term::<T>(wj[o], pred_o)));
    for_blocks(
        terms,
        acc,
        |acc, block: [_; BLOCK]| accumulate4(acc, block),
        |acc, (u, e)| accumulate1(acc, u, e),
    );
}

/// Feeds `items` in order to `block`, `N` at a time, and the last `len % N` to `one`, each
/// with `acc` (what both write).
#[inline]
fn for_blocks<I: Iterator, A: ?Sized, const N: usize>(
    mut items: I,
    acc: &mut A,
    block: impl Fn(&mut A, [I::Item; N]),
    one: impl Fn(&mut A, I::Item),
) {
    loop {
        let next: [Option<I::Item>; N] = std::array::from_fn(|_| items.next());
        if next.iter().all(Option::is_some) {
            block(
                acc,
                next.map(|item| item.expect("checked: every item is there")),
            );
        } else {
            for item in next.into_iter().flatten() {
                one(acc, item);
            }
            return;
        }
    }
}

/// Centres and scales the C^{uw} rows, `C_o[p] = (S_o[p] − ū[p]·Σ_j e_j[o])·inv_j` from the
/// sums `S_o = Σ_j u_j e_j[o]` ([`accumulate_rows`]) and `esum` ([`prediction_sums`]), and forms
/// the next mean ū' = ū + Σ_o C^{uw}_o q̄_o over the same columns (`rows` holds each output's
/// row, or this part's columns of it). Per element: the centring and scaling, then the
/// outputs' terms in output order.
pub fn scale_and_next_mean<'r, T: Real>(
    rows: impl Iterator<Item = &'r mut [T]>,
    inv_j: T,
    esum: &[T],
    qbar: &[f64],
    mean: &[T],
    next_mean: &mut [T],
) {
    next_mean.copy_from_slice(mean);
    for ((row, &qb), &es) in rows.zip(qbar).zip(esum) {
        let qb = T::from_f64(qb);
        for ((c, x), &u) in row.iter_mut().zip(next_mean.iter_mut()).zip(mean) {
            *c = (*c - u * es) * inv_j;
            *x += *c * qb;
        }
    }
}

/// Particles per block of the plain update pass: eight rows share each load and store of the
/// new mean's running sum. Against blocks of four: 3.97 → 3.47 ms (`f64`) and 1.24 → 1.13 ms
/// (`f32`) per observation at J=2000, hidden 32 (BENCHMARKS.md, decisions).
pub const UPDATE_BLOCK: usize = 8;

/// The plain update of a block (one output, no inflation, no momentum): `u_b[p] += c[p]·q_b`,
/// then `sum[p] += u_b[p]` in particle order.
#[inline]
pub fn update8<T: Real>(rows: [(&mut [T], T); UPDATE_BLOCK], c: &[T], sum: &mut [T]) {
    let n = c.len();
    let [
        (u0, q0),
        (u1, q1),
        (u2, q2),
        (u3, q3),
        (u4, q4),
        (u5, q5),
        (u6, q6),
        (u7, q7),
    ] = rows;
    let q = [q0, q1, q2, q3, q4, q5, q6, q7];
    let (u0, u1, u2, u3) = (&mut u0[..n], &mut u1[..n], &mut u2[..n], &mut u3[..n]);
    let (u4, u5, u6, u7) = (&mut u4[..n], &mut u5[..n], &mut u6[..n], &mut u7[..n]);
    let sum = &mut sum[..n];
    for p in 0..n {
        let cp = c[p];
        let a0 = u0[p] + cp * q[0];
        let a1 = u1[p] + cp * q[1];
        let a2 = u2[p] + cp * q[2];
        let a3 = u3[p] + cp * q[3];
        let a4 = u4[p] + cp * q[4];
        let a5 = u5[p] + cp * q[5];
        let a6 = u6[p] + cp * q[6];
        let a7 = u7[p] + cp * q[7];
        u0[p] = a0;
        u1[p] = a1;
        u2[p] = a2;
        u3[p] = a3;
        u4[p] = a4;
        u5[p] = a5;
        u6[p] = a6;
        u7[p] = a7;
        sum[p] = (((((((sum[p] + a0) + a1) + a2) + a3) + a4) + a5) + a6) + a7;
    }
}

/// Settings of the update pass of one step.
#[derive(Debug, Clone, Copy)]
pub struct UpdateRule<'a, T> {
    /// `m×d`, row o = C^{uw} column o.
    pub cuw: &'a [T],
    pub d: usize,
    pub m: usize,
    pub lambda: T,
    /// ū' = ū + C^{uw} q̄, the centre of inflation.
    pub next_mean: &'a [T],
    /// The Nesterov coefficient when momentum is on.
    pub nesterov: Option<T>,
}

impl<T: Real> UpdateRule<'_, T> {
    fn plain(&self) -> bool {
        self.m == 1 && self.lambda == T::ONE && self.nesterov.is_none()
    }

    /// One particle's columns, in the original order of passes: `u += C^{uw} q` output by
    /// output, then inflation around ū', then the Nesterov extrapolation, then `sum += u`.
    fn one(&self, u: &mut [T], q: &[f64], prev: Option<&mut [T]>, sum: &mut [T]) {
        for (o, row) in self.cuw.chunks_exact(self.d).enumerate() {
            let qv = T::from_f64(q[o]);
            for (up, &cp) in u.iter_mut().zip(row) {
                *up += cp * qv;
            }
        }
        if self.lambda != T::ONE {
            let lambda = self.lambda;
            for (up, &nm) in u.iter_mut().zip(self.next_mean) {
                *up = nm + lambda * (*up - nm);
            }
        }
        if let (Some(nesterov), Some(prev)) = (self.nesterov, prev) {
            for (up, pp) in u.iter_mut().zip(prev.iter_mut()) {
                let new = *up;
                *up = new + nesterov * (new - *pp);
                *pp = new;
            }
        }
        for (s, &up) in sum.iter_mut().zip(u.iter()) {
            *s += up;
        }
    }

    /// Updates consecutive particles: `rows` yields each one's columns (those this rule's
    /// C^{uw} rows and next mean cover: a particle-major buffer's `chunks_exact_mut(d)`, or a
    /// panel's rows), `q` their coefficients (`m` apart) and, with momentum, `prev` their
    /// previous iterates alike; adds each new particle to `sum` in order. Blocks of
    /// [`UPDATE_BLOCK`] particles on the plain rule ([`update8`]).
    pub fn update<'r, 'p>(
        &self,
        rows: impl Iterator<Item = &'r mut [T]>,
        q: &[f64],
        prev: impl Iterator<Item = &'p mut [T]>,
        sum: &mut [T],
    ) where
        T: 'r + 'p,
    {
        let m = self.m;
        if self.plain() {
            let c = &self.cuw[..self.d];
            for_blocks(
                rows.zip(q),
                sum,
                |sum, block: [_; UPDATE_BLOCK]| {
                    update8(block.map(|(u, qj)| (u, T::from_f64(*qj))), c, sum);
                },
                |sum, (u, qj)| self.one(u, std::slice::from_ref(qj), None, sum),
            );
        } else if self.nesterov.is_some() {
            for ((u, qj), pv) in rows.zip(q.chunks_exact(m)).zip(prev) {
                self.one(u, qj, Some(pv), sum);
            }
        } else {
            for (u, qj) in rows.zip(q.chunks_exact(m)) {
                self.one(u, qj, None, sum);
            }
        }
    }
}
