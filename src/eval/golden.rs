//! Pins the exact bits the EKI engine produces: every performance change must leave every
//! prediction, score and particle bit-identical. Each case folds the bits of everything it
//! produced into one FNV-1a fingerprint and compares it with a recorded constant. A mismatch means results changed: an optimisation reordered
//! a floating-point sum (or contracted a multiply-add), not that the constant needs updating.
//!
//! The constants were recorded on x86-64 Linux. The ensemble's arithmetic calls no libm (its
//! `tanh` in both precisions is the engine's own, `real::tanh_f64` and `real::tanh_f32`) and
//! uses no fused multiply-add, and the mixture's weights are plain arithmetic, so the pins hold
//! on any IEEE machine. One libm call remains: the normal sampler of the prior draws (`exp`/`ln`
//! in its rare tail); on a libm that rounds those differently a case whose draws reach the tail
//! differs: to check a change there, record the fingerprints with the code before the change
//! and compare with the code after.

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

/// The default options in `f64`: what the `f64` pins run (the default precision is `f32`,
/// pinned by its own cases).
fn f64_defaults() -> Options {
    Options {
        precision: Precision::F64,
        ..Options::default()
    }
}

fn small(j: usize, hidden: usize) -> Options {
    Options {
        ensemble: j,
        hidden,
        ..f64_defaults()
    }
}

const FILES: [&str; 2] = ["daily-min-temperatures.csv", "monthly-sunspots.csv"];

#[test]
fn default_eki_predictions_are_pinned_issue_6() {
    // Whole series, default options (J = 100, hidden 16), prequential pass + 2 passes.
    let want = [0x4c8928cd8d569246, 0x21f652b3c3b18b02];
    let got = FILES.map(|f| eval_fingerprint(f, usize::MAX, "eki", f64_defaults(), 2));
    assert_eq!(got, want, "got {got:#x?}");
}

/// The default stream's forecaster (the ensemble in its mixture with the autoregression and
/// persistence) on the first 1000 values of each series, prequential pass + 2 passes: in
/// `f64`, and in the default precision (`f32`).
#[test]
fn default_mixture_predictions_are_pinned() {
    let want = [0xfaf82707b40285f6, 0xe0acbdf22de0147b];
    let got = FILES.map(|f| mixture_fingerprint(f, 1000, "eki", f64_defaults(), 2));
    assert_eq!(got, want, "got {got:#x?}");
    assert_eq!(Options::default().precision, Precision::F32);
    let want = [0xcb5285cb15553895, 0x57ccaf1f7ac8b95f];
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
        [0xb751746d65f4f24c, 0x70e9443bb04910ec],
        [0xaf5c644c265aff4c, 0xf9befaf33dc61f7e],
        [0x62d2784724d68f0f, 0xcc4ec38c8006af85],
        [0x9e39893032f723a3, 0xaec72c67c6594fbf],
        [0x5688a92f448b6b07, 0x05f0283b81f03d2f],
        [0xf28ffd447ac5ac66, 0x54904c5859a407fe],
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
        ..f64_defaults()
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
        0x9a8f9a5503867bf8,
        0x1d3b3478005ae4eb,
        0xd93457ba15a2fc76,
        0xb942e6a7535c2270,
        0xa5b76ce7889530aa,
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
        ..f64_defaults()
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
    assert_eq!(f.0, 0x30a791d5b6a0b78e, "got {:#x}", f.0);
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
        0x5f09b0e175cb53be,
        0x1715bc5b8af0a86f,
        0x61fe1256bb859d53,
        0xa2739b8c789d69c1,
        0x42dfbab91997b5c5,
    ];
    assert_eq!(got, want, "got {got:#x?}");
}
