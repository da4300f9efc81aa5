//! The data directory under attack, against the real daemon: deletes and creations that fail
//! half-way, files damaged or removed underneath it, names it did not make, a read-only disk,
//! and values that would make a stream's scale infinite. What the API answers and what a
//! restart finds must agree, and no answer shows the host's paths.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::util::{
    Daemon, Tmpfs, client, fingerprint, metrics, ndjson, send, serve_refused, write_config,
};

const OPTIONS: &str = r#"{"ensemble": 12, "hidden": 3, "lags": 2, "scale": {"min": 0, "max": 10}}"#;

fn put(c: &Client, d: &Daemon, name: &str, options: &str) -> (u16, Value) {
    let (s, v, _) = send(
        c.put(d.url(&format!("/v1/streams/{name}")))
            .header("content-type", "application/json")
            .body(options.to_owned()),
    );
    (s, v)
}

fn post_values(c: &Client, d: &Daemon, name: &str, values: &[f64]) -> (u16, Value) {
    let body = ndjson(values, None);
    let (s, v, _) = send(
        c.post(d.url(&format!("/v1/streams/{name}/observations")))
            .header("content-type", "application/x-ndjson")
            .body(body),
    );
    (s, v)
}

/// `n` values of a smooth series from `from` on.
fn series(from: usize, n: usize) -> Vec<f64> {
    (from..from + n)
        .map(|i| 5.0 + 3.0 * (i as f64 / 4.0).sin())
        .collect()
}

fn status(c: &Client, d: &Daemon, path: &str) -> u16 {
    c.get(d.url(path)).send().expect("GET").status().as_u16()
}

fn names(c: &Client, d: &Daemon) -> Vec<String> {
    let (_, v, _) = send(c.get(d.url("/v1/streams")));
    v["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Asserts that a response shows no host path: neither the data directory nor the temporary
/// directory it lives in.
fn assert_no_paths(body: &Value, data: &Path) {
    let text = body.to_string();
    let data = data.to_string_lossy();
    let tmp = std::env::temp_dir();
    assert!(
        !text.contains(&*data) && !text.contains(&*tmp.to_string_lossy()),
        "a host path in {text}"
    );
}

fn stream_dir(data: &Path, name: &str) -> PathBuf {
    data.join("streams").join(name)
}

/// Flips one byte inside the first record of a log segment (the header is 20 bytes).
fn damage_first_record(segment: &Path) {
    let mut bytes = std::fs::read(segment).expect("read segment");
    assert!(bytes.len() > 40, "{} holds no record", segment.display());
    bytes[30] ^= 0xff;
    std::fs::write(segment, bytes).expect("write segment");
}

#[test]
fn a_delete_that_cannot_move_the_files_leaves_the_stream_serving_before_and_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let c = client();
    let mut d = Daemon::start_in(&data, &[]);
    assert_eq!(put(&c, &d, "s", OPTIONS).0, 201);
    assert_eq!(post_values(&c, &d, "s", &series(0, 10)).0, 200);
    // A file where the trash directory must be: the rename into it fails, even for root.
    let trash = data.join("trash");
    std::fs::remove_dir_all(&trash).expect("rm trash");
    std::fs::write(&trash, b"in the way").expect("obstacle");

    let (s, p, ct) = send(c.delete(d.url("/v1/streams/s")));
    assert_eq!(s, 503, "{p}");
    assert_eq!(ct, "application/problem+json");
    assert_eq!(p["type"], "/problems/storage");
    let detail = p["detail"].as_str().expect("detail");
    assert!(
        detail.contains("`s`") && detail.contains("unchanged") && detail.contains("trash"),
        "{detail}"
    );
    assert_no_paths(&p, &data);
    // Nothing changed: listed, readable, learning.
    assert_eq!(names(&c, &d), vec!["s"]);
    assert_eq!(status(&c, &d, "/v1/streams/s"), 200);
    let (s, p) = post_values(&c, &d, "s", &series(10, 5));
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["last_seq"], 15);
    let before = fingerprint(&c, &d, "s");

    d.kill9();
    // With the obstacle still there the daemon refuses to start, naming what is in the way.
    let (exit, stderr) = serve_refused(&data, &[]);
    assert!(!exit.success());
    assert!(stderr.contains("trash"), "{stderr}");
    std::fs::remove_file(&trash).expect("rm obstacle");
    let mut d = Daemon::start_in(&data, &[]);
    assert_eq!(fingerprint(&c, &d, "s"), before);

    assert_eq!(send(c.delete(d.url("/v1/streams/s"))).0, 204);
    assert_eq!(status(&c, &d, "/v1/streams/s"), 404);
    d.kill9();
    let d = Daemon::start_in(&data, &[]);
    assert_eq!(status(&c, &d, "/v1/streams/s"), 404);
    assert!(names(&c, &d).is_empty());
    assert!(!stream_dir(&data, "s").exists());
}

