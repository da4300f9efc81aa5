//! One observation (mean-particle predict + EKI update of every particle) for
//! J ∈ {100, 500, 2000} × hidden ∈ {16, 32}, next to the least memory traffic that work needs:
//! a pass that reads a buffer the size of the ensemble and then reads and writes it again.
//!
//! `cargo bench --bench update`; BENCHMARKS.md turns the times into observations/s and
//! nanoseconds per particle-parameter. `cargo bench --bench roofline` measures the same two
//! things interleaved in one run and prints the ratio.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ekid::engine::Ensemble;

mod common;

use common::{engine_options as options, floor_pass};

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("observation");
    for &hidden in &[16usize, 32] {
        for &j in &[100usize, 500, 2000] {
            let o = options(j, hidden);
            let mut e = Ensemble::<f64>::new(&o);
            let n_in = e.layout().n_in;
            let d = e.dim();
            g.throughput(Throughput::Elements((j * d) as u64));
            let mut t = 0usize;
            let mut pred = [0.0];
            let mut z = vec![0.0; n_in];
            g.bench_function(BenchmarkId::new(format!("h{hidden}"), j), |b| {
                b.iter(|| {
                    t += 1;
                    let y = 0.5 + 0.4 * (t as f64 / 7.0).sin();
                    z.rotate_right(1);
                    z[0] = y;
                    e.step(black_box(&z), black_box(&[y]), &mut pred);
                    black_box(pred[0])
                })
            });
        }
    }
    g.finish();
}

/// The floor (`common::floor_pass`, as in the roofline bench): read J·d doubles (the
/// forward), then read and write them (the update).
fn memory_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    for &hidden in &[16usize, 32] {
        for &j in &[100usize, 500, 2000] {
            let d = options(j, hidden).layout().dim();
            let mut buf = ekid::engine::ParticleBuf::from_slice(&vec![1.0f64; j * d]);
            let coef = vec![1e-12f64; d];
            g.throughput(Throughput::Elements((j * d) as u64));
            g.bench_function(BenchmarkId::new(format!("h{hidden}"), j), |b| {
                b.iter(|| {
                    floor_pass(&mut buf, &coef, d);
                    black_box(buf[0])
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, update, memory_floor);
criterion_main!(benches);
