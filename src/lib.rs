//! ekid: online forecasting of streaming time series with recurrent-network ensembles trained
//! by Ensemble Kalman Inversion.
//!
//! The parts, each a folder, each depending only on the ones above it:
//!
//! - [`engine`]: the numerical core. A stream's options, its ensemble and the EKI step, the
//!   baselines, the forecast roll-out. Pure: no I/O, no clock, randomness from the stream's seed.
//! - [`storage`]: durability on disk. The write-ahead log, snapshots, the data directory and
//!   recovery (which replays through the engine's own apply).
//! - [`eval`]: the offline evaluation protocol (`ekid eval`), CSV series, plots, and the golden
//!   pins of the engine's results.
//! - [`cluster`]: cluster mode's NATS JetStream side: each stream's replicated log and
//!   snapshots, leases on partitions of streams, heartbeats and the routing they give.
//! - [`server`]: the daemon. Config, one owner task per stream, the HTTP API, metrics.
//! - [`cli`]: the command line (`main.rs` only calls [`cli::main`]), including `ekid replay`,
//!   the HTTP client that streams a CSV into a daemon.
//!
//! ARCHITECTURE.md follows one observation through these parts and states their invariants.

pub mod cli;
pub mod cluster;
pub mod engine;
pub mod eval;
pub mod server;
pub mod storage;
