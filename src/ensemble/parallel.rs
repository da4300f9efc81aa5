//! One step of one big ensemble on two threads, bit-identical to the serial step.
//!
//! Sums over particles (C^{uw}, the new mean) must run j = 0, 1, …, J−1 for every parameter,
//! so the particles cannot simply be cut in two with a partial sum each. Instead:
//!
//! - forward: one side runs particles `[0, s)` and accumulates C^{uw} over them (all columns,
//!   fused as in the serial step) while the other runs the forward of `[s, J)`, handing over
//!   each finished block's predictions; the first side then chases the second, continuing the
//!   sums over its finished particles in order while it computes the rest;
//! - finish: whatever sums the chase had not reached when the second side finished are
//!   continued by both sides, split by columns; then each side scales its columns of C^{uw},
//!   forms its columns of the next mean, updates its columns of every particle and sums its
//!   part of the new mean (an element-wise pass has no order to keep across columns).
//!
//! Where the cuts fall, and how far the chase gets, change only who computes what, never an
//! operation or its order, so the result is the serial one for any cut and any thread timing.
//! The cost over the serial step is the chase's second read of the second part's particles
//! (just after the other core read them, so mostly from the shared cache) and two fork-joins
//! per observation.
//!
//! The halves run as `rayon::join`s on [`pool`], workers started once and kept: a join
//! costs a wake-up of an idle (usually still spinning) worker, microseconds, where spawning a
//! thread per pass cost 60–90 µs in this VM. The pool is the only place the crate starts
//! threads for the engine; rayon's scoped joins let the halves borrow the ensemble, and the
//! hand-over is atomics, so there is no `unsafe`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::kernels::{self, BLOCK, UpdateRule};
use super::{Accumulate, forward_rows, touch_ahead};
use crate::network::Layout;
use crate::real::Real;

/// Particle-parameters (J·d) from which a step of `T` with two threads splits: 2^20 (8 MiB)
/// for `f64`, 2^22 (16 MiB) for `f32` ([`Real::SPLIT_FACTOR`]). Below that the fork-joins and
/// the chase's second read cost more than the second core gains. `f32` does half the work per
/// byte of memory traffic, so it needs the bigger ensemble: at J=2000, hidden 32 (12 MB of
/// `f32`, 2.97 M particle-parameters) two threads measured 1.13–1.29 ms against 1.14–1.16 ms
/// on one, at J=4000 (24 MB) 3.2–3.6 against 4.0–4.1 ms; `f64` at J=1000, hidden 32 (12 MB,
/// 1.49 M) 0.96–1.02 against 1.31 ms (`roofline profile`, interleaved).
pub fn parallel_min_work<T: Real>() -> usize {
    (1 << 20) * T::SPLIT_FACTOR
}

/// Where the two sides cut the work, learned from how long each side took: the cut never
/// changes a result, only who computes what, so it may follow the machine. A fixed cut made
/// every step wait for the slower side whenever the host slowed one core down (seconds at a
/// time here); these move part of the way (a tenth for the forward, whose single-step
/// estimate is noisier, a fifth for the columns) to the cut that would have balanced the last
/// step. They start near where they settle on an idle machine: the first side (which also sums,
/// and then chases) takes 30% of the particles and 53% of the columns.
#[derive(Debug, Clone, Copy)]
pub struct Balance {
    forward: f64,
    finish: f64,
}

impl Default for Balance {
    fn default() -> Self {
        Balance {
            forward: 0.3,
            finish: 0.53,
        }
    }
}

/// What the two-thread step keeps from one step to the next so that, once warm, it allocates
/// nothing: the forward's hand-over slots, the chase's block of predictions, the vectors that
/// give each thread its parts of the rows (empty between steps; [`keep`]) and the gathered
/// C^{uw} rows of a multi-output stream. A clone starts empty.
#[derive(Default)]
pub struct Spare<T: 'static> {
    shared: Vec<AtomicU64>,
    chase: Vec<f64>,
    parts: [Vec<&'static mut [T]>; 6],
    gathered: [Vec<T>; 2],
}

impl<T> Clone for Spare<T> {
    fn clone(&self) -> Self {
        Spare {
            shared: Vec::new(),
            chase: Vec::new(),
            parts: Default::default(),
            gathered: Default::default(),
        }
    }
}

impl<T> std::fmt::Debug for Spare<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare").finish_non_exhaustive()
    }
}

