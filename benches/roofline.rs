//! The engine against the machine's memory floor, in one run.
//!
//! `cargo bench --bench roofline` prints four tables (or those named as arguments):
//!
//! 1. `ratio`: the time of one observation (mean-particle predict + update of J particles) next
//!    to the floor, the least memory traffic that work needs: a pass that reads a buffer of J·d
//!    doubles and then reads and writes it (the forward reads every weight once, the update
//!    reads and writes each once). Both are timed in the same run, samples interleaved, and the
//!    ratio of the medians is reported. Small ensembles sit in cache, and so does the floor's
//!    buffer of the same size: the comparison is always like for like. Timed with them: the
//!    fixed operations (`OpFloor`), the arithmetic the engine's bits pin, in plain loops over a
//!    buffer of the same size, over the floor.
//! 2. `cores`: observations/s of one big stream on one thread and split over two.
//! 3. `growth`: observations/s and ensemble bytes for J ∈ {32, 100, 500, 2000, 8000} ×
//!    hidden ∈ {8, 16, 32, 64}.
//! 4. `layout`: one read of half-rows of particle-major rows against panels, on one thread and
//!    on two (why a split ensemble stores its particles as two panels).
//!
//! Pass table names to run only some (`cargo bench --bench roofline -- ratio cores`), and
//! `quick` for fewer samples. `profile J HIDDEN [THREADS [SECONDS]]` runs only observations (10 s
//! by default; add `f32` after the seconds for that precision), for `perf record`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ekid::engine::Options;
use ekid::engine::{AnyEnsemble, ParticleBuf};
use ekid::engine::{Precision, Real};

mod common;

use common::{engine_options as options, floor_pass};

/// A stream of observations for the default model (lags 12, one output).
struct Stream {
    e: AnyEnsemble,
    t: usize,
    z: Vec<f64>,
    pred: [f64; 1],
}

impl Stream {
    fn new(j: usize, hidden: usize, threads: usize) -> Self {
        Self::with(j, hidden, threads, Precision::F64)
    }
    fn with(j: usize, hidden: usize, threads: usize, precision: Precision) -> Self {
        let o = Options {
            precision,
            ..options(j, hidden)
        };
        let mut e = AnyEnsemble::new(&o);
        e.set_threads(threads);
        let z = vec![0.0; e.layout().n_in];
        Stream {
            e,
            t: 0,
            z,
            pred: [0.0],
        }
    }
    fn observe(&mut self) {
        self.t += 1;
        let y = 0.5 + 0.4 * (self.t as f64 / 7.0).sin();
        self.e
            .step(black_box(&self.z), black_box(&[y]), &mut self.pred);
        self.z.rotate_right(1);
        self.z[0] = y;
        black_box(self.pred[0]);
    }
}

/// The floor over a buffer of the ensemble's size: one read pass, then one read-write pass,
/// both written so that they vectorise (sixteen independent sums; an element-wise update). The
/// buffer is stored as the ensemble's particles are (`ParticleBuf`: huge pages from 4 MiB), so
/// that the engine and its floor pay the same for address translation.
struct Floor<T> {
    buf: ParticleBuf<T>,
    coef: Vec<T>,
    d: usize,
}

impl<T: Real> Floor<T> {
    fn new(j: usize, d: usize) -> Self {
        Floor {
            buf: ParticleBuf::from_slice(&vec![T::ONE; j * d]),
            coef: vec![T::from_f64(1e-12); d],
            d,
        }
    }
    fn pass(&mut self) {
        floor_pass(&mut self.buf, &self.coef, self.d);
        black_box(self.buf[0]);
    }

    /// The same traffic split over two threads (each its half of the rows).
    fn pass2(&mut self) {
        let rows = self.buf.len() / self.d / 2;
        let (a, b) = self.buf.split_at_mut(rows * self.d);
        let (coef, d) = (&self.coef, self.d);
        // On the engine's step pool, as the two-thread step runs.
        ekid::engine::on_pool(true, || {
            rayon::join(|| floor_pass(a, coef, d), || floor_pass(b, coef, d))
        });
        black_box(self.buf[0]);
    }
}

