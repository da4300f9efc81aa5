//! The EKI maths against theory and against direct dense computations.

use nalgebra::{DMatrix, DVector};
use proptest::prelude::*;

use super::*;
use crate::engine::options::{Method, Options};

fn options(
    j: usize,
    hidden: usize,
    lags: usize,
    outputs: usize,
    method: Method,
    seed: u64,
) -> Options {
    Options {
        ensemble: j,
        hidden,
        lags,
        outputs,
        method,
        seed,
        ..Options::default()
    }
    .check()
    .expect("valid test options")
}

/// Zeroes the read-out's hidden columns in every particle: the output is then `S z + c`, a
/// linear function of u (and the span of the ensemble keeps those entries at zero).
fn linearise(e: &mut Ensemble) {
    let l = *e.layout();
    let (d, k, ro) = (l.dim(), l.row(), l.readout_offset());
    let mut p = e.stored_particles().to_vec();
    for u in p.chunks_exact_mut(d) {
        for o in 0..l.outputs {
            u[ro + o * k..ro + o * k + l.hidden].fill(0.0);
        }
    }
    e.set_particles(&p);
}

/// Largest distance of a particle from the affine span of the initial ensemble, relative to
/// its size.
fn span_residual(initial: &[f64], now: &[f64], j: usize, d: usize) -> f64 {
    let base = DVector::from_column_slice(&initial[..d]);
    let basis = DMatrix::from_fn(d, j - 1, |r, c| initial[(c + 1) * d + r] - base[r]);
    let svd = basis.svd(true, true);
    let mut worst: f64 = 0.0;
    for u in now.chunks_exact(d) {
        let v = DVector::from_column_slice(u) - &base;
        let x = svd.solve(&v, 1e-10).expect("svd solve");
        let r = (svd_basis_times(initial, d, j, &x) - &v).norm();
        worst = worst.max(r / (1.0 + v.norm()));
    }
    worst
}

fn svd_basis_times(initial: &[f64], d: usize, j: usize, x: &DVector<f64>) -> DVector<f64> {
    DVector::from_fn(d, |r, _| {
        (0..j - 1)
            .map(|c| (initial[(c + 1) * d + r] - initial[r]) * x[c])
            .sum()
    })
}

fn random_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    use rand::Rng;
    (0..n).map(|_| rng.random_range(0.0..1.0)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Schillings & Stuart 2017: with a linear forward map and no spread or inflation, every
    /// particle stays in the affine span of the initial ensemble (Kalman and flow forms, with
    /// and without momentum), for observations that change every step.
    #[test]
    fn particles_stay_in_the_initial_affine_span(
        j in 2usize..10, hidden in 1usize..4, lags in 1usize..4, outputs in 1usize..3,
        flow in any::<bool>(), momentum in any::<bool>(), seed in any::<u64>(), steps in 1usize..8,
    ) {
        let method = if flow { Method::Flow } else { Method::Kalman };
        let mut o = options(j, hidden, lags, outputs, method, seed);
        o.momentum = momentum && flow;
        let mut e = Ensemble::<f64>::new(&o);
        linearise(&mut e);
        let initial = e.stored_particles().to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let mut pred = vec![0.0; outputs];
        for _ in 0..steps {
            let z = random_vec(&mut rng, e.layout().n_in);
            let y = random_vec(&mut rng, outputs);
            e.step(&z, &y, &mut pred);
        }
        let r = span_residual(&initial, e.stored_particles(), j, e.dim());
        prop_assert!(r < 1e-9, "residual {r}");
    }

    /// With a linear forward map and a fixed observation (the inverse-problem setting), the
    /// Kalman form contracts every particle's misfit and the mean's: `y − w' = Γ(C^{ww}+Γ)^{-1}(y − w)`.
    #[test]
    fn kalman_misfit_does_not_increase(
        j in 2usize..10, hidden in 1usize..4, lags in 1usize..4, outputs in 1usize..3,
        seed in any::<u64>(), noise in 1e-3f64..1.0,
    ) {
        let mut o = options(j, hidden, lags, outputs, Method::Kalman, seed);
        o.noise = noise;
        let mut e = Ensemble::<f64>::new(&o);
        linearise(&mut e);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xabc);
        let z = random_vec(&mut rng, e.layout().n_in);
        let y = random_vec(&mut rng, outputs);
        let mut pred = vec![0.0; outputs];
        let misfit = |v: &[f64]| v.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        let mut last_mean = f64::INFINITY;
        let mut last_particles = vec![f64::INFINITY; j];
        for _ in 0..6 {
            e.step(&z, &y, &mut pred);
            let m = misfit(&pred);
            prop_assert!(m <= last_mean * (1.0 + 1e-9) + 1e-15, "mean misfit {m} after {last_mean}");
            last_mean = m;
            for (jj, w) in e.particle_predictions().chunks_exact(outputs).enumerate() {
                let mj = misfit(w);
                prop_assert!(mj <= last_particles[jj] * (1.0 + 1e-9) + 1e-15);
                last_particles[jj] = mj;
            }
        }
    }
}

