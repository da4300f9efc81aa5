//! Abuse of what the daemon shares between clients, against the real binary: metric series a
//! client can make up, connections that never (or no longer) send requests, routes whose stream
//! name looks like a route, forecasts that outlive their request, event subscribers, and
//! settings that would disable the daemon.

use reqwest::Method;
use reqwest::blocking::Client;

use crate::util::{Daemon, client};

/// A daemon with `config` as its TOML file; the directory holds both and must outlive it.
fn start(config: &str) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("ekid.toml");
    std::fs::write(&cfg, config).expect("config");
    let d = Daemon::start_in(
        &tmp.path().join("data"),
        &["--config", cfg.to_str().expect("utf-8")],
    );
    (tmp, d)
}

fn put_stream(c: &Client, d: &Daemon, name: &str, options: &str, token: Option<&str>) -> u16 {
    let mut r = c
        .put(d.url(&format!("/v1/streams/{name}")))
        .header("content-type", "application/json")
        .body(options.to_owned());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().expect("put").status().as_u16()
}

fn post_ndjson(c: &Client, d: &Daemon, name: &str, ys: impl Iterator<Item = f64>) -> u16 {
    let body: String = ys.map(|y| format!("{{\"y\": {y}}}\n")).collect();
    c.post(d.url(&format!("/v1/streams/{name}/observations")))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .expect("post")
        .status()
        .as_u16()
}

fn metrics(c: &Client, d: &Daemon) -> String {
    c.get(d.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text")
}

#[test]
fn made_up_methods_and_paths_leave_the_metrics_bounded() {
    let (_tmp, d) = start("[storage]\nfsync = \"never\"\n");
    let c = client();
    let s = r#"{"ensemble": 8, "hidden": 2, "lags": 2}"#;
    assert_eq!(put_stream(&c, &d, "kept", s, None), 201);
    assert_eq!(put_stream(&c, &d, "gone", s, None), 201);
    for name in ["kept", "gone"] {
        assert_eq!(post_ndjson(&c, &d, name, (0..5).map(f64::from)), 200);
    }
    let before = metrics(&c, &d);
    // Made-up methods on known and unknown paths, made-up paths with every method.
    for i in 0..300 {
        let method = Method::from_bytes(format!("MADEUP{i}{}", "X".repeat(200)).as_bytes())
            .expect("a token is a method");
        for path in ["/v1/streams/kept".to_owned(), format!("/nowhere/{i}")] {
            let r = c
                .request(method.clone(), d.url(&path))
                .send()
                .expect("send");
            assert!(
                r.status().is_client_error(),
                "{method} {path}: {}",
                r.status()
            );
        }
        let r = c
            .get(d.url(&format!("/made/up/path/{i}")))
            .send()
            .expect("get");
        assert_eq!(r.status(), 404);
        // Streams that do not exist get no series either.
        let r = c
            .get(d.url(&format!("/v1/streams/ghost{i}/forecast?horizon=1")))
            .send()
            .expect("get");
        assert_eq!(r.status(), 404);
    }
    let after = metrics(&c, &d);
    for made_up in ["MADEUP", "nowhere", "made/up", "ghost"] {
        assert!(
            !after.contains(made_up),
            "/metrics holds client-made text `{made_up}`: {} bytes",
            after.len()
        );
    }
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    // Every known route × method × status, and a histogram per route, is a few hundred lines.
    assert!(
        series(&after) < series(&before) + 200 && after.len() < 100_000,
        "{} series ({} bytes) after made-up requests, {} before",
        series(&after),
        after.len(),
        series(&before)
    );
    assert!(after.contains("method=\"other\""), "{after}");
    // A deleted stream's series go with it.
    assert!(after.contains("stream=\"gone\""));
    let r = c.delete(d.url("/v1/streams/gone")).send().expect("delete");
    assert_eq!(r.status(), 204);
    let last = metrics(&c, &d);
    assert!(!last.contains("stream=\"gone\""), "{last}");
    assert!(last.contains("stream=\"kept\""), "{last}");
}
