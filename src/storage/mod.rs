//! Durability on the local disk: each stream's write-ahead log, its snapshots, the data
//! directory that holds them, and `ekid inspect`, which reads them back for a person.
//!
//! - [`Store`]: the data directory (create, delete, recover streams) and [`StreamStore`], one
//!   stream's log and snapshot schedule, owned by that stream's owner task;
//! - `wal`: log segments of checksummed records ([`FsyncPolicy`]);
//! - `snapshot`: atomic snapshot files of a stream's state;
//! - [`inspect`]: what is on disk, checked;
//! - [`is_valid_stream_name`]: which names a stream (and its directory) may have.

mod inspect;
mod name;
mod snapshot;
mod store;
mod wal;

pub use inspect::{FileReport, StreamReport, inspect, render};
pub use name::{STREAM_NAME_RULE, is_valid_stream_name};
pub use snapshot::write as write_snapshot;
pub use snapshot::{decode as decode_snapshot, encode as encode_snapshot};
pub use store::{Recovered, RecoveryReport, StorageConfig, Store, StoreError, StreamStore};
pub use wal::{FsyncPolicy, WalError};
