//! Cluster mode: streams spread over many nodes that share one NATS JetStream cluster.
//!
//! JetStream holds what must survive a node: every stream's log (replicated, the write-ahead
//! log of the stream), its snapshots, its options, the nodes' heartbeats and the leases that
//! say which node owns which partition of the streams. This part is the NATS side of that: it
//! knows nothing of HTTP or of owner tasks (the server drives it).
//!
//! - [`ClusterConfig`] (`config`): the `[cluster]` section;
//! - [`Cluster`] (`node`): connection, buckets, the coordinator (heartbeats, leases by
//!   rendezvous hashing over live nodes), routing, `GET /v1/cluster`'s [`Status`];
//! - [`StreamLog`] (`log`): one stream's log (appends fenced by the last sequence applied),
//!   its reads and snapshots, under a [`Lease`];
//! - `hash`: partitions of names and the rendezvous hash.

mod config;
mod hash;
mod log;
mod node;

pub use config::{ClusterConfig, is_node_name};
pub use hash::{assignment, partition};
pub use log::{
    Entry, LOG_PREFIX, LOG_STREAM, Lease, LogError, LogHandles, RECORD_HEADER, Record, StreamLog,
    get_snapshots, slot_name, subject_of,
};
pub use node::{Change, Cluster, Counters, NodeStatus, PartitionStatus, Route, Status};
