//! The ensemble of J particles (networks), their hidden states, the mean particle, and the EKI
//! step that predicts with the mean particle and then updates every particle.
//!
//! Memory: particles are one contiguous `J×d` buffer (row per particle; two panels of columns
//! while the steps split over two threads, see the `parallel` module). One step reads it
//! twice and writes it once: the forward pass reads `u_j` and, while it is hot in L1,
//! accumulates `Σ u_j e_jᵀ` with `e_j = w_j − ŷ`, and the step then centres it once,
//! `C^{uw} = (Σ u_j e_jᵀ − ū (Σ e_j)ᵀ)/J` (the cross-covariance, shifted by the mean particle's
//! prediction ŷ instead of w̄, which differs only by `(Σ_j (u_j − ū))(w̄ − ŷ)ᵀ`, zero up to
//! rounding because ū is recomputed as the exact mean on every update): a multiply and an add
//! per particle-parameter where `Σ (u_j − ū) e_jᵀ` took a subtraction more. The update pass
//! reads and writes `u_j` and sums the new mean on the way. All workspaces are allocated at
//! construction (the two-thread step's on its first step); a warm [`Ensemble::step`] allocates
//! nothing.
//!
//! This module does no IO, reads no clock, and draws randomness only from its own seeded RNG.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::engine::network::{self, Layout};
use crate::engine::options::{Options, Spread};
use crate::engine::prior::Prior;
use crate::engine::real::Real;
use crate::engine::update::KalmanUpdate;

mod any;
mod buffer;
mod kernels;
mod parallel;
pub use any::AnyEnsemble;
pub use buffer::ParticleBuf;
use kernels::BLOCK;
pub use parallel::{on_pool, parallel_min_work};

/// One EKI ensemble, storing and computing its particles in `T` ([`Real`]: `f64` by default,
/// or `f32`). Only its owner mutates it.
#[derive(Debug, Clone)]
pub struct Ensemble<T: Real = f64> {
    layout: Layout,
    j: usize,
    d: usize,
    update: KalmanUpdate,
    inflation: f64,
    momentum: bool,
    momentum_restart: u64,
    spread: Option<Spread>,
    prior: Prior,
    rng: ChaCha8Rng,
    /// `J×d`, particle-major: the points where G is evaluated.
    particles: ParticleBuf<T>,
    /// Momentum only: the un-extrapolated iterates `u_n` (`J×d`), empty otherwise.
    previous: ParticleBuf<T>,
    /// `J×hidden`.
    hidden: Vec<T>,
    mean: Vec<T>,
    mean_hidden: Vec<T>,
    /// Updates applied so far.
    steps: u64,
    respreads: u64,
    repaired: u64,
    /// Per-particle sum of squared one-step errors since the last reset (picks the best particle).
    particle_sse: Vec<f64>,
    last_prediction_var: f64,
    /// Threads one step may use (see [`Ensemble::set_threads`]).
    threads: usize,
    parallel_min_work: usize,
    /// `Some(c)` while the steps split over two threads: `particles` and `previous` are then
    /// stored as two panels cut at column `c` (`parallel`'s module doc), and C^{uw} too.
    /// Particle-major rows otherwise.
    cut: Option<usize>,
    /// What the two-thread step keeps between steps (allocations only).
    spare: parallel::Spare<T>,
    ws: Workspace<T>,
}

#[derive(Debug, Clone)]
struct Workspace<T> {
    /// Particle predictions `J×m`.
    w: Vec<f64>,
    /// Update coefficients `J×m`.
    q: Vec<f64>,
    /// `m×d`: row o holds `Σ_j u_j (w_j[o] − ŷ[o])`, then C^{uw} column o.
    cuw: Vec<T>,
    /// `m`: `Σ_j (w_j[o] − ŷ[o])`, which centres C^{uw}.
    esum: Vec<T>,
    /// `m×m`.
    cww: Vec<f64>,
    next_mean: Vec<T>,
    /// `[h; z; 1]` then the `m` outputs of one particle's forward.
    scratch: Vec<T>,
    /// The second thread's.
    scratch_b: Vec<T>,
    /// Two threads: the new hidden states (`J×hidden`, swapped with the old after the
    /// forward); empty until the first split step.
    hidden_next: Vec<T>,
    /// One particle as a row: a repair's re-draw; with panels also a particle gathered for a
    /// frozen prediction or drawn by a re-spread. Empty until first needed: most streams never repair (a d-long row per
    /// stream would cost the many-streams budget 1.5 KiB at J=32, hidden 8).
    row: Vec<T>,
    mean_hidden_before: Vec<T>,
    healthy: Vec<bool>,
    wbar: Vec<f64>,
    qbar: Vec<f64>,
}

