//! HTTP path benchmark: the real `ekid serve` on loopback driven by blocking
//! reqwest clients in threads (this file is the load generator). For each fsync policy and
//! setting it measures
//! 1. ingest of NDJSON batches of 1000 from one client, with forecast (horizon 14) latency
//!    sampled by a second client while ingest runs;
//! 2. single-observation POSTs from 8 concurrent clients (acknowledgement latency and
//!    aggregate observations/s);
//! 3. the engine alone: `ekid eval --methods eki --passes 1` obs/s at the same settings, run
//!    right after the NDJSON ingest it is compared with.
//!
//! Then the recovery time of a stream with 1e5 logged observations (no snapshot), and with the
//! default snapshot interval.
//!
//! `cargo bench --bench http` (add `-- quick` for a shorter run). Prints markdown tables.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

mod common;

use common::{EXE, percentile, post_ndjson, start, start_in};
const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/datasets/daily-min-temperatures.csv"
);

fn values() -> Vec<f64> {
    let text = std::fs::read_to_string(DATA).expect("dataset");
    text.lines()
        .skip(1)
        .filter_map(|l| l.rsplit(',').next()?.trim().parse().ok())
        .collect()
}

fn create(c: &Client, base: &str, name: &str, j: usize, h: usize) {
    let r = c
        .put(format!("{base}/v1/streams/{name}"))
        .json(&serde_json::json!({"ensemble": j, "hidden": h, "scale": {"min": 0.0, "max": 26.3}}))
        .send()
        .expect("create");
    assert!(r.status().is_success(), "create: {}", r.status());
}

fn engine_obs_per_sec(j: usize, h: usize) -> f64 {
    let out = Command::new(EXE)
        .args(["eval", DATA, "--methods", "eki", "--passes", "1", "--json"])
        .args(["--ensemble", &j.to_string(), "--hidden", &h.to_string()])
        .output()
        .expect("eval");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("eval json");
    doc["results"][0]["obs_per_sec"]
        .as_f64()
        .expect("obs_per_sec")
}

/// Two seconds of the first measurement's work, untimed: the first second of a process measured
/// up to 50% slow on the development machine (the guest's clock ramping up; the engine benches
/// do the same).
fn warm_up(v: &[f64]) {
    let server = start("fsync = \"never\"");
    let c = Client::new();
    create(&c, &server.base, "warm", 100, 16);
    let started = Instant::now();
    let mut b = 0;
    while started.elapsed() < Duration::from_secs(2) {
        post_batch(&c, &server.base, "warm", v, b);
        b += 1;
    }
}

