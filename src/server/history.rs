//! The recent observations of a stream, with the prequential prediction made before each, kept
//! in memory for `GET /v1/streams/{name}/history` and the page's chart: a bounded ring the
//! stream's owner appends to after every group of batches, read by handlers without queuing
//! behind updates.
//!
//! One entry is `seq`, then `outputs` values of `y`, `outputs` of the prediction and the squared
//! error, all in one flat `f64` buffer (a missing prediction and error are NaN: the engine never
//! publishes a non-finite prediction). The buffers grow with what the ring holds (doubling,
//! never past the capacity), so a stream of few observations holds little; a full ring costs
//! [`History::bytes_for`], which is what the memory budget charges from the start.

use std::sync::Mutex;

use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use crate::engine::Applied;

/// A ring of at most `capacity` recent observations.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    outputs: usize,
    /// Entries in order of arrival from `start`, wrapping; `len` of them are live.
    seqs: Vec<u64>,
    values: Vec<f64>,
    start: usize,
    len: usize,
}

impl History {
    pub fn new(capacity: usize, outputs: usize) -> Self {
        History {
            capacity,
            outputs,
            seqs: Vec::new(),
            values: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    /// What a ring of `capacity` entries of `outputs` values holds once allocated, bytes.
    pub fn bytes_for(capacity: usize, outputs: usize) -> u64 {
        capacity as u64 * (8 + 8 * Self::stride_of(outputs) as u64)
    }

    fn stride_of(outputs: usize) -> usize {
        2 * outputs + 1
    }

    fn stride(&self) -> usize {
        Self::stride_of(self.outputs)
    }

    /// Appends the observations, oldest first, dropping the oldest entries past the capacity.
    pub fn extend<'a>(&mut self, applied: impl ExactSizeIterator<Item = &'a Applied>) {
        if self.capacity == 0 {
            return;
        }
        // Only the last `capacity` of a large group survive: skip the rest without copying.
        let skip = applied.len().saturating_sub(self.capacity);
        let (m, stride) = (self.outputs, self.stride());
        for a in applied.skip(skip) {
            let slot = if self.len < self.capacity {
                // Growing: the entries sit in order from slot 0.
                self.grow_for_one();
                self.len += 1;
                self.len - 1
            } else {
                let oldest = self.start;
                self.start = (self.start + 1) % self.capacity;
                oldest
            };
            self.seqs[slot] = a.seq;
            let row = &mut self.values[slot * stride..(slot + 1) * stride];
            row.fill(f64::NAN);
            for (dst, &y) in row[..m].iter_mut().zip(&a.y) {
                *dst = y;
            }
            if let Some(p) = &a.prediction {
                for (dst, &p) in row[m..2 * m].iter_mut().zip(p) {
                    *dst = p;
                }
            }
            row[2 * m] = a.error.unwrap_or(f64::NAN);
        }
    }

    /// Makes room for one more entry at the end of a ring that is not full, doubling the
    /// buffers (up to the capacity) when they are.
    fn grow_for_one(&mut self) {
        let stride = self.stride();
        if self.seqs.len() == self.seqs.capacity() {
            let want = (2 * self.seqs.len()).max(16).min(self.capacity);
            self.seqs.reserve_exact(want - self.seqs.len());
            self.values.reserve_exact(want * stride - self.values.len());
        }
        self.seqs.push(0);
        self.values.extend(std::iter::repeat_n(f64::NAN, stride));
    }

    /// A copy of the newest `limit` entries (all of them when `limit` is larger), oldest first.
    pub fn recent(&self, limit: usize) -> Recent {
        let n = self.len.min(limit);
        let stride = self.stride();
        let mut seqs = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n * stride);
        for i in self.len - n..self.len {
            let slot = (self.start + i) % self.capacity;
            seqs.push(self.seqs[slot]);
            values.extend_from_slice(&self.values[slot * stride..(slot + 1) * stride]);
        }
        Recent {
            outputs: self.outputs,
            seqs,
            values,
        }
    }
}

/// A ring shared by a stream's owner (who appends) and handlers (who copy out of it).
#[derive(Debug)]
pub struct SharedHistory(Mutex<History>);

