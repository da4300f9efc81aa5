//! `Ensemble::step` allocates nothing once warm, on one thread and on two (the
//! ensemble code is allocation-free in the hot path). dhat's allocator sees every allocation
//! of this test binary, the step pool's workers included; this file holds one test so that
//! nothing else runs while it counts.

use ekid::engine::Options;
use ekid::engine::Precision;
use ekid::engine::{AnyEnsemble, on_pool};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Heap blocks allocated by `steps` observations after `warm` ones, inside the step pool as
/// the daemon's batches and `ekid eval` run them.
fn allocations(o: &Options, threads: usize, warm: usize, steps: usize) -> u64 {
    let mut e = AnyEnsemble::new(o);
    e.set_threads(threads);
    let (n_in, m) = (e.layout().n_in, e.layout().outputs);
    let mut z = vec![0.1; n_in];
    let mut y = vec![0.0; m];
    let mut pred = vec![0.0; m];
    on_pool(threads > 1, || {
        let mut observe = |t: usize| {
            for (o, v) in y.iter_mut().enumerate() {
                *v = 0.5 + 0.4 * ((t + o) as f64 / 7.0).sin();
            }
            e.step(&z, &y, &mut pred);
            z.rotate_right(m);
            z[..m].copy_from_slice(&y);
        };
        for t in 0..warm {
            observe(t);
        }
        let before = dhat::HeapStats::get().total_blocks;
        for t in warm..warm + steps {
            observe(t);
        }
        dhat::HeapStats::get().total_blocks - before
    })
}

#[test]
fn a_warm_step_allocates_nothing_on_one_thread_or_two() {
    let _profiler = dhat::Profiler::builder().testing().build();
    for precision in [Precision::F64, Precision::F32] {
        // Big enough that two threads split the step (J·d ≥ 2^22 even for f32).
        let big = Options {
            ensemble: 3000,
            hidden: 32,
            precision,
            ..Options::default()
        }
        .check()
        .expect("valid options");
        let mut probe = AnyEnsemble::new(&big);
        probe.set_threads(2);
        assert!(
            probe.is_parallel(),
            "{precision:?}: the test needs a split step"
        );
        drop(probe);
        for threads in [1, 2] {
            let n = allocations(&big, threads, 5, 20);
            assert_eq!(
                n, 0,
                "{precision:?}, {threads} thread(s): {n} blocks in 20 steps"
            );
        }
        // The other update paths: momentum, inflation and two outputs.
        let rules = Options {
            ensemble: 64,
            hidden: 8,
            outputs: 2,
            momentum: true,
            inflation: 1.001,
            precision,
            ..Options::default()
        }
        .check()
        .expect("valid options");
        let n = allocations(&rules, 1, 5, 20);
        assert_eq!(
            n, 0,
            "{precision:?}, momentum, inflation, two outputs: {n} blocks"
        );
    }
}
