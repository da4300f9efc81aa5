//! The live page and the history behind its chart: what `/` and its files are served as, that
//! they are open when reads are protected while the data is not, and what
//! `GET /v1/streams/{name}/history` holds. The page itself runs in a browser test
//! (`tests/browser/`).

use serde_json::{Value, json};

use crate::util::{Daemon, client, get_json, ndjson, post_ndjson, put, send, series};

const SMALL: &str = r#"{"ensemble": 10, "hidden": 4, "lags": 3}"#;

fn small() -> Value {
    serde_json::from_str(SMALL).expect("SMALL parses")
}

/// The `/assets/...` paths the page names.
fn asset_paths(html: &str) -> Vec<String> {
    html.split('"')
        .filter(|s| s.starts_with("/assets/"))
        .map(str::to_owned)
        .collect()
}

fn header(r: &reqwest::blocking::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

#[test]
fn the_page_and_its_files_are_served_with_their_types_and_caching() {
    let d = Daemon::start();
    let c = client();
    let r = c.get(d.url("/")).send().expect("GET /");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&r, "cache-control"), "no-cache");
    assert!(
        header(&r, "content-security-policy").starts_with("default-src 'self'"),
        "the page may contact this daemon only"
    );
    let etag = header(&r, "etag");
    let html = r.text().expect("html");
    // The page names no other host.
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"));
    let again = c
        .get(d.url("/?stream=x"))
        .header("if-none-match", &etag)
        .send()
        .expect("GET / again");
    assert_eq!(again.status(), 304, "an unchanged page is not sent again");

    let assets = asset_paths(&html);
    assert_eq!(assets.len(), 4, "{assets:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for path in &assets {
        let r = c.get(d.url(path)).send().expect("GET asset");
        assert_eq!(r.status(), 200, "{path}");
        let want = if path.ends_with(".js") {
            "text/javascript; charset=utf-8"
        } else {
            "text/css; charset=utf-8"
        };
        assert_eq!(header(&r, "content-type"), want, "{path}");
        assert_eq!(
            header(&r, "cache-control"),
            "public, max-age=31536000, immutable",
            "{path}: named by its contents, so cacheable for good"
        );
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        let etag = header(&r, "etag");
        let body = r.bytes().expect("asset bytes");
        // The vendored chart library is served byte for byte as it is in the repository.
        let name = path.trim_start_matches("/assets/");
        let file = match name.split('.').next() {
            Some("uPlot") if name.ends_with(".js") => "assets/vendor/uplot/uPlot.iife.min.js",
            Some("uPlot") => "assets/vendor/uplot/uPlot.min.css",
            _ if name.ends_with(".js") => "assets/page/page.js",
            _ => "assets/page/page.css",
        };
        assert_eq!(
            body.as_ref(),
            std::fs::read(root.join(file)).expect("asset file"),
            "{path}"
        );
        let cached = c
            .get(d.url(path))
            .header("if-none-match", &etag)
            .send()
            .expect("revalidate");
        assert_eq!(cached.status(), 304, "{path}");
    }
    let (status, problem, ct) = send(c.get(d.url("/assets/page.0000000000000000.js")));
    assert_eq!(
        (status, ct.as_str(), problem["type"].as_str()),
        (404, "application/problem+json", Some("/problems/not-found"))
    );
    // The page's routes are described, and label metrics as their templates.
    let doc = get_json(&c, &d, "/openapi.json");
    for p in ["/", "/assets/{file}", "/v1/streams/{name}/history"] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    let m = crate::util::metrics(&c, &d);
    assert!(
        m.contains("route=\"/assets/{file}\",method=\"GET\",status=\"404\""),
        "{m}"
    );
}

#[test]
fn with_protected_reads_the_page_is_open_and_the_data_needs_the_token() {
    let d = Daemon::start_config("[auth]\ntokens = [\"t0ken\"]\nprotect_reads = true\n");
    let c = client();
    let r = c.get(d.url("/")).send().expect("GET /");
    assert_eq!(r.status(), 200, "the page itself holds no data");
    for path in asset_paths(&r.text().expect("html")) {
        assert_eq!(c.get(d.url(&path)).send().expect("asset").status(), 200);
    }
    let s = c
        .put(d.url("/v1/streams/s"))
        .bearer_auth("t0ken")
        .json(&small())
        .send()
        .expect("PUT");
    assert_eq!(s.status(), 201);
    for path in ["/v1/streams", "/v1/streams/s/history"] {
        let (status, _, _) = send(c.get(d.url(path)));
        assert_eq!(status, 401, "{path} without the token");
        let (status, _, _) = send(c.get(d.url(path)).bearer_auth("t0ken"));
        assert_eq!(status, 200, "{path} with the token");
    }
}