#[test]
fn a_delete_cut_short_by_the_request_timeout_still_completes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = write_config(tmp.path(), "[limits]\nrequest_timeout_ms = 300\n");
    let c = client();
    let mut d = Daemon::start_in(&data, &["--config", &cfg]);
    let heavy = r#"{"ensemble": 400, "hidden": 24, "lags": 8, "scale": {"min": 0, "max": 10}}"#;
    assert_eq!(put(&c, &d, "slow", heavy).0, 201);
    // A batch that keeps the stream's owner busy for longer than the timeout. Its own request
    // times out once it waits for the owner's answer, so the batch is being learned from when
    // the DELETE arrives: the DELETE queues behind it and its request times out too.
    let body: String = series(0, 8000)
        .iter()
        .map(|y| format!("{{\"y\": {y}}}\n"))
        .collect();
    let (s, p, _) = send(
        c.post(d.url("/v1/streams/slow/observations"))
            .header("content-type", "application/x-ndjson")
            .body(body),
    );
    if s == 200 {
        eprintln!("the batch was learned within the timeout: the DELETE below may not time out");
    } else {
        assert_eq!((s, &p["type"]), (503, &json!("/problems/timeout")), "{p}");
    }
    let (s, p, _) = send(c.delete(d.url("/v1/streams/slow")));
    assert!(s == 503 || s == 204, "{s} {p}");
    if s == 503 {
        assert_eq!(p["type"], "/problems/timeout", "{p}");
    } else {
        eprintln!("the batch finished within the timeout: the DELETE did not time out");
    }
    // The delete goes on to its end: the stream goes, and stays gone after a restart.
    let started = Instant::now();
    while status(&c, &d, "/v1/streams/slow") != 404 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the delete never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill9();
    let d = Daemon::start_in(&data, &["--config", &cfg]);
    assert_eq!(status(&c, &d, "/v1/streams/slow"), 404, "{}", d.log());
}

#[test]
fn an_auto_scale_that_would_not_be_finite_is_refused_naming_the_observation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let c = client();
    let d = Daemon::start_in(&data, &[]);
    let auto = r#"{"ensemble": 12, "hidden": 3, "lags": 2, "scale": "auto"}"#;
    for (name, opening) in [("wide", [1e308, -1e308]), ("huge", [1.7e308, 1.7e308])] {
        assert_eq!(put(&c, &d, name, auto).0, 201);
        let (s, p) = post_values(&c, &d, name, &opening);
        assert_eq!(s, 422, "{name}: {p}");
        assert_eq!(p["type"], "/problems/invalid-observation");
        assert_eq!((&p["field"], &p["index"]), (&json!("y"), &json!(1)), "{p}");
        let detail = p["detail"].as_str().expect("detail");
        assert!(
            detail.contains("seq 2") && detail.contains("`y[0]`") && detail.contains("scale"),
            "{detail}"
        );
        // Nothing applied.
        let (_, info, _) = send(c.get(d.url(&format!("/v1/streams/{name}"))));
        assert_eq!(info["stats"]["observations"], 0, "{info}");
        assert!(info["scale"].is_null(), "{info}");
        // Split over two requests: the first is held, the second (which would fix the scale)
        // is refused.
        assert_eq!(post_values(&c, &d, name, &opening[..1]).0, 200);
        let (s, p) = post_values(&c, &d, name, &opening[1..]);
        assert_eq!(s, 422, "{p}");
        assert_eq!(p["index"], 0, "{p}");
        // Values that leave a finite scale go through, and every prediction is a number.
        let sane = [opening[0] * 0.95, opening[0] * 0.9, opening[0] * 0.92];
        let (s, p) = post_values(&c, &d, name, &sane);
        assert_eq!(s, 200, "{p}");
        let predicted = &p["predictions"][2]["prediction"][0];
        assert!(predicted.is_f64(), "{p}");
        let (_, info, _) = send(c.get(d.url(&format!("/v1/streams/{name}"))));
        assert!(
            info["scale"][0]["min"].is_f64() && info["scale"][0]["max"].is_f64(),
            "{info}"
        );
    }
    // An explicit scale is held to the same rule.
    for bad in [
        r#"{"scale": {"min": -1e308, "max": 1e308}}"#,
        r#"{"scale": {"min": 1, "max": 1}}"#,
    ] {
        let (s, p) = put(&c, &d, "explicit", bad);
        assert_eq!((s, &p["field"]), (422, &json!("scale")), "{bad}: {p}");
    }
}

