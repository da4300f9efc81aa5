//! One stream's replicated log on JetStream, its snapshots in the object store, and the lease
//! that lets this node write them.
//!
//! Every record of a stream is a message on the subject `ekid.obs.<partition>.<name>` (the
//! partition of the name, see [`partition`](super::partition); a `.` of the name written `=`)
//! of the JetStream stream `EKID_OBS`, so that a node follows only the partitions it owns. A
//! record is either a batch the owner accepted (header `Ekid-Record: batch`, payload the
//! postcard encoding of its observations, each with its `seq`), or whatever a producer
//! published there directly (JSON or NDJSON observations, as a `POST` body); the stream's state
//! is the replay, in log order, of every record through the same plan-then-apply code, a
//! refused record changing nothing. The owner appends with
//! `Nats-Expected-Last-Subject-Sequence` set to the last record it applied, so an append from a
//! node that has not seen everything before it is refused by JetStream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::RawMessageErrorKind;
use bytes::Bytes;

use crate::engine::Observation;

/// The JetStream stream that holds every stream's log.
pub const LOG_STREAM: &str = "EKID_OBS";
/// Subjects of the log: `ekid.obs.<partition>.<name>`.
pub const LOG_PREFIX: &str = "ekid.obs.";
/// The header that marks a record written by an owner.
pub const RECORD_HEADER: &str = "Ekid-Record";

/// A stream name as a subject token or key: `.` (which would split the token) becomes `=`,
/// which names never hold.
pub fn key_of(name: &str) -> String {
    name.replace('.', "=")
}

pub fn name_of(key: &str) -> String {
    key.replace('=', ".")
}

/// The subject of the log of stream `name`, which falls in `partition`.
pub fn subject_of(partition: u32, name: &str) -> String {
    format!("{LOG_PREFIX}{partition}.{}", key_of(name))
}

/// The subjects of every log of `partition`.
pub fn partition_filter(partition: u32) -> String {
    format!("{LOG_PREFIX}{partition}.>")
}

/// The stream a log subject belongs to.
pub fn name_of_subject(subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(LOG_PREFIX)?;
    let (_, key) = rest.split_once('.')?;
    Some(name_of(key))
}

/// A lease on a partition as this node sees it: valid until a deadline on the local monotonic
/// clock, set from when the renewal was sent so that it ends before JetStream forgets it.
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    /// Milliseconds after `base`; 0 once revoked.
    until_ms: AtomicU64,
}

impl Lease {
    pub fn new() -> Arc<Lease> {
        Arc::new(Lease {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
        })
    }

    pub fn valid(&self) -> bool {
        (self.base.elapsed().as_millis() as u64) < self.until_ms.load(Ordering::Acquire)
    }

    /// The lease holds until `valid_for` after `sent` (when the renewal that succeeded left).
    pub fn extend(&self, sent: Instant, valid_for: Duration) {
        let until = sent.saturating_duration_since(self.base) + valid_for;
        self.until_ms
            .fetch_max(until.as_millis() as u64, Ordering::AcqRel);
    }

    pub fn revoke(&self) {
        self.until_ms.store(0, Ordering::Release);
    }
}

/// One record of a stream's log.
#[derive(Debug, Clone)]
pub enum Record {
    /// Observations an owner accepted, each with its `seq`.
    Batch(Vec<Observation>),
    /// A producer's message: a `POST` body in `content_type` (JSON when absent).
    Direct {
        content_type: Option<String>,
        body: Bytes,
    },
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// The record's sequence number in `EKID_OBS`.
    pub seq: u64,
    pub record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Someone appended after the last record this node applied: catch up, then retry.
    #[error("the log has records this node has not applied yet")]
    Behind,
    /// This node's lease on the stream's partition ran out: it may not write.
    #[error("this node no longer owns stream `{0}`")]
    NotOwner(String),
    /// The record cannot be published whole (over the servers' payload limit).
    #[error("{0}")]
    TooLarge(String),
    /// JetStream could not be reached or did not confirm in time; a timed-out append may
    /// still be stored.
    #[error("JetStream unavailable: {0}")]
    Unavailable(String),
}

/// What a node needs to write and read one stream's log and snapshots.
#[derive(Clone)]
pub struct LogHandles {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub log: async_nats::jetstream::stream::Stream,
    pub snapshots: async_nats::jetstream::object_store::ObjectStore,
    /// The JetStream stream behind `snapshots`, read directly by takeovers.
    pub snapshot_stream: async_nats::jetstream::stream::Stream,
}

impl LogHandles {
    /// The object store's bucket name (its stream is `OBJ_<bucket>`).
    fn snapshots_bucket(&self) -> &str {
        let name = &self.snapshot_stream.cached_info().config.name;
        name.strip_prefix("OBJ_").unwrap_or(name)
    }
}

