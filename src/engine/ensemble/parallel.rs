//! One step of one big ensemble on two threads, bit-identical to the serial step.
//!
//! Sums over particles (C^{uw}, the new mean) must run j = 0, 1, …, J−1 for every parameter,
//! so the particles cannot be cut in two with a partial sum each. The parameters can: a split
//! ensemble keeps its particles as two panels ([`Ensemble`](super::Ensemble)'s `cut`), the
//! left one holding the first `r` cell rows of every particle ([`row_cut`]), the right one the
//! other cell rows and the read-out, each particle's part contiguous and the particles in
//! order. Each thread owns one panel for the whole step:
//!
//! - forward: both threads walk the particles in order. For each particle the left thread
//!   computes its rows' new states and hands them over; the right thread computes its own,
//!   takes the left's, runs the read-out (the prediction w_j) and hands w_j back. Each thread
//!   adds its panel's terms of C^{uw} for a block of particles as soon as it has their
//!   predictions, while the block is still in its cache;
//! - finish: each thread scales its columns of C^{uw}, forms its columns of the next mean,
//!   updates its panel and sums it into the new mean (an element-wise pass has no order to
//!   keep across columns).
//!
//! Every value is computed by the serial step's operations in its order (a row's dot product
//! does not depend on which thread computes it, nor a column's sum on where the row is stored),
//! so the results are the serial ones whatever the threads' timing. Each thread streams its own
//! panel, one contiguous read in the forward and one read-write in the update: no part of the
//! ensemble is read twice, and what crosses between the cores per particle is `r` states and
//! `m` predictions. (Cutting particle-major rows instead, each thread walking half-rows,
//! measured slower than one thread: BENCHMARKS.md.)
//!
//! The halves run as `rayon::join`s on [`pool`], workers started once and kept: a join
//! costs a wake-up of an idle (usually still spinning) worker, microseconds, where spawning a
//! thread per pass cost 60–90 µs in this VM. The pool is the only place the crate starts
//! threads for the engine; rayon's scoped joins let the halves borrow the ensemble, and the
//! hand-over is atomics, so there is no `unsafe`.
//!
//! A half that waits for the other spins briefly, then yields its core at every check
//! (crossbeam's `Backoff`): with more runnable threads than cores (another process, a build),
//! the partner it waits for may be descheduled, and a waiter that kept spinning would burn its
//! time slice instead of letting the partner (or anyone) run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::Backoff;

use super::kernels::{self, BLOCK, UpdateRule};
use super::{TOUCH_AHEAD, split_scratch, touch_block, widen_into};
use crate::engine::network::{self, Layout};
use crate::engine::real::Real;

/// Particle-parameters (J·d) from which a step of `T` with two threads splits: 2^20 (8 MiB)
/// for `f64`, 2^22 (16 MiB) for `f32` ([`Real::SPLIT_FACTOR`]). Below that the fork-joins and
/// the per-particle hand-overs cost more than the second core gains.
pub fn parallel_min_work<T: Real>() -> usize {
    (1 << 20) * T::SPLIT_FACTOR
}

/// The cell rows of every particle that the left thread (panel) takes: half of the particle's
/// `hidden + outputs` rows, rounded up, and at least one cell row. The right thread has the
/// read-out's hand-over to do besides, so the left gets the odd row (at hidden 32 the left
/// waited for the right for 6% of its time with 16 of the 33 rows; BENCHMARKS.md).
pub fn row_cut(layout: &Layout) -> usize {
    (layout.hidden + layout.outputs)
        .div_ceil(2)
        .clamp(1, layout.hidden)
}

/// The pool every two-thread step runs on, started on first use: one worker per core (at
/// least two), so that as many split steps can run at once as the daemon's core permits let
/// through. `None` if the operating system refused the threads: steps then stay serial.
pub fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.max(2))
            .thread_name(|i| format!("ekid-step-{i}"))
            .build()
            .map_err(|e| tracing::warn!("two-thread steps disabled: {e}"))
            .ok()
    })
    .as_ref()
}