/// The fixed operation order alone, in tight loops over a buffer like the floor's: per
/// particle-parameter the forward's multiply and add (sixteen independent sums per row), C^{uw}'s
/// multiply and add (four particles per pass over the accumulator), the update's
/// multiply and add and the add into the new mean's sum (eight particles per pass), and
/// `hidden` calls of the type's `tanh` per particle; no network structure, mean particle or
/// solve. Any implementation that keeps the engine's bits does at least this arithmetic, so
/// its time over the memory floor bounds the roofline ratio the rule allows on this machine.
struct OpFloor<T> {
    buf: ParticleBuf<T>,
    /// The forward's input (one row's worth), C^{uw}'s row, the new mean's sum.
    x: Vec<T>,
    cuw: Vec<T>,
    sum: Vec<T>,
    /// One particle's new hidden state.
    state: Vec<T>,
    d: usize,
}

impl<T: Real> OpFloor<T> {
    fn new(j: usize, d: usize, hidden: usize) -> Self {
        OpFloor {
            buf: ParticleBuf::from_slice(&vec![T::ONE; j * d]),
            x: vec![T::from_f64(1e-3); d],
            cuw: vec![T::ZERO; d],
            sum: vec![T::ZERO; d],
            state: vec![T::ZERO; hidden],
            d,
        }
    }

    fn pass(&mut self) {
        let (d, small) = (self.d, T::from_f64(1e-12));
        // The forward of four particles, then their terms of C^{uw} while they are in cache.
        let mut acts = T::ZERO;
        let e: [T; 4] = black_box([small; 4]);
        for blk in self.buf.chunks(4 * d) {
            for row in blk.chunks_exact(d) {
                let mut s = [T::ZERO; 16];
                let (body, tail) = row.split_at(d - d % 16);
                for (c, x) in body.chunks_exact(16).zip(self.x.chunks_exact(16)) {
                    for k in 0..16 {
                        s[k] += c[k] * x[k];
                    }
                }
                for (c, x) in tail.iter().zip(&self.x[d - d % 16..]) {
                    s[0] += *c * *x;
                }
                // The engine's order: the row's sums first, then tanh over the new state at once.
                for (i, h) in self.state.iter_mut().enumerate() {
                    *h = s[i % 16];
                }
                for h in self.state.iter_mut() {
                    *h = h.tanh();
                }
                acts += self.state[0];
            }
            if blk.len() == 4 * d {
                let (u01, u23) = blk.split_at(2 * d);
                let ((u0, u1), (u2, u3)) = (u01.split_at(d), u23.split_at(d));
                let cuw = &mut self.cuw[..d];
                for p in 0..d {
                    let mut a = cuw[p];
                    a += u0[p] * e[0];
                    a += u1[p] * e[1];
                    a += u2[p] * e[2];
                    a += u3[p] * e[3];
                    cuw[p] = a;
                }
            }
        }
        black_box(acts);
        // The update of eight particles per pass over the new mean's sum.
        self.sum.fill(T::ZERO);
        let (c, sum) = (&self.cuw[..d], &mut self.sum[..d]);
        let q: [T; 8] = black_box([small; 8]);
        for blk in self.buf.chunks_exact_mut(8 * d) {
            let (a, b) = blk.split_at_mut(4 * d);
            let ((u0, u1), (u2, u3)) = pair(a, d);
            let ((u4, u5), (u6, u7)) = pair(b, d);
            for p in 0..d {
                let cp = c[p];
                let u = [u0[p], u1[p], u2[p], u3[p], u4[p], u5[p], u6[p], u7[p]];
                let a: [T; 8] = std::array::from_fn(|k| u[k] + cp * q[k]);
                (u0[p], u1[p], u2[p], u3[p]) = (a[0], a[1], a[2], a[3]);
                (u4[p], u5[p], u6[p], u7[p]) = (a[4], a[5], a[6], a[7]);
                sum[p] = a.iter().fold(sum[p], |s, &v| s + v);
            }
        }
        black_box(self.sum[0]);
    }
}

/// Four rows of `d` values from a buffer of four.
#[allow(clippy::type_complexity, reason = "two pairs of rows")]
fn pair<T>(buf: &mut [T], d: usize) -> ((&mut [T], &mut [T]), (&mut [T], &mut [T])) {
    let (a, b) = buf.split_at_mut(2 * d);
    let ((u0, u1), (u2, u3)) = (a.split_at_mut(d), b.split_at_mut(d));
    ((&mut u0[..d], &mut u1[..d]), (&mut u2[..d], &mut u3[..d]))
}

