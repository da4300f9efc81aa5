//! The `[cluster]` section of the daemon's configuration.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers to connect to (`nats://HOST:PORT`); empty: no cluster, the node runs alone
    /// on its data directory.
    pub urls: Vec<String>,
    /// This node's name, unique in the cluster (`[A-Za-z0-9_-]`); empty: the host name.
    pub node: String,
    /// The URL other nodes forward requests to; empty: `http://` + the listen address.
    pub advertise: String,
    /// JetStream replicas of the log, the snapshots and the leases.
    pub replicas: usize,
    /// How long a lease on a partition of streams lives without renewal, milliseconds; a node
    /// renews every fifth of it, and a node that cannot stops applying before it runs out.
    pub lease_ttl_ms: u64,
    /// Partitions of the stream names (by hash), the unit of ownership.
    pub partitions: u32,
    /// A snapshot goes to JetStream after this many log records without one (besides the
    /// `[storage]` observation count and interval), so a takeover replays a bounded log.
    pub snapshot_records: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            urls: Vec::new(),
            node: String::new(),
            advertise: String::new(),
            replicas: 3,
            lease_ttl_ms: 4000,
            partitions: 64,
            snapshot_records: 1000,
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }

    /// Refuses settings a cluster cannot run with, naming the key.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        if !(1..=5).contains(&self.replicas) {
            anyhow::bail!("[cluster] replicas must be 1 to 5, got {}", self.replicas);
        }
        if !(500..=600_000).contains(&self.lease_ttl_ms) {
            anyhow::bail!(
                "[cluster] lease_ttl_ms must be 500 to 600000, got {}",
                self.lease_ttl_ms
            );
        }
        if !(1..=4096).contains(&self.partitions) {
            anyhow::bail!(
                "[cluster] partitions must be 1 to 4096, got {}",
                self.partitions
            );
        }
        if self.snapshot_records == 0 {
            anyhow::bail!("[cluster] snapshot_records must be at least 1, got 0");
        }
        if !self.node.is_empty() && !is_node_name(&self.node) {
            anyhow::bail!(
                "[cluster] node must be 1 to 64 characters of A-Z a-z 0-9 _ -, got `{}`",
                self.node
            );
        }
        Ok(())
    }
}

pub fn is_node_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
