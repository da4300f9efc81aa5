//! Bad input, limits, auth and panic isolation against the real daemon. Every refusal must be
//! a problem document, and must leave every stream exactly as it was.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::util::{
    Daemon, client, fingerprint, get_json, metrics, parts, post, post_ndjson, put, raw_request,
    send, write_config,
};

/// The options of a small stream.
fn small() -> Value {
    json!({"ensemble": 12, "hidden": 3, "lags": 2, "scale": {"min": 0, "max": 10}})
}

/// What a refusal's problem document must name, besides its status and type.
#[derive(Clone, Copy)]
enum Names {
    /// `field` is this.
    Field(&'static str),
    /// `line` (of an NDJSON or CSV body) is this.
    Line(u64),
    /// `detail` contains each of these.
    Detail(&'static [&'static str]),
    Nothing,
}
use Names::{Detail, Field, Line, Nothing};

const J: Option<&str> = Some("application/json");
const ND: Option<&str> = Some("application/x-ndjson");
const CSV: Option<&str> = Some("text/csv");
const TEXT: Option<&str> = Some("text/plain");
const OBS: &str = "/v1/streams/s/observations";
const N1: &str = "/v1/streams/n1";
/// A stream name of 65 characters, one over the limit.
const LONG: &str = "/v1/streams/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const _: () = assert!(LONG.len() == "/v1/streams/".len() + 65);

/// Method, path, content type, body, the status expected and what the problem names. The
/// daemon holds `s` (small, 10 observations), `x` (one exogenous input, 10 observations) and
/// `fresh` (small, nothing observed).
type BadRequest = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static [u8],
    u16,
    Names,
);