/// Forward of every particle from zero hidden state, outside the ensemble.
fn forward_all(e: &Ensemble, z: &[f64]) -> Vec<f64> {
    let l = *e.layout();
    let mut w = vec![0.0; e.size() * l.outputs];
    let mut scratch = vec![0.0; l.row()];
    for (u, wj) in e
        .stored_particles()
        .chunks_exact(e.dim())
        .zip(w.chunks_exact_mut(l.outputs))
    {
        let mut h = vec![0.0; l.hidden];
        network::load_inputs(&l, &mut scratch, z);
        network::step(&l, u, &mut h, &mut scratch, wj);
    }
    w
}

#[test]
fn kalman_update_matches_dense_computation() {
    let (j, m) = (7, 2);
    let o = options(j, 3, 2, m, Method::Kalman, 11);
    let mut e = Ensemble::<f64>::new(&o);
    let d = e.dim();
    let z = [0.3, 0.7, 0.1, 0.9];
    let y = [0.4, 0.6];
    let u = DMatrix::from_row_slice(j, d, e.stored_particles());
    let w = DMatrix::from_row_slice(j, m, &forward_all(&e, &z));
    let ubar = u.row_mean();
    let wbar = w.row_mean();
    let du = DMatrix::from_fn(j, d, |r, c| u[(r, c)] - ubar[c]);
    let dw = DMatrix::from_fn(j, m, |r, c| w[(r, c)] - wbar[c]);
    let cuw = du.transpose() * &dw / j as f64;
    let cww = dw.transpose() * &dw / j as f64;
    let gain = &cuw
        * (cww + DMatrix::identity(m, m) * o.noise)
            .try_inverse()
            .expect("SPD");
    let resid = DMatrix::from_fn(j, m, |r, c| y[c] - w[(r, c)]);
    let expected = &u + resid * gain.transpose();

    // The mean particle's prediction is the network at ū.
    let mut mean_pred = [0.0; 2];
    let mut h = vec![0.0; 3];
    let mut scratch = vec![0.0; e.layout().row()];
    network::load_inputs(e.layout(), &mut scratch, &z);
    network::step(e.layout(), e.mean(), &mut h, &mut scratch, &mut mean_pred);

    let mut pred = [0.0; 2];
    e.step(&z, &y, &mut pred);
    assert_eq!(pred, mean_pred);
    let got = DMatrix::from_row_slice(j, d, e.stored_particles());
    let err = (&got - &expected).abs().max();
    assert!(err < 1e-12, "max deviation {err}");
    let mean_err = (DMatrix::from_row_slice(1, d, e.mean()) - expected.row_mean())
        .abs()
        .max();
    assert!(mean_err < 1e-13, "mean deviation {mean_err}");
}