#[test]
fn damage_in_a_log_segment_the_snapshot_covers_does_not_fail_the_stream() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = write_config(tmp.path(), "[storage]\nsnapshot_every = 10\n");
    let c = client();
    let mut d = Daemon::start_in(&data, &["--config", &cfg]);
    assert_eq!(put(&c, &d, "k", OPTIONS).0, 201);
    // Snapshots at 10 and 20; wal-11 holds 11..20 (kept for a fallback to the snapshot at
    // 10), wal-21 the three batches after.
    for (from, n) in [(0, 10), (10, 10), (20, 2), (22, 2), (24, 2)] {
        assert_eq!(post_values(&c, &d, "k", &series(from, n)).0, 200);
    }
    let dir = stream_dir(&data, "k");
    let covered = dir.join("wal-00000000000000000011.log");
    let needed = dir.join("wal-00000000000000000021.log");
    assert!(
        covered.exists() && needed.exists(),
        "{:?}",
        std::fs::read_dir(&dir).map(|r| r
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect::<Vec<_>>())
    );
    let before = fingerprint(&c, &d, "k");
    d.kill9();

    damage_first_record(&covered);
    let mut d = Daemon::start_in(&data, &["--config", &cfg]);
    assert_eq!(fingerprint(&c, &d, "k"), before, "{}", d.log());
    assert!(
        d.log().contains("wal-00000000000000000011.log") && d.log().contains("does not need it"),
        "{}",
        d.log()
    );
    let out = crate::util::ekid()
        .args(["inspect"])
        .arg(&data)
        .output()
        .expect("inspect");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(
        listing.contains("[DAMAGED: recoverable]")
            && listing.contains("covers this segment")
            && !listing.contains("[PROBLEM]"),
        "{listing}"
    );
    // The stream goes on learning.
    assert_eq!(post_values(&c, &d, "k", &series(26, 3)).0, 200);
    d.kill9();

    // Damage where recovery needs it still fails the stream, saying so without paths.
    damage_first_record(&needed);
    let d = Daemon::start_in(&data, &["--config", &cfg]);
    let (s, info, _) = send(c.get(d.url("/v1/streams/k")));
    assert_eq!(s, 200);
    let failed = info["failed"].as_str().expect("failed");
    assert!(failed.contains("wal-00000000000000000021.log"), "{failed}");
    assert_no_paths(&info, &data);
    let (s, p) = post_values(&c, &d, "k", &[1.0]);
    assert_eq!(s, 500, "{p}");
    assert_no_paths(&p, &data);
}

#[test]
fn writes_after_the_stream_directory_is_removed_fail_the_stream_loudly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let c = client();
    let d = Daemon::start_in(&data, &[]);
    assert_eq!(put(&c, &d, "gone", OPTIONS).0, 201);
    assert_eq!(put(&c, &d, "kept", OPTIONS).0, 201);
    assert_eq!(post_values(&c, &d, "gone", &series(0, 5)).0, 200);
    std::fs::remove_dir_all(stream_dir(&data, "gone")).expect("rm -r");

    let (s, p) = post_values(&c, &d, "gone", &series(5, 3));
    assert_eq!(s, 500, "acknowledged into a deleted file: {p}");
    assert_eq!(p["type"], "/problems/stream-failed");
    assert_no_paths(&p, &data);
    let (_, info, _) = send(c.get(d.url("/v1/streams/gone")));
    let failed = info["failed"].as_str().expect("failed");
    assert!(failed.contains("removed"), "{failed}");
    assert_eq!(info["stats"]["last_seq"], 5, "nothing more applied");
    assert_no_paths(&info, &data);
    assert_eq!(post_values(&c, &d, "gone", &series(5, 3)).0, 500);
    let metrics = metrics(&c, &d);
    assert!(
        metrics.contains("ekid_stream_failed{stream=\"gone\"} 1"),
        "{metrics}"
    );
    // The other stream is untouched, and the failed one can be deleted.
    assert_eq!(post_values(&c, &d, "kept", &series(0, 5)).0, 200);
    assert_eq!(send(c.delete(d.url("/v1/streams/gone"))).0, 204);
    assert_eq!(names(&c, &d), vec!["kept"]);
}

