//! Calibrated intervals end to end: the daemon's running coverage, forecasts at several levels,
//! the coverage metrics, and `ekid eval`'s probabilistic scores.

use serde_json::json;

use crate::util::{Daemon, client, eval_json, get_json, metrics, post_ndjson, put, send};

/// An AR(1) around 50 with Gaussian noise of deviation 2 (Box–Muller on a fixed LCG), so that
/// nothing but the calibration decides the coverage.
fn noisy_series(n: usize) -> Vec<f64> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut uniform = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut y = 50.0;
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            let e = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
            y = 50.0 + 0.7 * (y - 50.0) + 2.0 * e;
            y
        })
        .collect()
}

fn ndjson(values: &[f64]) -> String {
    values.iter().map(|v| format!("{{\"y\": {v}}}\n")).collect()
}

#[test]
fn a_stream_reports_its_coverage_and_serves_nested_intervals_at_several_levels() {
    let d = Daemon::start();
    let c = client();
    let r = put(
        &c,
        &d,
        "noisy",
        &json!({"ensemble": 20, "hidden": 4, "lags": 3, "horizon": 6}),
    );
    assert_eq!(r.status(), 201);
    let values = noisy_series(4000);
    for chunk in values.chunks(1000) {
        assert_eq!(post_ndjson(&c, &d, "noisy", ndjson(chunk)).status(), 200);
    }

    // The running coverage: every reported level, every step, near its level.
    let stream = get_json(&c, &d, "/v1/streams/noisy");
    let coverage = stream["stats"]["coverage"].as_array().expect("coverage");
    assert_eq!(coverage.len(), 4, "{coverage:?}");
    for level in coverage {
        let l = level["level"].as_f64().expect("level");
        let steps = level["steps"].as_array().expect("steps");
        assert_eq!(steps.len(), 6, "one per calibrated step: {level}");
        for (h, v) in steps.iter().enumerate() {
            let v = v.as_f64().expect("scored");
            assert!(
                (v - l).abs() <= 0.03,
                "level {l} step {}: coverage {v}",
                h + 1
            );
        }
    }
    let text = metrics(&c, &d);
    for step in [1, 6] {
        let line =
            format!("ekid_stream_coverage{{stream=\"noisy\",level=\"0.9\",step=\"{step}\"}}");
        assert!(text.contains(&line), "no {line} in\n{text}");
    }

    // Two levels in one forecast, past the calibrated steps: nested, in the order asked.
    let f = get_json(
        &c,
        &d,
        "/v1/streams/noisy/forecast?horizon=10&level=0.9,0.5",
    );
    assert_eq!(f["levels"], json!([0.9, 0.5]));
    assert_eq!(f["level"], json!(0.9));
    let steps = f["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 10);
    let mut last_width = 0.0;
    for s in steps {
        let iv = s["intervals"].as_array().expect("intervals");
        let at = |i: usize, k: &str| iv[i][k][0].as_f64().expect("bound");
        let mean = s["mean"][0].as_f64().expect("mean");
        assert!(
            at(0, "lower") <= at(1, "lower") && at(1, "upper") <= at(0, "upper"),
            "{s}"
        );
        assert!(at(1, "lower") <= mean && mean <= at(1, "upper"), "{s}");
        assert_eq!(
            s["lower"], iv[0]["lower"],
            "lower/upper repeat the first level"
        );
        let width = at(0, "upper") - at(0, "lower");
        // Noise of deviation 2 around an AR(1): the 90% interval is about ±3.3 at step 1 and
        // widens towards the process's ±4.6.
        assert!(
            (4.0..14.0).contains(&width),
            "step {}: 90% width {width}",
            s["step"]
        );
        assert!(
            width + 1e-9 >= last_width * 0.9,
            "intervals do not collapse: {s}"
        );
        last_width = width;
    }

    // Levels that are not levels: 400 naming `level`, nothing else happens.
    let seq_before = stream["stats"]["last_seq"].clone();
    let many = vec!["0.5"; 17].join(",");
    for bad in ["0.5,abc", "1.5", "0", &many] {
        let (status, p, _) =
            send(c.get(d.url(&format!("/v1/streams/noisy/forecast?horizon=3&level={bad}"))));
        assert_eq!(
            (status, p["field"].as_str()),
            (400, Some("level")),
            "{bad}: {p}"
        );
    }
    let (status, p, _) = send(
        c.post(d.url("/v1/streams/noisy/forecast"))
            .json(&json!({"horizon": 2, "level": [0.5, 0.8]})),
    );
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["steps"][1]["intervals"].as_array().map(Vec::len), Some(2));
    let after = get_json(&c, &d, "/v1/streams/noisy");
    assert_eq!(after["stats"]["last_seq"], seq_before);
}

/// `ekid eval --horizon H --level L`: every method's coverage and interval score per step, its
/// CRPS, in the JSON; coverage near the level.
#[test]
fn eval_scores_every_methods_calibrated_intervals() {
    let doc = eval_json(
        "monthly-sunspots.csv",
        &[
            "--methods",
            "persistence,ar,eki",
            "--passes",
            "1",
            "--horizon",
            "5",
            "--level",
            "0.8",
        ],
    );
    for r in doc["results"].as_array().expect("results") {
        assert_eq!(r["level"], json!(0.8), "{r}");
        let coverage = r["coverage"].as_array().expect("coverage");
        let scores = r["interval_score"].as_array().expect("interval_score");
        assert_eq!((coverage.len(), scores.len()), (5, 5), "{r}");
        for (c, s) in coverage.iter().zip(scores) {
            let (c, s) = (c.as_f64().expect("number"), s.as_f64().expect("number"));
            assert!((c - 0.8).abs() <= 0.04, "{}: coverage {c}", r["method"]);
            assert!(
                s > 0.0 && s.is_finite(),
                "{}: interval score {s}",
                r["method"]
            );
        }
        let crps = r["crps"].as_f64().expect("crps");
        assert!(crps > 0.0 && crps < 0.1, "{}: crps {crps}", r["method"]);
    }
}

/// With the defaults (24 steps, level 0.9) the stream's intervals cover every step of the
/// horizon within 0.02 of the level over the bundled series, far steps included.
#[test]
fn eval_covers_every_step_of_the_default_horizon() {
    for name in ["monthly-sunspots.csv", "daily-min-temperatures.csv"] {
        let doc = eval_json(name, &["--methods", "eki", "--passes", "1"]);
        let r = &doc["results"][0];
        let coverage = r["coverage"].as_array().expect("coverage");
        assert_eq!(coverage.len(), 24, "{r}");
        for (h, c) in coverage.iter().enumerate() {
            let c = c.as_f64().expect("number");
            assert!(
                (c - 0.9).abs() <= 0.02,
                "{name}: step {}: coverage {c}",
                h + 1
            );
        }
    }
}