/// Seconds per call of `f`, one sample: enough calls to fill `target`.
fn sample(f: &mut dyn FnMut(), target: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u32;
    while n == 0 || start.elapsed() < target {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Medians of interleaved samples of several measured functions (so that a burst of load from
/// elsewhere on the machine hits all of them alike).
fn interleaved(fs: &mut [&mut dyn FnMut()], samples: usize, target: Duration) -> Vec<f64> {
    rounds(fs, samples, target)
        .into_iter()
        .map(median)
        .collect()
}

/// Every sample of every function, round by round (`times[f][round]`), after a warm-up.
fn rounds(fs: &mut [&mut dyn FnMut()], samples: usize, target: Duration) -> Vec<Vec<f64>> {
    for f in fs.iter_mut() {
        sample(*f, target / 2);
    }
    let mut times = vec![Vec::new(); fs.len()];
    for _ in 0..samples {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            t.push(sample(*f, target));
        }
    }
    times
}

fn fmt_time(s: f64) -> String {
    if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn ratio(samples: usize) {
    println!("## ratio: one observation vs the memory floor (single thread)\n");
    println!(
        "| precision | J | hidden | d | ensemble bytes | time / obs | obs/s | ns per particle-parameter | floor | time / floor | fixed operations | operations / floor | time / operations |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for precision in [Precision::F64, Precision::F32] {
        for &(j, hidden) in &[
            (100, 16),
            (500, 16),
            (2000, 16),
            (100, 32),
            (500, 32),
            (2000, 32),
        ] {
            match precision {
                Precision::F64 => ratio_row::<f64>(samples, j, hidden, precision),
                Precision::F32 => ratio_row::<f32>(samples, j, hidden, precision),
            }
        }
    }
    println!();
}

/// One row: the stream in `precision` against the floor over its bytes (`T` is its type).
fn ratio_row<T: Real>(samples: usize, j: usize, hidden: usize, precision: Precision) {
    {
        let mut s = Stream::with(j, hidden, 1, precision);
        let d = s.e.dim();
        let mut floor = Floor::<T>::new(j, d);
        let mut ops = OpFloor::<T>::new(j, d, hidden);
        let t = interleaved(
            &mut [&mut || s.observe(), &mut || floor.pass(), &mut || {
                ops.pass()
            }],
            samples,
            Duration::from_millis(40),
        );
        let name = precision.name();
        println!(
            "| {name} | {j} | {hidden} | {d} | {:.2} MB | {} | {:.0} | {:.2} | {} | {:.2} | {} | {:.2} | {:.2} |",
            (j * d * std::mem::size_of::<T>()) as f64 / 1e6,
            fmt_time(t[0]),
            1.0 / t[0],
            t[0] * 1e9 / (j * d) as f64,
            fmt_time(t[1]),
            t[0] / t[1],
            fmt_time(t[2]),
            t[2] / t[1],
            t[0] / t[2]
        );
    }
}

fn cores(samples: usize) {
    println!("## cores: one stream on one thread and on two\n");
    println!(
        "| precision | J | hidden | 1 thread obs/s | 2 threads obs/s | speed-up (median of rounds) | floor, 1 thread | floor, 2 threads | 2 threads / 2-thread floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &(j, hidden) in &[(2000, 32), (8000, 32), (2000, 64), (2000, 16)] {
        cores_row::<f64>(samples, j, hidden, Precision::F64);
    }
    // f32 splits from 2^22 particle-parameters (`ensemble::parallel_min_work`).
    for &(j, hidden) in &[(4000, 32), (8000, 32)] {
        cores_row::<f32>(samples, j, hidden, Precision::F32);
    }
    println!();
}

fn cores_row<T: Real>(samples: usize, j: usize, hidden: usize, precision: Precision) {
    {
        // One stream whose samples alternate between one thread and two (the results are the
        // same bits either way, so it is one stream's evolution). Switching re-lays the
        // particles out (a split ensemble stores them as two panels): neither that nor the
        // 300 ms of observations after it are timed. (Two-thread steps right after one-thread
        // ones measured 10–40% slow for 100–300 ms on this VM, with no re-layout at all as
        // well: the host gives an idle second vCPU back slowly. A stream that keeps both
        // cores busy never sees that.) Then the two floors, interleaved: two ensembles of this
        // size at once would evict each other from L3.
        let mut s = Stream::with(j, hidden, 1, precision);
        let d = s.e.dim();
        let mut r = [Vec::new(), Vec::new()];
        ekid::engine::on_pool(true, || {
            // Round 0 warms up.
            for round in 0..=samples {
                for (times, threads) in r.iter_mut().zip([1, 2]) {
                    s.e.set_threads(threads);
                    sample(&mut || s.observe(), Duration::from_millis(300));
                    let t = sample(&mut || s.observe(), Duration::from_millis(60));
                    if round > 0 {
                        times.push(t);
                    }
                }
            }
        });
        drop(s);
        // The speed-up of each round (adjacent samples), then the median: the machine's speed
        // drifts over seconds when its host is busy, and adjacent samples share the drift.
        let speedup = median(r[0].iter().zip(&r[1]).map(|(a, b)| a / b).collect());
        let t = [median(r[0].clone()), median(r[1].clone())];
        let mut floor = Floor::<T>::new(j, d);
        let mut floor2 = Floor::<T>::new(j, d);
        let f = interleaved(
            &mut [&mut || floor.pass(), &mut || floor2.pass2()],
            samples,
            Duration::from_millis(60),
        );
        let t = [t[0], t[1], f[0], f[1]];
        println!(
            "| {} | {j} | {hidden} | {:.0} | {:.0} | {speedup:.2} | {} | {} | {:.2} |",
            precision.name(),
            1.0 / t[0],
            1.0 / t[1],
            fmt_time(t[2]),
            fmt_time(t[3]),
            t[1] / t[3]
        );
    }
}

fn growth(samples: usize) {
    println!("## growth: observations/s (single thread) and ensemble bytes\n");
    let js = [32usize, 100, 500, 2000, 8000];
    let hs = [8usize, 16, 32, 64];
    println!("| J \\ hidden (d) | {} |", {
        let v: Vec<String> = hs
            .iter()
            .map(|&h| format!("{h} ({})", options(2, h).layout().dim()))
            .collect();
        v.join(" | ")
    });
    println!("|---|{}", "---|".repeat(hs.len()));
    let mut per = Vec::new();
    for &j in &js {
        let mut cells = Vec::new();
        for &h in &hs {
            let mut s = Stream::new(j, h, 1);
            let d = s.e.dim();
            let work = (j * d) as f64;
            // Fewer samples where one observation takes tens of milliseconds.
            let n = if work > 5e6 { samples.min(3) } else { samples };
            let target = Duration::from_millis(if work > 5e6 { 150 } else { 30 });
            let t = interleaved(&mut [&mut || s.observe()], n, target)[0];
            per.push((j, h, t * 1e9 / work));
            let bytes = (j * d * 8) as f64;
            let b = if bytes >= 1e6 {
                format!("{:.1} MB", bytes / 1e6)
            } else {
                format!("{:.0} kB", bytes / 1e3)
            };
            cells.push(format!("{:.0} obs/s, {b}", 1.0 / t));
        }
        println!("| {j} | {} |", cells.join(" | "));
    }
    println!("\nns per particle-parameter (time / (J·d)):\n");
    println!("| J \\ hidden | {} |", {
        let v: Vec<String> = hs.iter().map(|h| h.to_string()).collect();
        v.join(" | ")
    });
    println!("|---|{}", "---|".repeat(hs.len()));
    for &j in &js {
        let v: Vec<String> = per
            .iter()
            .filter(|r| r.0 == j)
            .map(|r| format!("{:.2}", r.2))
            .collect();
        println!("| {j} | {} |", v.join(" | "));
    }
    println!();
}

/// `layout`: why a split ensemble stores its particles as two panels. One read of half of an
/// ensemble-sized buffer (J=2000, hidden 32, `f64`: the left panel is 17 of the 33 rows of 45)
/// and of all of it, laid out as particle-major rows or as two panels, on one thread and on
/// two (on the step pool).
fn layout(samples: usize) {
    println!("## layout: reading half-rows against panels (J=2000, hidden 32, f64)\n");
    println!("| read | threads | time | GB/s |");
    println!("|---|---|---|---|");
    let (j, d, c) = (2000, 1485, 17 * 45);
    let values: Vec<f64> = (0..j * d).map(|i| (i % 97) as f64 * 1e-3).collect();
    let buf = ParticleBuf::from_slice(&values);
    drop(values);
    let (left, right) = buf.split_at(j * c);
    let rows = || buf.chunks_exact(d);
    let pool = |a: &(dyn Fn() + Sync), b: &(dyn Fn() + Sync)| {
        ekid::engine::on_pool(true, || rayon::join(a, b));
    };
    let mut cases: Vec<Case> = vec![
        ("all of every row", 1, j * d, Box::new(|| read(rows()))),
        (
            "the left part of every row",
            1,
            j * c,
            Box::new(|| read(rows().map(|r| &r[..c]))),
        ),
        (
            "the left panel",
            1,
            j * c,
            Box::new(|| read(left.chunks_exact(c))),
        ),
        (
            "each thread its part of every row",
            2,
            j * d,
            Box::new(|| {
                pool(&|| read(rows().map(|r| &r[..c])), &|| {
                    read(rows().map(|r| &r[c..]))
                })
            }),
        ),
        (
            "each thread its panel",
            2,
            j * d,
            Box::new(|| {
                pool(&|| read(left.chunks_exact(c)), &|| {
                    read(right.chunks_exact(d - c))
                })
            }),
        ),
        (
            "each thread half the rows",
            2,
            j * d,
            Box::new(|| {
                let (a, b) = buf.split_at(j / 2 * d);
                pool(&|| read(a.chunks_exact(d)), &|| read(b.chunks_exact(d)))
            }),
        ),
    ];
    let mut fs: Vec<&mut dyn FnMut()> = cases.iter_mut().map(|c| &mut *c.3 as _).collect();
    let t = interleaved(&mut fs, samples, Duration::from_millis(40));
    for ((name, threads, n, _), t) in cases.iter().zip(t) {
        let gbs = (*n * 8) as f64 / t / 1e9;
        println!("| {name} | {threads} | {} | {gbs:.1} |", fmt_time(t));
    }
    println!();
}

/// A `layout` case: what is read, on how many threads, how many values, and the read.
type Case<'a> = (&'static str, usize, usize, Box<dyn FnMut() + 'a>);

/// Sums every value of the slices, sixteen independent sums (as the floor's read pass).
fn read<'a>(parts: impl Iterator<Item = &'a [f64]>) {
    let mut acc = [0.0; 16];
    for part in parts {
        let mut chunks = part.chunks_exact(16);
        for ch in &mut chunks {
            for k in 0..16 {
                acc[k] += ch[k];
            }
        }
        for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += v;
        }
    }
    black_box(acc.iter().sum::<f64>());
}

/// `profile J HIDDEN [THREADS [SECONDS [f32]]]`: only observations (10 s by default), to run under
/// `perf record` or to time one configuration in a process of its own.
fn profile(args: &[String]) {
    let num =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let precision = match args.get(5).map(String::as_str) {
        Some("f32") => Precision::F32,
        _ => Precision::F64,
    };
    let mut s = Stream::with(num(1, 2000), num(2, 32), num(3, 1), precision);
    let seconds = num(4, 10) as u64;
    let start = Instant::now();
    let mut n = 0u64;
    // Enter the step pool once, as `ekid eval` and the daemon's batches do.
    ekid::engine::on_pool(true, || {
        while start.elapsed() < Duration::from_secs(seconds) {
            s.observe();
            n += 1;
        }
    });
    println!(
        "{n} observations, {}",
        fmt_time(start.elapsed().as_secs_f64() / n as f64)
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().is_some_and(|a| a == "profile") {
        return profile(&args);
    }
    let quick = args.iter().any(|a| a == "quick");
    let want = |name: &str| {
        let named: Vec<&String> = args.iter().filter(|a| *a != "quick").collect();
        named.is_empty() || named.iter().any(|a| *a == name)
    };
    let samples = if quick { 5 } else { 15 };
    // The first second of a run measured up to 50% slow (clock ramp-up of the virtual CPU,
    // seen on the development machine whatever ran before): spend it here.
    let mut warm = Stream::new(100, 16, 1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        warm.observe();
    }
    if want("ratio") {
        ratio(samples);
    }
    if want("cores") {
        cores(samples);
    }
    if want("growth") {
        growth(if quick { 3 } else { 7 });
    }
    if want("layout") {
        layout(samples);
    }
}
