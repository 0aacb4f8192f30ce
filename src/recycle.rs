//! Buffers filled again once everyone else is done with them. A fresh megabyte from the allocator comes from the
//! OS (buffers this big are handed back, see `main.rs`) and faults in every page: a quarter of a fetch's CPU, 6 %
//! of an upload's, before the pipeline's blocks and the upload's batches were recycled. And how bytes are copied
//! into them ([`append`]).

use std::collections::VecDeque;

use bytes::BytesMut;

/// The most [`append`] copies in one call.
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
