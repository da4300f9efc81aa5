//! `ekid replay` end to end: the real binary against a real daemon.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::util::{Daemon, assert_success, client, dataset, ekid, get_json, run_ok};

fn replay(args: &[&str]) -> Output {
    let out = ekid()
        .arg("replay")
        .args(args)
        .env_remove("EKID_TOKEN")
        .output()
        .expect("spawn ekid replay");
    assert_success(&out, args);
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Replays `path` into stream `name` and runs `ekid eval --methods eki --passes 1` on it, both
/// with `options` (stream option flags) and `--predictions`; returns replay's stderr and the
/// two prediction files.
fn replay_and_eval(
    d: &Daemon,
    dir: &Path,
    path: &Path,
    name: &str,
    options: &[&str],
) -> (Output, Vec<u8>, Vec<u8>) {
    let a = dir.join(format!("replay-{name}.csv"));
    let b = dir.join(format!("eval-{name}.csv"));
    let mut args = vec![s(path), "--server", &d.base, "--stream", name];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--predictions", s(&a)]);
    let out = replay(&args);
    let mut args = vec!["eval", s(path), "--methods", "eki", "--passes", "1"];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--predictions", s(&b)]);
    run_ok(&args);
    (
        out,
        std::fs::read(&a).expect("replay predictions"),
        std::fs::read(&b).expect("eval predictions"),
    )
}

/// The daemon fed by `ekid replay` predicts exactly what `ekid eval` does offline: the same
/// default options and seed, the same scale (the file's min/max), every prediction bit for bit.
#[test]
fn replay_predictions_equal_eval_bit_for_bit_issue_3() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, file) in ["daily-min-temperatures.csv", "monthly-sunspots.csv"]
        .into_iter()
        .enumerate()
    {
        let name = format!("s{i}");
        let (out, a, b) = replay_and_eval(&d, dir.path(), &dataset(file), &name, &[]);
        let n = if i == 0 { 3650 } else { 2820 };
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), n + 1, "{file}");
        assert!(a == b, "{file}: replay and eval predictions differ");
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "replayed {n} observations into `{name}` (0 duplicates)"
            )),
            "{err}"
        );
        let st = get_json(&client(), &d, &format!("/v1/streams/{name}"));
        assert_eq!(st["stats"]["observations"], n as u64);
        assert_eq!(st["stats"]["last_seq"], n as u64);
    }
}

/// A replay interrupted after 1000 rows and resumed from the full file applies the rest once,
/// and the two runs together predict exactly what one uninterrupted replay does.
#[test]
fn replay_resumes_from_the_streams_last_seq() {
    let d = Daemon::start();
    let c = client();
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dataset("daily-min-temperatures.csv");
    let text = std::fs::read_to_string(&full).expect("read dataset");
    // Header plus the first 1000 rows, CRLF kept as in the file.
    let head: String = text.split_inclusive('\n').take(1001).collect();
    let part = dir.path().join("daily-min-temperatures.csv");
    std::fs::write(&part, head).expect("write part");
    // The scale is fixed when the stream is created; give the whole file's range so the partial
    // first run scales as the uninterrupted one does.
    let scale = "0:26.3";
    let p = |n: &str| dir.path().join(n);
    let run = |file: &Path, name: &str, out: &Path| {
        replay(&[
            s(file),
            "--server",
            &d.base,
            "--stream",
            name,
            "--scale",
            scale,
            "--predictions",
            s(out),
        ])
    };

    run(&part, "resumed", &p("first.csv"));
    let st = get_json(&c, &d, "/v1/streams/resumed");
    assert_eq!(st["stats"]["observations"], 1000);
    assert_eq!(st["stats"]["last_seq"], 1000);

    let second = run(&full, "resumed", &p("second.csv"));
    let err = stderr(&second);
    assert!(err.contains("replayed 2650 observations"), "{err}");
    let st = get_json(&c, &d, "/v1/streams/resumed");
    assert_eq!(st["stats"]["observations"], 3650);
    assert_eq!(st["stats"]["last_seq"], 3650);

    let first = std::fs::read_to_string(p("first.csv")).expect("first predictions");
    let second = std::fs::read_to_string(p("second.csv")).expect("second predictions");
    let rows: Vec<&str> = second.lines().skip(1).collect();
    assert_eq!(rows.len(), 2650);
    assert!(rows[0].starts_with("1001,"), "{}", rows[0]);
    assert!(rows[2649].starts_with("3650,"), "{}", rows[2649]);

    run(&full, "fresh", &p("fresh.csv"));
    let fresh = std::fs::read_to_string(p("fresh.csv")).expect("fresh predictions");
    let (_, second_body) = second.split_once('\n').expect("header");
    assert!(
        format!("{first}{second_body}") == fresh,
        "resumed predictions differ from an uninterrupted replay"
    );

    // A third run finds nothing left to do, and applies nothing.
    let third = run(&full, "resumed", &p("third.csv"));
    let err = stderr(&third);
    assert!(err.contains("replayed 0 observations"), "{err}");
    let third = std::fs::read_to_string(p("third.csv")).expect("third predictions");
    assert_eq!(third.lines().count(), 1, "{third}");
    assert_eq!(
        get_json(&c, &d, "/v1/streams/resumed")["stats"]["observations"],
        3650
    );

    // Flags that contradict the existing stream are an error, not a silent change.
    let out = ekid()
        .args([
            "replay",
            s(&full),
            "--server",
            &d.base,
            "--stream",
            "resumed",
        ])
        .args(["--ensemble", "50"])
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("ensemble is 100, the flags say 50"), "{err}");
}

/// Nothing listening: a non-zero exit and a message naming the server, after a bounded retry.
#[test]
fn replay_to_a_dead_server_fails_clearly() {
    let started = Instant::now();
    let out = ekid()
        .arg("replay")
        .arg(dataset("monthly-sunspots.csv"))
        .args(["--server", "http://127.0.0.1:9"])
        .output()
        .expect("spawn");
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("error: ") && err.contains("http://127.0.0.1:9/v1/streams/monthly-sunspots"),
        "{err}"
    );
    assert!(err.contains("gave up after"), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// The same with `f32` ensembles: the daemon's `f32` stream predicts what `ekid eval
/// --precision f32` does, bit for bit.
#[test]
fn f32_replay_predictions_equal_eval_bit_for_bit_issue_6() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dataset("monthly-sunspots.csv");
    let (_, a, b) = replay_and_eval(&d, dir.path(), &path, "f", &["--precision", "f32"]);
    assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 2821);
    assert!(a == b, "replay and eval predictions differ");
    assert_eq!(
        get_json(&client(), &d, "/v1/streams/f")["options"]["precision"],
        "f32"
    );
}
