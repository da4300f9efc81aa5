//! `ekid eval` end to end on the bundled datasets.

use serde_json::Value;

use crate::util::{dataset, ekid, eval_json, run_ok};

fn result<'a>(doc: &'a Value, method: &str) -> &'a Value {
    doc["results"]
        .as_array()
        .expect("results array")
        .iter()
        .find(|r| r["method"] == method)
        .unwrap_or_else(|| panic!("no row for {method}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number: {v}"))
}

/// The accuracy bar of the engine issue, with the default settings: the seed's published EKI
/// figures, persistence and OGD on the test segment, persistence online.
#[test]
fn default_eki_beats_the_published_figures_and_the_baselines_issue_2() {
    for (file, seed_final) in [
        ("daily-min-temperatures.csv", 7.448e-3),
        ("monthly-sunspots.csv", 6.006e-3),
    ] {
        let doc = eval_json(file, &["--methods", "persistence,ogd,eki"]);
        let (p, o, e) = (
            result(&doc, "persistence"),
            result(&doc, "ogd"),
            result(&doc, "eki"),
        );
        let ef = num(e, "final");
        assert!(ef <= seed_final, "{file}: eki final {ef} > {seed_final}");
        assert!(
            ef < num(p, "final"),
            "{file}: eki final {ef} vs persistence"
        );
        assert!(ef < num(o, "final"), "{file}: eki final {ef} vs ogd");
        assert!(
            num(e, "nmse_prequential") < num(p, "nmse_prequential"),
            "{file}: prequential {e} vs {p}"
        );
        assert_eq!(
            doc["n"].as_u64(),
            Some(if file.starts_with("daily") {
                3650
            } else {
                2820
            })
        );
    }
}

/// The predictions file lets anyone recompute `nmse_prequential`, and is the same bit for bit
/// on a second run with the same seed.
#[test]
fn predictions_file_recomputes_the_prequential_figure_and_is_reproducible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dataset("monthly-sunspots.csv");
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.csv");
    let mut docs = Vec::new();
    for out in [&a, &b] {
        let s = run_ok(&[
            "eval",
            path.to_str().expect("utf-8"),
            "--methods",
            "eki",
            "--passes",
            "1",
            "--ensemble",
            "30",
            "--json",
            "--predictions",
            out.to_str().expect("utf-8"),
        ]);
        docs.push(serde_json::from_str::<Value>(&s).expect("json"));
    }
    let bytes_a = std::fs::read(&a).expect("read a");
    assert_eq!(bytes_a, std::fs::read(&b).expect("read b"));
    let doc = &docs[0];
    let (min, max) = (num(&doc["scale"], "min"), num(&doc["scale"], "max"));
    let text = String::from_utf8(bytes_a).expect("utf-8");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("seq,y,prediction"));
    let (mut sum, mut n, mut rows) = (0.0, 0usize, 0usize);
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], (i + 1).to_string(), "seq is the 1-based row");
        rows += 1;
        if f[2].is_empty() {
            assert!(i < 12, "only the lag buffer's rows lack a prediction");
            continue;
        }
        let y: f64 = f[1].parse().expect("y");
        let p: f64 = f[2].parse().expect("prediction");
        let e = (p - y) / (max - min);
        sum += e * e;
        n += 1;
    }
    assert_eq!(rows, 2820);
    let recomputed = sum / n as f64;
    let reported = num(result(doc, "eki"), "nmse_prequential");
    assert!(
        (recomputed - reported).abs() <= 1e-9 * reported,
        "recomputed {recomputed} vs reported {reported}"
    );
}

#[test]
fn a_bad_cell_fails_with_its_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("bad.csv");
    std::fs::write(
        &f,
        "\"Date\",\"Temp\"\r\n\"1981-01-01\",20.7\r\n\"1981-01-02\",x17\r\n",
    )
    .expect("write");
    let out = ekid()
        .args(["eval", f.to_str().expect("utf-8")])
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3, column `Temp`: `x17` is not a number"),
        "{err}"
    );
}

#[test]
fn unknown_method_and_bad_option_are_refused() {
    let path = dataset("monthly-sunspots.csv");
    let p = path.to_str().expect("utf-8");
    for (args, want) in [
        (
            vec!["eval", p, "--methods", "eki,nope"],
            "unknown method `nope`",
        ),
        (vec!["eval", p, "--noise", "-1"], "option `noise`"),
        (vec!["eval", p, "--ensemble", "1"], "option `ensemble`"),
        (vec!["eval", p, "--passes", "0"], "--passes"),
    ] {
        let out = ekid().args(&args).output().expect("spawn");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn plot_draws_the_series_and_the_predictions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("p.svg");
    let path = dataset("daily-min-temperatures.csv");
    run_ok(&[
        "eval",
        path.to_str().expect("utf-8"),
        "--methods",
        "eki",
        "--passes",
        "1",
        "--ensemble",
        "20",
        "--plot",
        svg.to_str().expect("utf-8"),
    ]);
    let text = std::fs::read_to_string(&svg).expect("svg written");
    assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
    assert!(
        text.matches("<polyline").count() >= 2,
        "series and predictions are drawn"
    );
    assert!(text.contains("prequential prediction") && text.contains("train | test split"));
}