/// One stream's log, held by its owner.
pub struct StreamLog {
    name: String,
    subject: String,
    handles: LogHandles,
    lease: Arc<Lease>,
    /// The options' revision in the streams bucket: tells this stream's snapshots from those of
    /// an earlier stream of the same name.
    incarnation: u64,
    /// The sequence number of the last record applied (0: none).
    last: u64,
    records_since_snapshot: u64,
    /// The last record each of the stream's two snapshot slots covers (0: empty). A new
    /// snapshot replaces the older one; the log is kept from the older one on, so that a
    /// newest snapshot that cannot be read leaves the other and the log after it.
    slots: [u64; 2],
}

impl StreamLog {
    /// `subject`: [`subject_of`] the stream; `slots`: what [`get_snapshots`] found (zeros for
    /// a new stream).
    pub fn new(
        name: &str,
        subject: String,
        handles: LogHandles,
        lease: Arc<Lease>,
        incarnation: u64,
        last: u64,
        slots: [u64; 2],
    ) -> Self {
        StreamLog {
            name: name.to_owned(),
            subject,
            handles,
            lease,
            incarnation,
            last,
            records_since_snapshot: 0,
            slots,
        }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn owned(&self) -> bool {
        self.lease.valid()
    }

    fn check_owner(&self) -> Result<(), LogError> {
        if self.lease.valid() {
            Ok(())
        } else {
            Err(LogError::NotOwner(self.name.clone()))
        }
    }

    /// Appends one record of accepted observations after the last record applied, replicated
    /// on a quorum before this returns. `Ok` only while the lease holds, before and after.
    pub async fn append(&mut self, observations: &[Observation]) -> Result<u64, LogError> {
        self.check_owner()?;
        if self.handles.client.connection_state() != async_nats::connection::State::Connected {
            return Err(LogError::Unavailable("not connected to NATS".into()));
        }
        let payload = postcard::to_stdvec(observations)
            .map_err(|e| LogError::TooLarge(format!("cannot encode the batch: {e}")))?;
        let limit = self.handles.client.server_info().max_payload;
        if payload.len() + 256 > limit {
            return Err(LogError::TooLarge(format!(
                "the batch takes {} bytes in the log, over the NATS servers' max_payload of {limit}; send it in smaller batches",
                payload.len()
            )));
        }
        let mut headers = HeaderMap::new();
        headers.insert(RECORD_HEADER, "batch");
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            self.last.to_string().as_str(),
        );
        let ack = self
            .handles
            .js
            .publish_with_headers(self.subject.clone(), headers, payload.into())
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => LogError::Behind,
                _ => LogError::Unavailable(e.to_string()),
            })?;
        // Stored; but a node whose lease ran out meanwhile acknowledges nothing (the record
        // stands in the log and the new owner applies it).
        if !self.lease.valid() {
            return Err(LogError::Unavailable(format!(
                "stored, but this node's lease on stream `{}` ran out before it could acknowledge",
                self.name
            )));
        }
        self.advance(ack.sequence);
        Ok(ack.sequence)
    }

    /// Records `seq` as applied.
    pub fn advance(&mut self, seq: u64) {
        if seq > self.last {
            self.last = seq;
            self.records_since_snapshot += 1;
        }
    }

    /// Every record after the last one applied, in order, read from the log's leader.
    pub async fn read_after(&self) -> Result<Vec<Entry>, LogError> {
        read_after(&self.handles.log, &self.subject, self.last).await
    }

    pub fn snapshot_due(&self, every_records: u64) -> bool {
        self.records_since_snapshot >= every_records
    }

    /// Stores `state` (a storage snapshot's bytes of the stream after record `self.last()`) in
    /// the slot of the older snapshot, then drops the log records both snapshots cover.
    pub async fn put_snapshot(&mut self, state: Vec<u8>) -> Result<(), LogError> {
        let covered = self.last;
        let mut bytes = Vec::with_capacity(state.len() + 24);
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&self.incarnation.to_le_bytes());
        bytes.extend_from_slice(&covered.to_le_bytes());
        bytes.extend_from_slice(&state);
        let slot = usize::from(self.slots[1] < self.slots[0]);
        self.handles
            .snapshots
            .put(slot_name(&self.name, slot).as_str(), &mut bytes.as_slice())
            .await
            .map_err(|e| LogError::Unavailable(format!("storing a snapshot: {e}")))?;
        self.slots[slot] = covered;
        self.records_since_snapshot = 0;
        let older = self.slots[0].min(self.slots[1]);
        if older > 0
            && let Err(e) = self
                .handles
                .log
                .purge()
                .filter(self.subject.clone())
                .sequence(older + 1)
                .await
        {
            // Only space: the records stay until the next snapshot's purge.
            tracing::debug!(stream = %self.name, error = %e, "could not trim the log");
        }
        Ok(())
    }
}