/// Runs `f` on the step pool when `split` (the steps it makes run on two threads) and there
/// is a pool, inline otherwise (and inline when already on it): callers that make many
/// two-thread steps in a row (a batch, an evaluation pass) enter the pool once, so each step's
/// fork-joins start from a worker instead of waking one from outside. Serial work never starts
/// the pool.
pub fn on_pool<R: Send>(split: bool, f: impl FnOnce() -> R + Send) -> R {
    match split.then(pool).flatten() {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Blocks of particles the left thread may run ahead of its C^{uw} sums (beyond that it waits
/// for the right thread's predictions): its part of 8 blocks of 4 particles stays in L2
/// (8 × 4 × 6.1 kB at hidden 32 in `f64`: 17 rows of 45).
const LAG: usize = 8;

/// What the two-thread step keeps from one step to the next so that, once warm, it allocates
/// nothing: the hand-over's slots, the left thread's copy of the predictions and its new
/// states. A clone starts empty.
#[derive(Default)]
pub struct Spare<T> {
    states: Vec<AtomicU64>,
    predictions: Vec<AtomicU64>,
    w_left: Vec<f64>,
    state: Vec<T>,
}

impl<T: Real> Spare<T> {
    /// The hand-over slots and buffers sized for `j` particles of `layout` (allocated on the
    /// first split step, then kept).
    #[allow(clippy::type_complexity, reason = "the four buffers, borrowed apart")]
    fn fit(
        &mut self,
        layout: &Layout,
        j: usize,
    ) -> (&[AtomicU64], &[AtomicU64], &mut Vec<f64>, &mut [T]) {
        let (m, r) = (layout.outputs, row_cut(layout));
        if self.states.len() != j * r {
            self.states = (0..j * r).map(|_| AtomicU64::new(0)).collect();
        }
        if self.predictions.len() != j * m {
            self.predictions = (0..j * m).map(|_| AtomicU64::new(0)).collect();
        }
        self.w_left.resize(j * m, 0.0);
        self.state.resize(r, T::ZERO);
        (
            &self.states,
            &self.predictions,
            &mut self.w_left,
            &mut self.state,
        )
    }
}

impl<T: Default> Clone for Spare<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> std::fmt::Debug for Spare<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare").finish_non_exhaustive()
    }
}

/// The two panels of a split ensemble's particles (`J×c` and `J×(d − c)`), and whether the
/// forward touches each ahead ([`super::touch_ahead`], by the whole ensemble's bytes as in the
/// serial forward: split `f64` ensembles of 9.5–14 MB ran 0–8% slower with the touch, 24 MB
/// 10% faster; BENCHMARKS.md, decisions).
pub(super) struct Panels<'a, T> {
    pub left: &'a [T],
    pub right: &'a [T],
    pub touch: bool,
}

/// The forward of every particle on two threads (module doc), with C^{uw} accumulated
/// (unscaled) into `cuw`, which is stored as panels too (`m×c`, then `m×(d − c)`). Reads the
/// states from `hidden` and writes the new ones to `hidden_next`; `scratch_a`/`scratch_b` hold
/// the inputs `z`. Returns whether every prediction was finite and how many particles' left
/// sums are done: all of them, unless the right half ran only after the left one on the same
/// thread (the pool's other worker busy), when [`Finish`] does the rest.
#[allow(
    clippy::too_many_arguments,
    reason = "the serial forward's slices plus the second thread's"
)]
pub(super) fn forward<T: Real>(
    layout: &Layout,
    panels: Panels<T>,
    hidden: &[T],
    hidden_next: &mut [T],
    w: &mut [f64],
    healthy: &mut [bool],
    scratch_a: &mut [T],
    scratch_b: &mut [T],
    cuw: &mut [T],
    pred: &[f64],
    spare: &mut Spare<T>,
) -> (bool, usize) {
    let (m, k) = (layout.outputs, layout.row());
    let c = row_cut(layout) * k;
    let j = panels.left.len() / c;
    let (states, predictions, w_left, state) = spare.fit(layout, j);
    let (cuw_l, cuw_r) = cuw.split_at_mut(m * c);
    let hand_over = HandOver {
        states,
        predictions,
        left: AtomicUsize::new(0),
        right: AtomicUsize::new(0),
        left_finished: AtomicBool::new(false),
        right_started: AtomicBool::new(false),
        right_finished: AtomicBool::new(false),
    };
    let left = LeftHalf {
        layout,
        rows: panels.left,
        touch: panels.touch,
        hidden,
        scratch: scratch_a,
        state,
    };
    let sums = Sums {
        cuw: cuw_l,
        rows: panels.left,
        pred,
        w: w_left,
        done: 0,
    };
    let right = RightHalf {
        layout,
        rows: panels.right,
        touch: panels.touch,
        hidden,
        hidden_next,
        w,
        healthy,
        scratch: scratch_b,
        cuw: cuw_r,
        pred,
    };
    let (left_done, ok) = rayon::join(|| left.run(&hand_over, sums), || right.run(&hand_over));
    (ok && pred.iter().all(|v| v.is_finite()), left_done)
}

