//! The data directory under attack, against the real daemon: deletes and creations that fail
//! half-way, files damaged or removed underneath it, names it did not make, a read-only disk,
//! and values that would make a stream's scale infinite. What the API answers and what a
//! restart finds must agree, and no answer shows the host's paths.

use reqwest::blocking::{Client, RequestBuilder};
use serde_json::{Value, json};

use crate::util::{Daemon, client};

/// Status, body (JSON, or Null) and content type.
fn send(r: RequestBuilder) -> (u16, Value, String) {
    let r = r.send().expect("request");
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let text = r.text().expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        ct,
    )
}

fn put(c: &Client, d: &Daemon, name: &str, options: &str) -> (u16, Value) {
    let (s, v, _) = send(
        c.put(d.url(&format!("/v1/streams/{name}")))
            .header("content-type", "application/json")
            .body(options.to_owned()),
    );
    (s, v)
}

fn post_values(c: &Client, d: &Daemon, name: &str, values: &[f64]) -> (u16, Value) {
    let body: String = values
        .iter()
        .map(|y| format!("{{\"y\": {y:e}}}\n"))
        .collect();
    let (s, v, _) = send(
        c.post(d.url(&format!("/v1/streams/{name}/observations")))
            .header("content-type", "application/x-ndjson")
            .body(body),
    );
    (s, v)
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
