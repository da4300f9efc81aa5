//! Helpers to run the real binary: `ekid` commands, a daemon on an ephemeral loopback port
//! with a temporary data directory that can be stopped gracefully or killed, and the requests
//! the tests send it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

pub fn ekid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ekid"))
}

pub fn dataset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(name)
}

/// Runs `ekid ARGS`, asserting success, and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = ekid().args(args).output().expect("spawn ekid");
    assert_success(&out, args);
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `ekid eval` on the bundled dataset `file` with `args` and `--json`, asserting success,
/// and returns the parsed report.
pub fn eval_json(file: &str, args: &[&str]) -> serde_json::Value {
    let path = dataset(file);
    let mut all = vec!["eval", path.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&run_ok(&all)).expect("eval --json prints JSON")
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "ekid {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `ekid serve` on 127.0.0.1:0.
pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    #[allow(dead_code)] // for tests that inspect the files
    pub data_dir: PathBuf,
    log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts a daemon with a fresh temporary data directory.
    pub fn start() -> Daemon {
        Self::start_args(&[])
    }

    /// Starts a daemon with extra arguments (after `serve`) and a fresh data directory.
    pub fn start_args(extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let mut d = Self::start_in(&dir, extra);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon with a fresh data directory and `config` (TOML) as its `--config` file.
    pub fn start_config(config: &str) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = write_config(tmp.path(), config);
        let mut d = Self::start_in(&tmp.path().join("data"), &["--config", &cfg]);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon on an existing data directory (for restarts).
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_with(ekid(), data_dir, extra)
    }

    /// Like [`Daemon::start_in`] with a prepared command (extra environment).
    pub fn start_with(mut cmd: Command, data_dir: &Path, extra: &[&str]) -> Daemon {
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open daemon log");
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn ekid serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log: {}", read(&log)))
            .to_owned();
        Daemon {
            child: Some(child),
            base,
            data_dir: data_dir.to_owned(),
            log,
            _tmp: None,
        }
    }

    /// Names of the daemon's threads (Linux: `/proc/PID/task/*/comm`).
    pub fn thread_names(&self) -> Vec<String> {
        let pid = self.child.as_ref().map_or(0, Child::id);
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| {
                dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .map(|n| n.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (up to `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        loop {
            if let Some(s) = c.try_wait().expect("try_wait") {
                return s;
            }
            if started.elapsed() > limit {
                let _ = c.kill();
                panic!(
                    "daemon did not exit within {limit:?} of SIGTERM; log:\n{}",
                    read(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Writes `text` to `DIR/ekid.toml` and returns its path, for `--config`.
pub fn write_config(dir: &Path, text: &str) -> String {
    let p = dir.join("ekid.toml");
    std::fs::write(&p, text).expect("write config");
    p.to_str().expect("utf-8 path").to_owned()
}

/// PUTs stream `options` (as JSON) to `/v1/streams/{name}`.
pub fn put(c: &Client, d: &Daemon, name: &str, options: &Value) -> Response {
    c.put(d.url(&format!("/v1/streams/{name}")))
        .json(options)
        .send()
        .expect("PUT")
}

/// POSTs `body` as `content_type` to `/v1/streams/{name}/observations`.
pub fn post(
    c: &Client,
    d: &Daemon,
    name: &str,
    content_type: &str,
    body: impl Into<String>,
) -> Response {
    c.post(d.url(&format!("/v1/streams/{name}/observations")))
        .header("content-type", content_type)
        .body(body.into())
        .send()
        .expect("POST")
}

/// POSTs NDJSON observations to `/v1/streams/{name}/observations`.
pub fn post_ndjson(c: &Client, d: &Daemon, name: &str, body: impl Into<String>) -> Response {
    post(c, d, name, "application/x-ndjson", body)
}

/// The JSON body of a response.
pub fn json_of(r: Response) -> Value {
    r.json().expect("json body")
}

/// GETs `path`, asserting 200, and returns its JSON body.
pub fn get_json(c: &Client, d: &Daemon, path: &str) -> Value {
    let r = c.get(d.url(path)).send().expect("GET");
    let status = r.status();
    let body = r.text().expect("body");
    assert_eq!(status, 200, "GET {path}: {body}\n{}", d.log());
    serde_json::from_str(&body).expect("json")
}

/// The text of `/metrics`.
pub fn metrics(c: &Client, d: &Daemon) -> String {
    c.get(d.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text")
}

/// Sends a request and returns [`parts`] of its response.
pub fn send(r: RequestBuilder) -> (u16, Value, String) {
    parts(r.send().expect("request"))
}

/// A response's status, its JSON body (`null` if it has none) and its content type (empty if
/// none).
pub fn parts(r: Response) -> (u16, Value, String) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let body: Value = r.json().unwrap_or(Value::Null);
    (status, body, ct)
}

/// Everything a client can see of a stream but the wall clock: its description (without
/// `last_update`) and a forecast. Equal fingerprints, equal streams.
pub fn fingerprint(c: &Client, d: &Daemon, name: &str) -> (Value, Value) {
    let mut s = get_json(c, d, &format!("/v1/streams/{name}"));
    s["stats"]["last_update"] = Value::Null;
    let f = get_json(
        c,
        d,
        &format!("/v1/streams/{name}/forecast?horizon=5&level=0.8"),
    );
    (s, f)
}

/// Writes `request` as it is on a new connection (what an HTTP client would normalise or
/// refuse to send) and returns the status code (0 if none) and the body text.
pub fn raw_request(d: &Daemon, request: &str) -> (u16, String) {
    let mut sock = TcpStream::connect(d.base.trim_start_matches("http://")).expect("connect");
    sock.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    let _ = sock.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A smooth test series of `n` values around 10.
pub fn series(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 10.0 + 5.0 * (i as f64 / 6.0).sin() + 0.1 * (i % 7) as f64)
        .collect()
}

/// NDJSON observations of `values`, numbered from `first_seq` when given.
pub fn ndjson(values: &[f64], first_seq: Option<u64>) -> String {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match first_seq {
            Some(s) => format!("{{\"seq\": {}, \"y\": {v}}}\n", s + i as u64),
            None => format!("{{\"y\": {v}}}\n"),
        })
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// Runs `ekid serve` on `data_dir` expecting it to refuse to start: returns its exit status and
/// what it printed on stderr. Panics if it starts listening instead.
pub fn serve_refused(data_dir: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let mut child = ekid()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ekid serve");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    if line.starts_with("listening on") {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!(
            "the daemon started on {}: {line}{}",
            data_dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `kB` field of `/proc/PID/status` (Linux), such as `VmHWM` (peak resident memory).
pub fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

impl Daemon {
    /// CPU seconds (user + system) the daemon process has used so far (Linux:
    /// `/proc/PID/stat`, in clock ticks of `getconf CLK_TCK`).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = read(Path::new(&format!("/proc/{}/stat", self.pid())));
        // Fields after the command name (which may hold spaces) start at state (field 3);
        // utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let ticks: f64 = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .sum();
        let per_second = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        ticks / per_second
    }
}

/// A small tmpfs mounted on a fresh temporary directory (needs root, as CI has), unmounted when
/// dropped: a real disk that can be filled or made read-only.
pub struct Tmpfs {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` where mounting is not allowed (not root); the caller then skips its test, saying so.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mnt");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fs = Tmpfs { dir, _tmp: tmp };
        fs.mount_with(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .then_some(fs)
    }

    /// `mount ARGS DIR`, e.g. `-o remount,ro`; whether it succeeded.
    pub fn mount_with(&self, args: &[&str]) -> bool {
        Command::new("mount")
            .args(args)
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