/// Everything in an ensemble that evolves (what a snapshot holds); the rest is derived from
/// the options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleState {
    pub particles: Vec<f64>,
    pub previous: Vec<f64>,
    pub hidden: Vec<f64>,
    pub mean: Vec<f64>,
    pub mean_hidden: Vec<f64>,
    pub steps: u64,
    pub respreads: u64,
    pub repaired: u64,
    pub particle_sse: Vec<f64>,
    pub last_prediction_var: f64,
    pub rng: ChaCha8Rng,
    pub prior_centre: Vec<f64>,
    pub prior_scale: Vec<f64>,
}

/// What one step did, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepReport {
    /// Particles re-drawn because their prediction was not finite.
    pub repaired: usize,
    /// Step size used (1 for the Kalman form).
    pub step_size: f64,
}

/// `T` values as `f64` (exact), for snapshots and forecasts.
fn widen<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Writes `from` (exactly) into `to`, element by element.
fn widen_into<T: Real>(to: &mut [f64], from: &[T]) {
    for (t, f) in to.iter_mut().zip(from) {
        *t = f.to_f64();
    }
}

/// Writes `from`, rounded to `T`, into `to`, element by element.
fn narrow_into<T: Real>(to: &mut [T], from: &[f64]) {
    for (t, &f) in to.iter_mut().zip(from) {
        *t = T::from_f64(f);
    }
}

/// Splits a scratch vector into `[h; z; 1]` and the outputs.
fn split_scratch<'s, T>(scratch: &'s mut [T], layout: &Layout) -> (&'s mut [T], &'s mut [T]) {
    scratch.split_at_mut(layout.row())
}

/// The layout of these options and J, d, outputs and hidden units.
fn shape(options: &Options) -> (Layout, [usize; 4]) {
    let layout = options.layout();
    let dims = [
        options.ensemble,
        layout.dim(),
        layout.outputs,
        layout.hidden,
    ];
    (layout, dims)
}

/// The memory of an ensemble, in bytes (see [`Ensemble::footprint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Everything the ensemble holds while it runs.
    pub resident: usize,
    /// A snapshot's copy of its state ([`EnsembleState`], `f64`), made while the stream runs on.
    pub snapshot: usize,
}

impl<T: Real> Ensemble<T> {
    /// What an ensemble of these options holds: every buffer [`Ensemble::new`] allocates, the
    /// ones a split step adds and a repair's row; and the size of its snapshot state. Computed
    /// from the shapes alone, before anything is allocated (the daemon's memory budget); keep it
    /// next to `new`, whose buffers it lists. Parameter-sized work buffers (C^{uw} is m×d) can
    /// outgrow the particles when outputs exceed J.
    pub fn footprint(options: &Options) -> Footprint {
        let (layout, [j, d, m, nh]) = shape(options);
        let (v, f) = (std::mem::size_of::<T>(), std::mem::size_of::<f64>());
        let copies = if options.momentum { 2 } else { 1 };
        let particles = copies * ParticleBuf::<T>::resident_bytes(j * d);
        // hidden and hidden_next; mean, next_mean, the row, C^{uw}; mean_hidden twice; two
        // scratch rows; C^{uw}'s centring sums.
        let values = 2 * j * nh + (3 + m) * d + 2 * nh + 2 * (layout.row() + m) + m;
        // Per particle: w, q, the split step's hand-over (predictions, its copy of w, the
        // left rows' states) and the squared error; then C^{ww}, w̄, q̄ and the prior's centre
        // and scales.
        let doubles = j * (4 * m + parallel::row_cut(&layout) + 1) + m * m + 2 * m + 2 * d;
        let resident = particles + values * v + doubles * f + j;
        let snapshot = (copies * j * d + j * nh + d + nh + j + 2 * d) * f;
        Footprint { resident, snapshot }
    }

