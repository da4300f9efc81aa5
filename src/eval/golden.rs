//! Pins the exact bits the EKI engine produces: every performance change must leave every
//! prediction, score and particle bit-identical. Each case folds the bits of everything it
//! produced into one FNV-1a fingerprint and compares it with a recorded constant. A mismatch means results changed: an optimisation reordered
//! a floating-point sum (or contracted a multiply-add), not that the constant needs updating.
//!
//! The constants were recorded on x86-64 Linux with glibc, whose libm picks its FMA variant of
//! `expm1` (inside `tanh`) on CPUs that have FMA. The engine calls the platform's `f64::tanh`,
//! so on another libm its results, and these fingerprints, differ: to check a change there,
//! record the fingerprints with the code before the change and compare with the code after.

use std::path::PathBuf;

use super::series::read_series;
use super::{EvalConfig, EvalMethod, OgdSettings, run_method};
use crate::engine::Scaler;
use crate::engine::*;
use crate::engine::{Method, Off, Options, SpreadOption};

/// FNV-1a over 64-bit words.
#[derive(Debug, Clone, Copy)]
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    fn value(&mut self, v: f64) {
        self.word(v.to_bits());
    }
    /// Values of either precision (f32 widened to f64 exactly).
    fn values<T: Real>(&mut self, vs: &[T]) {
        for &v in vs {
            self.value(v.to_f64());
        }
    }
    fn prediction(&mut self, p: Option<f64>) {
        match p {
            Some(v) => self.value(v),
            None => self.word(0x6e6f_6e65),
        }
    }
    fn option(&mut self, v: Option<f64>) {
        self.prediction(v);
    }
}

fn scaled(file: &str, prefix: usize) -> Vec<f64> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(file);
    let series = read_series(&path, None).expect("bundled dataset");
    let scaler = Scaler::fit(&series.values);
    let n = prefix.min(series.values.len());
    series.values[..n]
        .iter()
        .map(|&v| scaler.to_model(v))
        .collect()
}

/// `ekid eval`'s path for one method with the ensemble's mean particle alone predicting (no
/// mixture): the prequential predictions and the scores of the `first`/`final` passes (which
/// depend on every bit of the trained ensemble).
fn eval_fingerprint(file: &str, prefix: usize, method: &str, o: Options, passes: usize) -> u64 {
    let o = Options {
        mixture: false,
        ..o
    };
    mixture_fingerprint(file, prefix, method, o, passes)
}

/// The same with the options as given: the stream's forecaster, mixture included when on.
fn mixture_fingerprint(file: &str, prefix: usize, method: &str, o: Options, passes: usize) -> u64 {
    let s = scaled(file, prefix);
    let m = EvalMethod::parse(method, &o).expect("known method");
    let config = EvalConfig {
        options: o,
        passes,
        methods: vec![m],
        ogd: OgdSettings::default(),
        train_fraction: 0.8,
        step_threads: 1,
        level: 0.9,
    };
    let mut f = Fingerprint::new();
    let r = run_method(&config.methods[0], &config, &s, |_, p| f.prediction(p));
    f.values(&[r.first, r.final_, r.nmse_prequential]);
    f.option(r.best_first);
    f.option(r.best_final);
    f.0
}

fn small(j: usize, hidden: usize) -> Options {
    Options {
        ensemble: j,
        hidden,
        ..Options::default()
    }
}

const FILES: [&str; 2] = ["daily-min-temperatures.csv", "monthly-sunspots.csv"];

#[test]
fn default_eki_predictions_are_pinned_issue_6() {
    // Whole series, default options (J = 100, hidden 16), prequential pass + 2 passes.
    let want = [0x523815bd3e94f97d, 0x221ec449b4f51b26];
    let got = FILES.map(|f| eval_fingerprint(f, usize::MAX, "eki", Options::default(), 2));
    assert_eq!(got, want, "got {got:#x?}");
}

/// The default stream's forecaster (the ensemble in its mixture with the autoregression and
/// persistence) on the first 1000 values of each series, prequential pass + 2 passes.
#[test]
fn default_mixture_predictions_are_pinned() {
    let want = [0x0fd87929cbc42efa, 0x9df206ad8114ec34];
    let got = FILES.map(|f| mixture_fingerprint(f, 1000, "eki", Options::default(), 2));
    assert_eq!(got, want, "got {got:#x?}");
}

#[test]
fn eki_variants_are_pinned_issue_6() {
    let variants = [
        ("eki-flow", small(40, 8)),
        ("eki-momentum", small(40, 8)),
        ("eki-inflation", small(40, 8)),
        (
            "eki",
            Options {
                spread: SpreadOption::On(crate::engine::Spread {
                    every: 60,
                    gamma: 0.3,
                    decay: 0.8,
                }),
                ..small(40, 8)
            },
        ),
        ("eki", small(30, 32)),
        ("eki", small(7, 64)),
    ];
    let want: [[u64; 2]; 6] = [
        [0xde316c143938363a, 0xa94d5fa88fc142e2],
        [0xaaf8a3a0e71bffad, 0xd2d1467e9c64ace6],
        [0x04bc44b7bdff9cd5, 0x242c971a5c1ea77e],
        [0xd67b8322565e9ba9, 0x28adba2c6ff317e0],
        [0x1ff8d06e86f0d64e, 0xae4df4c63e1baddb],
        [0x76ce834c28ebb05e, 0xc891b5607fca0d57],
    ];
    let mut got = [[0u64; 2]; 6];
    for (g, (name, o)) in got.iter_mut().zip(variants) {
        for (gf, file) in g.iter_mut().zip(FILES) {
            *gf = eval_fingerprint(file, 500, name, o.clone(), 2);
        }
    }
    assert_eq!(got, want, "got {got:#x?}");
}

