//! Bodies built to make the daemon hold memory: 16 MiB of valid-looking rows past the batch
//! limit, forecast inputs a stream cannot use, a bad row early in a huge body. Each must be
//! refused at the row where it goes wrong, holding little more than the raw body, and requests
//! in flight are charged to the memory budget.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

use crate::util::{Daemon, client, proc_status_kb};

const S: &str = r#"{"ensemble": 12, "hidden": 3, "lags": 2, "scale": {"min": 0, "max": 10}}"#;

/// Just under the default 16 MiB body limit.
const BIG: usize = (16 << 20) - 64;

/// How far the daemon's peak resident memory may rise over its start for one of these bodies:
/// the raw body (16 MiB) and what a batch of the limit's observations holds, with room to
/// spare. A body decoded whole before its limits are checked grows it by 200 to 800 MB.
const GROWTH_KB: u64 = 64 << 10;

fn put(c: &Client, d: &Daemon, name: &str, options: &str) -> u16 {
    c.put(d.url(&format!("/v1/streams/{name}")))
        .header("content-type", "application/json")
        .body(options.to_owned())
        .send()
        .expect("put")
        .status()
        .as_u16()
}

fn post(c: &Client, d: &Daemon, path: &str, ct: &str, body: Vec<u8>) -> (u16, Value) {
    let r = c
        .post(d.url(path))
        .header("content-type", ct)
        .body(body)
        .send()
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Copies of `row` separated by `sep`, between `head` and `tail`: as many as fit in `BIG`
/// bytes.
fn repeat(head: &str, row: &str, sep: &str, tail: &str) -> Vec<u8> {
    let n = (BIG - head.len() - tail.len()) / (row.len() + sep.len());
    let mut out = Vec::with_capacity(BIG);
    out.extend_from_slice(head.as_bytes());
    for i in 0..n {
        if i > 0 {
            out.extend_from_slice(sep.as_bytes());
        }
        out.extend_from_slice(row.as_bytes());
    }
    out.extend_from_slice(tail.as_bytes());
    assert!(out.len() <= BIG);
    out
}

fn peak_kb(d: &Daemon) -> u64 {
    proc_status_kb(d.pid(), "VmHWM")
}

fn observations(c: &Client, d: &Daemon, name: &str) -> u64 {
    let s: Value = c
        .get(d.url(&format!("/v1/streams/{name}")))
        .send()
        .expect("get")
        .json()
        .expect("json");
    s["stats"]["observations"].as_u64().expect("observations")
}

/// Held by each test that sends 16 MiB bodies: one at a time, so that together they do not
/// starve the other tests' daemons of CPU.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A started daemon with stream `s` (no inputs) and stream `x` (one input), both warmed up by
/// a small batch, and its peak memory so far.
fn started() -> (Daemon, Client, u64) {
    let d = Daemon::start();
    let c = client();
    assert_eq!(put(&c, &d, "s", S), 201);
    let with_input = r#"{"ensemble": 12, "hidden": 3, "lags": 2, "inputs": 1}"#;
    assert_eq!(put(&c, &d, "x", with_input), 201);
    let rows: String = (0..5)
        .map(|i| format!("{{\"y\": {i}, \"x\": 1}}\n"))
        .collect();
    let (st, p) = post(
        &c,
        &d,
        "/v1/streams/x/observations",
        "application/x-ndjson",
        rows.into_bytes(),
    );
    assert_eq!(st, 200, "{p}");
    let rows: String = (0..5).map(|i| format!("{{\"y\": {i}}}\n")).collect();
    let (st, p) = post(
        &c,
        &d,
        "/v1/streams/s/observations",
        "application/x-ndjson",
        rows.into_bytes(),
    );
    assert_eq!(st, 200, "{p}");
    let base = peak_kb(&d);
    (d, c, base)
}

fn assert_small_growth(d: &Daemon, base: u64, what: &str) {
    let grown = peak_kb(d).saturating_sub(base);
    assert!(
        grown < GROWTH_KB,
        "{what}: the daemon's peak memory grew by {grown} kB (bound {GROWTH_KB} kB)"
    );
}

#[test]
fn sixteen_mib_of_rows_past_the_batch_limit_are_413_without_decoding_them_whole() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let (d, c, base) = started();
    let path = "/v1/streams/s/observations";
    for (what, ct, body) in [
        ("CSV", "text/csv", repeat("y\n", "1", "\n", "\n")),
        (
            "JSON array",
            "application/json",
            repeat("[", r#"{"y":1}"#, ",", "]"),
        ),
        (
            "NDJSON",
            "application/x-ndjson",
            repeat("", r#"{"y":1}"#, "\n", "\n"),
        ),
    ] {
        let (st, p) = post(&c, &d, path, ct, body);
        assert_eq!(
            (st, p["type"].as_str()),
            (413, Some("/problems/too-large")),
            "{what}: {p}"
        );
        assert!(
            p["detail"].as_str().is_some_and(|t| t.contains("100000")),
            "{what}: {p}"
        );
        assert_small_growth(&d, base, what);
    }
    assert_eq!(observations(&c, &d, "s"), 5, "nothing was applied");
}

#[test]
fn a_forecast_with_sixteen_mib_of_inputs_it_cannot_use_is_refused_at_the_first_such_row() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let (d, c, base) = started();
    let cases = [
        // No inputs: the first row of `x` is refused.
        ("s", r#"{"horizon": 2, "x": ["#, "]}", "x"),
        // One input, two steps: the third row is.
        ("x", r#"{"horizon": 2, "x": ["#, "]}", "x"),
        // The horizon after `x`: rows past the longest horizon are.
        ("x", r#"{"x": ["#, r#"], "horizon": 2}"#, "x"),
        // A horizon past the longest one, then its rows.
        ("x", r#"{"horizon": 99999999, "x": ["#, "]}", "horizon"),
    ];
    for (stream, head, tail, field) in cases {
        let body = repeat(head, "[1]", ",", tail);
        let (st, p) = post(
            &c,
            &d,
            &format!("/v1/streams/{stream}/forecast"),
            "application/json",
            body,
        );
        assert_eq!(
            (st, p["field"].as_str()),
            (400, Some(field)),
            "{stream} {head}: {p}"
        );
        assert_small_growth(&d, base, head);
    }
    // One row of a million numbers for a stream of one input: counted, not kept.
    let body = repeat(r#"{"horizon": 1, "x": [["#, "1", ",", "]]}");
    let (st, p) = post(&c, &d, "/v1/streams/x/forecast", "application/json", body);
    assert_eq!((st, p["field"].as_str()), (400, Some("x[0]")), "{p}");
    assert_small_growth(&d, base, "one wide row");
    // The forecasts still work.
    let (st, p) = post(
        &c,
        &d,
        "/v1/streams/x/forecast",
        "application/json",
        br#"{"horizon": 2, "x": [[1], [2]]}"#.to_vec(),
    );
    assert_eq!(st, 200, "{p}");
}

#[test]
fn a_bad_row_early_in_a_huge_body_is_refused_naming_that_row() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let (d, c, base) = started();
    let path = "/v1/streams/s/observations";
    // Malformed at line 3 (CSV).
    let (st, p) = post(
        &c,
        &d,
        path,
        "text/csv",
        repeat("y\n1\nabc\n", "1", "\n", "\n"),
    );
    assert_eq!(
        (st, p["line"].as_u64(), p["field"].as_str()),
        (400, Some(3), Some("y")),
        "{p}"
    );
    // Two outputs on line 2 of NDJSON for a stream of one.
    let (st, p) = post(
        &c,
        &d,
        path,
        "application/x-ndjson",
        repeat("{\"y\":1}\n{\"y\":[1,2]}\n", r#"{"y":1}"#, "\n", "\n"),
    );
    assert_eq!(
        (
            st,
            p["line"].as_u64(),
            p["index"].as_u64(),
            p["field"].as_str()
        ),
        (422, Some(2), Some(1), Some("y")),
        "{p}"
    );
    // An input in the second element of a JSON array for a stream without.
    let (st, p) = post(
        &c,
        &d,
        path,
        "application/json",
        repeat(r#"[{"y":1},{"y":1,"x":2},"#, r#"{"y":1}"#, ",", "]"),
    );
    assert_eq!(
        (st, p["index"].as_u64(), p["field"].as_str()),
        (422, Some(1), Some("x")),
        "{p}"
    );
    // A CSV whose header gives a stream without inputs an `x`: the first row.
    let (st, p) = post(&c, &d, path, "text/csv", repeat("y,x\n", "1,1", "\n", "\n"));
    assert_eq!(
        (
            st,
            p["line"].as_u64(),
            p["index"].as_u64(),
            p["field"].as_str()
        ),
        (422, Some(2), Some(0), Some("x")),
        "{p}"
    );
    // One observation of two million numbers: counted, not kept.
    let (st, p) = post(
        &c,
        &d,
        path,
        "application/json",
        repeat(r#"{"y": ["#, "1", ",", "]}"),
    );
    assert_eq!(
        (
            st,
            p["field"].as_str(),
            p["detail"].as_str().map(|t| t.contains("values"))
        ),
        (422, Some("y"), Some(true)),
        "{p}"
    );
    assert_small_growth(&d, base, "bad rows");
    assert_eq!(observations(&c, &d, "s"), 5, "nothing was applied");
}

#[test]
fn request_bodies_are_charged_to_the_memory_budget_while_in_flight() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // One stream like S, and room for one body of the limit's charge but not two, nor for a
    // second stream while a body is in flight.
    let raw: ekid::engine::RawOptions = serde_json::from_str(S).expect("S parses");
    let stream = ekid::server::stream_memory(
        &raw.resolve(&ekid::engine::Options::default())
            .expect("S is valid"),
        &ekid::server::Limits::default(),
    );
    let limit = 1_000_000usize;
    let body_charge = limit as u64 + ekid::server::body::observations_bound(limit, 100_000, 1);
    let budget = 2 * stream + body_charge - stream / 2;
    let cfg = tmp.path().join("ekid.toml");
    std::fs::write(
        &cfg,
        format!("[limits]\nbody_bytes = {limit}\nmemory_bytes = {budget}\n"),
    )
    .expect("config");
    let d = Daemon::start_in(
        &tmp.path().join("data"),
        &["--config", cfg.to_str().expect("utf-8")],
    );
    let c = client();
    assert_eq!(put(&c, &d, "s", S), 201);
    // A client that declares a body of the limit and sends a few bytes of it.
    let mut slow = TcpStream::connect(d.base.trim_start_matches("http://")).expect("connect");
    write!(
        slow,
        "POST /v1/streams/s/observations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {limit}\r\n\r\n{{\"y\": 1}}\n"
    )
    .expect("write");
    assert_eq!(
        charged_within(&c, &d, |b| b > 0),
        body_charge,
        "the slow request is charged what its declared body may hold"
    );
    // A second such body does not fit beside it: 503 + Retry-After.
    let big: Vec<u8> = b"{\"y\":1}\n".repeat(limit / 8);
    let second = || {
        c.post(d.url("/v1/streams/s/observations"))
            .header("content-type", "application/x-ndjson")
            .body(big.clone())
            .send()
            .expect("post")
    };
    let r = second();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let p: Value = r.json().expect("problem");
    assert_eq!(p["type"], "/problems/busy", "{p}");
    // Nor a second stream, which would fit without it.
    let r = c
        .put(d.url("/v1/streams/t"))
        .header("content-type", "application/json")
        .body(S)
        .send()
        .expect("put");
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    // The client goes away: its charge is given back, and both are taken.
    drop(slow);
    assert_eq!(charged_within(&c, &d, |b| b == 0), 0);
    assert_eq!(
        second().status(),
        413,
        "the body holds 125 000 observations, past the limit"
    );
    assert_eq!(put(&c, &d, "t", S), 201);
    assert_eq!(observations(&c, &d, "s"), 0, "nothing was applied");
}

/// Polls `ekid_request_memory_bytes` until `until` holds of it (within 10 s), and returns it.
fn charged_within(c: &Client, d: &Daemon, until: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = c
            .get(d.url("/metrics"))
            .send()
            .expect("metrics")
            .text()
            .expect("text");
        let bytes = text
            .lines()
            .find_map(|l| l.strip_prefix("ekid_request_memory_bytes "))
            .and_then(|v| v.trim().parse().ok())
            .expect("ekid_request_memory_bytes");
        if until(bytes) || Instant::now() > deadline {
            return bytes;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