    /// Draws the initial ensemble from the prior, reproducibly from `options.seed`.
    pub fn new(options: &Options) -> Self {
        let (layout, [j, d, m, nh]) = shape(options);
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let prior = Prior::new(
            &layout,
            options.prior_spread,
            options.readout_spread,
            options.skip,
            &mut rng,
        );
        let mut particles = ParticleBuf::zeroed(j * d);
        for u in particles.chunks_exact_mut(d) {
            prior.draw_around(&prior.centre, 1.0, &mut rng, u);
        }
        let mut e = Ensemble {
            layout,
            j,
            d,
            update: KalmanUpdate {
                method: options.method,
                noise: options.noise,
                h: options.step.h,
                eps: options.step.eps,
                loss: options.loss,
                huber_delta: options.huber_delta,
            },
            inflation: options.inflation,
            momentum: options.momentum,
            momentum_restart: options.momentum_restart,
            spread: options.spread.schedule(),
            prior,
            rng,
            previous: if options.momentum {
                particles.clone()
            } else {
                ParticleBuf::zeroed(0)
            },
            particles,
            hidden: vec![T::ZERO; j * nh],
            mean: vec![T::ZERO; d],
            mean_hidden: vec![T::ZERO; nh],
            steps: 0,
            respreads: 0,
            repaired: 0,
            particle_sse: vec![0.0; j],
            last_prediction_var: 0.0,
            threads: 1,
            parallel_min_work: parallel_min_work::<T>(),
            cut: None,
            spare: parallel::Spare::default(),
            ws: Workspace {
                w: vec![0.0; j * m],
                q: vec![0.0; j * m],
                cuw: vec![T::ZERO; m * d],
                esum: vec![T::ZERO; m],
                cww: vec![0.0; m * m],
                next_mean: vec![T::ZERO; d],
                scratch: vec![T::ZERO; layout.row() + m],
                scratch_b: vec![T::ZERO; layout.row() + m],
                hidden_next: Vec::new(),
                row: Vec::new(),
                mean_hidden_before: vec![T::ZERO; nh],
                healthy: vec![true; j],
                wbar: vec![0.0; m],
                qbar: vec![0.0; m],
            },
        };
        e.recompute_mean();
        e
    }

    /// A copy of the evolving state, for snapshots.
    pub fn state(&self) -> EnsembleState {
        EnsembleState {
            particles: rows_f64(&self.particles, self.d, self.cut),
            previous: rows_f64(&self.previous, self.d, self.cut),
            hidden: widen(&self.hidden),
            mean: widen(&self.mean),
            mean_hidden: widen(&self.mean_hidden),
            steps: self.steps,
            respreads: self.respreads,
            repaired: self.repaired,
            particle_sse: self.particle_sse.clone(),
            last_prediction_var: self.last_prediction_var,
            rng: self.rng.clone(),
            prior_centre: self.prior.centre.clone(),
            prior_scale: self.prior.scale.clone(),
        }
    }

