//! What the benches share: a real `ekid serve` on a free loopback port with its own temporary
//! data directory and config, and percentiles (the HTTP benches); stream options by size and
//! the memory floor's passes (the engine benches).

#![allow(dead_code)] // each bench uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const EXE: &str = env!("CARGO_BIN_EXE_ekid");

pub struct Server {
    pub child: Child,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(storage: &str) -> Server {
    start_in(tempfile::tempdir().expect("tempdir"), storage)
}

pub fn start_in(dir: tempfile::TempDir, storage: &str) -> Server {
    let cfg = dir.path().join("ekid.toml");
    std::fs::write(&cfg, format!("[storage]\n{storage}\n")).expect("config");
    let mut child = Command::new(EXE)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ekid serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let base = line.trim().trim_start_matches("listening on ").to_owned();
    Server {
        child,
        base,
        _dir: dir,
    }
}

/// POSTs `values` to `stream` as one NDJSON batch of `{"y": v}` lines; panics unless accepted.
pub fn post_ndjson(
    c: &reqwest::blocking::Client,
    base: &str,
    stream: &str,
    values: impl Iterator<Item = f64>,
) {
    let body: String = values.map(|y| format!("{{\"y\": {y}}}\n")).collect();
    let r = c
        .post(format!("{base}/v1/streams/{stream}/observations"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .expect("post");
    assert!(r.status().is_success(), "post to {stream}: {}", r.status());
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Default stream options with `j` particles and `hidden` units.
pub fn engine_options(j: usize, hidden: usize) -> ekid::engine::Options {
    ekid::engine::Options {
        ensemble: j,
        hidden,
        ..ekid::engine::Options::default()
    }
    .check()
    .expect("valid bench options")
}

/// The memory floor's two passes over `buf` (the least traffic one observation needs: the
/// forward reads every weight, the update reads and writes it): sixteen independent sums (a cache line of `f32`, two of
/// `f64`, per iteration), then the element-wise read-write.
pub fn floor_pass<T: ekid::engine::Real>(buf: &mut [T], coef: &[T], d: usize) {
    let mut acc = [T::ZERO; 16];
    for c in buf.chunks_exact(16) {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    let sum = acc.iter().fold(0.0, |s, a| s + a.to_f64());
    let q = T::from_f64(std::hint::black_box(sum) * 1e-30);
    for row in buf.chunks_exact_mut(d) {
        for (u, &c) in row.iter_mut().zip(coef) {
            *u += c * q;
        }
    }
}