/// A deterministic multi-output, exogenous-input stream driven straight into `Ensemble::step`.
fn synthetic_fingerprint<T: Real>(o: &Options, steps: usize) -> u64 {
    let mut e = Ensemble::<T>::new(o);
    let (n_in, m) = (e.layout().n_in, e.layout().outputs);
    let mut z = vec![0.0; n_in];
    let mut y = vec![0.0; m];
    let mut pred = vec![0.0; m];
    let mut f = Fingerprint::new();
    for t in 0..steps {
        let tf = t as f64;
        for (i, zi) in z.iter_mut().enumerate() {
            *zi = 0.5 + 0.4 * (0.37 * tf + 1.3 * i as f64).sin();
        }
        for (o, yo) in y.iter_mut().enumerate() {
            *yo = 0.5 + 0.3 * (0.21 * tf + o as f64).cos() * z[0];
        }
        let r = e.step(&z, &y, &mut pred);
        f.values(&pred);
        f.value(r.step_size);
        f.word(r.repaired as u64);
    }
    f.values(e.stored_particles());
    f.values(e.mean());
    f.values(e.particle_predictions());
    f.0
}

#[test]
fn multi_output_ensembles_are_pinned_issue_6() {
    let base = Options {
        ensemble: 24,
        hidden: 6,
        lags: 3,
        inputs: 2,
        outputs: 2,
        seed: 17,
        ..Options::default()
    };
    let cases = [
        base.clone(),
        Options {
            outputs: 3,
            inflation: 1.001,
            ..base.clone()
        },
        Options {
            method: Method::Flow,
            momentum: true,
            inflation: 1.0003,
            ..base.clone()
        },
        Options {
            spread: SpreadOption::On(crate::engine::Spread {
                every: 25,
                gamma: 0.5,
                decay: 0.9,
            }),
            ..base.clone()
        },
        Options {
            outputs: 1,
            spread: SpreadOption::Off(Off::Off),
            ..base
        },
    ];
    let want = [
        0xe4e2175689d94287,
        0x2f55a902a6fc4b0b,
        0x7173580f35ea4034,
        0x51225da33633284f,
        0x0553e0e04fec532d,
    ];
    let got = cases.map(|o| synthetic_fingerprint::<f64>(&o.check().expect("valid"), 150));
    assert_eq!(got, want, "got {got:#x?}");
}

#[test]
fn repaired_particles_are_pinned_issue_6() {
    let o = Options {
        ensemble: 12,
        hidden: 5,
        lags: 3,
        seed: 4,
        ..Options::default()
    }
    .check()
    .expect("valid");
    let mut e = Ensemble::<f64>::new(&o);
    let d = e.dim();
    let mut p = e.stored_particles().to_vec();
    p[3 * d + d - 1] = f64::INFINITY;
    p[7 * d + 2] = f64::NAN;
    e.set_particles(&p);
    let mut f = Fingerprint::new();
    let mut pred = [0.0];
    let mut repaired = 0;
    for t in 0..40 {
        let v = 0.5 + 0.3 * (t as f64 * 0.3).sin();
        let r = e.step(&[v, 0.4, 0.6], &[v * 0.9 + 0.05], &mut pred);
        f.value(pred[0]);
        f.word(r.repaired as u64);
        repaired += r.repaired;
    }
    assert_eq!(repaired, 2, "the case must go through the repair path");
    f.values(e.stored_particles());
    assert_eq!(f.0, 0x5ada6366432590c9, "got {:#x}", f.0);
}

/// `f32` ensembles have results of their own (not those of `f64`): pinned the same way, so
/// that later work on the `f32` path keeps them. They use no libm (their tanh is
/// [`crate::engine::tanh_f32`]), so unlike the `f64` constants these hold on any IEEE machine. Default options on both datasets, the flow
/// form with momentum, and a multi-output stream with inflation.
#[test]
fn f32_results_are_pinned_issue_6() {
    let f32 = |o: Options| Options {
        precision: crate::engine::Precision::F32,
        ..o
    };
    let mut got = Vec::new();
    for file in FILES {
        got.push(eval_fingerprint(
            file,
            usize::MAX,
            "eki",
            f32(Options::default()),
            2,
        ));
        got.push(eval_fingerprint(
            file,
            500,
            "eki-momentum",
            f32(small(40, 8)),
            2,
        ));
    }
    let multi = Options {
        ensemble: 24,
        hidden: 6,
        lags: 3,
        inputs: 2,
        outputs: 3,
        inflation: 1.001,
        seed: 17,
        ..Options::default()
    };
    got.push(synthetic_fingerprint::<f32>(
        &f32(multi).check().expect("valid"),
        150,
    ));
    let want: [u64; 5] = [
        0x1c08485f088e206c,
        0xdb1513d466e53ade,
        0xf317ffefff990a8f,
        0x935e2e69ab891b68,
        0x87cdaae83997b5c5,
    ];
    assert_eq!(got, want, "got {got:#x?}");
}