/// The left thread of the forward: the first `r` cell rows of every particle (its panel), each
/// new state handed over as it is made; the C^{uw} sums of its panel as the predictions come
/// back.
struct LeftHalf<'a, T> {
    layout: &'a Layout,
    rows: &'a [T],
    touch: bool,
    hidden: &'a [T],
    scratch: &'a mut [T],
    state: &'a mut [T],
}

impl<T: Real> LeftHalf<'_, T> {
    /// Returns how many particles' sums are done (see [`Sums::catch_up`]).
    fn run(self, hand_over: &HandOver, mut sums: Sums<T>) -> usize {
        let _finished = SetOnDrop(&hand_over.left_finished);
        let (nh, r) = (self.layout.hidden, row_cut(self.layout));
        let c = r * self.layout.row();
        let j = self.rows.len() / c;
        let (x, _) = split_scratch(self.scratch, self.layout);
        for (b, blk) in self.rows.chunks(BLOCK * c).enumerate() {
            let j0 = b * BLOCK;
            if self.touch {
                touch_block(self.rows, b + TOUCH_AHEAD, BLOCK * c);
            }
            for (i, u) in blk.chunks_exact(c).enumerate() {
                let jj = j0 + i;
                x[..nh].copy_from_slice(&self.hidden[jj * nh..(jj + 1) * nh]);
                network::cell_rows(u, x, self.state);
                for (slot, v) in hand_over.states[jj * r..(jj + 1) * r]
                    .iter()
                    .zip(&*self.state)
                {
                    slot.store(v.to_f64().to_bits(), Ordering::Relaxed);
                }
            }
            let produced = j0 + blk.len() / c;
            hand_over.left.store(produced, Ordering::Release);
            sums.catch_up(hand_over, produced, j);
        }
        sums.catch_up(hand_over, j, j);
        sums.done
    }
}

/// The right thread of the forward: the rest of the cell rows and the read-out of every
/// particle (its panel), completing each state with the left's hand-over, handing each
/// prediction back, and summing its panel's C^{uw} block by block.
struct RightHalf<'a, T> {
    layout: &'a Layout,
    rows: &'a [T],
    touch: bool,
    hidden: &'a [T],
    hidden_next: &'a mut [T],
    w: &'a mut [f64],
    healthy: &'a mut [bool],
    scratch: &'a mut [T],
    /// `m×(d − c)`: the right columns of C^{uw}, unscaled.
    cuw: &'a mut [T],
    pred: &'a [f64],
}

