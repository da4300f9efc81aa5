//! Many streams: 1,000 streams (J=32, hidden 8) created in one daemon and fed
//! concurrently over HTTP by 8 client threads, with forecasts (horizon 14) sampled on random
//! streams meanwhile. Reports aggregate observations/s, p50/p99 forecast latency, and the
//! daemon's resident memory per stream (RSS after ingest minus RSS before the streams existed,
//! divided by the number of streams) against the bytes the ensemble itself needs.
//!
//! `cargo bench --bench streams` (add `-- quick` for 200 streams, `-- f32` for streams with
//! `precision = "f32"`, `-- no-history` for a daemon with `[limits] history = 0`: each stream's
//! history ring grows with what it holds, up to 312 KiB at the default 10,000 entries;
//! `-- horizon=N` for streams whose intervals are calibrated over N steps instead of the
//! default 24).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;

mod common;

use common::{percentile, post_ndjson, rss_bytes, start};

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let history = if std::env::args().any(|a| a == "no-history") {
        "\n[limits]\nhistory = 0"
    } else {
        ""
    };
    let (precision, value_bytes) = if std::env::args().any(|a| a == "f32") {
        ("f32", 4)
    } else {
        ("f64", 8)
    };
    let horizon: Option<usize> = std::env::args().find_map(|a| {
        a.strip_prefix("horizon=")
            .map(|v| v.parse().expect("horizon=N"))
    });
    let (n, rounds, per_batch) = if quick {
        (200usize, 3usize, 20usize)
    } else {
        (1000, 5, 20)
    };
    let (j, h) = (32usize, 8usize);
    // d = (hidden + 1)(hidden + lags + 1) with the default 12 lags.
    let d = (h + 1) * (h + 12 + 1);
    let ensemble_bytes = (j * d * value_bytes) as f64;
    println!(
        "| precision | fsync | streams | obs/s (8 clients, NDJSON × {per_batch}) | forecast p50 / p99 | RSS per stream | ensemble bytes | budget 1.3×ens + 32 KiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for fsync in ["never", "always"] {
        let server = start(&format!("fsync = \"{fsync}\"{history}"));
        let pid = server.child.id();
        let c = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        std::thread::sleep(Duration::from_millis(200));
        let base_rss = rss_bytes(pid);
        for i in 0..n {
            let r = c
                .put(format!("{}/v1/streams/s{i}", server.base))
                .json(&{
                    let mut o = serde_json::json!({
                        "ensemble": j,
                        "hidden": h,
                        "precision": precision,
                        "scale": {"min": -1.0, "max": 1.0}
                    });
                    if let Some(horizon) = horizon {
                        o["horizon"] = horizon.into();
                    }
                    o
                })
                .send()
                .expect("create");
            assert!(r.status().is_success(), "create s{i}: {}", r.status());
        }
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (done, base, c) = (done.clone(), server.base.clone(), c.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut k = 1usize;
                while !done.load(Ordering::Relaxed) {
                    k = (k * 7919 + 13) % n;
                    let t = Instant::now();
                    let r = c
                        .get(format!("{base}/v1/streams/s{k}/forecast?horizon=14"))
                        .send();
                    if matches!(r, Ok(ref r) if r.status().is_success()) {
                        lat.push(t.elapsed().as_secs_f64());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                lat
            })
        };
        let started = Instant::now();
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (base, c) = (server.base.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut sent = 0usize;
                    for round in 0..rounds {
                        for i in (w..n).step_by(8) {
                            let ys = (0..per_batch)
                                .map(|t| ((round * per_batch + t) as f64 / 5.0 + i as f64).sin());
                            post_ndjson(&c, &base, &format!("s{i}"), ys);
                            sent += per_batch;
                        }
                    }
                    sent
                })
            })
            .collect();
        let total: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
        let secs = started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        let mut lat = sampler.join().expect("sampler");
        let per_stream = (rss_bytes(pid).saturating_sub(base_rss)) as f64 / n as f64;
        println!(
            "| {precision} | {fsync} | {n} | {:.0} | {:.2} / {:.2} ms ({} samples) | {:.1} KiB | {:.1} KiB | {:.1} KiB |",
            total as f64 / secs,
            percentile(&mut lat, 0.5) * 1e3,
            percentile(&mut lat, 0.99) * 1e3,
            lat.len(),
            per_stream / 1024.0,
            ensemble_bytes / 1024.0,
            (1.3 * ensemble_bytes + 32768.0) / 1024.0,
        );
    }
}
