//! Helpers to run the real binary: `ekid` commands, and a daemon on an ephemeral loopback port
//! with a temporary data directory that can be stopped gracefully or killed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

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

    fn pid(&self) -> u32 {
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

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
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