/// The object that holds snapshot slot `slot` (0 or 1) of stream `name`.
pub fn slot_name(name: &str, slot: usize) -> String {
    format!("{}.{slot}", key_of(name))
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"EKIDCSN1";

/// A stream's snapshots: what each slot covers (0: none of this `incarnation`), and the
/// snapshots, newest first, as the sequence number of the last record each covers and a
/// storage snapshot's bytes.
pub async fn get_snapshots(
    handles: &LogHandles,
    name: &str,
    incarnation: u64,
) -> Result<([u64; 2], Vec<(u64, Vec<u8>)>), LogError> {
    let mut slots = [0; 2];
    let mut found = Vec::new();
    for (slot, covered) in slots.iter_mut().enumerate() {
        if let Some((seq, bytes)) = get_slot(handles, name, slot, incarnation).await? {
            *covered = seq;
            found.push((seq, bytes));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok((slots, found))
}

/// Reads snapshot slot `slot` of stream `name` from the stream behind the object store,
/// through its leader and without a consumer: the object's description (the last message on its
/// meta subject), then its chunks in order. An object-store `get` would create an ephemeral
/// consumer for the chunks, and a JetStream cluster missing one server fails to place about one
/// such consumer in three: the takeover that needs the snapshot then waits out a timeout. The
/// leader, unlike a replica answering a direct get, never serves an older description.
async fn get_slot(
    handles: &LogHandles,
    name: &str,
    slot: usize,
    incarnation: u64,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    use async_nats::jetstream::object_store::ObjectInfo;
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    use base64::Engine;
    let unavailable = |e: &dyn std::fmt::Display| {
        LogError::Unavailable(format!("reading a snapshot of `{name}`: {e}"))
    };
    let bucket = &handles.snapshot_stream;
    let bucket_name = handles.snapshots_bucket();
    let object = base64::engine::general_purpose::URL_SAFE.encode(slot_name(name, slot));
    let meta = format!("$O.{bucket_name}.M.{object}");
    let info: ObjectInfo = match bucket.get_last_raw_message_by_subject(&meta).await {
        Ok(m) => match serde_json::from_slice(&m.payload) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(stream = name, slot, error = %e, "ignoring a snapshot whose description cannot be read");
                return Ok(None);
            }
        },
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(unavailable(&e)),
    };
    if info.deleted {
        return Ok(None);
    }
    let chunks = format!("$O.{bucket_name}.C.{}", info.nuid);
    let mut bytes = Vec::with_capacity(info.size);
    let mut from = 1;
    for _ in 0..info.chunks {
        // A chunk gone: the slot was written again meanwhile; the caller tries again.
        let chunk = bucket
            .raw_message_builder()
            .next_by_subject(chunks.clone())
            .sequence(from)
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        from = chunk.sequence + 1;
        bytes.extend_from_slice(&chunk.payload);
    }
    if bytes.len() != info.size {
        return Err(unavailable(&format!(
            "read {} bytes of {}",
            bytes.len(),
            info.size
        )));
    }
    if bytes.len() < 24 || &bytes[..8] != SNAPSHOT_MAGIC {
        tracing::warn!(stream = name, "ignoring a snapshot without its header");
        return Ok(None);
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
    if u64_at(8) != incarnation {
        return Ok(None);
    }
    let seq = u64_at(16);
    Ok(Some((seq, bytes.split_off(24))))
}

/// Records of `subject` after `after`, in order.
pub async fn read_after(
    log: &async_nats::jetstream::stream::Stream,
    subject: &str,
    after: u64,
) -> Result<Vec<Entry>, LogError> {
    let mut out = Vec::new();
    let mut from = after + 1;
    loop {
        let got = log
            .raw_message_builder()
            .next_by_subject(subject.to_owned())
            .sequence(from)
            .send()
            .await;
        let msg = match got {
            Ok(m) => m,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(out),
            Err(e) => return Err(LogError::Unavailable(format!("reading the log: {e}"))),
        };
        from = msg.sequence + 1;
        out.push(decode(msg.sequence, &msg.headers, msg.payload));
    }
}

fn decode(seq: u64, headers: &HeaderMap, payload: Bytes) -> Entry {
    let record = if headers.get(RECORD_HEADER).map(|v| v.as_str()) == Some("batch") {
        match postcard::from_bytes::<Vec<Observation>>(&payload) {
            Ok(batch) => Record::Batch(batch),
            // Not what an owner writes: let the replay refuse it as a body.
            Err(_) => Record::Direct {
                content_type: Some("application/octet-stream".into()),
                body: payload,
            },
        }
    } else {
        Record::Direct {
            content_type: headers.get("Content-Type").map(|v| v.as_str().to_owned()),
            body: payload,
        }
    };
    Entry { seq, record }
}