impl<T: Real> RightHalf<'_, T> {
    /// Returns whether every prediction was finite (false too when the left half is gone).
    fn run(self, hand_over: &HandOver) -> bool {
        hand_over.right_started.store(true, Ordering::Release);
        let _finished = SetOnDrop(&hand_over.right_finished);
        let layout = self.layout;
        let (m, nh, k) = (layout.outputs, layout.hidden, layout.row());
        let r = row_cut(layout);
        let cr = layout.dim() - r * k;
        let (x, out) = split_scratch(self.scratch, layout);
        let cell = (nh - r) * k;
        let mut all = true;
        for (b, (((blk, hb), wb), okb)) in self
            .rows
            .chunks(BLOCK * cr)
            .zip(self.hidden_next.chunks_mut(BLOCK * nh))
            .zip(self.w.chunks_mut(BLOCK * m))
            .zip(self.healthy.chunks_mut(BLOCK))
            .enumerate()
        {
            let j0 = b * BLOCK;
            let j1 = j0 + okb.len();
            if self.touch {
                touch_block(self.rows, b + TOUCH_AHEAD, BLOCK * cr);
            }
            if !hand_over.wait_for_left(j1) {
                // The left half panicked; the join re-raises it.
                return false;
            }
            for (i, (((u, hn), wj), ok)) in blk
                .chunks_exact(cr)
                .zip(hb.chunks_exact_mut(nh))
                .zip(wb.chunks_exact_mut(m))
                .zip(okb.iter_mut())
                .enumerate()
            {
                let jj = j0 + i;
                x[..nh].copy_from_slice(&self.hidden[jj * nh..(jj + 1) * nh]);
                network::cell_rows(&u[..cell], x, &mut hn[r..]);
                for (v, slot) in hn[..r].iter_mut().zip(&hand_over.states[jj * r..]) {
                    *v = T::from_f64(f64::from_bits(slot.load(Ordering::Relaxed)));
                }
                x[..nh].copy_from_slice(hn);
                network::readout(&u[cell..], x, out);
                widen_into(wj, out);
                *ok = wj.iter().all(|v| v.is_finite());
                all &= *ok;
                for (slot, v) in hand_over.predictions[jj * m..].iter().zip(wj.iter()) {
                    slot.store(v.to_bits(), Ordering::Relaxed);
                }
            }
            hand_over.right.store(j1, Ordering::Release);
            for (o, acc) in self.cuw.chunks_exact_mut(cr).enumerate() {
                let rows = blk.chunks_exact(cr);
                kernels::accumulate_rows(acc, rows, wb, m, o, self.pred[o]);
            }
        }
        all
    }
}

/// The left thread's C^{uw} sums: its panel's rows, and how far they have got.
struct Sums<'a, T> {
    /// `m×c`: the left columns of C^{uw}, unscaled.
    cuw: &'a mut [T],
    rows: &'a [T],
    pred: &'a [f64],
    /// The predictions received so far (`J×m`).
    w: &'a mut [f64],
    /// Particles summed.
    done: usize,
}

impl<T: Real> Sums<'_, T> {
    /// Sums over the particles whose predictions have arrived. When the right half is running
    /// it then waits for more until at most [`LAG`] blocks of the `produced` particles are
    /// left, or none once all `j` are produced; a right half that has not started may be
    /// waiting for this very thread (rayon runs an unstolen half on the thread that forked it,
    /// after the first), so then it returns and leaves the rest to [`Finish`].
    fn catch_up(&mut self, hand_over: &HandOver, produced: usize, j: usize) {
        let (m, c) = (self.pred.len(), self.cuw.len() / self.pred.len());
        let backoff = Backoff::new();
        loop {
            // `finished` before `right`: once finished, the progress read after it is final.
            let over = hand_over.right_finished.load(Ordering::Acquire);
            let ready = hand_over.right.load(Ordering::Acquire);
            if ready > self.done {
                let (from, to) = (self.done, ready);
                for (v, slot) in self.w[from * m..to * m]
                    .iter_mut()
                    .zip(&hand_over.predictions[from * m..to * m])
                {
                    *v = f64::from_bits(slot.load(Ordering::Relaxed));
                }
                for (o, acc) in self.cuw.chunks_exact_mut(c).enumerate() {
                    let rows = self.rows[from * c..to * c].chunks_exact(c);
                    let w = &self.w[from * m..to * m];
                    kernels::accumulate_rows(acc, rows, w, m, o, self.pred[o]);
                }
                self.done = to;
            }
            let behind = produced - self.done;
            let running = hand_over.right_started.load(Ordering::Acquire) && !over;
            if behind == 0 || !running || (produced < j && behind <= LAG * BLOCK) {
                return;
            }
            backoff.snooze();
        }
    }
}

