//! One step of one big ensemble on two threads, bit-identical to the serial step.
//!
//! Sums over particles (C^{uw}, the new mean) must run j = 0, 1, …, J−1 for every parameter,
//! so the particles cannot simply be cut in two with a partial sum each. Instead:
//!
//! - forward: thread A runs particles `[0, s)` and accumulates C^{uw} over them (all columns,
//!   fused as in the serial step) while thread B runs the forward of `[s, J)`; then both
//!   continue the sums over `[s, J)`, A on the first part of the accumulator and B on the rest
//!   (columns for one output, output rows for several);
//! - update: each thread updates its half of the columns of every particle and sums its half
//!   of the new mean (an element-wise pass has no order to keep across columns).
//!
//! A takes fewer particles than B because it also sums. Where the cut falls changes only who
//! computes what, never an operation or its order, so the result is the serial one for any
//! cut and any thread timing. The cost over the serial step is one extra read of B's part of
//! the ensemble in the forward, and one scoped thread spawned per pass (a few tens of µs),
//! which is why only big ensembles ([`PARALLEL_MIN_WORK`]) take this path.
//!
//! The threads hand each other slices through `Mutex<Option<…>>` slots and meet at one
//! `Barrier` per pass, so the borrow checker sees every hand-over: no `unsafe`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};

use super::kernels::{self, BLOCK, UpdateRule};
use super::{Accumulate, forward_rows, touch_ahead};
use crate::network::Layout;

/// Particle-parameters (J·d) from which a step with two threads splits: 2^20, 8 MiB of
/// particles. Below that the spawn and the extra read cost more than the second core gains.
pub const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Share of the particles thread A runs in the forward (it also accumulates C^{uw}).
const FORWARD_SHARE: f64 = 0.4;
/// Share of the columns thread A updates.
const UPDATE_LEFT: f64 = 0.54;

/// The cut: a multiple of [`BLOCK`], at least one block each side.
fn cut(j: usize, share: f64) -> usize {
    let s = ((j as f64 * share) as usize) / BLOCK * BLOCK;
    s.clamp(BLOCK, j - BLOCK)
}

/// Where B's part of the `m×d` accumulator starts: half the columns for one output, half the
/// output rows for several (kept a multiple of 8 so both halves start on a cache line).
fn accumulator_cut(d: usize, m: usize) -> usize {
    if m == 1 { d / 2 / 8 * 8 } else { m / 2 * d }
}

fn put<T>(slot: &Mutex<Option<T>>, v: T) {
    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
}

fn take<T>(slot: &Mutex<Option<T>>) -> T {
    slot.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .expect("the other thread filled the slot before the barrier")
}

/// Continues the accumulation of `part` (the flat elements `[start, start + len)` of the
/// `m×d` accumulator) over the consecutive particles `rows` with predictions `w`.
#[allow(clippy::too_many_arguments, reason = "plain slices, as in the kernels")]
fn accumulate_span(
    part: &mut [f64],
    start: usize,
    mean: &[f64],
    rows: &[f64],
    d: usize,
    w: &[f64],
    m: usize,
    pred: &[f64],
) {
    let end = start + part.len();
    let mut at = start;
    while at < end {
        let o = at / d;
        let (p0, p1) = (at % d, d.min(end - o * d));
        let acc = &mut part[at - start..at - start + (p1 - p0)];
        kernels::accumulate_rows(acc, &mean[p0..p1], rows, d, p0..p1, w, m, o, pred[o]);
        at += p1 - p0;
    }
}

/// The forward of every particle with C^{uw} accumulated (unscaled) into `cuw`, on two
/// threads. `scratch_a`/`scratch_b` hold the inputs `z`. Returns whether every prediction was
/// finite; when one is not, C^{uw} is left incomplete (the repair pass recomputes it).
#[allow(
    clippy::too_many_arguments,
    reason = "the serial forward's slices plus the second thread's scratch"
)]
pub(super) fn forward(
    layout: &Layout,
    particles: &[f64],
    hidden: &mut [f64],
    w: &mut [f64],
    healthy: &mut [bool],
    scratch_a: &mut [f64],
    scratch_b: &mut [f64],
    cuw: &mut [f64],
    mean: &[f64],
    pred: &[f64],
) -> bool {
    let (d, m, nh) = (layout.dim(), layout.outputs, layout.hidden);
    let j = particles.len() / d;
    let s = cut(j, FORWARD_SHARE);
    let c = accumulator_cut(d, m);
    let (pa, pb) = particles.split_at(s * d);
    let (ha, hb) = hidden.split_at_mut(s * nh);
    let (wa, wb) = w.split_at_mut(s * m);
    let (oka, okb) = healthy.split_at_mut(s);
    let touch = touch_ahead(particles.len());
    let sick = AtomicBool::new(!pred.iter().all(|v| v.is_finite()));
    let barrier = Barrier::new(2);
    let w_slot: Mutex<Option<&[f64]>> = Mutex::new(None);
    let cuw_slot: Mutex<Option<&mut [f64]>> = Mutex::new(None);
    let (sick, barrier, w_slot, cuw_slot) = (&sick, &barrier, &w_slot, &cuw_slot);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            if !forward_rows(layout, pb, hb, wb, okb, scratch_b, None, touch) {
                sick.store(true, Ordering::Relaxed);
            }
            let wb: &[f64] = wb;
            put(w_slot, wb);
            barrier.wait();
            if !sick.load(Ordering::Relaxed) {
                accumulate_span(take(cuw_slot), c, mean, pb, d, wb, m, pred);
            }
        });
        let acc = (!sick.load(Ordering::Relaxed)).then_some(Accumulate {
            cuw: &mut *cuw,
            mean,
            pred,
        });
        if !forward_rows(layout, pa, ha, wa, oka, scratch_a, acc, touch) {
            sick.store(true, Ordering::Relaxed);
        }
        let (left, right) = cuw.split_at_mut(c);
        put(cuw_slot, right);
        barrier.wait();
        if !sick.load(Ordering::Relaxed) {
            accumulate_span(left, 0, mean, pb, d, take(w_slot), m, pred);
        }
    });
    !sick.load(Ordering::Relaxed)
}

/// The update pass on two threads, split by columns: each thread updates its half of every
/// particle and sums its half of the mean, so nothing is read twice and no sum changes order.
/// `sum` is zeroed by the caller. (Handing each thread its halves of the rows takes two
/// vectors of J slices: the two-thread step's only allocation besides the spawn.)
pub(super) fn update(
    rule: &UpdateRule,
    particles: &mut [f64],
    q: &[f64],
    previous: &mut [f64],
    sum: &mut [f64],
) {
    let d = rule.d;
    // The helper starts a spawn later (tens of µs), so it takes a little less than half.
    let c = (d as f64 * UPDATE_LEFT) as usize / 8 * 8;
    let (mut left, mut right) = halves(particles, d, c);
    let (mut prev_left, mut prev_right) = halves(previous, d, c);
    let (sum_left, sum_right) = sum.split_at_mut(c);
    std::thread::scope(|scope| {
        scope.spawn(|| rule.columns(&mut right, c, q, &mut prev_right, sum_right));
        rule.columns(&mut left, 0, q, &mut prev_left, sum_left);
    });
}

/// Every row of `buf` (rows of `d`) cut at column `c`: the left parts and the right parts.
type Halves<'a> = (Vec<&'a mut [f64]>, Vec<&'a mut [f64]>);
fn halves(buf: &mut [f64], d: usize, c: usize) -> Halves<'_> {
    buf.chunks_exact_mut(d).map(|r| r.split_at_mut(c)).unzip()
}
