//! The daemon end to end: the real binary on an ephemeral loopback port, spoken to over HTTP.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use reqwest::blocking::Response;
use serde_json::{Value, json};

use crate::util::{
    Daemon, client, get_json, json_of, ndjson, post, post_ndjson, put, series, write_config,
};

const SMALL: &str = r#"{"ensemble": 20, "hidden": 4, "lags": 3, "scale": {"min": 0, "max": 20}}"#;

fn small() -> Value {
    serde_json::from_str(SMALL).expect("json")
}

#[test]
fn every_endpoint_and_content_type() {
    let d = Daemon::start();
    let c = client();
    assert_eq!(get_json(&c, &d, "/healthz")["status"], "ok");

    // Create, same again, different options.
    let r = put(&c, &d, "s", &small());
    assert_eq!(r.status(), 201);
    assert_eq!(json_of(r)["options"]["ensemble"], 20);
    assert_eq!(put(&c, &d, "s", &small()).status(), 200);
    let r = put(&c, &d, "s", &json!({"ensemble": 21}));
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // JSON object, JSON array, NDJSON, CSV.
    let r = post(&c, &d, "s", "application/json", r#"{"y": 10.0}"#);
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r)["first_seq"], 1);
    let r = json_of(post(
        &c,
        &d,
        "s",
        "application/json",
        r#"[{"y": 11}, {"y": [12]}]"#,
    ));
    assert_eq!(
        (r["accepted"].clone(), r["last_seq"].clone()),
        (json!(2), json!(3))
    );
    assert_eq!(
        r["predictions"][1]["prediction"],
        Value::Null,
        "lags fill first"
    );
    let r = json_of(post_ndjson(&c, &d, "s", ndjson(&[13.0, 14.0], None)));
    assert_eq!(r["first_seq"], 4);
    assert!(r["predictions"][0]["prediction"][0].is_number());
    let r = json_of(post(&c, &d, "s", "text/csv", "seq,y\n6,15\n7,14.5\n"));
    assert_eq!(
        (r["accepted"].clone(), r["last_seq"].clone()),
        (json!(2), json!(7))
    );

    // Get, list.
    let s = get_json(&c, &d, "/v1/streams/s");
    assert_eq!(s["stats"]["observations"], 7);
    assert_eq!(s["stats"]["last_seq"], 7);
    assert!(s["stats"]["mse"].as_f64().expect("mse") >= 0.0);
    assert!(
        s["stats"]["last_update"]
            .as_str()
            .expect("time")
            .ends_with('Z')
    );
    let l = get_json(&c, &d, "/v1/streams");
    assert_eq!(l["streams"][0]["name"], "s");

    // Forecast.
    let f = get_json(&c, &d, "/v1/streams/s/forecast?horizon=14&level=0.8");
    assert_eq!(
        (f["stream"].clone(), f["seq"].clone(), f["horizon"].clone()),
        (json!("s"), json!(7), json!(14))
    );
    let steps = f["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 14);
    for (i, st) in steps.iter().enumerate() {
        assert_eq!(st["step"], i + 1);
        let (lo, m, hi) = (
            st["lower"][0].as_f64(),
            st["mean"][0].as_f64(),
            st["upper"][0].as_f64(),
        );
        let (lo, m, hi) = (lo.expect("lower"), m.expect("mean"), hi.expect("upper"));
        assert!(lo < m && m < hi, "step {i}: {lo} {m} {hi}");
    }
    // A wider level gives a wider interval.
    let f95 = get_json(&c, &d, "/v1/streams/s/forecast?horizon=1&level=0.95");
    let w = |f: &Value| {
        f["steps"][0]["upper"][0].as_f64().unwrap() - f["steps"][0]["lower"][0].as_f64().unwrap()
    };
    assert!(w(&f95) > w(&f));

    // Exogenous inputs: forecasts take future inputs by POST.
    let r = put(
        &c,
        &d,
        "x",
        &json!({"ensemble": 10, "hidden": 3, "lags": 2, "inputs": 1}),
    );
    assert_eq!(r.status(), 201);
    let body: String = (0..10)
        .map(|i| format!("{{\"x\": [{i}], \"y\": {}}}\n", i * 2))
        .collect();
    assert_eq!(post_ndjson(&c, &d, "x", body).status(), 200);
    let r = c
        .get(d.url("/v1/streams/x/forecast?horizon=2"))
        .send()
        .expect("GET");
    assert_eq!(r.status(), 400);
    let r = c
        .post(d.url("/v1/streams/x/forecast"))
        .json(&json!({"horizon": 2, "x": [[10], [11]]}))
        .send()
        .expect("POST forecast");
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r)["steps"].as_array().expect("steps").len(), 2);

    // Metrics and OpenAPI.
    let m = c
        .get(d.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    assert!(m.contains("ekid_observations_total{stream=\"s\"} 7"), "{m}");
    assert!(m.contains("ekid_update_seconds_count"));
    assert!(m.contains("ekid_stream_prequential_mse{stream=\"s\"}"));
    assert!(m.contains("ekid_http_requests_total{route=\"/v1/streams/{name}/observations\",method=\"POST\",status=\"200\"}"), "{m}");
    let o = get_json(&c, &d, "/openapi.json");
    for p in [
        "/healthz",
        "/metrics",
        "/v1/streams",
        "/v1/streams/{name}",
        "/v1/streams/{name}/observations",
        "/v1/streams/{name}/forecast",
        "/v1/streams/{name}/events",
    ] {
        assert!(o["paths"][p].is_object(), "openapi lacks {p}");
    }
    // What a schema-driven client needs: the forecast's parameters where they go, and the
    // answers every operation may give.
    let params = o["paths"]["/v1/streams/{name}/forecast"]["get"]["parameters"]
        .as_array()
        .expect("forecast parameters");
    let param = |n: &str| {
        params
            .iter()
            .find(|p| p["name"] == n)
            .unwrap_or_else(|| panic!("no parameter {n}: {params:?}"))
    };
    assert_eq!(param("horizon")["in"], "query");
    assert_eq!(param("horizon")["required"], true);
    assert_eq!(param("level")["in"], "query");
    assert_ne!(param("level")["required"], true);
    assert_eq!(param("name")["in"], "path");
    let put = &o["paths"]["/v1/streams/{name}"]["put"];
    for status in ["401", "422", "503"] {
        assert!(put["responses"][status].is_object(), "PUT lacks {status}");
    }
    assert!(o["paths"]["/v1/streams/{name}/forecast"]["get"]["responses"]["422"].is_object());
    assert!(o["paths"]["/healthz"]["get"]["responses"]["401"].is_null());
    assert_eq!(
        o["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // Delete.
    let r = c.delete(d.url("/v1/streams/s")).send().expect("DELETE");
    assert_eq!(r.status(), 204);
    let r = c.get(d.url("/v1/streams/s")).send().expect("GET");
    assert_eq!(r.status(), 404);
    assert_eq!(json_of(r)["type"], "/problems/no-such-stream");
}

#[test]
fn a_retried_batch_is_applied_once() {
    let d = Daemon::start();
    let c = client();
    put(&c, &d, "r", &small());
    let v = series(20);
    let first = json_of(post_ndjson(&c, &d, "r", ndjson(&v, Some(1))));
    assert_eq!(
        (first["accepted"].clone(), first["duplicates"].clone()),
        (json!(20), json!(0))
    );
    let again = json_of(post_ndjson(&c, &d, "r", ndjson(&v, Some(1))));
    assert_eq!(
        (again["accepted"].clone(), again["duplicates"].clone()),
        (json!(0), json!(20))
    );
    assert_eq!(again["first_seq"], Value::Null);
    // Overlapping retry: 15..25 applies 21..25 only.
    let mut w = series(25);
    let tail = w.split_off(14);
    let r = json_of(post_ndjson(&c, &d, "r", ndjson(&tail, Some(15))));
    assert_eq!(
        (
            r["accepted"].clone(),
            r["duplicates"].clone(),
            r["first_seq"].clone()
        ),
        (json!(5), json!(6), json!(21))
    );
    assert_eq!(
        get_json(&c, &d, "/v1/streams/r")["stats"]["observations"],
        25
    );
    // A gap is a conflict and changes nothing.
    let r = post(&c, &d, "r", "application/json", r#"{"seq": 27, "y": 1}"#);
    assert_eq!(r.status(), 409);
    assert_eq!(get_json(&c, &d, "/v1/streams/r")["stats"]["last_seq"], 25);
}

#[test]
fn a_batch_with_one_bad_row_applies_nothing() {
    let d = Daemon::start();
    let c = client();
    put(&c, &d, "a", &small());
    post_ndjson(&c, &d, "a", ndjson(&series(10), None));
    let before = get_json(&c, &d, "/v1/streams/a");
    let forecast_before = get_json(&c, &d, "/v1/streams/a/forecast?horizon=3");
    for (ct, body) in [
        ("text/csv", "y\n1\n2\nNaN\n4\n"),
        ("application/json", r#"[{"y": 1}, {"y": [1, 2]}]"#),
        ("application/x-ndjson", "{\"y\": 1}\n{\"y\": \"x\"}\n"),
        ("application/json", r#"[{"y": 1}, {"y": 2, "x": [3]}]"#),
    ] {
        let r = post(&c, &d, "a", ct, body);
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(get_json(&c, &d, "/v1/streams/a")["stats"], before["stats"]);
    assert_eq!(
        get_json(&c, &d, "/v1/streams/a/forecast?horizon=3"),
        forecast_before
    );
}

/// Reads SSE `data:` lines until `n` events arrived.
fn read_events(r: Response, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut lines = BufReader::new(r).lines();
    while out.len() < n {
        let line = lines
            .next()
            .expect("stream ended early")
            .expect("read line");
        if let Some(data) = line.strip_prefix("data:") {
            out.push(serde_json::from_str(data.trim()).expect("event json"));
        }
    }
    out
}

#[test]
fn sse_delivers_one_event_per_applied_observation() {
    let d = Daemon::start();
    let c = client();
    put(&c, &d, "e", &small());
    let sub = c
        .get(d.url("/v1/streams/e/events"))
        .send()
        .expect("subscribe");
    assert_eq!(sub.status(), 200);
    assert!(
        sub.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/event-stream")
    );
    let v = series(6);
    post_ndjson(&c, &d, "e", ndjson(&v[..4], Some(1)));
    post_ndjson(&c, &d, "e", ndjson(&v[2..], Some(3))); // 2 duplicates
    let events = read_events(sub, 6);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(events[5]["y"][0].as_f64(), Some(v[5]));
    assert!(events[5]["prediction"][0].is_number() && events[5]["error"].is_number());
}

#[test]
fn graceful_shutdown_with_an_sse_client_attached() {
    let mut d = Daemon::start();
    let c = client();
    put(&c, &d, "g", &small());
    let sub = c
        .get(d.url("/v1/streams/g/events"))
        .send()
        .expect("subscribe");
    post(&c, &d, "g", "application/json", r#"{"y": 1}"#);
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        for line in BufReader::new(sub).lines() {
            match line {
                Ok(l) if l.starts_with("data:") => n += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        n
    });
    std::thread::sleep(Duration::from_millis(200));
    let status = d.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        reader.join().expect("reader"),
        1,
        "the SSE stream ends at shutdown"
    );
}

#[test]
fn concurrent_streams_learn_as_if_alone() {
    let d = Daemon::start();
    let c = client();
    for n in ["a", "b", "alone"] {
        assert_eq!(put(&c, &d, n, &small()).status(), 201);
    }
    let v = series(300);
    let feed = |name: &'static str| {
        let c = client();
        let base = d.base.clone();
        let v = v.clone();
        std::thread::spawn(move || {
            let mut preds = Vec::new();
            for (k, chunk) in v.chunks(25).enumerate() {
                let r: Value = c
                    .post(format!("{base}/v1/streams/{name}/observations"))
                    .header("content-type", "application/x-ndjson")
                    .body(ndjson(chunk, Some(1 + 25 * k as u64)))
                    .send()
                    .expect("post")
                    .json()
                    .expect("json");
                preds.extend(r["predictions"].as_array().expect("predictions").clone());
            }
            preds
        })
    };
    let (a, b) = (feed("a"), feed("b"));
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    let alone = feed("alone").join().expect("alone");
    assert_eq!(a.len(), 300);
    assert_eq!(a, alone);
    assert_eq!(b, alone);
}

/// One stream big enough to split its steps over two threads (J·d ≥ 2^20; its particles are
/// then stored as two panels) learns the same bits as with `[engine] step_threads = 1`:
/// predictions of every batch, a forecast, and after a restart (snapshot and log written from
/// the panels, read back into rows and re-laid out) the next batch's predictions and forecast.
#[test]
fn split_steps_give_the_serial_predictions_issue_6() {
    let v = series(80);
    let run = |threads: usize| {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write_config(
            dir.path(),
            &format!("[storage]\nfsync = \"never\"\n[engine]\nstep_threads = {threads}\n"),
        );
        let mut d = Daemon::start_in(&dir.path().join("data"), &["--config", &cfg]);
        let c = client();
        // f64: J·d = 1.07 M splits from 2^20 (f32 from 2^22).
        let big = serde_json::json!({"ensemble": 720, "hidden": 32, "precision": "f64",
            "scale": {"min": 0, "max": 20}});
        assert_eq!(put(&c, &d, "big", &big).status(), 201);
        let mut preds = Vec::new();
        for (k, chunk) in v[..60].chunks(20).enumerate() {
            let r = post_ndjson(&c, &d, "big", ndjson(chunk, Some(1 + 20 * k as u64)));
            assert_eq!(r.status(), 200);
            let r: Value = r.json().expect("json");
            preds.extend(r["predictions"].as_array().expect("predictions").clone());
        }
        let f = get_json(&c, &d, "/v1/streams/big/forecast?horizon=5");
        // The split runs on the step pool's two workers, started on the first split step.
        let pool = d.thread_names().iter().any(|n| n.starts_with("ekid-step"));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(pool, threads == 2 && cores >= 2, "{:?}", d.thread_names());
        assert!(d.terminate(std::time::Duration::from_secs(30)).success());
        let d = Daemon::start_in(&dir.path().join("data"), &["--config", &cfg]);
        let r = post_ndjson(&c, &d, "big", ndjson(&v[60..], Some(61)));
        assert_eq!(r.status(), 200);
        let r: Value = r.json().expect("json");
        preds.extend(r["predictions"].as_array().expect("predictions").clone());
        let after = get_json(&c, &d, "/v1/streams/big/forecast?horizon=5");
        // The recovered stream splits too.
        let pool = d.thread_names().iter().any(|n| n.starts_with("ekid-step"));
        assert_eq!(pool, threads == 2 && cores >= 2, "{:?}", d.thread_names());
        (preds, f["steps"].clone(), after["steps"].clone())
    };
    let (serial, split) = (run(1), run(2));
    assert_eq!(serial.0.len(), 80);
    assert_ne!(serial.1, serial.2, "the last batch moved the forecast");
    assert!(
        serial.0[20..]
            .iter()
            .all(|p| p["prediction"][0].is_number())
    );
    assert_eq!(serial.1.as_array().map(Vec::len), Some(5));
    assert_eq!(serial, split);
}

#[test]
fn spread_and_noise_of_several_outputs_are_in_each_outputs_units() {
    // Two streams see the same series in model units: `b`'s second output is `a`'s times
    // 1000 (auto scales: that output's width is 1000 times `a`'s).
    let d = Daemon::start();
    let c = client();
    let options = json!({"ensemble": 32, "hidden": 4, "lags": 3, "outputs": 2, "seed": 5});
    for name in ["a", "b"] {
        assert_eq!(put(&c, &d, name, &options).status(), 201);
    }
    let rows = |k: f64| -> String {
        series(60)
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{{\"y\": [{v}, {}]}}\n", k * (20.0 - v + 0.05 * i as f64)))
            .collect()
    };
    for (name, k) in [("a", 1.0), ("b", 1000.0)] {
        assert_eq!(post_ndjson(&c, &d, name, rows(k)).status(), 200);
    }
    let stats = |name: &str| get_json(&c, &d, &format!("/v1/streams/{name}"))["stats"].clone();
    let (a, b) = (stats("a"), stats("b"));
    let num = |s: &Value, k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k}: {s}"));
    // Before 500 predictions the noise estimate is the running mean of the squared errors,
    // summed over outputs in their own units: the prequential MSE.
    for s in [&a, &b] {
        let (noise, mse) = (num(s, "noise"), num(s, "mse"));
        assert!(
            (noise - mse).abs() <= 1e-9 * mse,
            "noise {noise} vs mse {mse}: {s}"
        );
    }
    // The particles' spread carries the second output's units too.
    assert!(
        num(&b, "spread") > 10.0 * num(&a, "spread"),
        "a: {a}\nb: {b}"
    );
}