/// What the two halves of the forward share: the left's new states (`J×r`) and the right's
/// predictions (`J×m`), as bits, how many particles each has handed over, and whether each
/// has started or finished.
struct HandOver<'a> {
    states: &'a [AtomicU64],
    predictions: &'a [AtomicU64],
    left: AtomicUsize,
    right: AtomicUsize,
    left_finished: AtomicBool,
    right_started: AtomicBool,
    right_finished: AtomicBool,
}

impl HandOver<'_> {
    /// Waits until the left half has handed over the states of the first `j1` particles (it
    /// always runs, first); false when it finished without them (it panicked).
    fn wait_for_left(&self, j1: usize) -> bool {
        let backoff = Backoff::new();
        while self.left.load(Ordering::Acquire) < j1 {
            if self.left_finished.load(Ordering::Acquire) && self.left.load(Ordering::Acquire) < j1
            {
                return false;
            }
            backoff.snooze();
        }
        true
    }
}

/// Sets its flag when dropped, a panic included, so that the other half never waits for a
/// half that is gone.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The rest of a step once the coefficients are known: finish C^{uw}'s sums when some are
/// due, scale C^{uw} by 1/J, form the next mean ū' = ū + C^{uw} q̄ (the centre of inflation,
/// needed before the pass), then one read-write pass updates every particle and sums the new
/// mean. On the calling thread over rows, or a panel per thread in one fork-join: the same
/// operations per element, in the same order.
pub(super) struct Finish<'a, T> {
    pub m: usize,
    pub inv_j: f64,
    pub lambda: T,
    pub nesterov: Option<T>,
    pub q: &'a [f64],
    pub qbar: &'a [f64],
    /// `Σ_j e_j` per output ([`kernels::prediction_sums`]): C^{uw}'s centring.
    pub esum: &'a [T],
    /// `(the first particle whose left sums are due, all predictions w, the mean prediction
    /// ŷ)` when the forward left some; `None` when it did not, or after a repair recomputed
    /// C^{uw} whole.
    pub continuation: Option<(usize, &'a [f64], &'a [f64])>,
}

/// One thread's panel and its columns of everything else [`Finish`] touches.
struct Panel<'a, T> {
    rows: &'a mut [T],
    /// Momentum only: the previous iterates' panel (empty otherwise).
    prev: &'a mut [T],
    /// `m×n`: this panel's columns of C^{uw}.
    cuw: &'a mut [T],
    next_mean: &'a mut [T],
    /// ū on entry, the sum of the new particles on exit.
    mean: &'a mut [T],
}