/// The share that would have balanced two sides that took `ta` and `tb` for shares `share`
/// and `1 − share`, approached by a fifth, kept within [0.1, 0.9].
fn rebalance(share: f64, ta: Duration, tb: Duration) -> f64 {
    let (ta, tb) = (ta.as_secs_f64(), tb.as_secs_f64());
    if !(ta > 0.0 && tb > 0.0) {
        return share;
    }
    // Time per unit of work on each side; the balanced share gives both the same time.
    let (ra, rb) = (ta / share, tb / (1.0 - share));
    let target = rb / (ra + rb);
    (share + 0.2 * (target - share)).clamp(0.1, 0.9)
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

/// The cut: a multiple of [`BLOCK`], at least one block each side.
fn cut(j: usize, share: f64) -> usize {
    let s = ((j as f64 * share) as usize) / BLOCK * BLOCK;
    s.clamp(BLOCK, j - BLOCK)
}

/// The forward of every particle on two threads, with C^{uw} accumulated (unscaled) into
/// `cuw` as far as it can go in order. One side runs the forward of `[0, s)` with the sums
/// fused, as the serial step does; the other runs the forward of `[s, J)` and hands each
/// finished block's predictions over (`progress`). The first side then chases it: it continues
/// the sums over the second part's finished particles, in order, while the second part is
/// still being computed, and stops when that is done. Returns whether every prediction was
/// finite and the first particle whose sums are still due ([`Finish`] does those, split by
/// columns). `scratch_a`/`scratch_b` hold the inputs `z`.
#[allow(
    clippy::too_many_arguments,
    reason = "the serial forward's slices plus the second thread's scratch"
)]
pub(super) fn forward<T: Real>(
    layout: &Layout,
    particles: &[T],
    hidden: &mut [T],
    w: &mut [f64],
    healthy: &mut [bool],
    scratch_a: &mut [T],
    scratch_b: &mut [T],
    cuw: &mut [T],
    mean: &[T],
    pred: &[f64],
    balance: &mut Balance,
    spare: &mut Spare<T>,
) -> (bool, usize) {
    let (d, m, nh) = (layout.dim(), layout.outputs, layout.hidden);
    let j = particles.len() / d;
    let s = cut(j, balance.forward);
    let (pa, pb) = particles.split_at(s * d);
    let (ha, hb) = hidden.split_at_mut(s * nh);
    let (wa, wb) = w.split_at_mut(s * m);
    let (oka, okb) = healthy.split_at_mut(s);
    let touch = touch_ahead::<T>(particles.len());
    let pred_ok = pred.iter().all(|v| v.is_finite());
    // The hand-over: the second side's predictions as bits, how many of its particles are
    // done, and whether it has started and finished.
    if spare.shared.len() < j * m {
        spare.shared.resize_with(j * m, || AtomicU64::new(0));
    }
    spare.chase.resize(BLOCK * m, 0.0);
    let shared = &spare.shared[..(j - s) * m];
    let chase_w = &mut spare.chase;
    let progress = AtomicUsize::new(0);
    let (started, finished) = (AtomicBool::new(false), AtomicBool::new(false));
    let hand_over = HandOver {
        shared,
        progress: &progress,
        started: &started,
        finished: &finished,
    };
    let start = Instant::now();
    let (first, (ok_b, tb)) = rayon::join(
        || {
            let acc = pred_ok.then_some(Accumulate {
                cuw: &mut *cuw,
                mean,
                pred,
            });
            let ok = forward_rows(
                layout,
                pa,
                ha,
                wa,
                oka,
                scratch_a,
                acc,
                touch,
                &mut |_, _| {},
            );
            let own = start.elapsed();
            let mut chase = Chase::default();
            if ok && pred_ok {
                chase.run(cuw, mean, pb, d, m, pred, &hand_over, chase_w);
            }
            (ok, own, chase)
        },
        || {
            hand_over.started.store(true, Ordering::Release);
            // Set even if this side panics, so that a chase never waits for it forever.
            let _finished = SetOnDrop(hand_over.finished);
            let ok = forward_rows(
                layout,
                pb,
                hb,
                wb,
                okb,
                scratch_b,
                None,
                touch,
                &mut |done, block| {
                    let at = (done - block.len() / m) * m;
                    for (slot, v) in hand_over.shared[at..at + block.len()].iter().zip(block) {
                        slot.store(v.to_bits(), Ordering::Relaxed);
                    }
                    hand_over.progress.store(done, Ordering::Release);
                },
            );
            (ok, start.elapsed())
        },
    );
    let (ok_a, own, chase) = first;
    balance.forward = rebalance_forward(balance.forward, j, s, own, tb, &chase);
    (pred_ok && ok_a && ok_b, s + chase.done)
}