    /// Rebuilds an ensemble from options and a saved state, checking every length.
    pub fn from_state(options: &Options, s: EnsembleState) -> Result<Self, String> {
        let mut e = Ensemble::new(options);
        let (j, d, nh) = (e.j, e.d, e.layout.hidden);
        let checks = [
            ("particles", s.particles.len(), j * d),
            ("previous", s.previous.len(), e.previous.len()),
            ("hidden", s.hidden.len(), j * nh),
            ("mean", s.mean.len(), d),
            ("mean_hidden", s.mean_hidden.len(), nh),
            ("particle_sse", s.particle_sse.len(), j),
            ("prior_centre", s.prior_centre.len(), d),
            ("prior_scale", s.prior_scale.len(), d),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(format!(
                    "ensemble state: {what} has {got} values, the options need {want}"
                ));
            }
        }
        // Every length was checked above.
        narrow_into(&mut e.particles, &s.particles);
        narrow_into(&mut e.previous, &s.previous);
        narrow_into(&mut e.hidden, &s.hidden);
        narrow_into(&mut e.mean, &s.mean);
        narrow_into(&mut e.mean_hidden, &s.mean_hidden);
        e.steps = s.steps;
        e.respreads = s.respreads;
        e.repaired = s.repaired;
        e.particle_sse = s.particle_sse;
        e.last_prediction_var = s.last_prediction_var;
        e.rng = s.rng;
        e.prior = Prior {
            centre: s.prior_centre,
            scale: s.prior_scale,
        };
        Ok(e)
    }

    /// Lets one step split its work over two threads (`threads` ≥ 2; 1, the default, is the
    /// serial step) once the ensemble is big enough ([`parallel_min_work`] particle-parameters).
    /// Results are bit-identical either way. It pays only when a second core is idle, so the
    /// owner decides: the daemon asks for it (`[engine] step_threads`) and holds a core permit
    /// per thread, so that split steps never compete with other streams' updates; `ekid eval`
    /// asks for it with `--step-threads`.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.clamp(1, 2);
        self.sync_layout();
    }

    /// Stores the particles as the steps need them: two panels when they split, rows when not.
    fn sync_layout(&mut self) {
        let k = self.layout.row();
        let want = self
            .is_parallel()
            .then(|| parallel::row_cut(&self.layout) * k);
        if want == self.cut {
            return;
        }
        let d = self.d;
        if let Some(c) = self.cut.take() {
            for buf in [&mut self.particles, &mut self.previous] {
                parallel::relayout(buf, d, c, false);
            }
        }
        if let Some(c) = want {
            for buf in [&mut self.particles, &mut self.previous] {
                parallel::relayout(buf, d, c, true);
            }
            self.cut = want;
        }
    }

    /// Whether a step of this ensemble runs on two threads.
    pub fn is_parallel(&self) -> bool {
        self.threads >= 2
            && self.j * self.d >= self.parallel_min_work
            && self.j >= 4 * BLOCK
            && parallel::pool().is_some()
    }

    /// Tests force the two-thread path on small ensembles with a threshold of 0.
    #[cfg(test)]
    fn set_parallel_min_work(&mut self, work: usize) {
        self.parallel_min_work = work;
        self.sync_layout();
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn size(&self) -> usize {
        self.j
    }
    pub fn dim(&self) -> usize {
        self.d
    }
    /// The particles as stored: particle-major rows (`J×d`), or two panels while the steps
    /// split over two threads. Tests only: everything else reads a particle through
    /// [`Ensemble::particle_parts`] or the rows of [`Ensemble::state`], whatever the storage.
    #[cfg(test)]
    pub(crate) fn stored_particles(&self) -> &[T] {
        &self.particles
    }
    /// Particle `j`'s parameters in two parts, in parameter order (the second empty when the
    /// particles are stored as rows).
    pub fn particle_parts(&self, j: usize) -> (&[T], &[T]) {
        parts(&self.particles, self.d, self.cut, j)
    }
    pub fn mean(&self) -> &[T] {
        &self.mean
    }
    pub fn mean_hidden(&self) -> &[T] {
        &self.mean_hidden
    }
    pub fn hidden(&self, j: usize) -> &[T] {
        let nh = self.layout.hidden;
        &self.hidden[j * nh..(j + 1) * nh]
    }
    pub fn steps(&self) -> u64 {
        self.steps
    }
    pub fn repaired(&self) -> u64 {
        self.repaired
    }
    /// The particles' predictions `w_j` (`J×m`) of the last step.
    pub fn particle_predictions(&self) -> &[f64] {
        &self.ws.w
    }

    /// Variance of the particles' last predictions, averaged over outputs (scaled units).
    pub fn prediction_variance(&self) -> f64 {
        self.last_prediction_var
    }

    /// Variance of the particles' last predictions of output `o` (scaled units; 0 before the
    /// first step of this process: the workspace is not part of a snapshot).
    pub fn prediction_variance_of(&self, o: usize) -> f64 {
        let m = self.layout.outputs;
        self.ws.cww[o * m + o]
    }

    /// Root mean variance of the parameters across particles.
    pub fn parameter_spread(&self) -> f64 {
        let mut s = 0.0;
        for jj in 0..self.j {
            let (u0, u1) = self.particle_parts(jj);
            for (&a, &b) in u0.iter().chain(u1).zip(&self.mean) {
                let x = (a - b).to_f64();
                s += x * x;
            }
        }
        (s / (self.j * self.d) as f64).sqrt()
    }

    /// Replaces the particles (tests and analysis drive the ensemble from given states).
    /// `particles` are rows (`J×d`) whatever the ensemble's storage.
    pub fn set_particles(&mut self, particles: &[T]) {
        self.particles.copy_from_slice(particles);
        if self.momentum {
            self.previous.copy_from_slice(particles);
        }
        if let Some(c) = self.cut {
            parallel::relayout(&mut self.particles, self.d, c, true);
            parallel::relayout(&mut self.previous, self.d, c, true);
        }
        self.recompute_mean();
    }

    fn recompute_mean(&mut self) {
        self.mean.fill(T::ZERO);
        for jj in 0..self.j {
            let (u0, u1) = parts(&self.particles, self.d, self.cut, jj);
            for (m, &v) in self.mean.iter_mut().zip(u0.iter().chain(u1)) {
                *m += v;
            }
        }
        let inv = T::from_f64(1.0 / self.j as f64);
        for m in &mut self.mean {
            *m *= inv;
        }
    }

    /// Clears every hidden state (the mean particle's too), e.g. at the start of a pass.
    pub fn reset_hidden(&mut self) {
        self.hidden.fill(T::ZERO);
        self.mean_hidden.fill(T::ZERO);
    }

    pub fn reset_particle_errors(&mut self) {
        self.particle_sse.fill(0.0);
    }

    /// The particle with the least squared error since the last reset (ties: lowest index).
    pub fn best_particle(&self) -> usize {
        let mut best = 0;
        for (j, &e) in self.particle_sse.iter().enumerate() {
            if e < self.particle_sse[best] {
                best = j;
            }
        }
        best
    }

    /// Mean-particle prediction with frozen parameters; advances only the mean's hidden state.
    pub fn predict_frozen(&mut self, z: &[f64], pred: &mut [f64]) {
        let (x, out) = split_scratch(&mut self.ws.scratch, &self.layout);
        network::load_inputs(&self.layout, x, z);
        network::step(&self.layout, &self.mean, &mut self.mean_hidden, x, out);
        widen_into(pred, out);
    }

    /// Particle `j`'s prediction with frozen parameters; advances only its hidden state.
    pub fn predict_particle_frozen(&mut self, j: usize, z: &[f64], pred: &mut [f64]) {
        let nh = self.layout.hidden;
        let (x, out) = split_scratch(&mut self.ws.scratch, &self.layout);
        network::load_inputs(&self.layout, x, z);
        let params = gather(&self.particles, self.d, self.cut, j, &mut self.ws.row);
        network::step(
            &self.layout,
            params,
            &mut self.hidden[j * nh..(j + 1) * nh],
            x,
            out,
        );
        widen_into(pred, out);
    }

    /// One observation: writes the mean particle's prediction of `y` from inputs `z` into
    /// `pred` (made before anything learns from `y`), then updates every particle.
    /// `z` and `y` must be finite (checked at the edge).
    pub fn step(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) -> StepReport {
        parallel::on_pool(self.is_parallel(), || self.step_here(z, y, pred))
    }

    /// [`Ensemble::step`] on the calling thread (on the step pool when the step splits).
    fn step_here(&mut self, z: &[f64], y: &[f64], pred: &mut [f64]) -> StepReport {
        debug_assert!(z.iter().chain(y).all(|v| v.is_finite()));

        // 1. Predict with the mean particle.
        self.ws
            .mean_hidden_before
            .copy_from_slice(&self.mean_hidden);
        self.predict_frozen(z, pred);

        // 2. Forward every particle, fusing the cross-covariance accumulation.
        let forward = self.forward_particles(z, pred);
        let mut report = StepReport {
            repaired: 0,
            step_size: 1.0,
        };
        if !forward.healthy {
            report.repaired = self.repair(z, pred);
        }

        // 3. Output-space statistics.
        self.output_statistics(y);

        // 4. Coefficients q_j: u_j += C^{uw} q_j.
        let ws = &mut self.ws;
        report.step_size = self.update.coefficients(&ws.w, &mut ws.cww, y, &mut ws.q);

        // 5. The rest of C^{uw} (two threads), its scaling, ū' and the update pass.
        self.update_particles(pred, forward);
        self.steps += 1;

        // 6. EKI(R): periodically re-draw around the mean so the ensemble does not collapse.
        if let Some(s) = self.spread
            && self.steps.is_multiple_of(s.every)
        {
            let gamma = s.gamma * s.decay.powi(self.respreads.min(i32::MAX as u64) as i32);
            self.respread(gamma);
            self.respreads += 1;
        }
        report
    }

    /// Runs every particle one cell step into `ws.w` and, while the predictions are healthy,
    /// accumulates C^{uw} shifted by the mean particle's prediction `pred`.
    fn forward_particles(&mut self, z: &[f64], pred: &[f64]) -> ForwardPass {
        let mut healthy_so_far = pred.iter().all(|v| v.is_finite());
        self.ws.cuw.fill(T::ZERO);
        let Workspace {
            w,
            cuw,
            scratch,
            scratch_b,
            healthy,
            hidden_next,
            ..
        } = &mut self.ws;
        let Some(c) = self.cut else {
            let healthy = forward_rows(
                &self.layout,
                &self.particles,
                &mut self.hidden,
                w,
                healthy,
                scratch,
                healthy_so_far.then_some(Accumulate { cuw, pred }),
                touch_ahead::<T>(self.particles.len()),
            );
            return ForwardPass {
                healthy: healthy_so_far && healthy,
                left_done: None,
            };
        };
        network::load_inputs(&self.layout, scratch_b, z);
        hidden_next.resize(self.hidden.len(), T::ZERO);
        let touch = touch_ahead::<T>(self.particles.len());
        let (left, right) = self.particles.split_at(self.j * c);
        let (ok, done) = parallel::forward(
            &self.layout,
            parallel::Panels { left, right, touch },
            &self.hidden,
            hidden_next,
            w,
            healthy,
            scratch,
            scratch_b,
            cuw,
            pred,
            &mut self.spare,
        );
        std::mem::swap(&mut self.hidden, hidden_next);
        healthy_so_far &= ok;
        ForwardPass {
            healthy: healthy_so_far,
            left_done: Some(done),
        }
    }

    /// The particles' mean prediction w̄, C^{ww}, the prediction variance and each particle's
    /// running squared error against `y`.
    fn output_statistics(&mut self, y: &[f64]) {
        let m = self.layout.outputs;
        let inv_j = 1.0 / self.j as f64;
        let Workspace { w, cww, wbar, .. } = &mut self.ws;
        // Sums over particles, each in particle order from 0.0, one output (pair) at a time so
        // that the running sum stays in a register.
        mean_over_particles(w, m, inv_j, wbar);
        for a in 0..m {
            for b in 0..m {
                let (wa, wb) = (wbar[a], wbar[b]);
                let s = w
                    .chunks_exact(m)
                    .fold(0.0, |s, wj| s + (wj[a] - wa) * (wj[b] - wb));
                cww[a * m + b] = s * inv_j;
            }
        }
        self.last_prediction_var = (0..m).map(|o| cww[o * m + o]).sum::<f64>() / m as f64;
        for (e, wj) in self.particle_sse.iter_mut().zip(w.chunks_exact(m)) {
            *e += wj
                .iter()
                .zip(y)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>();
        }
    }

    /// `u_j += C^{uw} q_j` for every particle (plus inflation and the Nesterov extrapolation
    /// when enabled), finishing the left panel's C^{uw} sums the forward left due, and the new
    /// exact mean: every particle read and written once.
    fn update_particles(&mut self, pred: &[f64], forward: ForwardPass) {
        let m = self.layout.outputs;
        let inv_j = 1.0 / self.j as f64;
        let Workspace {
            w,
            q,
            cuw,
            esum,
            qbar,
            next_mean,
            ..
        } = &mut self.ws;
        mean_over_particles(q, m, inv_j, qbar);
        kernels::prediction_sums(w, pred, esum);
        let nesterov = self.momentum.then(|| {
            // Nesterov's n/(n+3) tends to 1 and a stream never ends, so the count restarts
            // every `momentum_restart` steps (scheduled restarts, Roulet & d'Aspremont 2017).
            let n = (self.steps % self.momentum_restart) as f64;
            T::from_f64(n / (n + 3.0))
        });
        let due = forward.left_done.filter(|&s| forward.healthy && s < self.j);
        parallel::Finish {
            m,
            inv_j,
            lambda: T::from_f64(self.inflation),
            nesterov,
            q,
            qbar,
            esum,
            continuation: due.map(|s| (s, &w[..], pred)),
        }
        .run(
            &mut self.particles,
            &mut self.previous,
            cuw,
            next_mean,
            &mut self.mean,
            self.cut,
        );
        let inv = T::from_f64(inv_j);
        for v in self.mean.iter_mut() {
            *v *= inv;
        }
    }

    fn respread(&mut self, gamma: f64) {
        let d = self.d;
        if self.cut.is_none() {
            for u in self.particles.chunks_exact_mut(d) {
                self.prior.draw_around(&self.mean, gamma, &mut self.rng, u);
            }
        } else {
            // Panels: each particle drawn as a row (the prior's scales are per parameter).
            let row = &mut self.ws.row;
            row.resize(d, T::ZERO);
            for jj in 0..self.j {
                self.prior
                    .draw_around(&self.mean, gamma, &mut self.rng, row);
                scatter(&mut self.particles, d, self.cut, jj, row);
            }
        }
        if self.momentum {
            self.previous.copy_from_slice(&self.particles);
        }
        self.recompute_mean();
    }

    /// The rare path: some particle (or the mean) predicted a non-finite value. Re-draws the
    /// unhealthy particles around the mean of the healthy ones (or from the prior if none is
    /// healthy), re-runs their forward from the step's starting hidden state, recomputes the
    /// mean prediction if needed, and re-accumulates C^{uw}. Returns how many were re-drawn.
    fn repair(&mut self, z: &[f64], pred: &mut [f64]) -> usize {
        let (d, m, nh) = (self.d, self.layout.outputs, self.layout.hidden);
        let n_healthy = self.ws.healthy.iter().filter(|&&h| h).count();
        let centre = &mut self.ws.next_mean;
        if n_healthy == 0 {
            narrow_into(centre, &self.prior.centre);
        } else {
            centre.fill(T::ZERO);
            for jj in (0..self.j).filter(|&jj| self.ws.healthy[jj]) {
                let (u0, u1) = parts(&self.particles, d, self.cut, jj);
                for (c, &v) in centre.iter_mut().zip(u0.iter().chain(u1)) {
                    *c += v;
                }
            }
            let n = T::from_f64(n_healthy as f64);
            for c in centre.iter_mut() {
                *c /= n;
            }
        }
        let mut repaired = 0;
        for jj in 0..self.j {
            if self.ws.healthy[jj] {
                continue;
            }
            repaired += 1;
            let u = &mut self.ws.row;
            u.resize(d, T::ZERO);
            self.prior
                .draw_around(&self.ws.next_mean, 1.0, &mut self.rng, u);
            if u.iter().any(|v| !v.is_finite()) {
                narrow_into(u, &self.prior.centre);
            }
            let h = &mut self.hidden[jj * nh..(jj + 1) * nh];
            h.copy_from_slice(&self.ws.mean_hidden_before);
            if h.iter().any(|v| !v.is_finite()) {
                h.fill(T::ZERO);
            }
            let (x, out) = split_scratch(&mut self.ws.scratch, &self.layout);
            network::load_inputs(&self.layout, x, z);
            network::step(&self.layout, u, h, x, out);
            let wj = &mut self.ws.w[jj * m..(jj + 1) * m];
            widen_into(wj, out);
            if wj.iter().any(|v| !v.is_finite()) {
                // Cannot happen for finite parameters, inputs and state; stay total anyway.
                wj.fill(0.0);
            }
            scatter(&mut self.particles, d, self.cut, jj, u);
            if self.momentum {
                scatter(&mut self.previous, d, self.cut, jj, u);
            }
        }
        self.repaired += repaired as u64;
        self.recompute_mean();
        if self.mean_hidden.iter().any(|v| !v.is_finite())
            || pred.iter().any(|v| !v.is_finite())
            || self.ws.mean_hidden_before.iter().any(|v| !v.is_finite())
        {
            if self.ws.mean_hidden_before.iter().any(|v| !v.is_finite()) {
                self.ws.mean_hidden_before.fill(T::ZERO);
            }
            self.mean_hidden
                .copy_from_slice(&self.ws.mean_hidden_before);
            self.predict_frozen(z, pred);
            if pred.iter().any(|v| !v.is_finite()) {
                self.mean_hidden.fill(T::ZERO);
                self.predict_frozen(z, pred);
            }
        }
        // Re-accumulate the cross-covariance over the repaired ensemble, per panel when the
        // particles are stored as two (C^{uw} is then stored as two panels too).
        let Workspace { w, cuw, .. } = &mut self.ws;
        cuw.fill(T::ZERO);
        let c = self.cut.unwrap_or(d);
        let (particles_l, particles_r) = self.particles.split_at(self.j * c);
        let (cuw_l, cuw_r) = cuw.split_at_mut(m * c);
        for (acc, rows, n) in [(cuw_l, particles_l, c), (cuw_r, particles_r, d - c)] {
            if n == 0 {
                continue;
            }
            for (o, row) in acc.chunks_exact_mut(n).enumerate() {
                let rows = rows.chunks_exact(n);
                kernels::accumulate_rows(row, rows, w, m, o, pred[o]);
            }
        }
        repaired
    }
}

