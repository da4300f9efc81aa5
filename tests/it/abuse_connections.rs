//! Abuse of what the daemon shares between clients, against the real binary: metric series a
//! client can make up, connections that never (or no longer) send requests, routes whose stream
//! name looks like a route, forecasts that outlive their request, event subscribers, and
//! settings that would disable the daemon.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::util::{Daemon, client, metrics, ndjson, post_ndjson, put, serve_refused, write_config};

fn addr(d: &Daemon) -> String {
    d.base.trim_start_matches("http://").to_owned()
}

/// Options of a stream that costs nothing to create or update.
fn small() -> Value {
    json!({"ensemble": 8, "hidden": 2, "lags": 2})
}

/// Sends again while the answer is 503 (under a short request timeout a loaded machine can
/// time out a setup request; PUT and numbered observations are idempotent), for up to 30 s;
/// returns the last status.
fn until_not_busy(mut send: impl FnMut() -> u16) -> u16 {
    let started = Instant::now();
    loop {
        let status = send();
        if status != 503 || started.elapsed() > Duration::from_secs(30) {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// PUTs a stream (again while 503) and asserts that it exists.
fn create(c: &Client, d: &Daemon, name: &str, options: &Value) {
    let status = until_not_busy(|| put(c, d, name, options).status().as_u16());
    assert!(matches!(status, 200 | 201), "PUT {name}: {status}");
}

/// POSTs observations numbered from 1 (again while 503) and asserts that they are applied.
fn observe(c: &Client, d: &Daemon, name: &str, values: &[f64]) {
    let status = until_not_busy(|| {
        post_ndjson(c, d, name, ndjson(values, Some(1)))
            .status()
            .as_u16()
    });
    assert_eq!(status, 200, "POST {name}");
}

/// PUTs a stream with a bearer token and returns the status.
fn put_with_token(c: &Client, d: &Daemon, name: &str, options: &Value, token: &str) -> u16 {
    c.put(d.url(&format!("/v1/streams/{name}")))
        .bearer_auth(token)
        .json(options)
        .send()
        .expect("put")
        .status()
        .as_u16()
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

/// `GET /healthz` on a fresh connection, retried until it is answered 200 or `limit` passes;
/// returns how long it took to be served.
fn served_within(d: &Daemon, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(mut s) = TcpStream::connect(addr(d)) {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let (out, _, _) = read_until_closed(&mut s, Duration::from_secs(5));
            if out.starts_with(b"HTTP/1.1 200") {
                return Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn made_up_methods_and_paths_leave_the_metrics_bounded() {
    let d = Daemon::start_config("[storage]\nfsync = \"never\"\n");
    let c = client();
    for name in ["kept", "gone"] {
        create(&c, &d, name, &small());
        observe(&c, &d, name, &[1.0, 2.0, 3.0, 4.0, 5.0]);
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

/// Opens `n` connections that each send `bytes` (maybe nothing) and then wait; a normal client
/// must be served within a bounded time after the first-request deadline, and the waiting
/// connections must be closed.
fn waiting_connections_are_closed(bytes: &[u8]) {
    let d = Daemon::start_config("[limits]\nconnections = 4\nheader_timeout_ms = 1000\n");
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr(&d)).expect("connect");
            s.write_all(bytes).expect("write");
            s
        })
        .collect();
    // Let the daemon accept all four (they hold every connection slot).
    std::thread::sleep(Duration::from_millis(300));
    let waited = served_within(&d, Duration::from_secs(20));
    assert!(
        waited.is_some(),
        "connections that sent {bytes:?} kept every slot for 20 s"
    );
    for s in &mut idle {
        let (_, took, closed) = read_until_closed(s, Duration::from_secs(10));
        assert!(closed, "a connection that sent {bytes:?} is still open");
        assert!(took < Duration::from_secs(10));
    }
}

#[test]
fn connections_that_send_nothing_are_closed_after_the_header_deadline() {
    waiting_connections_are_closed(b"");
}

#[test]
fn connections_that_send_a_partial_http2_preface_are_closed_after_the_header_deadline() {
    waiting_connections_are_closed(b"PRI * HTTP/2.0\r\n");
}

#[test]
fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // The head deadline is long: only the idle timeout can close it this soon.
    let d = Daemon::start_config("[limits]\nheader_timeout_ms = 30000\nidle_timeout_ms = 1000\n");
    let mut s = TcpStream::connect(addr(&d)).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (out, took, closed) = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(out.starts_with(b"HTTP/1.1 200"), "{out:?}");
    assert!(
        closed && took < Duration::from_secs(15),
        "open after {took:?}"
    );
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HTTP/2 frames read until the peer closes or `limit` passes: (type, flags, stream), and
/// whether it closed.
fn h2_frames_until_closed(sock: &mut TcpStream, limit: Duration) -> (Vec<(u8, u8, u32)>, bool) {
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            if kind == 4 && flags & 1 == 0 {
                // Acknowledge the server's settings, as a client must.
                let _ = sock.write_all(&h2_frame(4, 1, 0, &[]));
            }
            frames.push((kind, flags, stream));
            buf.drain(..9 + len);
        }
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return (frames, false);
        }
        sock.set_read_timeout(Some(left)).expect("read timeout");
        let mut chunk = [0u8; 4096];
        match sock.read(&mut chunk) {
            Ok(0) => return (frames, true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (frames, false);
            }
            Err(_) => return (frames, true),
        }
    }
}

#[test]
fn http2_connections_are_closed_when_idle_before_and_after_a_request() {
    let d = Daemon::start_config("[limits]\nheader_timeout_ms = 1000\n");
    // A whole preface and settings, then nothing: no first request within the deadline.
    let mut s = TcpStream::connect(addr(&d)).expect("connect");
    s.write_all(H2_PREFACE).expect("write");
    s.write_all(&h2_frame(4, 0, 0, &[])).expect("write");
    let (frames, closed) = h2_frames_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        closed,
        "an HTTP/2 connection without requests stayed open: {frames:?}"
    );
    // One request, answered, then idle. The first-request deadline is long here, so that a
    // loaded machine cannot miss it: only the idle timeout can close this one within 10 s.
    let d = Daemon::start_config("[limits]\nheader_timeout_ms = 30000\nidle_timeout_ms = 1000\n");
    let mut s = TcpStream::connect(addr(&d)).expect("connect");
    s.write_all(H2_PREFACE).expect("write");
    s.write_all(&h2_frame(4, 0, 0, &[])).expect("write");
    // HPACK: :method GET, :scheme http, :path /healthz, :authority x.
    let mut head = vec![0x82, 0x86, 0x44, 8];
    head.extend_from_slice(b"/healthz");
    head.extend_from_slice(&[0x41, 1, b'x']);
    s.write_all(&h2_frame(1, 0x5, 1, &head)).expect("write");
    let (frames, closed) = h2_frames_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        frames
            .iter()
            .any(|&(kind, _, stream)| kind == 1 && stream == 1),
        "the request was answered: {frames:?}"
    );
    assert!(closed, "an idle HTTP/2 connection stayed open: {frames:?}");
    // Nothing was refused that should not be: a normal client is served.
    assert!(served_within(&d, Duration::from_secs(5)).is_some());
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
    let d = Daemon::start_config(
        "[limits]\nrequest_timeout_ms = 500\nconcurrent_requests = 4\n[auth]\ntokens = [\"t0k\"]\n[storage]\nfsync = \"never\"\n",
    );
    let c = client();
    for name in ["events", "forecast"] {
        let status = until_not_busy(|| put_with_token(&c, &d, name, &small(), "t0k"));
        assert!(matches!(status, 200 | 201), "PUT {name}: {status}");
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
    let status = until_not_busy(|| {
        c.post(d.url("/v1/streams/events/observations"))
            .bearer_auth("t0k")
            .header("content-type", "application/json")
            .body(r#"{"seq": 1, "y": 1}"#)
            .send()
            .expect("post")
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);
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
        ("PUT", "/v1/streams/forecast", "{}"),
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

/// A stream whose 10 000-step forecast takes seconds: its calibrated forecast rolls out one
/// network of 1 062 925 parameters 10 000 times.
fn big() -> Value {
    json!({"ensemble": 4, "hidden": 1024, "lags": 12})
}

/// Times one single-observation POST to `name`.
fn timed_post(c: &Client, d: &Daemon, name: &str, seq: u64) -> Duration {
    let started = Instant::now();
    let r = c
        .post(d.url(&format!("/v1/streams/{name}/observations")))
        .header("content-type", "application/json")
        .body(format!("{{\"seq\": {seq}, \"y\": {}}}", (seq as f64).sin()))
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    started.elapsed()
}

#[test]
fn forecasts_share_the_cores_and_stop_when_their_request_ends() {
    let d = Daemon::start_config(
        "[limits]\nrequest_timeout_ms = 1500\nforecast_work = 20000000000\n[storage]\nfsync = \"never\"\n",
    );
    let c = client();
    create(&c, &d, "big", &big());
    observe(&c, &d, "big", &crate::util::series(20));
    create(&c, &d, "small", &small());
    // The reference: a one-observation POST on the idle daemon.
    let mut seq = 0;
    let reference = (0..5)
        .map(|_| {
            seq += 1;
            timed_post(&c, &d, "small", seq)
        })
        .max()
        .expect("five");
    let forecast = |horizon: usize| {
        let base = d.base.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let status = client()
                .get(format!("{base}/v1/streams/big/forecast?horizon={horizon}"))
                .send()
                .expect("forecast")
                .status()
                .as_u16();
            (status, started.elapsed())
        })
    };
    // Many forecasts at the work limit, each longer than the request timeout.
    let cpu_before = d.cpu_seconds();
    let running: Vec<_> = (0..24).map(|_| forecast(10_000)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let during: Vec<Duration> = (0..3)
        .map(|_| {
            seq += 1;
            timed_post(&c, &d, "small", seq)
        })
        .collect();
    let during = during.into_iter().max().expect("three");
    for r in running {
        let (status, _) = r.join().expect("forecast thread");
        assert_eq!(
            status, 503,
            "a forecast at the work limit finished within 1.5 s"
        );
    }
    // Every forecast has answered 503: none may still be computing.
    let answered = d.cpu_seconds();
    std::thread::sleep(Duration::from_secs(2));
    let after = d.cpu_seconds() - answered;
    assert!(
        after < 0.5,
        "the daemon used {after:.2} s of CPU in the 2 s after every forecast timed out (and {:.2} s while they ran)",
        answered - cpu_before
    );
    assert!(
        during < reference * 20 + Duration::from_secs(2),
        "a one-observation POST took {during:?} beside the forecasts, {reference:?} alone"
    );
    // And the daemon is its quick self again.
    let (status, took) = forecast(10).join().expect("forecast");
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(5),
        "a short forecast took {took:?}"
    );
    seq += 1;
    let again = timed_post(&c, &d, "small", seq);
    assert!(
        again < reference * 20 + Duration::from_secs(2),
        "{again:?} vs {reference:?}"
    );
}

#[test]
fn forecasts_stop_when_their_client_disconnects() {
    let d = Daemon::start_config(
        "[limits]\nrequest_timeout_ms = 60000\nforecast_work = 20000000000\n[storage]\nfsync = \"never\"\n",
    );
    let c = client();
    create(&c, &d, "big", &big());
    observe(&c, &d, "big", &crate::util::series(20));
    let socks: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(addr(&d)).expect("connect");
            s.write_all(b"GET /v1/streams/big/forecast?horizon=10000 HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(socks);
    // Give the daemon a moment to see the closes, then it must be idle.
    std::thread::sleep(Duration::from_millis(500));
    let closed = d.cpu_seconds();
    std::thread::sleep(Duration::from_secs(2));
    let after = d.cpu_seconds() - closed;
    assert!(
        after < 0.5,
        "the daemon used {after:.2} s of CPU in the 2 s after the forecasts' clients left"
    );
}

#[test]
fn event_subscribers_are_bounded_per_stream_and_in_total() {
    let d = Daemon::start_config("[limits]\nsubscribers = 4\nsubscribers_per_stream = 2\n");
    let c = client();
    for name in ["a", "b", "c"] {
        create(&c, &d, name, &small());
    }
    let subscribe = |name: &str| {
        client()
            .get(d.url(&format!("/v1/streams/{name}/events")))
            .send()
            .expect("subscribe")
    };
    let refused = |r: reqwest::blocking::Response, what: &str| {
        assert_eq!(r.status(), 503, "{what}");
        assert!(r.headers().get("retry-after").is_some(), "{what}");
        let p: Value = r.json().expect("problem");
        assert_eq!(p["type"], "/problems/busy", "{what}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .is_some_and(|t| t.contains("subscribers")),
            "{p}"
        );
    };
    let mut held = vec![subscribe("a"), subscribe("a")];
    assert!(held.iter().all(|r| r.status() == 200));
    refused(subscribe("a"), "a third subscriber of one stream");
    held.push(subscribe("b"));
    held.push(subscribe("b"));
    assert!(held.iter().all(|r| r.status() == 200));
    refused(subscribe("c"), "a fifth subscriber in all");
    // A subscriber that leaves gives its slot back.
    drop(held.remove(0));
    let started = Instant::now();
    loop {
        let r = subscribe("c");
        if r.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the slot did not come back"
        );
        drop(r);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ekid serve` with `config` must refuse to start, naming `key`.
fn refused_at_start(dir: &Path, config: &str, key: &str) {
    let cfg = write_config(dir, config);
    let (status, err) = serve_refused(&dir.join("data"), &["--config", &cfg]);
    assert!(!status.success(), "{config}");
    assert!(err.contains(key), "`{config}`: {err}");
}

#[test]
fn settings_that_would_disable_the_daemon_are_refused_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for key in [
        "concurrent_requests",
        "connections",
        "request_timeout_ms",
        "header_timeout_ms",
        "idle_timeout_ms",
        "subscribers",
        "subscribers_per_stream",
        "body_bytes",
        "batch_observations",
        "streams",
        "memory_bytes",
        "horizon",
        "queue_depth",
        "forecast_work",
    ] {
        refused_at_start(tmp.path(), &format!("[limits]\n{key} = 0\n"), key);
    }
    // Beyond what a semaphore or a deadline can hold.
    for (key, value) in [
        ("connections", i64::MAX),
        ("subscribers", i64::MAX),
        ("header_timeout_ms", i64::MAX),
        ("idle_timeout_ms", i64::MAX),
        ("request_timeout_ms", i64::MAX),
    ] {
        refused_at_start(tmp.path(), &format!("[limits]\n{key} = {value}\n"), key);
    }
    for tokens in [
        r#"[""]"#,
        r#"[" padded"]"#,
        r#"["padded "]"#,
        r#"["ok", "in side"]"#,
    ] {
        refused_at_start(
            tmp.path(),
            &format!("[auth]\ntokens = {tokens}\n"),
            "tokens",
        );
    }
}