/// What the second side of the forward shares with the first.
struct HandOver<'a> {
    /// Its predictions, `(J − s)×m`, as bits.
    shared: &'a [AtomicU64],
    /// How many of its particles are done (their predictions in `shared`).
    progress: &'a AtomicUsize,
    started: &'a AtomicBool,
    finished: &'a AtomicBool,
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// How far the first side got chasing the second, and the time it spent summing.
#[derive(Debug, Default)]
struct Chase {
    /// Second-part particles whose C^{uw} sums are done.
    done: usize,
    work: Duration,
}

impl Chase {
    /// Continues C^{uw}'s sums (all columns) over the second part's particles `rows` as their
    /// predictions arrive, block by block in order, until the second side has finished: what
    /// is left then is split by columns in [`Finish`]. It waits only for a second side that is
    /// running on another worker: one that has not started may be waiting for this very
    /// thread (rayon runs an unstolen half on the thread that forked it, after the first half;
    /// the pool's other worker may be busy with another stream's step), so then it returns.
    #[allow(
        clippy::too_many_arguments,
        reason = "the accumulation's slices, the hand-over and its buffer"
    )]
    fn run<T: Real>(
        &mut self,
        cuw: &mut [T],
        mean: &[T],
        rows: &[T],
        d: usize,
        m: usize,
        pred: &[f64],
        hand_over: &HandOver,
        w: &mut [f64],
    ) {
        loop {
            // `finished` before `progress`: once finished, the progress read after it is final.
            let over = hand_over.finished.load(Ordering::Acquire);
            let ready = hand_over.progress.load(Ordering::Acquire);
            if over || self.done >= ready {
                if over || !hand_over.started.load(Ordering::Acquire) {
                    return;
                }
                std::hint::spin_loop();
                continue;
            }
            let t = Instant::now();
            let end = (self.done + BLOCK).min(ready);
            let n = end - self.done;
            for (v, slot) in w.iter_mut().zip(&hand_over.shared[self.done * m..end * m]) {
                *v = f64::from_bits(slot.load(Ordering::Relaxed));
            }
            let block = &rows[self.done * d..end * d];
            for (o, row) in cuw.chunks_exact_mut(d).enumerate() {
                let rows = block.chunks_exact(d);
                kernels::accumulate_rows(row, mean, rows, &w[..n * m], m, o, pred[o]);
            }
            self.done = end;
            self.work += t.elapsed();
        }
    }
}

/// The forward's next share for the first side: the cut at which its own part plus the chase
/// of the rest would take as long as the second side's forward, from this step's costs per
/// particle, approached by a tenth and kept within [0.1, 0.9].
fn rebalance_forward(
    share: f64,
    j: usize,
    s: usize,
    own: Duration,
    theirs: Duration,
    chase: &Chase,
) -> f64 {
    let (own, theirs) = (own.as_secs_f64(), theirs.as_secs_f64());
    if !(own > 0.0 && theirs > 0.0) || s == 0 || s >= j {
        return share;
    }
    let own_each = own / s as f64; // forward + fused sums
    let forward_each = theirs / (j - s) as f64;
    let sum_each = if chase.done > 0 {
        chase.work.as_secs_f64() / chase.done as f64
    } else {
        0.3 * own_each
    };
    // s·own + (J − s)·sum = (J − s)·forward  ⇒  s = J(forward − sum) / (own + forward − sum)
    let denominator = own_each + forward_each - sum_each;
    if !(denominator > 0.0 && forward_each > sum_each) {
        return share;
    }
    let target = (forward_each - sum_each) / denominator;
    (share + 0.1 * (target - share)).clamp(0.1, 0.9)
}