#[test]
fn history_holds_the_recent_observations_with_their_predictions() {
    let d = Daemon::start_config("[limits]\nhistory = 8\n");
    let c = client();
    assert_eq!(put(&c, &d, "h", &small()).status(), 201);
    let empty = get_json(&c, &d, "/v1/streams/h/history");
    assert_eq!(
        empty,
        json!({"stream": "h", "last_seq": 0, "observations": []})
    );
    let values = series(12);
    let mut predictions = Vec::new();
    for chunk in [&values[..5], &values[5..]] {
        let r = post_ndjson(&c, &d, "h", ndjson(chunk, None));
        assert_eq!(r.status(), 200);
        let body: Value = r.json().expect("json");
        predictions.extend(body["predictions"].as_array().expect("predictions").clone());
    }
    let h = get_json(&c, &d, "/v1/streams/h/history");
    assert_eq!(h["last_seq"], 12);
    let kept = h["observations"].as_array().expect("observations");
    // The ring keeps the newest 8 of 12, oldest first, with the predictions the POSTs returned.
    assert_eq!(kept.len(), 8);
    for (i, o) in kept.iter().enumerate() {
        let seq = 5 + i as u64;
        assert_eq!(o["seq"], seq);
        assert_eq!(o["y"], json!([values[seq as usize - 1]]));
        assert_eq!(o["prediction"], predictions[seq as usize - 1]["prediction"]);
        let p = o["prediction"][0]
            .as_f64()
            .expect("a prediction after the lags");
        let e = o["error"].as_f64().expect("an error with a prediction");
        assert!((e - (values[seq as usize - 1] - p).powi(2)).abs() <= 1e-9 * (1.0 + e));
    }
    let last2 = get_json(&c, &d, "/v1/streams/h/history?limit=2");
    assert_eq!(last2["observations"].as_array().map(Vec::len), Some(2));
    assert_eq!(last2["observations"][1]["seq"], 12);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        ("limit=1&limit=2", "limit"),
        ("before=3", "before"),
    ] {
        let (status, p, _) = send(c.get(d.url(&format!("/v1/streams/h/history?{query}"))));
        assert_eq!((status, p["field"].as_str()), (400, Some(field)), "{query}");
    }
    let (status, p, _) = send(c.get(d.url("/v1/streams/nope/history")));
    assert_eq!(
        (status, p["type"].as_str()),
        (404, Some("/problems/no-such-stream"))
    );
    // The ring lives in memory: after a restart it holds what came since.
    let mut d = d;
    d.terminate(std::time::Duration::from_secs(30));
    let d = Daemon::start_in(&d.data_dir.clone(), &[]);
    let h = get_json(&c, &d, "/v1/streams/h/history");
    assert_eq!(
        (
            h["last_seq"].as_u64(),
            h["observations"].as_array().map(Vec::len)
        ),
        (Some(12), Some(0))
    );
    assert_eq!(
        post_ndjson(&c, &d, "h", ndjson(&series(1), None)).status(),
        200
    );
    let h = get_json(&c, &d, "/v1/streams/h/history");
    assert_eq!(h["observations"][0]["seq"], 13);
}

#[test]
fn the_history_ring_is_charged_to_the_memory_budget() {
    let options: ekid::engine::RawOptions = serde_json::from_str(SMALL).expect("SMALL");
    let options = options
        .resolve(&ekid::engine::Options::default())
        .expect("valid");
    let limits = ekid::server::Limits::default();
    let with = ekid::server::stream_memory(&options, &limits);
    let without = ekid::server::stream_memory(
        &options,
        &ekid::server::Limits {
            history: 0,
            ..limits.clone()
        },
    );
    // Per observation: its seq, y, prediction and error, 8 bytes each.
    assert_eq!(with - without, limits.history as u64 * 32);
    // A budget that holds the stream but not its ring refuses it, and holds it without a ring.
    let budget = without + (with - without) / 2;
    let d = Daemon::start_config(&format!("[limits]\nmemory_bytes = {budget}\n"));
    let c = client();
    let (status, p, _) = send(c.put(d.url("/v1/streams/s")).json(&small()));
    assert_eq!(status, 422, "{p}");
    assert!(
        p["detail"].as_str().unwrap_or("").contains("history"),
        "{p}"
    );
    let d = Daemon::start_config(&format!("[limits]\nmemory_bytes = {budget}\nhistory = 0\n"));
    assert_eq!(put(&c, &d, "s", &small()).status(), 201);
    assert_eq!(
        post_ndjson(&c, &d, "s", ndjson(&series(5), None)).status(),
        200
    );
    let h = get_json(&c, &d, "/v1/streams/s/history");
    assert_eq!(h["observations"], json!([]), "history = 0 keeps nothing");
}
