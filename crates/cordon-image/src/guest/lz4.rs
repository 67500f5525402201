//! Decompression of the LZ4 "legacy" stream format, the one Linux uses for an LZ4-compressed
//! kernel (Debian's cloud kernel is one): magic `0x184C2102`, then blocks of a 4-byte
//! little-endian compressed size and one raw LZ4 block each (at most 8 MiB decompressed).
//! Written out here because it is short and no well-kept crate reads the legacy framing.

/// The legacy stream's magic number, little-endian.
pub(crate) const LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Largest decompressed legacy block.
const BLOCK_MAX: usize = 8 << 20;
/// Largest compressed size of such a block (LZ4_compressBound).
const COMPRESSED_BLOCK_MAX: usize = BLOCK_MAX + BLOCK_MAX / 255 + 16;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Lz4Error {
    #[error("not an LZ4 legacy stream")]
    NotLegacy,
    #[error("corrupt LZ4 block")]
    Corrupt,
    #[error("decompressed data exceeds {0} bytes")]
    TooLarge(usize),
}

/// Decompresses a legacy stream, stopping at the first word that is not a plausible block
/// size (the kernel appends the decompressed length after the last block). At most `limit`
/// bytes of output.
pub(crate) fn decompress_legacy(input: &[u8], limit: usize) -> Result<Vec<u8>, Lz4Error> {
    let mut rest = input
        .strip_prefix(&LEGACY_MAGIC)
        .ok_or(Lz4Error::NotLegacy)?;
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let (size, after) = rest.split_at(4);
        if size == LEGACY_MAGIC {
            rest = after; // concatenated streams
            continue;
        }
        let size = u32::from_le_bytes(size.try_into().expect("4 bytes")) as usize;
        if size == 0 || size > COMPRESSED_BLOCK_MAX || size > after.len() {
            break;
        }
        decompress_block(&after[..size], &mut out, limit)?;
        rest = &after[size..];
    }
    if out.is_empty() {
        return Err(Lz4Error::Corrupt);
    }
    Ok(out)
}

/// Appends one raw LZ4 block's output to `out`.
fn decompress_block(mut block: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), Lz4Error> {
    loop {
        let (&token, rest) = block.split_first().ok_or(Lz4Error::Corrupt)?;
        block = rest;
        let literals = extended_length(usize::from(token >> 4), &mut block)?;
        let (literal_bytes, rest) = block.split_at_checked(literals).ok_or(Lz4Error::Corrupt)?;
        grow(out, literals, limit)?;
        out.extend_from_slice(literal_bytes);
        block = rest;
        if block.is_empty() {
            return Ok(()); // the last sequence has literals only
        }
        let (offset, rest) = block.split_at_checked(2).ok_or(Lz4Error::Corrupt)?;
        block = rest;
        let offset = usize::from(u16::from_le_bytes([offset[0], offset[1]]));
        let length = extended_length(usize::from(token & 0xf), &mut block)? + 4;
        if offset == 0 || offset > out.len() {
            return Err(Lz4Error::Corrupt);
        }
        grow(out, length, limit)?;
        // The match may overlap what it produces (offset < length): copy byte by byte.
        let start = out.len() - offset;
        for i in 0..length {
            out.push(out[start + i]);
        }
    }
}

/// A 4-bit length; 15 means more bytes follow, each added, until one below 255.
fn extended_length(mut length: usize, block: &mut &[u8]) -> Result<usize, Lz4Error> {
    if length == 15 {
        loop {
            let (&byte, rest) = block.split_first().ok_or(Lz4Error::Corrupt)?;
            *block = rest;
            length = length
                .checked_add(usize::from(byte))
                .ok_or(Lz4Error::Corrupt)?;
            if byte != 255 {
                break;
            }
        }
    }
    Ok(length)
}

fn grow(out: &mut Vec<u8>, more: usize, limit: usize) -> Result<(), Lz4Error> {
    if out.len().saturating_add(more) > limit {
        return Err(Lz4Error::TooLarge(limit));
    }
    out.reserve(more);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lz4 -l -9` of TEXT (LZ4 1.9.4), with the decompressed size appended as the kernel
    /// build does.
    const COMPRESSED: &[u8] = &[
        0x02, 0x21, 0x4c, 0x18, 0x28, 0x00, 0x00, 0x00, 0x6e, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x20,
        0x06, 0x00, 0x5f, 0x77, 0x6f, 0x72, 0x6c, 0x64, 0x06, 0x00, 0x00, 0xa8, 0x30, 0x31, 0x32,
        0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x0b, 0x00, 0x03, 0x34, 0x00, 0x50, 0x6f, 0x72,
        0x6c, 0x64, 0x0a, 0x52, 0x00, 0x00, 0x00,
    ];
    const TEXT: &[u8] =
        b"hello hello hello hello world world world world 0123456789 0123456789 hello world\n";

    #[test]
    fn decompresses_a_legacy_stream_and_stops_at_the_size_trailer() {
        assert_eq!(decompress_legacy(COMPRESSED, 1 << 20).unwrap(), TEXT);
    }

    #[test]
    fn output_is_bounded() {
        assert_eq!(
            decompress_legacy(COMPRESSED, 10),
            Err(Lz4Error::TooLarge(10))
        );
    }

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        assert_eq!(decompress_legacy(b"nope", 100), Err(Lz4Error::NotLegacy));
        for cut in 4..COMPRESSED.len() {
            let mut damaged = COMPRESSED[..cut].to_vec();
            let _ = decompress_legacy(&damaged, 1 << 20);
            damaged.extend_from_slice(&COMPRESSED[cut..]);
            let at = cut.min(damaged.len() - 1);
            damaged[at] ^= 0xff;
            let _ = decompress_legacy(&damaged, 1 << 20);
        }
    }
}