/// The rest of a two-thread step once the coefficients are known, split by columns: each
/// side continues C^{uw}'s sums over the second part's particles on its columns (when due),
/// scales them by 1/J, forms its columns of the next mean ū' = ū + C^{uw} q̄, then updates its
/// columns of every particle and sums them into the new mean: the serial step's operations
/// per element, in its order, in one fork-join.
///
/// (Runs of a few dozen columns, continuation then update while the second part's columns
/// are in L2, measured slower here: the strided walk over 2000 rows defeats the prefetcher
/// that the serial-looking walk along each half-row keeps busy.)
pub(super) struct Finish<'a, T> {
    pub d: usize,
    pub m: usize,
    pub inv_j: f64,
    pub lambda: T,
    pub nesterov: Option<T>,
    pub q: &'a [f64],
    pub qbar: &'a [f64],
    /// `(first particle of the second part, all predictions w, the mean prediction ŷ)` when
    /// C^{uw} still lacks the second part's sums; `None` after a repair recomputed it whole.
    pub continuation: Option<(usize, &'a [f64], &'a [f64])>,
}

/// One thread's columns of everything [`Finish`] touches.
struct Part<'p, 'a, T> {
    rows: &'p mut [&'a mut [T]],
    prev: &'p mut [&'a mut [T]],
    /// Per output, this thread's columns of its C^{uw} row.
    cuw: &'p mut [&'a mut [T]],
    next_mean: &'a mut [T],
    /// ū on entry, the sum of the new particles on exit.
    mean: &'a mut [T],
    /// Several outputs: this side's C^{uw} rows back to back, for the rule.
    gathered: &'p mut Vec<T>,
}

impl<T: Real> Finish<'_, T> {
    #[allow(
        clippy::too_many_arguments,
        reason = "the ensemble's buffers, each cut in two"
    )]
    pub(super) fn run(
        &self,
        particles: &mut [T],
        previous: &mut [T],
        cuw: &mut [T],
        next_mean: &mut [T],
        mean: &mut [T],
        balance: &mut Balance,
        spare: &mut Spare<T>,
    ) {
        let d = self.d;
        // The cut: a multiple of 8 columns, at least 8 each side.
        let c = if d >= 16 {
            ((d as f64 * balance.finish) as usize / 8 * 8).clamp(8, (d - 8) / 8 * 8)
        } else {
            d / 2
        };
        let [p0, p1, p2, p3, p4, p5] = &mut spare.parts;
        let (mut rows_l, mut rows_r) = halves(particles, d, c, [p0, p1]);
        let (mut prev_l, mut prev_r) = halves(previous, d, c, [p2, p3]);
        let (mut cuw_l, mut cuw_r) = halves(cuw, d, c, [p4, p5]);
        let [gathered_l, gathered_r] = &mut spare.gathered;
        let (nm_l, nm_r) = next_mean.split_at_mut(c);
        let (mean_l, mean_r) = mean.split_at_mut(c);
        let start = Instant::now();
        let (tl, tr) = rayon::join(
            || {
                self.columns(Part {
                    rows: &mut rows_l,
                    prev: &mut prev_l,
                    cuw: &mut cuw_l,
                    next_mean: nm_l,
                    mean: mean_l,
                    gathered: gathered_l,
                });
                start.elapsed()
            },
            || {
                self.columns(Part {
                    rows: &mut rows_r,
                    prev: &mut prev_r,
                    cuw: &mut cuw_r,
                    next_mean: nm_r,
                    mean: mean_r,
                    gathered: gathered_r,
                });
                start.elapsed()
            },
        );
        if d >= 16 {
            balance.finish = rebalance(c as f64 / d as f64, tl, tr);
        }
        for (spare, parts) in spare
            .parts
            .iter_mut()
            .zip([rows_l, rows_r, prev_l, prev_r, cuw_l, cuw_r])
        {
            *spare = keep(parts);
        }
    }

    fn columns(&self, p: Part<T>) {
        let m = self.m;
        let Part {
            rows,
            prev,
            cuw,
            next_mean,
            mean,
            gathered,
        } = p;
        let n = mean.len();
        if let Some((from, w, pred)) = self.continuation {
            for (o, row) in cuw.iter_mut().enumerate() {
                let parts = rows[from..].iter().map(|r| &**r);
                kernels::accumulate_rows(row, mean, parts, &w[from * m..], m, o, pred[o]);
            }
        }
        kernels::scale_and_next_mean(
            cuw.iter_mut().map(|r| &mut **r),
            T::from_f64(self.inv_j),
            self.qbar,
            mean,
            next_mean,
        );
        mean.fill(T::ZERO);
        // Several outputs: the rule wants this side's C^{uw} rows back to back.
        let rule_cuw: &[T] = if m == 1 {
            &cuw[0][..]
        } else {
            gathered.clear();
            gathered.extend(cuw.iter().flat_map(|r| r.iter().copied()));
            gathered
        };
        let rule = UpdateRule {
            cuw: rule_cuw,
            d: n,
            m,
            lambda: self.lambda,
            next_mean,
            nesterov: self.nesterov,
        };
        let rows = rows.iter_mut().map(|r| &mut **r);
        rule.update(rows, self.q, prev.iter_mut().map(|r| &mut **r), Some(mean));
    }
}

