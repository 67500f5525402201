//! One output stream of a command: the newest `cap` bytes, addressed by absolute byte offset.

use std::collections::VecDeque;

/// Smallest buffer we accept: a reader must always be able to make progress by a whole chunk.
pub const MIN_CAP: usize = 64 * 1024;
/// Largest buffer we accept, whatever the host asks: bounds the agent's memory per stream.
pub const MAX_CAP: usize = 1 << 30;

/// A byte window `[start, end)` of one output stream.
#[derive(Debug)]
pub struct OutputBuffer {
    bytes: VecDeque<u8>,
    /// Absolute offset of `bytes[0]`.
    start: u64,
    cap: usize,
    eof: bool,
}

/// Output text ready for a WebSocket message: whole characters only.
#[derive(Debug, PartialEq, Eq)]
pub struct TextChunk {
    /// Offset of the first raw byte of `data`.
    pub offset: u64,
    pub data: String,
    /// Offset just past the last raw byte consumed.
    pub next: u64,
}

impl OutputBuffer {
    pub fn new(cap: u64) -> Self {
        let cap = usize::try_from(cap)
            .unwrap_or(MAX_CAP)
            .clamp(MIN_CAP, MAX_CAP);
        OutputBuffer {
            bytes: VecDeque::new(),
            start: 0,
            cap,
            eof: false,
        }
    }

    #[cfg(test)]
    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    pub fn is_eof(&self) -> bool {
        self.eof
    }

    pub fn mark_eof(&mut self) {
        self.eof = true;
    }

    /// How many bytes may be appended without evicting anything at or above `floor` (the
    /// lowest offset some attached client still needs).
    pub fn room(&self, floor: u64) -> usize {
        let floor = floor.clamp(self.start, self.end());
        let pinned = usize::try_from(self.end() - floor).unwrap_or(usize::MAX);
        self.cap.saturating_sub(pinned)
    }

    /// Appends `data`, evicting the oldest bytes beyond the cap.
    pub fn append(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(self.cap);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.start += excess as u64;
        }
    }

    /// Up to `max` raw bytes from `cursor` (or from the earliest byte kept, if `cursor` was
    /// evicted). `None` when nothing is available yet.
    pub fn raw_chunk(&self, cursor: u64, max: usize) -> Option<(u64, Vec<u8>)> {
        let from = cursor.max(self.start);
        if from >= self.end() {
            return None;
        }
        let to = self.end().min(from.saturating_add(max as u64));
        Some((from, self.copy(from, to)))
    }

    /// Up to `max` raw bytes from `cursor` as text, cut on a character boundary. `realign` says
    /// `cursor` came from outside (a client's resume offset) and may sit inside a character.
    /// Invalid bytes become U+FFFD but still count in the offsets.
    pub fn text_chunk(&self, cursor: u64, max: usize, realign: bool) -> Option<TextChunk> {
        let mut from = cursor.max(self.start);
        if realign || from != cursor {
            from = self.skip_continuation_bytes(from)?;
        }
        if from >= self.end() {
            return None;
        }
        let to = self.end().min(from.saturating_add(max as u64));
        let mut raw = self.copy(from, to);
        if to < self.end() || !self.eof {
            // Keep a character split by the window (or not fully written yet) for next time.
            raw.truncate(complete_prefix_len(&raw));
        }
        if raw.is_empty() {
            return None;
        }
        let next = from + raw.len() as u64;
        let data = String::from_utf8(raw)
            .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned());
        Some(TextChunk {
            offset: from,
            data,
            next,
        })
    }

    /// Everything kept, as text (for `POST /execute`, which answers once at the end).
    pub fn all_text(&self) -> String {
        let mut text = String::new();
        let mut cursor = self.start;
        let mut realign = true;
        while let Some(chunk) = self.text_chunk(cursor, usize::MAX / 2, realign) {
            text.push_str(&chunk.data);
            cursor = chunk.next;
            realign = false;
        }
        text
    }

    /// The first offset at or after `from` that does not continue a character (at most three
    /// bytes on). `None` when we cannot tell yet because the buffer ends first.
    fn skip_continuation_bytes(&self, from: u64) -> Option<u64> {
        let mut at = from;
        while at < self.end() && at - from < 3 && is_continuation(self.byte(at)) {
            at += 1;
        }
        if at == self.end() && at > from && !self.eof {
            return None;
        }
        Some(at)
    }

    fn byte(&self, offset: u64) -> u8 {
        self.bytes[(offset - self.start) as usize]
    }

    fn copy(&self, from: u64, to: u64) -> Vec<u8> {
        let (from, to) = ((from - self.start) as usize, (to - self.start) as usize);
        let (front, back) = self.bytes.as_slices();
        let mut out = Vec::with_capacity(to - from);
        if from < front.len() {
            out.extend_from_slice(&front[from..to.min(front.len())]);
        }
        if to > front.len() {
            out.extend_from_slice(&back[from.saturating_sub(front.len())..to - front.len()]);
        }
        out
    }
}

fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// Length of `raw` without a trailing, incomplete multi-byte character.
fn complete_prefix_len(raw: &[u8]) -> usize {
    let tail_start = raw.len().saturating_sub(4);
    for lead_at in (tail_start..raw.len()).rev() {
        let byte = raw[lead_at];
        if is_continuation(byte) {
            continue;
        }
        let width = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if lead_at + width > raw.len() {
            lead_at
        } else {
            raw.len()
        };
    }
    raw.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer_with(data: &[u8], eof: bool) -> OutputBuffer {
        let mut buffer = OutputBuffer::new(0);
        buffer.append(data);
        if eof {
            buffer.mark_eof();
        }
        buffer
    }

    #[test]
    fn evicts_the_oldest_bytes_beyond_the_cap() {
        let mut buffer = OutputBuffer::new(0);
        buffer.append(&vec![b'a'; MIN_CAP]);
        buffer.append(b"bcd");
        assert_eq!(buffer.start(), 3);
        assert_eq!(buffer.end(), MIN_CAP as u64 + 3);
        let (offset, bytes) = buffer.raw_chunk(0, 10).unwrap();
        assert_eq!((offset, bytes.len()), (3, 10));
    }

    #[test]
    fn room_counts_only_bytes_a_client_still_needs() {
        let mut buffer = OutputBuffer::new(0);
        buffer.append(&vec![b'a'; 1000]);
        assert_eq!(buffer.room(0), MIN_CAP - 1000);
        assert_eq!(buffer.room(600), MIN_CAP - 400);
        assert_eq!(buffer.room(u64::MAX), MIN_CAP);
    }

    #[test]
    fn text_chunks_hold_back_a_split_character_until_it_completes() {
        let euro = "€".as_bytes();
        let mut buffer = buffer_with(&[b'x', euro[0], euro[1]], false);
        let chunk = buffer.text_chunk(0, 100, false).unwrap();
        assert_eq!((chunk.data.as_str(), chunk.next), ("x", 1));
        assert_eq!(buffer.text_chunk(1, 100, false), None);
        buffer.append(&euro[2..]);
        let chunk = buffer.text_chunk(1, 100, false).unwrap();
        assert_eq!((chunk.data.as_str(), chunk.offset, chunk.next), ("€", 1, 4));
    }

    #[test]
    fn window_cut_inside_a_character_moves_back_to_its_start() {
        let buffer = buffer_with("a€b".as_bytes(), true);
        let chunk = buffer.text_chunk(0, 2, false).unwrap();
        assert_eq!((chunk.data.as_str(), chunk.next), ("a", 1));
    }

    #[test]
    fn resume_inside_a_character_skips_to_the_next_one() {
        let buffer = buffer_with("€b".as_bytes(), true);
        let chunk = buffer.text_chunk(1, 100, true).unwrap();
        assert_eq!((chunk.data.as_str(), chunk.offset), ("b", 3));
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_but_keep_offsets() {
        let buffer = buffer_with(&[b'a', 0xFF, b'b'], true);
        let chunk = buffer.text_chunk(0, 100, false).unwrap();
        assert_eq!((chunk.data.as_str(), chunk.next), ("a\u{FFFD}b", 3));
    }

    #[test]
    fn incomplete_character_at_eof_is_flushed_as_replacement() {
        let buffer = buffer_with(&"€".as_bytes()[..2], true);
        let chunk = buffer.text_chunk(0, 100, false).unwrap();
        assert_eq!((chunk.data.as_str(), chunk.next), ("\u{FFFD}", 2));
    }

    #[test]
    fn copies_across_the_ring_wrap() {
        let mut buffer = OutputBuffer::new(0);
        buffer.append(&vec![b'a'; MIN_CAP]);
        buffer.append(&[b'b'; 100]);
        let (_, bytes) = buffer.raw_chunk(MIN_CAP as u64 - 10, 50).unwrap();
        assert_eq!(&bytes[..10], &[b'a'; 10]);
        assert_eq!(&bytes[10..], &[b'b'; 40]);
    }
}
