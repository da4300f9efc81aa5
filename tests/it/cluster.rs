//! Cluster mode against real NATS JetStream servers and real ekid nodes, on loopback.
//!
//! `EKID_CLUSTER_ROUNDS` (default 2) sets how many ekid nodes the failover test kills.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::cluster_util::{
    Nats, Node, cluster_status, cluster_tests_enabled, fingerprint_named, reference, retry,
    wait_all_owned,
};
use crate::util::{client, metrics, ndjson, series};

fn options(seed: u64) -> Value {
    json!({"ensemble": 20, "hidden": 6, "lags": 4, "seed": seed, "scale": {"min": 0, "max": 20}})
}

/// PUTs a stream through `base`, retrying while the cluster settles.
fn create(c: &Client, base: &str, name: &str, options: &Value) {
    let (s, b) = retry(Duration::from_secs(30), || {
        let r = c
            .put(format!("{base}/v1/streams/{name}"))
            .json(options)
            .send()
            .ok()?;
        Some((r.status().as_u16(), r.text().unwrap_or_default()))
    });
    assert!(s == 201 || s == 200, "PUT {name}: {s} {b}");
}

/// POSTs observations `first..first+values.len()` through one of `nodes` (taken in turn),
/// until one acknowledges them; a node that is down or answers 503 is passed over.
fn post_until_acked(
    c: &Client,
    nodes: &Mutex<Vec<String>>,
    turn: &mut usize,
    name: &str,
    values: &[f64],
    first: u64,
) {
    let started = Instant::now();
    loop {
        let base = {
            let n = nodes.lock().unwrap();
            *turn += 1;
            n[*turn % n.len()].clone()
        };
        let r = c
            .post(format!("{base}/v1/streams/{name}/observations"))
            .header("content-type", "application/x-ndjson")
            .body(ndjson(values, Some(first)))
            .timeout(Duration::from_secs(10))
            .send();
        if let Ok(r) = r {
            let status = r.status().as_u16();
            let body = r.text().unwrap_or_default();
            match status {
                200 => return,
                503 => {}
                _ => panic!("POST {name} seq {first}: {status} {body}"),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "seq {first} of {name} not acknowledged within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ingests `values` into each stream from its own thread, in batches of `batch`, spreading the
/// requests over the nodes.
fn ingest(
    nodes: Arc<Mutex<Vec<String>>>,
    streams: Vec<String>,
    values: Arc<Vec<f64>>,
    batch: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    streams
        .into_iter()
        .enumerate()
        .map(|(k, name)| {
            let (nodes, values) = (nodes.clone(), values.clone());
            std::thread::spawn(move || {
                let c = client();
                let mut turn = k;
                for (i, chunk) in values.chunks(batch).enumerate() {
                    let first = 1 + (i * batch) as u64;
                    post_until_acked(&c, &nodes, &mut turn, &name, chunk, first);
                }
            })
        })
        .collect()
}

/// Every stream, read through every node, equals a single node fed 1..n.
fn assert_exact(c: &Client, nodes: &[Node], streams: &[String], values: &[f64]) {
    for (k, name) in streams.iter().enumerate() {
        let want = reference(c, &options(k as u64), values);
        for n in nodes {
            let (s, _) = retry(Duration::from_secs(30), || {
                let r = c.get(n.daemon.url(&format!("/v1/streams/{name}"))).send().ok()?;
                Some((r.status().as_u16(), String::new()))
            });
            assert_eq!(s, 200, "{name} via {}", n.name);
            let got = fingerprint_named(c, &n.daemon, name);
            assert_eq!(
                got.0["stats"]["observations"],
                json!(values.len()),
                "{name} via {}: observations",
                n.name
            );
            assert_eq!(got, want, "{name} via {} differs from a single node", n.name);
        }
    }
}

#[test]
fn cluster_kill9_of_nodes_loses_nothing_and_applies_once() {
    if !cluster_tests_enabled() {
        return;
    }
    let rounds: usize = std::env::var("EKID_CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let c = client();
    let nats = Nats::start();
    let mut nodes: Vec<Node> = (0..3).map(|i| Node::start(&nats, &format!("e{i}"))).collect();
    wait_all_owned(&c, &nodes[0].daemon, Duration::from_secs(30));
    let streams: Vec<String> = (0..4).map(|k| format!("s{k}")).collect();
    for (k, name) in streams.iter().enumerate() {
        create(&c, &nodes[k % 3].base(), name, &options(k as u64));
    }
    let values = Arc::new(series(600));
    let urls = Arc::new(Mutex::new(nodes.iter().map(Node::base).collect::<Vec<_>>()));
    let writers = ingest(urls.clone(), streams.clone(), values.clone(), 5);
    // Kill a node at a random moment, let its streams move, start it again.
    let done = Arc::new(AtomicBool::new(false));
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(300 + rand::random::<u64>() % 1500));
        let victim = (round + rand::random::<u64>() as usize) % nodes.len();
        nodes[victim].daemon.kill9();
        std::thread::sleep(Duration::from_millis(500));
        let name = nodes[victim].name.clone();
        nodes[victim] = Node::start(&nats, &name);
        urls.lock().unwrap()[victim] = nodes[victim].base();
    }
    for w in writers {
        w.join().expect("writer");
    }
    done.store(true, Ordering::Relaxed);
    wait_all_owned(&c, &nodes[0].daemon, Duration::from_secs(30));
    assert_exact(&c, &nodes, &streams, &values);
    // Some request went through a node that does not own its stream.
    let forwards: u64 = nodes
        .iter()
        .map(|n| metric(&c, &n.daemon, "ekid_cluster_forwards_total"))
        .sum();
    assert!(forwards > 0);
}

fn metric(c: &Client, d: &crate::util::Daemon, name: &str) -> u64 {
    metrics(c, d)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn cluster_direct_publish_is_applied_in_order_and_any_node_answers() {
    if !cluster_tests_enabled() {
        return;
    }
    let c = client();
    let nats = Nats::start();
    let nodes: Vec<Node> = (0..3).map(|i| Node::start(&nats, &format!("d{i}"))).collect();
    wait_all_owned(&c, &nodes[0].daemon, Duration::from_secs(30));
    let name = "direct.one";
    create(&c, &nodes[1].base(), name, &options(0));
    // PUT through another node: same options, 200.
    let r = c
        .put(nodes[2].daemon.url(&format!("/v1/streams/{name}")))
        .json(&options(0))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let values = series(300);
    // The first 100 by POST through node 0, the rest published straight to the log:
    // JSON arrays, NDJSON, a duplicate, and messages the stream refuses.
    let r = c
        .post(nodes[0].daemon.url(&format!("/v1/streams/{name}/observations")))
        .header("content-type", "application/x-ndjson")
        .body(ndjson(&values[..100], Some(1)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", nodes[0].daemon.log());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let nc = async_nats::connect(nats.url(1)).await.unwrap();
        let js = async_nats::jetstream::new(nc);
        let subject = "ekid.obs.direct=one";
        for (k, chunk) in values[100..].chunks(50).enumerate() {
            let first = 101 + 50 * k as u64;
            let body = if k % 2 == 0 {
                let arr: Vec<Value> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, v)| json!({"seq": first + i as u64, "y": v}))
                    .collect();
                serde_json::to_vec(&arr).unwrap()
            } else {
                ndjson(chunk, Some(first)).into_bytes()
            };
            let mut h = async_nats::HeaderMap::new();
            if k % 2 == 1 {
                h.insert("Content-Type", "application/x-ndjson");
            }
            js.publish_with_headers(subject, h, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
            // Refused: a wrong dimension, a gap, not JSON. Applied as nothing.
            for bad in [
                json!([{"y": [1.0, 2.0]}]).to_string(),
                json!([{"seq": 10_000, "y": 1.0}]).to_string(),
                "not json".to_owned(),
            ] {
                js.publish(subject, bad.into_bytes().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
        // A duplicate of what is applied already.
        let mut h = async_nats::HeaderMap::new();
        h.insert("Content-Type", "application/x-ndjson");
        js.publish_with_headers(subject, h, ndjson(&values[..10], Some(1)).into_bytes().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    // Every node sees the stream reach 300.
    for n in &nodes {
        let started = Instant::now();
        loop {
            let r = c.get(n.daemon.url(&format!("/v1/streams/{name}"))).send().unwrap();
            if r.status() == 200 {
                let v: Value = r.json().unwrap();
                if v["stats"]["last_seq"] == json!(300) {
                    break;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{}", n.daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let want = reference(&c, &options(0), &values);
    for n in &nodes {
        assert_eq!(fingerprint_named(&c, &n.daemon, name), want, "via {}", n.name);
    }
    // The list holds the stream once, whichever node answers; bad input is refused alike.
    for n in &nodes {
        let list = crate::util::get_json(&c, &n.daemon, "/v1/streams");
        let names: Vec<&str> = list["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(names, vec![name]);
        let r = c
            .post(n.daemon.url(&format!("/v1/streams/{name}/observations")))
            .header("content-type", "application/json")
            .body(r#"{"y": "x"}"#)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = c
            .post(n.daemon.url(&format!("/v1/streams/{name}/observations")))
            .header("content-type", "application/json")
            .body(r#"{"seq": 400, "y": 1}"#)
            .send()
            .unwrap();
        assert_eq!(r.status(), 409);
        let r = c.get(n.daemon.url("/v1/streams/nope")).send().unwrap();
        assert_eq!(r.status(), 404);
    }
    let refused: u64 = nodes
        .iter()
        .map(|n| metric(&c, &n.daemon, "ekid_cluster_refused_records_total"))
        .sum();
    assert!(refused >= 12, "refused {refused}");
    // Delete through any node: gone everywhere.
    let r = c
        .delete(nodes[0].daemon.url(&format!("/v1/streams/{name}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    for n in &nodes {
        let r = c.get(n.daemon.url(&format!("/v1/streams/{name}"))).send().unwrap();
        assert_eq!(r.status(), 404);
    }
    let s = cluster_status(&c, &nodes[0].daemon);
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3, "{s}");
}