/// Particle `jj`'s two parts in a `J×d` buffer stored as rows (`cut` `None`: its row and an
/// empty part) or as two panels cut at column `c` (its left and right parts).
fn parts<T>(buf: &[T], d: usize, cut: Option<usize>, jj: usize) -> (&[T], &[T]) {
    let c = cut.unwrap_or(d);
    let (left, right) = buf.split_at(buf.len() / d * c);
    (
        &left[jj * c..(jj + 1) * c],
        &right[jj * (d - c)..(jj + 1) * (d - c)],
    )
}

/// [`parts`], mutable.
fn parts_mut<T>(buf: &mut [T], d: usize, cut: Option<usize>, jj: usize) -> (&mut [T], &mut [T]) {
    let c = cut.unwrap_or(d);
    let (left, right) = buf.split_at_mut(buf.len() / d * c);
    (
        &mut left[jj * c..(jj + 1) * c],
        &mut right[jj * (d - c)..(jj + 1) * (d - c)],
    )
}

/// Particle `jj` as one row: its row when stored as rows, else its parts copied into `row`.
fn gather<'a, T: Copy>(
    buf: &'a [T],
    d: usize,
    cut: Option<usize>,
    jj: usize,
    row: &'a mut Vec<T>,
) -> &'a [T] {
    let (u0, u1) = parts(buf, d, cut, jj);
    if u1.is_empty() {
        return u0;
    }
    row.clear();
    row.extend_from_slice(u0);
    row.extend_from_slice(u1);
    row
}