/// POSTs the `b`-th batch of 1000 values of `v` (cycling) to `stream` as NDJSON.
fn post_batch(c: &Client, base: &str, stream: &str, v: &[f64], b: usize) {
    post_ndjson(
        c,
        base,
        stream,
        (0..1000).map(|i| v[(b * 1000 + i) % v.len()]),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let v = values();
    println!(
        "| fsync | J | hidden | NDJSON×1000 obs/s | NDJSON batch ack p99 | forecast p50 / p99 during ingest | 8 clients × 1 obs: obs/s | ack p50 / p99 | engine alone (eval) obs/s | NDJSON / engine |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    warm_up(&v);
    for policy in ["never", "interval", "always"] {
        for &(j, h, batches, singles) in
            &[(100usize, 16usize, 20usize, 4000usize), (1000, 32, 3, 800)]
        {
            let (batches, singles) = if quick {
                (batches.div_ceil(4), singles / 4)
            } else {
                (batches, singles)
            };
            let server = start(&format!("fsync = \"{policy}\""));
            let c = Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client");
            create(&c, &server.base, "bulk", j, h);

            // 1. NDJSON batches, with a forecast sampler alongside.
            let done = Arc::new(AtomicBool::new(false));
            let sampler = {
                let (done, base, c) = (done.clone(), server.base.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut lat = Vec::new();
                    while !done.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let r = c
                            .get(format!("{base}/v1/streams/bulk/forecast?horizon=14"))
                            .send();
                        if matches!(r, Ok(ref r) if r.status().is_success()) {
                            lat.push(t.elapsed().as_secs_f64());
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    lat
                })
            };
            let started = Instant::now();
            let mut n = 0usize;
            let mut batch_acks = Vec::new();
            for b in 0..batches {
                let t = Instant::now();
                post_batch(&c, &server.base, "bulk", &v, b);
                batch_acks.push(t.elapsed().as_secs_f64());
                n += 1000;
            }
            let bulk = n as f64 / started.elapsed().as_secs_f64();
            done.store(true, Ordering::Relaxed);
            let mut flat = sampler.join().expect("sampler");

            // 3. The engine alone, right after the ingest it is compared with: this machine's
            // speed drifts over minutes (a busy host), so a figure from another minute compares
            // two different machines.
            let engine = engine_obs_per_sec(j, h);

            // 2. Single observations from 8 clients.
            create(&c, &server.base, "single", j, h);
            let per = singles / 8;
            let started = Instant::now();
            let workers: Vec<_> = (0..8)
                .map(|w| {
                    let (base, c, v) = (server.base.clone(), c.clone(), v.clone());
                    std::thread::spawn(move || {
                        let mut lat = Vec::with_capacity(per);
                        for i in 0..per {
                            let t = Instant::now();
                            let r = c
                                .post(format!("{base}/v1/streams/single/observations"))
                                .header("content-type", "application/json")
                                .body(format!("{{\"y\": {}}}", v[(w * per + i) % v.len()]))
                                .send()
                                .expect("post one");
                            if r.status().is_success() {
                                lat.push(t.elapsed().as_secs_f64());
                            }
                        }
                        lat
                    })
                })
                .collect();
            let mut acks: Vec<f64> = workers
                .into_iter()
                .flat_map(|w| w.join().expect("worker"))
                .collect();
            let single = acks.len() as f64 / started.elapsed().as_secs_f64();
            drop(server);

            let ms = |s: f64| s * 1e3;
            println!(
                "| {policy} | {j} | {h} | {bulk:.0} | {:.1} ms | {:.2} / {:.2} ms ({} samples) | {single:.0} | {:.2} / {:.2} ms | {engine:.0} | {:.0}% |",
                ms(percentile(&mut batch_acks, 0.99)),
                ms(percentile(&mut flat, 0.5)),
                ms(percentile(&mut flat, 0.99)),
                flat.len(),
                ms(percentile(&mut acks, 0.5)),
                ms(percentile(&mut acks, 0.99)),
                100.0 * bulk / engine,
            );
        }
    }
    recovery(quick);
}

/// Time from start to a served `/healthz` for a stream with `n` logged observations.
fn recovery(quick: bool) {
    let n = if quick { 20_000 } else { 100_000 };
    println!();
    println!("| observations | snapshots | recovery (start → serving) | replayed from the log |");
    println!("|---|---|---|---|");
    let v = values();
    for (label, storage, n) in [
        (
            "none (log only)",
            "snapshot_every = 1000000000\nfsync = \"never\"",
            n,
        ),
        ("every 10000 (default)", "fsync = \"never\"", n + 5_000),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_owned();
        let mut server = start_in(dir, storage);
        let c = Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .expect("client");
        create(&c, &server.base, "big", 100, 16);
        for b in 0..n / 1000 {
            let body: String = (0..1000)
                .map(|i| format!("{{\"y\": {}}}\n", v[(b * 1000 + i) % v.len()]))
                .collect();
            let r = c
                .post(format!("{}/v1/streams/big/observations", server.base))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .expect("post");
            assert!(r.status().is_success());
        }
        // Crash, then time the restart.
        let _ = server.child.kill();
        let _ = server.child.wait();
        let cfg = path.join("ekid.toml");
        let t = Instant::now();
        let mut child = Command::new(EXE)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(path.join("data"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("restart");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("line");
        let secs = t.elapsed().as_secs_f64();
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        let log = String::from_utf8_lossy(&out.stderr);
        let replayed = log
            .lines()
            .find(|l| l.contains("recovered stream"))
            .and_then(|l| l.split("replayed=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        println!("| {n} | {label} | {secs:.2} s | {replayed} |");
    }
}
