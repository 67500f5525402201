//! A writer for the "newc" cpio format (the one the kernel unpacks as an initramfs):
//! per entry a 110-byte ASCII header of 13 hex fields, the NUL-terminated name padded to 4
//! bytes, the data padded to 4 bytes; a `TRAILER!!!` entry ends the archive.

use std::io::{self, Read, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writes entries in the order given; parents must come before their children.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    /// A directory owned by root. `path` is relative (`modules`, not `/modules`).
    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.header(path, S_IFDIR | (mode & 0o7777), 0, 2)?;
        Ok(())
    }

    /// A regular file owned by root with exactly `len` bytes from `data`.
    pub(crate) fn file(
        &mut self,
        path: &str,
        mode: u32,
        len: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let size = u32::try_from(len)
            .map_err(|_| io::Error::other(format!("{path}: too large for a cpio entry")))?;
        self.header(path, S_IFREG | (mode & 0o7777), size, 1)?;
        let copied = io::copy(&mut data.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {len} bytes, got {copied}"),
            ));
        }
        self.written += copied;
        self.pad()
    }

    /// A character device node owned by root.
    pub(crate) fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.entry(path, S_IFCHR | (mode & 0o7777), 0, 1, (major, minor))
    }

    /// Writes the trailer and returns the output.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 0, 1)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, nlink: u32) -> io::Result<()> {
        self.entry(name, mode, size, nlink, (0, 0))
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        size: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
    ) -> io::Result<()> {
        if name.starts_with('/') || name.contains('\0') || name.is_empty() {
            return Err(io::Error::other(format!("bad cpio entry name {name:?}")));
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        let name_size = u32::try_from(name.len() + 1).map_err(io::Error::other)?;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            inode, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, name_size, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += 110 + u64::from(name_size);
        self.pad()
    }

    /// Zero bytes up to the next multiple of 4 of everything written.
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.out.write_all(&[0u8; 3][..padding as usize])?;
        self.written += padding;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A newc reader for the tests: (name, mode, data) of every entry before the trailer.
    pub(crate) fn read_entries(mut archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(offset % 4, 0, "entries start 4-aligned");
            assert_eq!(&archive[..6], MAGIC.as_bytes());
            let field = |i: usize| {
                let text = std::str::from_utf8(&archive[6 + 8 * i..14 + 8 * i]).unwrap();
                usize::from_str_radix(text, 16).unwrap()
            };
            let (mode, size, name_size) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&archive[110..110 + name_size - 1])
                .unwrap()
                .to_string();
            assert_eq!(archive[110 + name_size - 1], 0);
            let data_at = (110 + name_size).div_ceil(4) * 4;
            if name == TRAILER {
                return entries;
            }
            let data = archive[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            entries.push((name, mode as u32, data));
            archive = &archive[next..];
            offset += next;
        }
    }

    #[test]
    fn writes_aligned_newc_entries() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.dir("modules", 0o755).unwrap();
        writer.char_device("null", 0o666, 1, 3).unwrap();
        writer.file("init", 0o755, 5, &mut &b"hello"[..]).unwrap();
        writer
            .file("modules/a.ko", 0o644, 0, &mut &b""[..])
            .unwrap();
        let archive = writer.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        assert_eq!(
            read_entries(&archive),
            vec![
                ("modules".to_string(), S_IFDIR | 0o755, vec![]),
                ("null".to_string(), S_IFCHR | 0o666, vec![]),
                ("init".to_string(), S_IFREG | 0o755, b"hello".to_vec()),
                ("modules/a.ko".to_string(), S_IFREG | 0o644, vec![]),
            ]
        );
    }

    #[test]
    fn short_data_and_bad_names_are_errors() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.file("init", 0o755, 10, &mut &b"short"[..]).is_err());
        assert!(writer.dir("/abs", 0o755).is_err());
    }
}
