//! What the daemon's memory budget charges a stream (`Stream::memory_bytes`) covers what the
//! stream really holds: its heap at its peak while it learns, publishes forecast states and
//! takes a snapshot copy of its state and writes the snapshot. dhat's allocator sees every allocation of this test binary;
//! the file holds one test so that nothing else runs while it measures. Ensembles stay below
//! the 4 MiB from which particles are mapped (outside the heap).

use ekid::engine::Precision;
use ekid::engine::{Observation, Stream};
use ekid::engine::{Options, ScaleOption};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The peak heap bytes of one stream over its life: created, 30 observations in batches of
/// 10, two forecast states held, a snapshot written to `dir`, dropped.
fn peak_bytes(o: &Options, dir: &std::path::Path) -> u64 {
    let profiler = dhat::Profiler::builder().testing().build();
    let before = dhat::HeapStats::get().curr_bytes as u64;
    {
        let mut s = Stream::new(o.clone());
        for b in 0..3 {
            let batch: Vec<Observation> = (0..10)
                .map(|t| {
                    let t = (b * 10 + t) as f64;
                    Observation {
                        seq: None,
                        x: (0..o.inputs).map(|i| (t + i as f64).cos()).collect(),
                        y: (0..o.outputs).map(|k| (t / 7.0 + k as f64).sin()).collect(),
                    }
                })
                .collect();
            let plan = s.plan(&batch).expect("a valid batch");
            s.apply(&batch, &plan, |_| {});
        }
        // The owner publishes a forecast state after each batch while readers may still hold
        // the last one, and snapshots now and then.
        let published = s.forecast_state().expect("lags are full");
        let next = s.forecast_state().expect("lags are full");
        let state = s.state();
        ekid::storage::write_snapshot(dir, s.last_seq(), &state).expect("snapshot");
        drop((published, next));
    }
    let peak = dhat::HeapStats::get().max_bytes as u64;
    drop(profiler);
    peak - before
}

#[test]
fn the_memory_budget_covers_what_a_stream_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scaled = |o: Options| {
        Options {
            scale: ScaleOption::Fixed(ekid::engine::Range {
                min: -1.0,
                max: 1.0,
            }),
            ..o
        }
        .check()
        .expect("valid options")
    };
    let cases = [
        // The default stream.
        scaled(Options::default()),
        scaled(Options {
            ensemble: 500,
            hidden: 16,
            precision: Precision::F32,
            ..Options::default()
        }),
        scaled(Options {
            ensemble: 200,
            hidden: 8,
            momentum: true,
            ..Options::default()
        }),
        // More outputs than particles: C^{uw} (m×d) outgrows the particles (J×d).
        scaled(Options {
            ensemble: 2,
            hidden: 16,
            lags: 4,
            outputs: 24,
            inputs: 3,
            ..Options::default()
        }),
    ];
    for o in cases {
        let charged = Stream::memory_bytes(&o);
        let peak = peak_bytes(&o, dir.path());
        let what = format!(
            "J={} hidden={} outputs={} momentum={} {:?}: charged {charged} bytes, peak heap {peak}",
            o.ensemble, o.hidden, o.outputs, o.momentum, o.precision
        );
        eprintln!("{what}");
        assert!(charged >= peak, "{what}: the budget undercounts");
        // Not a blanket overcount either (the allocator's own slack and the batch aside).
        assert!(charged <= 2 * peak, "{what}: the budget overcounts");
    }
}