#[test]
fn flow_step_matches_hand_computed_d() {
    let j = 3;
    let mut o = options(j, 1, 1, 1, Method::Flow, 5);
    o.step = crate::engine::options::Step { h: 0.5, eps: 1e-3 };
    let mut e = Ensemble::<f64>::new(&o);
    let d = e.dim();
    let z = [0.8];
    let y = [0.25];
    let u: Vec<Vec<f64>> = e
        .stored_particles()
        .chunks_exact(d)
        .map(<[f64]>::to_vec)
        .collect();
    let w = forward_all(&e, &z);
    let wbar = w.iter().sum::<f64>() / j as f64;
    // D^{jk} = (1/J) (w_k − w̄)·(w_j − y), Ψ = ½‖z − y‖².
    let mut dm = [[0.0; 3]; 3];
    for a in 0..j {
        for b in 0..j {
            dm[a][b] = (w[b] - wbar) * (w[a] - y[0]) / j as f64;
        }
    }
    let norm = dm.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    let h_n = 0.5 / (norm + 1e-3);
    let mut pred = [0.0];
    let report = e.step(&z, &y, &mut pred);
    assert!((report.step_size - h_n).abs() < 1e-12 * h_n);
    for a in 0..j {
        for p in 0..d {
            let du: f64 = (0..j).map(|b| dm[a][b] * u[b][p]).sum();
            let want = u[a][p] - h_n * du;
            let got = e.stored_particles()[a * d + p];
            assert!(
                (got - want).abs() < 1e-12,
                "particle {a} param {p}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn a_particle_with_non_finite_prediction_is_redrawn() {
    let o = options(10, 4, 3, 1, Method::Kalman, 3);
    let mut e = Ensemble::<f64>::new(&o);
    let d = e.dim();
    let mut p = e.stored_particles().to_vec();
    // Particle 4's read-out bias overflows to infinity.
    p[4 * d + d - 1] = f64::INFINITY;
    e.set_particles(&p);
    let mut pred = [0.0];
    let report = e.step(&[0.1, 0.2, 0.3], &[0.5], &mut pred);
    assert_eq!(report.repaired, 1);
    assert_eq!(e.repaired(), 1);
    assert!(pred[0].is_finite());
    assert!(e.stored_particles().iter().all(|v| v.is_finite()));
    assert!(e.mean().iter().all(|v| v.is_finite()));
    // It keeps learning afterwards.
    let report = e.step(&[0.2, 0.1, 0.3], &[0.4], &mut pred);
    assert_eq!(report.repaired, 0);
    assert!(pred[0].is_finite());
}

#[test]
fn every_particle_unhealthy_falls_back_to_the_prior() {
    let o = options(4, 2, 1, 1, Method::Kalman, 9);
    let mut e = Ensemble::<f64>::new(&o);
    let p = vec![f64::NAN; e.stored_particles().len()];
    e.set_particles(&p);
    let mut pred = [0.0];
    let report = e.step(&[0.5], &[0.5], &mut pred);
    assert_eq!(report.repaired, 4);
    assert!(pred[0].is_finite());
    assert!(e.stored_particles().iter().all(|v| v.is_finite()));
}

#[test]
fn spread_and_inflation_keep_the_ensemble_alive() {
    // Without either, deterministic EKI collapses the spread; each keeps it up.
    let run = |f: &dyn Fn(&mut Options)| {
        let mut o = options(20, 4, 2, 1, Method::Kalman, 1);
        f(&mut o);
        let mut e = Ensemble::<f64>::new(&o.check().expect("valid"));
        let mut pred = [0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..400 {
            let z = random_vec(&mut rng, 2);
            e.step(&z, &[0.5 * z[0] + 0.2], &mut pred);
        }
        e.parameter_spread()
    };
    let plain = run(&|_| {});
    let inflated = run(&|o| o.inflation = 1.01);
    let spread = run(&|o| {
        o.spread = crate::engine::options::SpreadOption::On(crate::engine::options::Spread {
            every: 100,
            gamma: 1.0,
            decay: 1.0,
        })
    });
    assert!(
        inflated > 2.0 * plain,
        "inflated {inflated} vs plain {plain}"
    );
    assert!(spread > 2.0 * plain, "spread {spread} vs plain {plain}");
}

#[test]
fn same_seed_same_ensemble_different_seed_different() {
    let a = Ensemble::<f64>::new(&options(5, 2, 2, 1, Method::Kalman, 42));
    let b = Ensemble::<f64>::new(&options(5, 2, 2, 1, Method::Kalman, 42));
    let c = Ensemble::<f64>::new(&options(5, 2, 2, 1, Method::Kalman, 43));
    assert_eq!(a.stored_particles(), b.stored_particles());
    assert_ne!(a.stored_particles(), c.stored_particles());
}

/// Pushes one stream through the serial step and the two-thread step and asserts that every
/// prediction, particle, hidden state and the mean are bit-identical.
fn assert_parallel_matches_serial(o: &Options, steps: usize, poison: Option<usize>) {
    parallel_matches_serial::<f64>(o, steps, poison);
    parallel_matches_serial::<f32>(o, steps, poison);
}

fn parallel_matches_serial<T: Real>(o: &Options, steps: usize, poison: Option<usize>) {
    let mut serial = Ensemble::<T>::new(o);
    serial.set_threads(1);
    let mut parallel = serial.clone();
    parallel.set_threads(2);
    parallel.set_parallel_min_work(0);
    assert!(parallel.is_parallel() && !serial.is_parallel());
    if let Some(jj) = poison {
        let mut p = serial.stored_particles().to_vec();
        p[jj * serial.dim() + 1] = T::from_f64(f64::NAN);
        serial.set_particles(&p);
        parallel.set_particles(&p);
    }
    let (n_in, m) = (serial.layout().n_in, serial.layout().outputs);
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed ^ 0x7a11);
    let (mut ps, mut pp) = (vec![0.0; m], vec![0.0; m]);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let tbits = |v: &[T]| v.iter().map(|x| x.bits()).collect::<Vec<_>>();
    for t in 0..steps {
        let z = random_vec(&mut rng, n_in);
        let y = random_vec(&mut rng, m);
        let rs = serial.step(&z, &y, &mut ps);
        let rp = parallel.step(&z, &y, &mut pp);
        assert_eq!(bits(&ps), bits(&pp), "prediction at step {t}");
        assert_eq!(rs.repaired, rp.repaired, "repairs at step {t}");
        assert_eq!(rs.step_size.to_bits(), rp.step_size.to_bits());
    }
    // The split ensemble stores its particles as panels; as rows they must be the serial ones.
    assert!(parallel.cut.is_some());
    assert_eq!(serial.state(), parallel.state());
    parallel.set_threads(1);
    assert!(parallel.cut.is_none());
    assert_eq!(
        tbits(serial.stored_particles()),
        tbits(parallel.stored_particles())
    );
    assert_eq!(tbits(serial.mean()), tbits(parallel.mean()));
    assert_eq!(tbits(&serial.hidden), tbits(&parallel.hidden));
    assert_eq!(tbits(&serial.previous), tbits(&parallel.previous));
    assert_eq!(
        bits(serial.particle_predictions()),
        bits(parallel.particle_predictions())
    );
}

#[test]
fn two_threads_give_the_serial_bits_issue_6() {
    // Sizes around the block and cut boundaries, one and several outputs, every update rule.
    for (j, hidden, outputs) in [(16, 3, 1), (37, 4, 1), (50, 5, 2), (43, 2, 3), (64, 8, 1)] {
        let base = options(j, hidden, 3, outputs, Method::Kalman, j as u64);
        assert_parallel_matches_serial(&base, 30, None);
        let inflated = Options {
            inflation: 1.001,
            ..base.clone()
        };
        assert_parallel_matches_serial(&inflated, 30, None);
        let flow = Options {
            method: Method::Flow,
            momentum: true,
            ..base.clone()
        };
        assert_parallel_matches_serial(&flow, 30, None);
        let spread = Options {
            spread: crate::engine::options::SpreadOption::On(crate::engine::options::Spread {
                every: 7,
                gamma: 0.5,
                decay: 0.9,
            }),
            ..base.clone()
        };
        assert_parallel_matches_serial(&spread, 30, None);
        // A particle on each side of the cut turns non-finite: the repair path.
        assert_parallel_matches_serial(&base, 10, Some(1));
        assert_parallel_matches_serial(&base, 10, Some(j - 2));
    }
}

/// Whether an ensemble of `j` particles at `hidden` splits its steps when allowed two threads.
fn splits<T: Real>(j: usize, hidden: usize) -> bool {
    let mut e = Ensemble::<T>::new(&options(j, hidden, 12, 1, Method::Kalman, 1));
    e.set_threads(2);
    e.is_parallel()
}

#[test]
fn big_ensembles_split_and_small_ones_do_not() {
    assert!(!splits::<f64>(100, 16));
    assert!(splits::<f64>(2000, 32));
    let mut big = Ensemble::<f64>::new(&options(2000, 32, 12, 1, Method::Kalman, 1));
    big.set_threads(2);
    big.set_threads(1);
    assert!(!big.is_parallel());
    // f32 needs four times the particle-parameters: J=2000/h32 (2.97 M) stays serial, J=1000
    // at hidden 64 (5.0 M) splits.
    assert!(!splits::<f32>(2000, 32));
    assert!(splits::<f32>(1000, 64));
}

#[test]
fn touching_ahead_changes_no_result_issue_6() {
    // The touch only loads; force it on a small ensemble and compare with it off.
    let e = Ensemble::<f64>::new(&options(37, 5, 3, 1, Method::Kalman, 8));
    let l = *e.layout();
    let run = |touch: bool| {
        let (mut hidden, mut w, mut ok) = (e.hidden.clone(), vec![0.0; 37], vec![true; 37]);
        let mut cuw = vec![0.0; e.dim()];
        let mut scratch = vec![0.0; l.row() + l.outputs];
        network::load_inputs(&l, &mut scratch, &[0.2, 0.5, 0.9]);
        let acc = Accumulate {
            cuw: &mut cuw,
            pred: &[0.4],
        };
        let all = forward_rows(
            &l,
            e.stored_particles(),
            &mut hidden,
            &mut w,
            &mut ok,
            &mut scratch,
            Some(acc),
            touch,
        );
        assert!(all);
        [hidden, w, cuw].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    assert_eq!(run(true), run(false));
}

/// Two split ensembles stepping at once share the pool's two workers: each step's second half
/// may then never be stolen and run only after the first half on the same thread. The first
/// half must not wait for its predictions (it would wait forever), and the results stay the
/// serial ones.
#[test]
fn concurrent_split_steps_on_the_shared_pool_neither_hang_nor_change_results_issue_6() {
    let run = |seed: u64, threads: usize| {
        let o = options(40, 6, 3, 1, Method::Kalman, seed);
        let mut e = Ensemble::<f64>::new(&o);
        e.set_threads(threads);
        e.set_parallel_min_work(0);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pred = [0.0];
        let mut out = Vec::new();
        for _ in 0..1000 {
            let z = random_vec(&mut rng, 3);
            let y = random_vec(&mut rng, 1);
            e.step(&z, &y, &mut pred);
            out.push(pred[0].to_bits());
        }
        out
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for seed in 1u64..=6 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((seed, run(seed, 2)));
        });
    }
    for _ in 1..=6 {
        let (seed, split) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a split step hung on the shared pool");
        assert_eq!(split, run(seed, 1), "seed {seed}");
    }
}

/// On a pool of one thread rayon runs each join's second half after the first, on the same
/// thread: the left half then finds no predictions to sum (it never waits for a half that has
/// not started) and leaves every left sum to the finish. The results stay the serial ones.
#[test]
fn a_split_step_whose_halves_run_one_after_the_other_gives_the_serial_bits_issue_6() {
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a pool of one thread");
    for (j, hidden, outputs, momentum) in [(37, 6, 1, false), (40, 5, 2, true)] {
        let o = Options {
            momentum,
            method: if momentum {
                Method::Flow
            } else {
                Method::Kalman
            },
            ..options(j, hidden, 3, outputs, Method::Kalman, 5)
        };
        let mut serial = Ensemble::<f64>::new(&o);
        let mut split = serial.clone();
        split.set_threads(2);
        split.set_parallel_min_work(0);
        assert!(split.cut.is_some());
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut ps, mut pp) = (vec![0.0; outputs], vec![0.0; outputs]);
        for t in 0..20 {
            let z = random_vec(&mut rng, split.layout().n_in);
            let y = random_vec(&mut rng, outputs);
            serial.step(&z, &y, &mut ps);
            one_thread.install(|| split.step_here(&z, &y, &mut pp));
            assert_eq!(
                ps.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                pp.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "step {t}"
            );
        }
        assert_eq!(serial.state(), split.state());
    }
}

/// A split ensemble stores its particles as two panels; what the rest of the daemon reads of
/// them (each particle in parameter order, the parameter spread, a frozen particle's
/// prediction) is what the same ensemble stored as rows gives.
#[test]
fn particles_read_the_same_from_panels_as_from_rows_issue_6() {
    let o = options(24, 5, 3, 2, Method::Kalman, 9);
    let rows = Ensemble::<f64>::new(&o);
    let mut panels = rows.clone();
    panels.set_threads(2);
    panels.set_parallel_min_work(0);
    assert!(panels.cut.is_some() && rows.cut.is_none());
    assert_ne!(
        rows.stored_particles(),
        panels.stored_particles(),
        "stored differently"
    );
    let d = rows.dim();
    for j in 0..rows.size() {
        let (a, b) = rows.particle_parts(j);
        assert!(b.is_empty());
        let (l, r) = panels.particle_parts(j);
        assert!(!l.is_empty() && !r.is_empty());
        assert_eq!([l, r].concat(), a);
        assert_eq!(a, &rows.stored_particles()[j * d..(j + 1) * d]);
    }
    assert_eq!(
        rows.parameter_spread().to_bits(),
        panels.parameter_spread().to_bits()
    );
    let (mut rows, mut panels) = (rows, panels);
    let z = [0.3, -0.2, 0.5, 0.1, 0.9, 0.4];
    let (mut a, mut b) = ([0.0; 2], [0.0; 2]);
    rows.predict_particle_frozen(7, &z[..rows.layout().n_in], &mut a);
    panels.predict_particle_frozen(7, &z[..panels.layout().n_in], &mut b);
    assert_eq!(a.map(f64::to_bits), b.map(f64::to_bits));
    // Back to rows: the very same buffer.
    panels.set_threads(1);
    assert_eq!(rows.stored_particles(), panels.stored_particles());
}