#[rustfmt::skip]
const BAD_REQUESTS: &[BadRequest] = &[
    // Stream names.
    ("PUT", "/v1/streams/bad%20name", J, b"{}", 400, Field("name")),
    ("PUT", "/v1/streams/a%2Fb", J, b"{}", 400, Field("name")),
    ("PUT", LONG, J, b"{}", 400, Field("name")),
    ("GET", "/v1/streams/a%20b", None, b"", 400, Field("name")),
    ("DELETE", "/v1/streams/a%00b", None, b"", 400, Field("name")),
    // Options.
    ("PUT", N1, J, br#"{"hiden": 3}"#, 400, Field("hiden")),
    ("PUT", N1, J, br#"{"ensemble": 1}"#, 422, Field("ensemble")),
    ("PUT", N1, J, br#"{"noise": 0}"#, 422, Field("noise")),
    ("PUT", N1, J, br#"{"noise": -1}"#, 422, Field("noise")),
    ("PUT", N1, J, br#"{"hidden": 0}"#, 422, Field("hidden")),
    ("PUT", N1, J, br#"{"lags": 0}"#, 422, Field("lags")),
    ("PUT", N1, J, br#"{"inflation": 0.5}"#, 422, Field("inflation")),
    ("PUT", N1, J, br#"{"scale": {"min": 1, "max": 1}}"#, 422, Field("scale")),
    ("PUT", N1, J, br#"{"method": "newton"}"#, 400, Field("method")),
    ("PUT", N1, J, br#"{"hidden": "many"}"#, 400, Field("hidden")),
    ("PUT", N1, J, br#"{"step": {"h": 0.1}}"#, 400, Field("step.eps")),
    ("PUT", N1, J, br#"{"spread": {"every": 0, "gamma": 1}}"#, 422, Field("spread.every")),
    // Over the memory budget: the refusal says how much was asked and how much is left.
    ("PUT", N1, J, br#"{"ensemble": 1000000, "hidden": 1024}"#, 422, Detail(&["bytes", "left"])),
    ("PUT", N1, TEXT, b"{}", 415, Nothing),
    ("PUT", N1, J, b"{", 400, Nothing),
    ("PUT", "/v1/streams/s", J, br#"{"ensemble": 13}"#, 409, Nothing),
    // Observations: content types and syntax.
    ("POST", "/v1/streams/nope/observations", J, br#"{"y": 1}"#, 404, Nothing),
    ("POST", OBS, None, br#"{"y": 1}"#, 415, Nothing),
    ("POST", OBS, TEXT, br#"{"y": 1}"#, 415, Nothing),
    ("POST", OBS, J, b"", 400, Nothing),
    ("POST", OBS, J, br#"{"y": "a"}"#, 400, Field("y")),
    ("POST", OBS, J, br#"{"y": 1, "z": 2}"#, 400, Field("z")),
    ("POST", OBS, J, br#"{"x": [1]}"#, 400, Field("y")),
    ("POST", OBS, J, br#"{"y": 1e400}"#, 400, Nothing),
    ("POST", OBS, J, br#"{"seq": -1, "y": 1}"#, 400, Field("seq")),
    ("POST", OBS, J, br#"[{"y": 1}, {"y": [1, "a"]}]"#, 400, Field("[1].y[1]")),
    ("POST", OBS, ND, b"{\"y\": 1}\n{\"y\": }\n", 400, Line(2)),
    ("POST", OBS, ND, b"\n\n", 400, Nothing),
    ("POST", OBS, ND, b"{\"y\": NaN}\n", 400, Line(1)),
    ("POST", OBS, CSV, b"date,y\n2020,1\n", 400, Field("date")),
    ("POST", OBS, CSV, b"y\n1\nabc\n", 400, Line(3)),
    ("POST", OBS, CSV, b"y\n1,2\n", 400, Line(2)),
    ("POST", OBS, CSV, b"x\n1\n", 400, Field("y")),
    ("POST", OBS, CSV, b"y\n", 400, Nothing),
    // Invalid UTF-8 in each text format.
    ("POST", OBS, J, b"y\n\xff\xfe\n", 400, Nothing),
    ("POST", OBS, ND, b"y\n\xff\xfe\n", 400, Nothing),
    ("POST", OBS, CSV, b"y\n\xff\xfe\n", 400, Nothing),
    // Observations: semantics.
    ("POST", OBS, J, br#"{"y": [1, 2]}"#, 422, Field("y")),
    ("POST", OBS, J, br#"[{"y": 1}, {"y": []}]"#, 422, Field("y")),
    ("POST", OBS, J, br#"{"y": 1, "x": [1]}"#, 422, Field("x")),
    ("POST", OBS, J, br#"{"seq": 0, "y": 1}"#, 422, Field("seq")),
    ("POST", OBS, J, br#"{"seq": 999999, "y": 1}"#, 409, Field("seq")),
    ("POST", OBS, J, b"[]", 422, Field("body")),
    ("POST", OBS, CSV, b"y\n1\nNaN\n", 422, Field("y")),
    ("POST", "/v1/streams/x/observations", J, br#"{"y": 1}"#, 422, Field("x")),
    // Forecasts.
    ("GET", "/v1/streams/s/forecast", None, b"", 400, Field("horizon")),
    ("GET", "/v1/streams/s/forecast?horizon=1&horizon=2", None, b"", 400, Field("horizon")),
    ("GET", "/v1/streams/s/forecast?horizon=0", None, b"", 400, Field("horizon")),
    ("GET", "/v1/streams/s/forecast?horizon=abc", None, b"", 400, Field("horizon")),
    ("GET", "/v1/streams/s/forecast?horizon=1&level=1.5", None, b"", 400, Field("level")),
    ("GET", "/v1/streams/s/forecast?horizon=1&level=0", None, b"", 400, Field("level")),
    ("GET", "/v1/streams/s/forecast?horizon=1&bogus=1", None, b"", 400, Field("bogus")),
    ("GET", "/v1/streams/s/forecast?horizon=100001", None, b"", 400, Field("horizon")),
    ("GET", "/v1/streams/x/forecast?horizon=1", None, b"", 400, Field("x")),
    ("POST", "/v1/streams/x/forecast", J, br#"{"horizon": 2, "x": [[1]]}"#, 400, Field("x")),
    ("POST", "/v1/streams/x/forecast", J, br#"{"horizon": 1, "x": [[1e400]]}"#, 400, Field("x[0][0]")),
    ("POST", "/v1/streams/x/forecast", J, br#"{"horizon": 1, "x": [[1]], "y": 2}"#, 400, Field("y")),
    ("POST", "/v1/streams/x/forecast", CSV, b"horizon\n1\n", 415, Nothing),
    ("GET", "/v1/streams/fresh/forecast?horizon=1", None, b"", 409, Nothing),
    // Unknown things.
    ("GET", "/v1/streams/nope", None, b"", 404, Nothing),
    ("DELETE", "/v1/streams/nope", None, b"", 404, Nothing),
    ("PATCH", "/v1/streams/s", J, b"{}", 405, Nothing),
    ("GET", "/v2/anything", None, b"", 404, Nothing),
    ("GET", "/v1/streams/nope/events", None, b"", 404, Nothing),
];

/// Stream names `.` and `..`, percent-encoded and sent raw: HTTP clients normalise them away
/// before sending.
const DOT_NAMES: &[(&str, &str)] = &[
    ("GET", "/v1/streams/%2E%2E"),
    ("PUT", "/v1/streams/%2e"),
    ("POST", "/v1/streams/%2E%2E/observations"),
];

#[test]
fn forty_and_more_bad_requests_get_problem_documents_and_change_nothing_issue_5() {
    let d = Daemon::start();
    let c = client();
    let x = json!({"ensemble": 8, "hidden": 2, "lags": 1, "inputs": 1});
    for (name, opts) in [("s", small()), ("x", x), ("fresh", small())] {
        assert_eq!(put(&c, &d, name, &opts).status(), 201);
    }
    let feed: String = (0..10)
        .map(|i| format!("{{\"y\": {}}}\n", 5.0 + (i as f64).sin()))
        .collect();
    assert_eq!(post_ndjson(&c, &d, "s", feed).status(), 200);
    let everything = || {
        let streams = get_json(&c, &d, "/v1/streams")["streams"]
            .as_array()
            .map(Vec::len);
        (fingerprint(&c, &d, "s"), streams)
    };
    let before = everything();
    assert!(BAD_REQUESTS.len() >= 40, "{} cases", BAD_REQUESTS.len());
    for &(method, path, content_type, body, status, names) in BAD_REQUESTS {
        let mut r = c.request(
            Method::from_bytes(method.as_bytes()).expect("method"),
            d.url(path),
        );
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        if !body.is_empty() {
            r = r.body(body.to_vec());
        }
        let (got, p, ct) = send(r);
        let what = format!("{method} {path} {:?}", String::from_utf8_lossy(body));
        assert_eq!(got, status, "{what}: {p}");
        assert_eq!(ct, "application/problem+json", "{what}");
        assert_eq!(p["status"], status, "{what}: {p}");
        assert!(
            p["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("/problems/")),
            "{what}: {p}"
        );
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{what}: {p}"
        );
        let detail = p["detail"].as_str().unwrap_or("");
        assert!(!detail.is_empty(), "{what}: {p}");
        match names {
            Field(field) => assert_eq!(p["field"], field, "{what}: {p}"),
            Line(line) => assert_eq!(p["line"], line, "{what}: {p}"),
            Detail(fragments) => {
                for f in fragments {
                    assert!(detail.contains(f), "{what}: no {f:?} in {detail:?}");
                }
            }
            Nothing => {}
        }
    }
    for (method, path) in DOT_NAMES {
        let (status, body) = raw_request(
            &d,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("\"field\":\"name\""), "{path}: {body}");
    }
    assert_eq!(before, everything(), "a rejected request changed something");
}

/// A daemon with `[limits] LIMITS` and the small stream `a`.
fn limited(limits: &str) -> (Daemon, Client) {
    let d = Daemon::start_config(&format!("[limits]\n{limits}\n"));
    let c = client();
    assert_eq!(put(&c, &d, "a", &small()).status(), 201);
    (d, c)
}

/// PUTs stream options and returns the status and the body.
fn put_parts(c: &Client, d: &Daemon, name: &str, options: Value) -> (u16, Value) {
    let (status, body, _) = parts(put(c, d, name, &options));
    (status, body)
}

// The memory budget charges a stream what it holds: its ensemble, work buffers, a snapshot's
// f64 copy and its forecast states, against what is left. No history ring here (its charge is
// tested in `page.rs`), so that the figures below are the learning state's alone.
const MEMORY: &str = "memory_bytes = 2700000\nhistory = 0";

#[test]
fn a_stream_over_the_memory_budget_is_422_and_says_what_is_left() {
    let (d, c) = limited(MEMORY);
    let (st, p) = put_parts(&c, &d, "big", json!({"ensemble": 2000, "hidden": 16}));
    assert_eq!(st, 422, "{p}");
    assert!(
        p["detail"].as_str().expect("detail").contains("only"),
        "{p}"
    );
}

/// f32 ensembles count 4 bytes a value: J=300 at hidden 16 (d = 493) holds 1 183 200 bytes of
/// particles as f64 and half that as f32, plus about 1.9 MB of work buffers, snapshot copy and
/// forecast states either way: 3.1 MB as f64, over the budget, and 2.4 MB as f32, within it.
#[test]
fn an_f32_ensemble_counts_four_bytes_a_value_against_the_memory_budget() {
    let (d, c) = limited(MEMORY);
    let whole = json!({"ensemble": 300, "hidden": 16, "precision": "f64"});
    let (st, p) = put_parts(&c, &d, "half", whole);
    assert_eq!(st, 422, "{p}");
    assert!(
        p["detail"].as_str().expect("detail").contains("300·493·8"),
        "{p}"
    );
    let (st, p) = put_parts(
        &c,
        &d,
        "half",
        json!({"ensemble": 300, "hidden": 16, "precision": "f32"}),
    );
    assert_eq!(st, 201, "{p}");
}

/// A tiny ensemble with many outputs: J·d·8 = 87 680 bytes fits what is left beside an f32
/// stream of 2.4 MB (~250 kB), but its m×d cross-covariance alone is 1.4 MB.
#[test]
fn a_wide_streams_cross_covariance_counts_against_the_memory_budget() {
    let (d, c) = limited(MEMORY);
    let half = json!({"ensemble": 300, "hidden": 16, "precision": "f32"});
    assert_eq!(put_parts(&c, &d, "half", half).0, 201);
    let wide = json!({"ensemble": 2, "hidden": 8, "lags": 4, "outputs": 32});
    let (st, p) = put_parts(&c, &d, "wide", wide);
    assert_eq!(st, 422, "{p}");
}

#[test]
fn a_stream_over_the_streams_limit_is_422_and_a_deleted_one_frees_its_place() {
    let (d, c) = limited("streams = 2");
    assert_eq!(put_parts(&c, &d, "gone", small()).0, 201);
    let (st, _, _) = send(c.delete(d.url("/v1/streams/gone")));
    assert_eq!(st, 204);
    assert_eq!(put_parts(&c, &d, "b", small()).0, 201);
    let (st, p) = put_parts(&c, &d, "c", small());
    assert_eq!(
        (st, p["type"].as_str()),
        (422, Some("/problems/limit")),
        "{p}"
    );
}

#[test]
fn a_body_over_body_bytes_is_413() {
    let (d, c) = limited("body_bytes = 2000");
    let big: String = (0..400).map(|i| format!("{{\"y\": {i}}}\n")).collect();
    let (st, p, _) = parts(post_ndjson(&c, &d, "a", big));
    assert_eq!(
        (st, p["type"].as_str()),
        (413, Some("/problems/too-large")),
        "{p}"
    );
}

#[test]
fn a_batch_over_batch_observations_is_413() {
    let (d, c) = limited("batch_observations = 20");
    let many: String = (0..21)
        .map(|i| format!("{{\"y\": {}}}\n", i % 10))
        .collect();
    assert_eq!(post_ndjson(&c, &d, "a", many).status(), 413);
}

/// Five observations for `a`: enough to forecast from.
fn observe_five(c: &Client, d: &Daemon) {
    let ok: String = (0..5).map(|i| format!("{{\"y\": {i}}}\n")).collect();
    assert_eq!(post_ndjson(c, d, "a", ok).status(), 200);
}

#[test]
fn a_horizon_over_the_limit_is_400_and_the_openapi_document_says_so() {
    let (d, c) = limited("horizon = 50");
    observe_five(&c, &d);
    assert_eq!(
        send(c.get(d.url("/v1/streams/a/forecast?horizon=20"))).0,
        200
    );
    assert_eq!(
        send(c.get(d.url("/v1/streams/a/forecast?horizon=51"))).0,
        400
    );
    // The document tells a schema-driven client this daemon's horizon limit.
    let (_, doc, _) = send(c.get(d.url("/openapi.json")));
    let horizon = doc["paths"]["/v1/streams/{name}/forecast"]["get"]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "horizon"))
        .expect("horizon parameter");
    assert_eq!(horizon["schema"]["maximum"], 50, "{horizon}");
    assert_eq!(
        doc["components"]["schemas"]["ForecastRequest"]["properties"]["horizon"]["maximum"],
        50
    );
}

#[test]
fn a_forecast_over_forecast_work_is_422() {
    let (d, c) = limited("forecast_work = 500");
    observe_five(&c, &d);
    // The stream's intervals are calibrated (it has erred), so only its forecaster rolls out:
    // horizon × d = 24 parameters, over 500 from horizon 21.
    assert_eq!(
        send(c.get(d.url("/v1/streams/a/forecast?horizon=20"))).0,
        200
    );
    let (st, p, _) = send(c.get(d.url("/v1/streams/a/forecast?horizon=30")));
    assert_eq!(
        (st, p["type"].as_str(), p["field"].as_str()),
        (422, Some("/problems/limit"), Some("horizon")),
        "{p}"
    );
}

#[test]
fn a_client_that_never_finishes_its_request_head_is_cut_off_after_header_timeout_ms() {
    let d = Daemon::start_config("[limits]\nheader_timeout_ms = 300\n");
    let mut sock = TcpStream::connect(d.base.trim_start_matches("http://")).expect("connect");
    sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = sock.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow client held the connection {:?}",
        started.elapsed()
    );
    // The daemon still serves.
    assert_eq!(send(client().get(d.url("/healthz"))).0, 200);
}

#[test]
fn a_full_queue_is_503_with_retry_after_and_a_timeout_is_503() {
    let d = Daemon::start_config(
        "[limits]\nqueue_depth = 1\nrequest_timeout_ms = 300\n[storage]\nfsync = \"never\"\n",
    );
    let c = client();
    // A slow stream: each observation costs milliseconds.
    let slow = json!({"ensemble": 2000, "hidden": 32});
    // Drawing its 24 MB ensemble can outlast the 300 ms timeout on a loaded machine: the creation
    // completes anyway, and PUT is idempotent, so ask until the stream is there.
    let created = (0..50)
        .map(|_| put(&c, &d, "slow", &slow).status().as_u16())
        .find(|s| matches!(s, 200 | 201));
    assert!(created.is_some(), "the slow stream was never created");
    let body: String = (0..300)
        .map(|i| format!("{{\"y\": {}}}\n", (i as f64).sin()))
        .collect();
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (base, body) = (d.base.clone(), body.clone());
            std::thread::spawn(move || {
                let c = client();
                let r = c
                    .post(format!("{base}/v1/streams/slow/observations"))
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .expect("post");
                let retry = r.headers().get("retry-after").is_some();
                let status = r.status().as_u16();
                let p: Value = r.json().unwrap_or(Value::Null);
                (status, retry, p["type"].as_str().unwrap_or("").to_owned())
            })
        })
        .collect();
    let results: Vec<(u16, bool, String)> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    assert!(
        results
            .iter()
            .any(|(s, r, t)| *s == 503 && *r && t == "/problems/queue-full"),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|(s, _, t)| *s == 503 && t == "/problems/timeout"),
        "{results:?}"
    );
    assert!(
        results.iter().all(|(s, _, _)| *s == 503 || *s == 200),
        "{results:?}"
    );
}

#[test]
fn bearer_tokens_guard_writes_and_leave_reads_open() {
    let d = Daemon::start_config("[auth]\ntokens = [\"t0k3n\", \"second\"]\n");
    let c = client();
    let put = |auth: Option<&str>| {
        let mut r = c.put(d.url("/v1/streams/a")).json(&small());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().expect("put");
        let www = r.headers().get("www-authenticate").is_some();
        let s = r.status().as_u16();
        let p: Value = r.json().unwrap_or(Value::Null);
        (s, www, p)
    };
    let (s, www, p) = put(None);
    assert_eq!(
        (s, www, p["type"].as_str()),
        (401, true, Some("/problems/unauthorized"))
    );
    assert_eq!(put(Some("Bearer wrong")).0, 401);
    assert_eq!(put(Some("Basic t0k3n")).0, 401);
    assert_eq!(
        c.get(d.url("/v1/streams/a")).send().expect("get").status(),
        404,
        "nothing was created"
    );
    assert_eq!(put(Some("Bearer t0k3n")).0, 201);
    assert_eq!(put(Some("Bearer second")).0, 200);
    assert_eq!(
        put(Some("bearer t0k3n")).0,
        200,
        "the scheme is case-insensitive"
    );
    // Reads stay open by default; /healthz always.
    assert_eq!(
        c.get(d.url("/v1/streams/a")).send().expect("get").status(),
        200
    );
    // Observations are a write; a forecast with future inputs in a body is a read (not
    // enough observations yet: 409, not 401).
    for (path, body, status) in [
        ("/v1/streams/a/observations", r#"{"y": 1}"#, 401),
        ("/v1/streams/a/forecast", r#"{"horizon": 1}"#, 409),
    ] {
        let r = c
            .post(d.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("post");
        assert_eq!(r.status(), status, "{path}");
    }
}

#[test]
fn with_protect_reads_bearer_tokens_guard_reads_but_not_healthz() {
    let d = Daemon::start_config("[auth]\ntokens = [\"t0k3n\"]\nprotect_reads = true\n");
    let c = client();
    assert_eq!(
        c.get(d.url("/v1/streams")).send().expect("get").status(),
        401
    );
    assert_eq!(c.get(d.url("/metrics")).send().expect("get").status(), 401);
    assert_eq!(
        c.get(d.url("/v1/streams"))
            .header("authorization", "Bearer t0k3n")
            .send()
            .expect("get")
            .status(),
        200
    );
    assert_eq!(c.get(d.url("/healthz")).send().expect("get").status(), 200);
}

#[test]
fn a_panic_in_one_stream_fails_that_stream_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let log = data.with_extension("log");
    let _ = std::fs::remove_file(&log);
    // A memory budget for two small streams and half a third: a deleted failed stream must
    // give its share back.
    let raw: ekid::engine::RawOptions = serde_json::from_value(small()).expect("small parses");
    let charge = ekid::server::stream_memory(
        &raw.resolve(&ekid::engine::Options::default())
            .expect("small is valid"),
        &ekid::server::Limits::default(),
    );
    let cfg = write_config(
        tmp.path(),
        &format!("[limits]\nmemory_bytes = {}\n", 2 * charge + charge / 2),
    );
    let mut cmd = crate::util::ekid();
    cmd.env("EKID_FAILPOINTS", "panic-in-update:boom");
    let d = Daemon::start_with(cmd, &data, &["--config", &cfg]);
    let c = client();
    for n in ["boom", "fine"] {
        assert_eq!(put(&c, &d, n, &small()).status(), 201);
    }
    let feed = |n: &str| {
        parts(post(
            &c,
            &d,
            n,
            "application/json",
            r#"[{"y": 1}, {"y": 2}, {"y": 3}]"#,
        ))
    };
    let (s, p, ct) = feed("boom");
    assert_eq!(
        (s, p["type"].as_str(), ct.as_str()),
        (
            500,
            Some("/problems/stream-failed"),
            "application/problem+json"
        ),
        "{p}"
    );
    let (s, _, _) = feed("boom");
    assert_eq!(s, 500, "a failed stream stays failed");
    let info: Value = c
        .get(d.url("/v1/streams/boom"))
        .send()
        .expect("get")
        .json()
        .expect("json");
    assert!(
        info["failed"]
            .as_str()
            .is_some_and(|f| f.contains("panicked")),
        "{info}"
    );
    let metrics = metrics(&c, &d);
    assert!(
        metrics.contains("ekid_stream_failed{stream=\"boom\"} 1"),
        "{metrics}"
    );
    // Everything else carries on.
    assert_eq!(feed("fine").0, 200);
    assert_eq!(
        c.get(d.url("/healthz")).send().expect("health").status(),
        200
    );
    assert_eq!(
        c.get(d.url("/v1/streams/fine/forecast?horizon=2"))
            .send()
            .expect("forecast")
            .status(),
        200
    );
    // A failed stream can be deleted, and its memory goes back to the budget.
    assert_eq!(
        c.delete(d.url("/v1/streams/boom"))
            .send()
            .expect("delete")
            .status(),
        204
    );
    let (st, p, _) = parts(put(&c, &d, "again", &small()));
    assert_eq!(st, 201, "{p}");
}

#[test]
fn extreme_finite_values_leave_every_number_a_number() {
    // 1e308 against a scale of 0..1 squares to infinity; JSON has no infinity, so a
    // statistic or forecast that overflowed would come back as null.
    let d = Daemon::start();
    let c = client();
    let wild = json!({"ensemble": 16, "hidden": 4, "lags": 2, "scale": {"min": 0, "max": 1}});
    assert_eq!(put(&c, &d, "wild", &wild).status(), 201);
    let body: String = [0.1, 0.2, 0.3, 1e308, -1e308, 1e308, 0.5, 0.4, 0.3, 0.2]
        .iter()
        .map(|y| format!("{{\"y\": {y:e}}}\n"))
        .collect();
    let (s, p, _) = parts(post_ndjson(&c, &d, "wild", body));
    assert_eq!(s, 200, "{p}");
    let (_, info, _) = send(c.get(d.url("/v1/streams/wild")));
    for k in ["mse", "mse_scaled", "spread", "noise"] {
        assert!(info["stats"][k].is_f64(), "stats.{k}: {info}");
    }
    let (_, f, _) = send(c.get(d.url("/v1/streams/wild/forecast?horizon=50")));
    for step in f["steps"].as_array().expect("steps") {
        for k in ["mean", "lower", "upper"] {
            assert!(step[k][0].is_f64(), "{k}: {step}");
        }
    }
}

#[test]
fn requests_beyond_the_concurrency_limit_are_503_with_retry_after() {
    let d = Daemon::start_config("[limits]\nconcurrent_requests = 1\n");
    let c = client();
    assert_eq!(put(&c, &d, "a", &small()).status(), 201);
    // One request in flight: its head is sent, its body never finishes.
    let mut slow = TcpStream::connect(d.base.trim_start_matches("http://")).expect("connect");
    slow.write_all(
        b"POST /v1/streams/a/observations HTTP/1.1\r\nHost: x\r\ncontent-type: application/x-ndjson\r\ncontent-length: 100\r\n\r\n{\"y\"",
    )
    .expect("write");
    // Give the daemon a moment to take the head and hold the permit.
    let mut refused = None;
    for _ in 0..50 {
        let r = client().get(d.url("/v1/streams")).send().expect("get");
        if r.status() == 503 {
            refused = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = refused.expect("a second request while one is in flight is refused");
    assert!(
        r.headers().get("retry-after").is_some(),
        "{:?}",
        r.headers()
    );
    let p: Value = r.json().expect("problem");
    assert_eq!(p["type"], "/problems/busy", "{p}");
    // Once the first is gone, the next one is served.
    drop(slow);
    let mut served = false;
    for _ in 0..50 {
        if client()
            .get(d.url("/v1/streams"))
            .send()
            .expect("get")
            .status()
            == 200
        {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served, "the permit came back");
}

#[test]
fn connections_beyond_the_limit_are_closed_and_the_slot_comes_back() {
    let d = Daemon::start_config("[limits]\nconnections = 1\n");
    let addr = d.base.trim_start_matches("http://").to_owned();
    let healthz = |sock: &mut TcpStream| -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = sock.read_to_string(&mut out);
        out
    };
    // The one connection the daemon allows, kept open (a request on it keeps it alive).
    let mut first = TcpStream::connect(&addr).expect("connect");
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut head = [0u8; 12];
    first.read_exact(&mut head).expect("first is served");
    assert_eq!(&head, b"HTTP/1.1 200");
    // A second one is accepted and closed at once, unanswered.
    let mut second = TcpStream::connect(&addr).expect("connect");
    assert_eq!(
        healthz(&mut second),
        "",
        "the second connection got an answer"
    );
    // Once the first is gone, a new connection is served.
    drop(first);
    let mut served = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).expect("connect");
        if healthz(&mut s).starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served, "the connection slot came back");
}