/// Every row of `buf` (rows of `d`) cut at column `c`: the left parts and the right parts, in
/// the two spare vectors (handing each thread its parts of the rows takes vectors of slices;
/// these keep their allocation from step to step).
type Halves<'a, T> = (Vec<&'a mut [T]>, Vec<&'a mut [T]>);
fn halves<'a, T>(
    buf: &'a mut [T],
    d: usize,
    c: usize,
    spare: [&mut Vec<&'static mut [T]>; 2],
) -> Halves<'a, T> {
    let [l, r] = spare;
    let (mut left, mut right): Halves<'a, T> = (std::mem::take(l), std::mem::take(r));
    for row in buf.chunks_exact_mut(d) {
        let (a, b) = row.split_at_mut(c);
        left.push(a);
        right.push(b);
    }
    (left, right)
}

/// Empties a vector of borrowed parts and gives it back its `'static` type with its
/// allocation: collecting nothing from its own `into_iter` reuses the buffer in place (the
/// element layout is the same; `tests/alloc.rs` fails if it ever did not).
#[allow(
    clippy::unnecessary_filter_map,
    reason = "the map changes the element type's lifetime, which a filter cannot"
)]
fn keep<T>(mut parts: Vec<&mut [T]>) -> Vec<&'static mut [T]> {
    parts.clear();
    parts.into_iter().filter_map(|_| None).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_cut_moves_towards_own_part_plus_chase_equal_to_the_other_forward() {
        let us = Duration::from_micros;
        // 1000 particles cut at 300: the first side took 1.2 µs per own particle and summed at
        // 0.4 µs per chased one, the second took 1.0 µs per particle. Balanced:
        // s·1.2 + (1000 − s)·0.4 = (1000 − s)·1.0  ⇒  s = 600/1.8 = 333.3.
        let chase = Chase {
            done: 700,
            work: us(280),
        };
        let s = rebalance_forward(0.3, 1000, 300, us(360), us(700), &chase);
        assert!(
            (s - (0.3 + 0.1 * (600.0 / 1800.0 - 0.3))).abs() < 1e-9,
            "{s}"
        );
        // Nothing chased: the sums are taken as 0.3 of the first side's cost per particle.
        let none = Chase::default();
        let s = rebalance_forward(0.3, 1000, 300, us(360), us(700), &none);
        let sum = 0.36;
        let target = (1.0 - sum) / (1.2 + 1.0 - sum);
        assert!((s - (0.3 + 0.1 * (target - 0.3))).abs() < 1e-9, "{s}");
        // No timing, or summing as slow as the forward: no move.
        assert_eq!(
            rebalance_forward(0.3, 1000, 300, Duration::ZERO, us(7), &none),
            0.3
        );
        let slow = Chase {
            done: 10,
            work: us(20),
        };
        assert_eq!(
            rebalance_forward(0.3, 1000, 300, us(360), us(700), &slow),
            0.3
        );
    }

    #[test]
    fn the_cut_moves_a_fifth_of_the_way_to_balance() {
        let ms = Duration::from_millis;
        // Balanced already: stays.
        assert!((rebalance(0.4, ms(4), ms(4)) - 0.4).abs() < 1e-12);
        // Equal speeds but the first side took all its time on 60% of the work: the balanced
        // share is 0.5, a fifth of the way from 0.6 is 0.58.
        assert!((rebalance(0.6, ms(6), ms(4)) - 0.58).abs() < 1e-12);
        // The second side twice as slow per unit: balance at 2/3, approached by a fifth.
        let s = rebalance(0.5, ms(5), ms(10));
        assert!((s - (0.5 + 0.2 * (2.0 / 3.0 - 0.5))).abs() < 1e-12);
        // Never beyond [0.1, 0.9], and no timing leaves it as it was.
        assert_eq!(rebalance(0.12, ms(100), ms(1)), 0.1);
        assert_eq!(rebalance(0.3, Duration::ZERO, ms(1)), 0.3);
    }
}