/// Writes the row `u` into particle `jj`'s parts.
fn scatter<T: Copy>(buf: &mut [T], d: usize, cut: Option<usize>, jj: usize, u: &[T]) {
    let (u0, u1) = parts_mut(buf, d, cut, jj);
    let c = u0.len();
    u0.copy_from_slice(&u[..c]);
    u1.copy_from_slice(&u[c..]);
}

/// A `J×d` buffer (rows or panels) as particle-major rows of `f64`.
fn rows_f64<T: Real>(buf: &[T], d: usize, cut: Option<usize>) -> Vec<f64> {
    let mut rows = Vec::with_capacity(buf.len());
    for jj in 0..buf.len() / d {
        let (u0, u1) = parts(buf, d, cut, jj);
        rows.extend(u0.iter().chain(u1).map(|v| v.to_f64()));
    }
    rows
}

/// `out[o] = (Σ_j v_j[o]) · inv_j` over the particles' `m`-vectors `v` (`J×m`), each sum from 0.0
/// in particle order.
fn mean_over_particles(v: &[f64], m: usize, inv_j: f64, out: &mut [f64]) {
    for (o, x) in out.iter_mut().enumerate() {
        *x = v.chunks_exact(m).fold(0.0, |s, vj| s + vj[o]) * inv_j;
    }
}

