//! The daemon: one owner task per stream, the HTTP API in front of them, and `serve`, which
//! runs it all until shutdown.
//!
//! - [`Config`] (`config`): defaults < TOML file < flags;
//! - `daemon`: [`serve`]: recovery, the connection loop with its limits, graceful shutdown;
//! - `state`: [`AppState`], what handlers share (stream registry, memory budget, core permits);
//! - `owner`: the task that owns one stream, its closed `Command` enum and the `StreamView` it
//!   publishes;
//! - `router`, `middleware`: the routes and what wraps them (auth, limits, timeouts, metrics);
//! - `api`, `body`, `error`, `openapi`: handlers and their types, body decoding, problem
//!   documents, the OpenAPI document;
//! - `metrics`: the Prometheus registry;
//! - `history`: the ring of recent observations each stream keeps for the chart;
//! - `page`: the live page at `/` and its embedded files;
//! - `cluster`: cluster mode's side of the daemon (loading the partitions this node gains,
//!   forwarding requests to the owner of their stream, `GET /v1/cluster`).

mod api;
pub mod body;
mod cluster;
mod config;
mod daemon;
mod error;
mod history;
mod metrics;
mod middleware;
mod openapi;
mod owner;
mod page;
mod router;
mod state;

pub use config::{Auth, Config, Engine, Limits};
pub use daemon::serve;
pub use router::router;
pub use state::{AppState, Failpoints, stream_memory};
