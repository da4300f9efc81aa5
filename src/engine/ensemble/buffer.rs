//! The storage of an ensemble's particles: one contiguous `J×d` slice of `T`.
//!
//! Out of cache an observation streams the whole ensemble through the core twice (the forward
//! reads it, the update reads and writes it), so every 4 KiB page of it costs a TLB miss per
//! pass: 5,800 pages for J=2000 particles of hidden 32 in `f64`, more than the second-level
//! TLB holds. Big ensembles therefore live in an anonymous mapping advised as huge pages
//! (`MADV_HUGEPAGE`: transparent huge pages, which Linux grants on request in its default
//! `madvise` mode), 2 MiB-aligned so that whole 2 MiB pages fit: a dozen TLB entries instead
//! of thousands. Smaller ones, and any platform or moment where the mapping is refused, use a
//! plain `Vec`. Which storage a buffer has never changes a value.

use std::ops::{Deref, DerefMut};

use crate::engine::real::Real;

/// Buffers of at least this many bytes are mapped with huge pages. Smaller ensembles span
/// few enough small pages for the TLB to hold (and a daemon may hold thousands of them, where
/// a mapping each would only add kernel bookkeeping). Only the 2 MiB-aligned range the buffer
/// uses is advised, so nothing beyond its own bytes becomes resident.
pub const HUGE_MIN_BYTES: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// A fixed-length slice of `T`, zero-initialised.
pub struct ParticleBuf<T> {
    storage: Storage<T>,
    len: usize,
}

enum Storage<T> {
    Heap(Vec<T>),
    #[cfg(target_os = "linux")]
    Mapped {
        map: memmap2::MmapMut,
        /// Where the 2 MiB-aligned slice starts inside the mapping.
        offset: usize,
    },
}

impl<T: Real> ParticleBuf<T> {
    /// The memory a buffer of `len` values may hold: its bytes, and for a mapped one the huge
    /// page its last bytes round up to.
    pub fn resident_bytes(len: usize) -> usize {
        let bytes = len * std::mem::size_of::<T>();
        if bytes >= HUGE_MIN_BYTES {
            bytes.next_multiple_of(HUGE_PAGE) + HUGE_PAGE
        } else {
            bytes
        }
    }

    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len * std::mem::size_of::<T>() >= HUGE_MIN_BYTES
            && let Some(b) = Self::mapped(len)
        {
            return b;
        }
        ParticleBuf {
            storage: Storage::Heap(vec![T::ZERO; len]),
            len,
        }
    }

    /// An anonymous mapping (zero-filled by the kernel) one huge page longer than needed, so
    /// that the slice can start on a 2 MiB boundary; `None` if the kernel refuses it.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<Self> {
        let bytes = len * std::mem::size_of::<T>();
        let map = memmap2::MmapMut::map_anon(bytes + HUGE_PAGE).ok()?;
        let start = map.as_ptr() as usize;
        let offset = start.next_multiple_of(HUGE_PAGE) - start;
        // Advice only: without huge pages the mapping works as well, on small pages.
        if let Err(e) = map.advise_range(memmap2::Advice::HugePage, offset, bytes) {
            tracing::debug!(error = %e, "huge pages not available for an ensemble");
        }
        Some(ParticleBuf {
            storage: Storage::Mapped { map, offset },
            len,
        })
    }

    /// Whether the buffer lives in a mapping advised as huge pages.
    pub fn is_mapped(&self) -> bool {
        !matches!(self.storage, Storage::Heap(_))
    }

    pub fn from_slice(values: &[T]) -> Self {
        let mut b = Self::zeroed(values.len());
        b.copy_from_slice(values);
        b
    }
}

impl<T: Real> Deref for ParticleBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.storage {
            Storage::Heap(v) => v,
            #[cfg(target_os = "linux")]
            Storage::Mapped { map, offset } => {
                let bytes = self.len * std::mem::size_of::<T>();
                bytemuck::cast_slice(&map[*offset..*offset + bytes])
            }
        }
    }
}

impl<T: Real> DerefMut for ParticleBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let len = self.len;
        match &mut self.storage {
            Storage::Heap(v) => v,
            #[cfg(target_os = "linux")]
            Storage::Mapped { map, offset } => {
                let bytes = len * std::mem::size_of::<T>();
                bytemuck::cast_slice_mut(&mut map[*offset..*offset + bytes])
            }
        }
    }
}

impl<T: Real> Clone for ParticleBuf<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T> std::fmt::Debug for ParticleBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticleBuf")
            .field("len", &self.len)
            .field("mapped", &!matches!(self.storage, Storage::Heap(_)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_buffers_are_mapped_and_read_back_what_was_written() {
        for len in [10usize, HUGE_MIN_BYTES / 8 + 3] {
            let mut b = ParticleBuf::<f64>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            #[cfg(target_os = "linux")]
            assert_eq!(b.is_mapped(), len * 8 >= HUGE_MIN_BYTES);
            for (i, v) in b.iter_mut().enumerate() {
                *v = i as f64;
            }
            let c = b.clone();
            assert_eq!(c.len(), len);
            assert!(c.iter().enumerate().all(|(i, &v)| v == i as f64));
            // A mapped buffer starts on a huge-page boundary, so whole 2 MiB pages can back it.
            if c.is_mapped() {
                assert_eq!(c.as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
        let f = ParticleBuf::<f32>::from_slice(&[1.5, -2.0, 3.25]);
        assert_eq!(&f[..], &[1.5, -2.0, 3.25]);
    }
}