/// What the forward pass leaves the update: whether every prediction was finite, and (two
/// threads) the particle from which the left panel's C^{uw} sums are still due.
#[derive(Debug, Clone, Copy)]
struct ForwardPass {
    healthy: bool,
    left_done: Option<usize>,
}

/// The cross-covariance accumulation fused into a forward pass.
struct Accumulate<'a, T> {
    /// `m×d`, zeroed by the caller.
    cuw: &'a mut [T],
    /// The mean particle's prediction ŷ.
    pred: &'a [f64],
}

/// Runs the forward of consecutive particles (`params`, `hidden`, `w`, `healthy` aligned) and,
/// with `acc`, adds `(u_j − ū)(w_j − ŷ)ᵀ` for them, block by block while the block's rows are
/// still in L1/L2. Once a prediction is not finite it stops accumulating (the repair pass
/// recomputes C^{uw} from scratch). Returns whether every prediction was finite.
#[allow(
    clippy::too_many_arguments,
    reason = "the aligned per-particle slices, the fused sums and the touch switch"
)]
fn forward_rows<T: Real>(
    layout: &Layout,
    params: &[T],
    hidden: &mut [T],
    w: &mut [f64],
    healthy: &mut [bool],
    scratch: &mut [T],
    mut acc: Option<Accumulate<T>>,
    touch: bool,
) -> bool {
    let (d, m, nh) = (layout.dim(), layout.outputs, layout.hidden);
    let mut all = true;
    for (bi, (((blk, hb), wb), okb)) in params
        .chunks(BLOCK * d)
        .zip(hidden.chunks_mut(BLOCK * nh))
        .zip(w.chunks_mut(BLOCK * m))
        .zip(healthy.chunks_mut(BLOCK))
        .enumerate()
    {
        if touch {
            touch_block(params, bi + TOUCH_AHEAD, BLOCK * d);
        }
        for (((u, h), wj), ok) in blk
            .chunks_exact(d)
            .zip(hb.chunks_exact_mut(nh))
            .zip(wb.chunks_exact_mut(m))
            .zip(okb.iter_mut())
        {
            let (x, out) = split_scratch(scratch, layout);
            network::step(layout, u, h, x, out);
            widen_into(wj, out);
            *ok = wj.iter().all(|v| v.is_finite());
            all &= *ok;
        }
        if !all {
            acc = None;
        }
        if let Some(a) = acc.as_mut() {
            for (o, row) in a.cuw.chunks_exact_mut(d).enumerate() {
                kernels::accumulate_rows(row, blk.chunks_exact(d), wb, m, o, a.pred[o]);
            }
        }
    }
    all
}

