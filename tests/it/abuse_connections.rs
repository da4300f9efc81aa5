//! Abuse of what the daemon shares between clients, against the real binary: metric series a
//! client can make up, connections that never (or no longer) send requests, routes whose stream
//! name looks like a route, forecasts that outlive their request, event subscribers, and
//! settings that would disable the daemon.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

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

fn addr(d: &Daemon) -> String {
    d.base.trim_start_matches("http://").to_owned()
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

/// Reads until the peer closes (or `limit` passes) and returns what came and how long it took.
fn read_until_closed(sock: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration, bool) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return (out, started.elapsed(), false);
        }
        sock.set_read_timeout(Some(left)).expect("read timeout");
        match sock.read(&mut buf) {
            Ok(0) => return (out, started.elapsed(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (out, started.elapsed(), false);
            }
            // A reset is a close too.
            Err(_) => return (out, started.elapsed(), true),
        }
    }
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

/// Sends a request head and part of its body, and returns the status line the daemon answers
/// with (or an empty string if it did not within `limit`).
fn stalled_body_status(d: &Daemon, head: &str, limit: Duration) -> String {
    let mut s = TcpStream::connect(addr(d)).expect("connect");
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(b"{\"ens").expect("write");
    let (out, _, _) = read_until_closed(&mut s, limit);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.lines().next().unwrap_or("").to_owned()
}

#[test]
fn a_stream_named_events_or_forecast_gets_no_exemption() {
    let (_tmp, d) = start(
        "[limits]\nrequest_timeout_ms = 500\nconcurrent_requests = 4\n[auth]\ntokens = [\"t0k\"]\n",
    );
    let c = client();
    let s = r#"{"ensemble": 8, "hidden": 2, "lags": 2}"#;
    for name in ["events", "forecast"] {
        assert_eq!(put_stream(&c, &d, name, s, Some("t0k")), 201);
    }
    // A stalled PUT to a stream named `events` times out like any other request.
    let head = "PUT /v1/streams/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0k\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    let status = stalled_body_status(&d, head, Duration::from_secs(10));
    assert!(status.contains(" 503"), "a stalled PUT got `{status}`");
    // So its request slots come back: more stalled ones than the limit all time out.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let d_base = d.base.clone();
            std::thread::spawn(move || {
                let mut s =
                    TcpStream::connect(d_base.trim_start_matches("http://")).expect("connect");
                s.write_all(head.as_bytes()).expect("write");
                let (out, _, _) = read_until_closed(&mut s, Duration::from_secs(10));
                String::from_utf8_lossy(&out)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
        })
        .collect();
    for w in workers {
        let status = w.join().expect("worker");
        assert!(status.contains(" 503"), "{status}");
    }
    assert_eq!(
        c.get(d.url("/v1/streams")).send().expect("get").status(),
        200
    );
    // The event stream itself still outlives the request timeout.
    let mut events = c
        .get(d.url("/v1/streams/events/events"))
        .send()
        .expect("subscribe");
    assert_eq!(events.status(), 200);
    std::thread::sleep(Duration::from_millis(1500));
    let r = c
        .post(d.url("/v1/streams/events/observations"))
        .bearer_auth("t0k")
        .header("content-type", "application/json")
        .body(r#"{"y": 1}"#)
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("event: observation") {
        let n = events.read(&mut buf).expect("read events");
        assert!(
            n > 0,
            "the event stream ended: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    // A stream named `forecast`: writes to it are writes.
    for (method, path, body) in [
        ("POST", "/v1/streams/forecast", "{}"),
        ("PUT", "/v1/streams/forecast", s),
        ("POST", "/v1/streams/forecast/observations", r#"{"y": 1}"#),
        ("DELETE", "/v1/streams/forecast", ""),
    ] {
        let r = c
            .request(
                Method::from_bytes(method.as_bytes()).expect("method"),
                d.url(path),
            )
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("send");
        assert_eq!(r.status(), 401, "{method} {path} without a token");
    }
    // Its forecast is still a read (not enough observations yet: 409, not 401).
    let r = c
        .post(d.url("/v1/streams/forecast/forecast"))
        .header("content-type", "application/json")
        .body(r#"{"horizon": 1}"#)
        .send()
        .expect("post");
    assert_eq!(r.status(), 409);
}
