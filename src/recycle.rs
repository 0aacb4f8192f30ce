//! Buffers filled again once everyone else is done with them. A fresh megabyte from the allocator comes from the
//! OS (buffers this big are handed back, see `main.rs`) and faults in every page: a quarter of a fetch's CPU, 6 %
//! of an upload's, before the pipeline's blocks and the upload's batches were recycled. And where bytes are put,
//! so that copying them runs at full speed ([`append`], [`PageBuffer`]).

use std::collections::VecDeque;

use bytes::BytesMut;

/// The size of a memory page.
const PAGE: usize = 4096;

/// A buffer whose bytes start on a page boundary, to read files into. The kernel copies page-cache pages out with
/// `rep movsb` too: on the AMD EPYC measured, reading a page-cached file into a buffer 1–31 bytes past a page
/// boundary ran at 1.0 GB/s against 5–6.5 GB/s at the boundary, and glibc's allocations of a megabyte and more
/// start 16 bytes past one, just there.
#[derive(Default)]
pub struct PageBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuffer {
    /// `len` zeroed bytes.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0; len + PAGE - 1];
        let start = (PAGE - storage.as_ptr().addr() % PAGE) % PAGE;
        PageBuffer { storage, start, len }
    }

    /// Make the buffer `len` bytes long. Its memory is kept when it has room, and the bytes are then what they
    /// were; otherwise they are new zeroed ones.
    pub fn set_len(&mut self, len: usize) {
        if self.storage.len().saturating_sub(self.start) >= len {
            self.len = len;
        } else {
            *self = PageBuffer::zeroed(len);
        }
    }
}

impl std::ops::Deref for PageBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for PageBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for PageBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuffer").field("len", &self.len).finish_non_exhaustive()
    }
}

impl AsRef<[u8]> for PageBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// The most [`append`] copies in one call: below the smallest size glibc copies with `rep movsb` (2112 bytes, on
/// CPUs with fast short `rep movsb`).
const COPY_PIECE: usize = 2048;

/// Append `bytes` to `buffer`, a few kilobytes at a time. For a copy of 4 KiB up to about the L2 cache's size,
/// glibc 2.36 (Debian 12's, the image's) uses `rep movsb`, which on the AMD EPYC measured runs 10–15 × slower
/// when the destination lies 1–31 bytes past the source modulo a page (1.8–2.7 against 25–31 GB/s): an upload
/// whose form put its bytes at such an offset spent a fifth of its CPU regrouping them. Pieces this small take
/// glibc's vector loop at full speed whatever the offset (the transfer benchmark's first table).
pub fn append(buffer: &mut BytesMut, bytes: &[u8]) {
    buffer.reserve(bytes.len());
    for piece in bytes.chunks(COPY_PIECE) {
        buffer.extend_from_slice(piece);
    }
}

/// Hands out empty buffers of a fixed room, reusing the memory of those handed out lately.
pub struct Recycler {
    /// Empty handles on the memory of recent buffers: one is reclaimed once nothing else points into it.
    recent: VecDeque<BytesMut>,
    keep: usize,
    room: usize,
}

impl Recycler {
    /// Buffers with room for `room` bytes, the last `keep` of them remembered: about as many as are in flight,
    /// else most buffers are still held when they are looked at again.
    pub fn new(keep: usize, room: usize) -> Self {
        Recycler { recent: VecDeque::with_capacity(keep), keep, room }
    }

    /// An empty buffer: a recent one nothing points into any more, else a new one. Room not written to costs no
    /// memory.
    pub fn buffer(&mut self) -> BytesMut {
        for _ in 0..self.recent.len() {
            let mut handle = self.recent.pop_front().expect("counted");
            if handle.try_reclaim(self.room) {
                return handle;
            }
            self.recent.push_back(handle);
        }
        BytesMut::with_capacity(self.room)
    }

    /// What was written into `buffer`, to hand on; its memory is remembered to be filled again.
    pub fn hand_out(&mut self, mut buffer: BytesMut) -> BytesMut {
        let filled = buffer.split();
        if self.recent.len() == self.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(buffer);
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_buffer_starts_on_a_page_and_keeps_its_memory_when_it_has_room() {
        let mut buffer = PageBuffer::zeroed(3 * PAGE + 5);
        assert_eq!((buffer.as_ptr().addr() % PAGE, buffer.len()), (0, 3 * PAGE + 5));
        assert!(buffer.iter().all(|&b| b == 0));
        buffer[7] = 9;
        let at = buffer.as_ptr();
        buffer.set_len(10);
        assert_eq!((buffer.as_ptr(), &buffer[..]), (at, &[0, 0, 0, 0, 0, 0, 0, 9, 0, 0][..]));
        buffer.set_len(3 * PAGE + 5);
        assert_eq!(buffer.as_ptr(), at);
        buffer.set_len(8 * PAGE);
        assert_eq!((buffer.as_ptr().addr() % PAGE, buffer.len()), (0, 8 * PAGE));
        assert!(PageBuffer::default().is_empty());
    }

    #[test]
    fn append_copies_every_byte_in_order() {
        let bytes: Vec<u8> = (0..3 * COPY_PIECE + 17).map(|i| (i % 251) as u8).collect();
        let mut buffer = BytesMut::from(&b"head"[..]);
        append(&mut buffer, &bytes);
        append(&mut buffer, &[]);
        assert_eq!(&buffer[..4], b"head");
        assert_eq!(&buffer[4..], &bytes[..]);
    }

    #[test]
    fn a_buffer_is_filled_again_only_once_nothing_points_into_it() {
        let mut recycler = Recycler::new(2, 1000);
        let mut first = recycler.buffer();
        first.extend_from_slice(&[1; 600]);
        let first = recycler.hand_out(first).freeze();
        let held = first.slice(10..20);
        drop(first);
        // A slice of the first is still held: the next buffer is new memory.
        let second = recycler.buffer();
        assert_ne!(second.as_ptr(), held.as_ptr().wrapping_sub(10));
        let second_at = second.as_ptr();
        drop(recycler.hand_out(second));
        // The second's memory is free again; the first's is not, and what it holds is untouched.
        let third = recycler.buffer();
        assert_eq!(third.as_ptr(), second_at);
        assert!(third.is_empty() && third.capacity() >= 1000);
        assert_eq!(&held[..], &[1u8; 10]);
        // Only the last `keep` are remembered.
        let _ = recycler.hand_out(third);
        let fourth = recycler.buffer();
        let _ = recycler.hand_out(fourth);
        drop(held);
        assert_eq!(recycler.recent.len(), 2);
    }
}
