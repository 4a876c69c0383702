//! `/proc/self/maps`, read and parsed without touching the covered heap.

use crate::book::BookVec;

/// One line of `/proc/self/maps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: usize,
    /// End (exclusive).
    pub end: usize,
    /// `PROT_*` bits.
    pub prot: i32,
    /// `MAP_SHARED` (as opposed to private).
    pub shared: bool,
    /// A named special mapping: `[stack]`, `[vvar]`, `[vdso]`, `[vsyscall]` and the like.
    pub special: bool,
    /// The file offset column (for `/dev/cow`: the space's base plus the region's offset).
    pub offset: u64,
    /// A mapping of `/dev/cow`.
    pub dev_cow: bool,
}

/// The process's mappings, in address order.
pub fn read() -> std::io::Result<BookVec<Mapping>> {
    let text = read_file(c"/proc/self/maps")?;
    let mut out = BookVec::new();
    for line in text.as_slice().split(|&b| b == b'\n') {
        if let Some(m) = parse_line(line) {
            out.push(m);
        }
    }
    Ok(out)
}

fn read_file(path: &std::ffi::CStr) -> std::io::Result<BookVec<u8>> {
    // SAFETY: open with a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf: BookVec<u8> = BookVec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // SAFETY: reading into a stack buffer of its own size.
        let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // SAFETY: closing our descriptor.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n as usize]);
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    Ok(buf)
}

fn hex(s: &[u8]) -> Option<usize> {
    let mut v = 0usize;
    for &c in s {
        v = v.checked_mul(16)? + (c as char).to_digit(16)? as usize;
    }
    Some(v)
}

/// Parses `start-end perms offset dev inode [name]`.
fn parse_line(line: &[u8]) -> Option<Mapping> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let perms = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    let mut prot = 0;
    if perms.first() == Some(&b'r') {
        prot |= libc::PROT_READ;
    }
    if perms.get(1) == Some(&b'w') {
        prot |= libc::PROT_WRITE;
    }
    if perms.get(2) == Some(&b'x') {
        prot |= libc::PROT_EXEC;
    }
    let shared = perms.get(3) == Some(&b's');
    let offset = hex(fields.next()?)? as u64;
    let name = fields.nth(2).unwrap_or(&[]);
    let special =
        name.first() == Some(&b'[') && !name.starts_with(b"[heap]") && !name.starts_with(b"[anon");
    let dev_cow = name == b"/dev/cow";
    Some(Mapping {
        start,
        end,
        prot,
        shared,
        special,
        offset,
        dev_cow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let m = parse_line(b"7f00-7f10 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            (m.start, m.end, m.prot, m.shared, m.special),
            (0x7f00, 0x7f10, 3, false, false)
        );
        let m = parse_line(b"55aa000-55ab000 rw-p 00000000 00:00 0    [heap]").unwrap();
        assert!(!m.special);
        let m = parse_line(b"7ffc0000-7ffc1000 rw-p 00000000 00:00 0   [stack]").unwrap();
        assert!(m.special);
        let m = parse_line(b"1000-2000 r--s 100000003000 00:08 601  /dev/cow").unwrap();
        assert!(m.shared && m.dev_cow);
        assert_eq!(m.offset, 0x1000_0000_3000);
        assert_eq!(m.prot, libc::PROT_READ);
    }

    #[test]
    fn reads_own_maps() {
        let maps = read().unwrap();
        assert!(maps.as_slice().iter().any(|m| m.special));
        assert!(maps.as_slice().windows(2).all(|w| w[0].start < w[1].start));
    }
}