impl SharedHistory {
    pub fn new(capacity: usize, outputs: usize) -> Self {
        SharedHistory(Mutex::new(History::new(capacity, outputs)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        // Every change to the ring leaves it consistent between two entries, so a panic while
        // holding the lock cannot leave it half-written in a way a reader would notice.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn extend<'a>(&self, applied: impl ExactSizeIterator<Item = &'a Applied>) {
        self.lock().extend(applied);
    }

    pub fn recent(&self, limit: usize) -> Recent {
        self.lock().recent(limit)
    }
}

/// Entries copied out of a ring; serialises as an array of
/// `{"seq", "y": [..], "prediction": [..] | null, "error": x | null}`, the shape of an event.
#[derive(Debug)]
pub struct Recent {
    outputs: usize,
    seqs: Vec<u64>,
    values: Vec<f64>,
}

impl Recent {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

struct Entry<'a> {
    seq: u64,
    outputs: usize,
    row: &'a [f64],
}

impl Serialize for Entry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.outputs;
        let prediction = &self.row[m..2 * m];
        let error = self.row[2 * m];
        let mut e = s.serialize_struct("Entry", 4)?;
        e.serialize_field("seq", &self.seq)?;
        e.serialize_field("y", &self.row[..m])?;
        e.serialize_field(
            "prediction",
            &(!prediction[0].is_nan()).then_some(prediction),
        )?;
        e.serialize_field("error", &(!error.is_nan()).then_some(error))?;
        e.end()
    }
}

impl Serialize for Recent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let stride = 2 * self.outputs + 1;
        let mut seq = s.serialize_seq(Some(self.seqs.len()))?;
        for (i, &q) in self.seqs.iter().enumerate() {
            seq.serialize_element(&Entry {
                seq: q,
                outputs: self.outputs,
                row: &self.values[i * stride..(i + 1) * stride],
            })?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(seq: u64, y: f64, prediction: Option<f64>) -> Applied {
        Applied {
            seq,
            y: vec![y, -y],
            prediction: prediction.map(|p| vec![p, -p]),
            error: prediction.map(|p| 2.0 * (y - p) * (y - p)),
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_entries_in_order_and_serialises_like_events() {
        let mut h = History::new(3, 2);
        assert!(h.recent(10).is_empty());
        let first: Vec<Applied> = (1..=2).map(|s| applied(s, s as f64, None)).collect();
        h.extend(first.iter());
        let more: Vec<Applied> = (3..=5)
            .map(|s| applied(s, s as f64, Some(s as f64 - 0.5)))
            .collect();
        h.extend(more.iter());
        let all = serde_json::to_value(h.recent(10)).unwrap();
        assert_eq!(all, serde_json::to_value(&more).unwrap());
        let last = serde_json::to_value(h.recent(1)).unwrap();
        assert_eq!(last, serde_json::to_value(&more[2..]).unwrap());
        // A group larger than the ring leaves its own newest entries.
        let big: Vec<Applied> = (6..=20).map(|s| applied(s, s as f64, None)).collect();
        h.extend(big.iter());
        let all = serde_json::to_value(h.recent(3)).unwrap();
        assert_eq!(all, serde_json::to_value(&big[12..]).unwrap());
    }

    #[test]
    fn a_ring_of_capacity_zero_keeps_nothing_and_allocates_nothing() {
        let mut h = History::new(0, 1);
        let a = [applied(1, 1.0, Some(1.0))];
        h.extend(a.iter());
        assert!(h.recent(5).is_empty());
        assert!(h.seqs.capacity() == 0 && h.values.capacity() == 0);
        assert_eq!(History::bytes_for(10, 1), 10 * 32);
    }

    #[test]
    fn the_ring_grows_with_what_it_holds_and_never_past_its_capacity() {
        let mut h = History::new(1000, 2);
        let few: Vec<Applied> = (1..=5).map(|s| applied(s, s as f64, None)).collect();
        h.extend(few.iter());
        assert!(h.seqs.capacity() <= 16, "{}", h.seqs.capacity());
        assert_eq!(
            serde_json::to_value(h.recent(10)).unwrap(),
            serde_json::to_value(&few).unwrap()
        );
        // One at a time past the capacity: the buffers stop at it and the ring wraps.
        for s in 6..=2500 {
            h.extend([applied(s, s as f64, Some(0.5))].iter());
        }
        assert_eq!(h.seqs.capacity(), 1000);
        assert_eq!(h.values.capacity(), 1000 * 5);
        let last: Vec<Applied> = (2498..=2500)
            .map(|s| applied(s, s as f64, Some(0.5)))
            .collect();
        assert_eq!(
            serde_json::to_value(h.recent(3)).unwrap(),
            serde_json::to_value(&last).unwrap()
        );
        assert_eq!(h.recent(5000).seqs.first(), Some(&1501));
    }
}