/// Loads one value per cache line of block `b` (blocks of `len` values) of `buf`, what is
/// there of it. Out of cache the forward is where each particle is first read, and the
/// arithmetic in between (tanh above all) keeps the hardware prefetcher from running far
/// enough ahead: touching the block TOUCH_AHEAD blocks on starts those reads early. When the
/// ensemble fits in cache it only costs loads: callers touch by the whole ensemble's size
/// ([`touch_ahead`]).
fn touch_block<T: Real>(buf: &[T], b: usize, len: usize) {
    if let Some(ahead) = buf.get(b * len..) {
        let mut touched = 0u64;
        for v in ahead[..ahead.len().min(len)].iter().step_by(T::PER_LINE) {
            touched |= v.bits();
        }
        std::hint::black_box(touched);
    }
}

/// Whether the forward of an ensemble of `work` particle-parameters of `T` touches ahead.
fn touch_ahead<T>(work: usize) -> bool {
    work * std::mem::size_of::<T>() >= TOUCH_MIN_BYTES
}

/// Blocks ahead whose cache lines the forward touches (see [`forward_rows`]).
const TOUCH_AHEAD: usize = 4;
/// Ensemble bytes from which it does: 16 MiB of particles, half the (shared) L3. Measured on
/// the development machine (BENCHMARKS.md, decisions): about 7% faster at J=2000, hidden 32
/// (24 MB), 5% slower at J=2000, hidden 16 (8 MB, which the L3 holds); the two-thread forward
/// alike (0–8% slower split at 9.5–14 MB, 10% faster at 24 MB).
const TOUCH_MIN_BYTES: usize = 16 << 20;

#[cfg(test)]
mod tests;