#[test]
fn a_creation_that_fails_after_its_directory_is_in_place_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let c = client();
    let mut cmd = crate::util::ekid();
    cmd.env("EKID_FAILPOINTS", "fail-after-options-rename:doomed");
    let mut d = Daemon::start_with(cmd, &data, &[]);
    let (s, p) = put(&c, &d, "doomed", OPTIONS);
    assert_eq!(s, 503, "{p}");
    assert_eq!(p["type"], "/problems/storage");
    let detail = p["detail"].as_str().expect("detail");
    assert!(
        detail.contains("`doomed`") && detail.contains("nothing was created"),
        "{detail}"
    );
    assert_no_paths(&p, &data);
    assert_eq!(status(&c, &d, "/v1/streams/doomed"), 404);
    assert_eq!(put(&c, &d, "other", OPTIONS).0, 201);
    assert!(!stream_dir(&data, "doomed").exists());
    d.kill9();

    let d = Daemon::start_in(&data, &[]);
    assert_eq!(names(&c, &d), vec!["other"]);
    assert_eq!(put(&c, &d, "doomed", OPTIONS).0, 201);
}

#[test]
fn directories_whose_names_are_not_stream_names_are_skipped_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let c = client();
    let mut d = Daemon::start_in(&data, &[]);
    assert_eq!(put(&c, &d, "good", OPTIONS).0, 201);
    assert_eq!(post_values(&c, &d, "good", &series(0, 6)).0, 200);
    let before = fingerprint(&c, &d, "good");
    assert!(d.terminate(Duration::from_secs(10)).success());
    // Directories that look like streams (options and all) under names the API refuses.
    let options = std::fs::read(stream_dir(&data, "good").join("options.json")).expect("options");
    for bad in ["bad name!", "new\nline"] {
        let dir = stream_dir(&data, bad);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("options.json"), &options).expect("options");
    }

    let d = Daemon::start_in(&data, &[]);
    assert_eq!(names(&c, &d), vec!["good"]);
    assert_eq!(fingerprint(&c, &d, "good"), before);
    let log = d.log();
    assert!(
        log.contains(r#""bad name!""#) && log.contains(r#""new\nline""#),
        "names escaped in the log: {log}"
    );
    // Left alone, not removed.
    assert!(stream_dir(&data, "new\nline").join("options.json").exists());
}

/// A real read-only disk: the data directory is on a tmpfs remounted read-only (needs root,
/// as CI has; elsewhere the test says so and checks nothing).
#[test]
fn a_read_only_data_dir_refuses_to_start_naming_the_directory() {
    let Some(disk) = Tmpfs::mount("8m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?); the read-only test needs one");
        return;
    };
    let mnt = &disk.dir;
    let mount = |args: &[&str]| disk.mount_with(args);
    let data = mnt.join("data");
    let c = client();
    let mut d = Daemon::start_in(&data, &[]);
    assert_eq!(put(&c, &d, "r", OPTIONS).0, 201);
    assert_eq!(post_values(&c, &d, "r", &series(0, 8)).0, 200);
    let before = fingerprint(&c, &d, "r");
    assert!(d.terminate(Duration::from_secs(10)).success());

    assert!(mount(&["-o", "remount,ro"]), "remount read-only");
    let (exit, stderr) = serve_refused(&data, &[]);
    assert!(!exit.success());
    assert!(
        stderr.contains(&*data.to_string_lossy()) && stderr.contains("Read-only file system"),
        "{stderr}"
    );

    assert!(mount(&["-o", "remount,rw"]), "remount read-write");
    let d = Daemon::start_in(&data, &[]);
    assert_eq!(fingerprint(&c, &d, "r"), before);
}