impl<T: Real> Finish<'_, T> {
    /// `particles` and `previous` (empty without momentum) are stored as rows (`cut` `None`),
    /// or as panels cut at column `c`, and `cuw` then too (`m×c`, then `m×(d − c)`).
    pub(super) fn run(
        &self,
        particles: &mut [T],
        previous: &mut [T],
        cuw: &mut [T],
        next_mean: &mut [T],
        mean: &mut [T],
        cut: Option<usize>,
    ) {
        let Some(c) = cut else {
            let whole = Panel {
                rows: particles,
                prev: previous,
                cuw,
                next_mean,
                mean,
            };
            return self.panel(whole, self.continuation);
        };
        let j = particles.len() / mean.len();
        let (rows_l, rows_r) = particles.split_at_mut(j * c);
        let (prev_l, prev_r) = previous.split_at_mut((j * c).min(previous.len()));
        let (cuw_l, cuw_r) = cuw.split_at_mut(self.m * c);
        let (nm_l, nm_r) = next_mean.split_at_mut(c);
        let (mean_l, mean_r) = mean.split_at_mut(c);
        let left = Panel {
            rows: rows_l,
            prev: prev_l,
            cuw: cuw_l,
            next_mean: nm_l,
            mean: mean_l,
        };
        let right = Panel {
            rows: rows_r,
            prev: prev_r,
            cuw: cuw_r,
            next_mean: nm_r,
            mean: mean_r,
        };
        rayon::join(
            || self.panel(left, self.continuation),
            || self.panel(right, None),
        );
    }

    fn panel(&self, p: Panel<T>, continuation: Option<(usize, &[f64], &[f64])>) {
        let m = self.m;
        let n = p.mean.len();
        if let Some((from, w, pred)) = continuation {
            for (o, acc) in p.cuw.chunks_exact_mut(n).enumerate() {
                let rows = p.rows[from * n..].chunks_exact(n);
                kernels::accumulate_rows(acc, rows, &w[from * m..], m, o, pred[o]);
            }
        }
        kernels::scale_and_next_mean(
            p.cuw.chunks_exact_mut(n),
            T::from_f64(self.inv_j),
            self.esum,
            self.qbar,
            p.mean,
            p.next_mean,
        );
        p.mean.fill(T::ZERO);
        let rule = UpdateRule {
            cuw: p.cuw,
            d: n,
            m,
            lambda: self.lambda,
            next_mean: p.next_mean,
            nesterov: self.nesterov,
        };
        let rows = p.rows.chunks_exact_mut(n);
        rule.update(rows, self.q, p.prev.chunks_exact_mut(n), p.mean);
    }
}

/// Particle-major rows of `d` (`buf`) to two panels cut at column `c` (`to_panels`), or back:
/// what a split ensemble stores (module doc). Runs when an ensemble starts or stops splitting
/// its steps, never per step. In place but for the right parts, which wait in a copy (the
/// smaller part unless the read-out has more rows than the cell), while the left parts slide:
/// towards the front, first particle first, on the way to panels; towards the back, last
/// particle first, on the way back, so that no part is overwritten before it has moved.
pub(super) fn relayout<T: Copy>(buf: &mut [T], d: usize, c: usize, to_panels: bool) {
    if buf.is_empty() {
        return;
    }
    let j = buf.len() / d;
    let (cr, panel) = (d - c, j * c);
    if to_panels {
        let right: Vec<T> = buf
            .chunks_exact(d)
            .flat_map(|row| &row[c..])
            .copied()
            .collect();
        for jj in 1..j {
            buf.copy_within(jj * d..jj * d + c, jj * c);
        }
        buf[panel..].copy_from_slice(&right);
    } else {
        let right = buf[panel..].to_vec();
        for jj in (1..j).rev() {
            buf.copy_within(jj * c..(jj + 1) * c, jj * d);
        }
        for (row, part) in buf.chunks_exact_mut(d).zip(right.chunks_exact(cr)) {
            row[c..].copy_from_slice(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayout_to_panels_and_back_is_the_identity_and_panels_hold_each_part_in_order() {
        let (j, d, c) = (5, 7, 3);
        let rows: Vec<u32> = (0..(j * d) as u32).collect();
        let mut buf = rows.clone();
        relayout(&mut buf, d, c, true);
        for jj in 0..j {
            assert_eq!(&buf[jj * c..(jj + 1) * c], &rows[jj * d..jj * d + c]);
            let right = &buf[j * c + jj * (d - c)..j * c + (jj + 1) * (d - c)];
            assert_eq!(right, &rows[jj * d + c..(jj + 1) * d]);
        }
        relayout(&mut buf, d, c, false);
        assert_eq!(buf, rows);
    }

    #[test]
    fn the_left_panel_takes_half_the_rows_and_at_least_one_cell_row() {
        assert_eq!(row_cut(&Layout::new(32, 12, 1)), 17);
        assert_eq!(row_cut(&Layout::new(16, 12, 1)), 9);
        assert_eq!(row_cut(&Layout::new(8, 3, 3)), 6);
        assert_eq!(row_cut(&Layout::new(1, 3, 4)), 1);
        assert_eq!(row_cut(&Layout::new(2, 3, 1)), 2);
    }
}
