//! Daemon configuration: built-in defaults, then a TOML file, then command-line flags. Unknown
//! keys are errors naming the key. `config/ekid.toml` documents every key with its default; a
//! test keeps the two equal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterConfig;
use crate::engine::{Options, RawOptions};
use crate::storage::StorageConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Where stream state lives.
    pub data_dir: PathBuf,
    /// Defaults for every stream option a `PUT /v1/streams/{name}` leaves out.
    pub defaults: RawOptions,
    pub limits: Limits,
    pub auth: Auth,
    pub storage: StorageConfig,
    pub engine: Engine,
    /// Cluster mode (off while `urls` is empty).
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Engine {
    /// Threads one stream's step may use: 2 splits the step of an ensemble of at least
    /// 2^20 particle-parameters (2^22 in `f32`) over two cores (same results); 1 keeps every
    /// step serial.
    /// Capped at the machine's cores.
    pub step_threads: usize,
}

impl Default for Engine {
    fn default() -> Self {
        Engine { step_threads: 2 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted, bytes.
    pub body_bytes: usize,
    /// Most observations in one POST.
    pub batch_observations: usize,
    /// Most streams at once.
    pub streams: usize,
    /// Budget for all streams together, bytes: each is charged what it holds
    /// ([`crate::engine::Stream::memory_bytes`]: its ensemble of J·d values of 8 bytes, 4 for
    /// `f32`, the parameter-sized work buffers, a snapshot's `f64` copy of its state and its
    /// published forecast states). Requests are charged their body and what decoding it may
    /// hold while they run ([`crate::server::body::observations_bound`]); one that does not fit
    /// beside the others gets 503 + Retry-After (a request alone is always taken).
    pub memory_bytes: u64,
    /// Longest forecast horizon.
    pub horizon: usize,
    /// Commands queued per stream before POSTs get 503 + Retry-After.
    pub queue_depth: usize,
    /// Whole-request timeout, milliseconds (SSE streams excepted).
    pub request_timeout_ms: u64,
    /// Time a client has to send a request head, milliseconds: its first from when the
    /// connection is accepted (whatever it sends meanwhile), and on HTTP/1 each next one from
    /// the end of the previous response.
    pub header_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed, milliseconds (HTTP/2,
    /// and HTTP/1 keep-alive, which also closes at `header_timeout_ms` if that comes first).
    pub idle_timeout_ms: u64,
    /// Requests in flight at once; more get 503 + Retry-After.
    pub concurrent_requests: usize,
    /// Open connections at once; more are closed on accept.
    pub connections: usize,
    /// Event (SSE) subscribers connected at once, all streams together; more get 503 +
    /// Retry-After.
    pub subscribers: usize,
    /// Event subscribers of one stream at once; more get 503 + Retry-After.
    pub subscribers_per_stream: usize,
    /// Most work one forecast may take: horizon × (interval particles + 1) × d.
    pub forecast_work: u64,
    /// Recent observations each stream keeps in memory with their prequential predictions
    /// (`GET /v1/streams/{name}/history`, the page's chart), charged to `memory_bytes` with the
    /// stream; 0 keeps none.
    pub history: usize,
}

/// The most observations a stream's history may keep: a hundred million, 100 GB for a
/// 64-output stream, far past any memory budget but still countable.
const MAX_HISTORY: usize = 100_000_000;

/// The longest timeout a setting may give: a day. Deadlines are instants, and an instant that far
/// out does not overflow.
const MAX_TIMEOUT_MS: u64 = 86_400_000;

impl Limits {
    /// Refuses settings that would disable the daemon or part of it: a zero limit lets nothing
    /// through (a zero timeout times everything out), and a count a semaphore cannot hold or a
    /// timeout past [`MAX_TIMEOUT_MS`] cannot be set up. `history` may be 0 (no history kept),
    /// but not so large that one stream's ring could not be counted in bytes.
    fn check(&self) -> anyhow::Result<()> {
        if self.history > MAX_HISTORY {
            anyhow::bail!(
                "[limits] history must be at most {MAX_HISTORY}, got {}",
                self.history
            );
        }
        let max_permits = tokio::sync::Semaphore::MAX_PERMITS as u64;
        let counts = [
            ("body_bytes", self.body_bytes as u64, u64::MAX),
            (
                "batch_observations",
                self.batch_observations as u64,
                u64::MAX,
            ),
            ("streams", self.streams as u64, u64::MAX),
            ("memory_bytes", self.memory_bytes, u64::MAX),
            ("horizon", self.horizon as u64, u64::MAX),
            ("forecast_work", self.forecast_work, u64::MAX),
            ("queue_depth", self.queue_depth as u64, max_permits),
            (
                "concurrent_requests",
                self.concurrent_requests as u64,
                max_permits,
            ),
            ("connections", self.connections as u64, max_permits),
            ("subscribers", self.subscribers as u64, max_permits),
            (
                "subscribers_per_stream",
                self.subscribers_per_stream as u64,
                max_permits,
            ),
            (
                "request_timeout_ms",
                self.request_timeout_ms,
                MAX_TIMEOUT_MS,
            ),
            ("header_timeout_ms", self.header_timeout_ms, MAX_TIMEOUT_MS),
            ("idle_timeout_ms", self.idle_timeout_ms, MAX_TIMEOUT_MS),
        ];
        for (key, value, max) in counts {
            if value == 0 {
                anyhow::bail!("[limits] {key} must be at least 1, got 0");
            }
            if value > max {
                anyhow::bail!("[limits] {key} must be at most {max}, got {value}");
            }
        }
        Ok(())
    }
}

impl Auth {
    /// Refuses tokens no client could send as given: empty ones, and ones with spaces (the
    /// header's value is trimmed), control or non-ASCII characters. The token itself is not
    /// repeated in the message.
    fn check(&self) -> anyhow::Result<()> {
        for (i, t) in self.tokens.iter().enumerate() {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                anyhow::bail!(
                    "[auth] tokens[{i}] must be one or more visible ASCII characters, without spaces (it has {} characters)",
                    t.chars().count()
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Bearer tokens accepted for writes; empty = no auth.
    pub tokens: Vec<String>,
    /// Also require a token for reads (`/healthz` stays open).
    pub protect_reads: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            data_dir: PathBuf::from("./data"),
            defaults: RawOptions::default(),
            limits: Limits::default(),
            auth: Auth::default(),
            storage: StorageConfig::default(),
            engine: Engine::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes: 16 << 20,
            batch_observations: 100_000,
            streams: 10_000,
            memory_bytes: 4 << 30,
            horizon: 10_000,
            queue_depth: 64,
            request_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            concurrent_requests: 1024,
            connections: 4096,
            subscribers: 1024,
            subscribers_per_stream: 128,
            forecast_work: 2_000_000_000,
            history: 10_000,
        }
    }
}

impl Config {
    /// Reads a TOML file over the built-in defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.stream_defaults()?;
        if c.engine.step_threads == 0 {
            anyhow::bail!("[engine] step_threads must be at least 1");
        }
        c.limits.check()?;
        c.auth.check()?;
        c.cluster.check()?;
        Ok(c)
    }

    /// The validated options a stream gets for every field it leaves out.
    pub fn stream_defaults(&self) -> anyhow::Result<Options> {
        self.defaults
            .resolve(&Options::default())
            .map_err(|e| anyhow::anyhow!("[defaults] {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ekid.toml");
        let file = Config::from_file(&path).unwrap();
        // The file spells out every stream default; built in, they are implied.
        let built_in = Config {
            defaults: file.defaults.clone(),
            ..Config::default()
        };
        assert_eq!(file, built_in);
        assert_eq!(file.stream_defaults().unwrap(), Options::default());
        // And it names every option, so it documents all of them.
        let named = serde_json::to_value(&file.defaults).unwrap();
        assert!(
            named.as_object().unwrap().values().all(|v| !v.is_null()),
            "config/ekid.toml leaves a stream option out: {named}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = Config::from_toml("listne = \"127.0.0.1:1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listne"), "{e}");
        let e = Config::from_toml("[limits]\nbody = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("body"), "{e}");
        let e = Config::from_toml("[defaults]\nnoise = -1.0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("noise"), "{e}");
        let e = Config::from_toml("[engine]\nstep_threads = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("step_threads"), "{e}");
    }
}
