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
    /// Backed by a file (inode ≠ 0), as opposed to anonymous memory.
    pub file: bool,
    /// The program break's heap (`[heap]`).
    pub heap: bool,
}

impl Mapping {
    /// Whether the program may write it (`PROT_WRITE`).
    pub fn is_writable(&self) -> bool {
        self.prot & libc::PROT_WRITE != 0
    }
}

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// The process's mappings, in address order.
pub fn read() -> std::io::Result<BookVec<Mapping>> {
    read_path(c"/proc/self/maps")
}

/// Process `pid`'s mappings, in address order (reading them needs ptrace rights over it).
pub fn read_of(pid: i32) -> std::io::Result<BookVec<Mapping>> {
    let path = std::ffi::CString::new(format!("/proc/{pid}/maps")).expect("no NUL");
    read_path(&path)
}

fn read_path(path: &std::ffi::CStr) -> std::io::Result<BookVec<Mapping>> {
    let mut out = BookVec::new();
    for_each_in(path, |m, _| out.push(m))?;
    Ok(out)
}

/// Calls `f` with each mapping of the process and its name (the path, `[stack]`, … or empty),
/// in address order. Allocates only in the book.
pub fn for_each_named(f: impl FnMut(Mapping, &[u8])) -> std::io::Result<()> {
    for_each_in(c"/proc/self/maps", f)
}

fn for_each_in(path: &std::ffi::CStr, mut f: impl FnMut(Mapping, &[u8])) -> std::io::Result<()> {
    let text = read_file(path)?;
    for line in text.as_slice().split(|&b| b == b'\n') {
        if let Some((m, name)) = parse_line_named(line) {
            f(m, name);
        }
    }
    Ok(())
}

/// `struct procmap_query` (Linux 6.11+): one mapping of `/proc/PID/maps`, asked by address.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `PROCMAP_QUERY` = `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u32 = cow_abi::ioc(
    cow_abi::IOC_READ | cow_abi::IOC_WRITE,
    b'f' as u32,
    17,
    std::mem::size_of::<ProcmapQuery>(),
);
const VMA_READABLE: u64 = 0x01;
const VMA_WRITABLE: u64 = 0x02;
const VMA_EXECUTABLE: u64 = 0x04;
const VMA_SHARED: u64 = 0x08;
/// The mapping at the address, or else the next one.
const COVERING_OR_NEXT_VMA: u64 = 0x10;

/// The process's **writable** mappings, in address order: what [`read`] returns, less the
/// mappings without write permission. Asked from the kernel with `PROCMAP_QUERY`, which skips
/// the others and formats no text (a third of the cost of reading redis' 131-line maps); the
/// text is read instead where the kernel lacks it.
pub fn read_writable() -> std::io::Result<BookVec<Mapping>> {
    static MAPS: crate::sys::ProcSelfFile =
        crate::sys::ProcSelfFile::new(c"/proc/self/maps", libc::O_RDONLY, 2);
    let fd = MAPS.fd()?;
    let mut out = BookVec::new();
    let mut name = [0u8; 512];
    let mut addr = 0u64;
    let (start_stack, start_brk) = stack_and_heap_starts();
    // SAFETY: brk(0) only reports the current break.
    let brk = unsafe { libc::syscall(libc::SYS_brk, 0) } as u64;
    let result = loop {
        // Without the name first: the kernel formats it (a path lookup for a file), a fifth of
        // the query's cost, and it is needed only for a shared file mapping (`/dev/cow`).
        let mut q = query(fd, addr, None);
        if q.as_ref()
            .is_ok_and(|q| q.vma_flags & VMA_SHARED != 0 && q.inode != 0)
        {
            q = query(fd, addr, Some(&mut name));
        }
        let q = match q {
            Ok(q) => q,
            Err(e) => {
                break match e.raw_os_error() {
                    Some(libc::ENOENT) => Ok(()), // No writable mapping at or after `addr`.
                    // The kernel has no PROCMAP_QUERY (before 6.11) or no name this short: the
                    // text.
                    Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENAMETOOLONG) => Err(None),
                    _ => Err(Some(e)),
                };
            }
        };
        let name_len = (q.vma_name_size as usize).saturating_sub(1).min(name.len());
        let name = &name[..name_len];
        let mut prot = 0;
        for (flag, bit) in [
            (VMA_READABLE, libc::PROT_READ),
            (VMA_WRITABLE, libc::PROT_WRITE),
            (VMA_EXECUTABLE, libc::PROT_EXEC),
        ] {
            if q.vma_flags & flag != 0 {
                prot |= bit;
            }
        }
        let anonymous = q.inode == 0;
        // The kernel's own tests for the names `[stack]` and `[heap]`.
        let stack = anonymous && q.vma_start <= start_stack && q.vma_end >= start_stack;
        let heap = anonymous && !stack && q.vma_start < brk && q.vma_end > start_brk;
        out.push(Mapping {
            start: q.vma_start as usize,
            end: q.vma_end as usize,
            prot,
            shared: q.vma_flags & VMA_SHARED != 0,
            special: stack || is_special(name),
            offset: q.vma_offset,
            dev_cow: name == b"/dev/cow",
            file: !anonymous,
            heap,
        });
        addr = q.vma_end;
    };
    match result {
        Ok(()) => Ok(out),
        Err(Some(e)) => Err(e),
        Err(None) => {
            let mut all = read()?;
            all.retain(Mapping::is_writable);
            Ok(all)
        }
    }
}

/// The writable mapping at or after `addr` (`PROCMAP_QUERY`), its name into `name` if given.
fn query(fd: i32, addr: u64, name: Option<&mut [u8; 512]>) -> std::io::Result<ProcmapQuery> {
    let (name_size, name_addr) = name.map_or((0, 0), |n| (n.len() as u32, n.as_mut_ptr() as u64));
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_flags: COVERING_OR_NEXT_VMA | VMA_WRITABLE,
        query_addr: addr,
        vma_name_size: name_size,
        vma_name_addr: name_addr,
        ..Default::default()
    };
    // SAFETY: PROCMAP_QUERY reads and fills `q` and writes at most `vma_name_size` bytes of
    // the name into the caller's buffer (none without one).
    if unsafe { libc::ioctl(fd, PROCMAP_QUERY as libc::c_ulong, &mut q) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(q)
}

/// `mm->start_stack` and `mm->start_brk`, fields 28 and 47 of `/proc/self/stat` (set at exec):
/// the kernel names the anonymous mapping holding the first `[stack]`, the one spanning
/// `start_brk..brk` `[heap]`. Read once per process (0, 0 if unreadable: no mapping is then
/// taken for either).
fn stack_and_heap_starts() -> (u64, u64) {
    // Keyed by pid: a forked child has the same values, an exec'ed program re-reads them
    // anyway (these statics start at zero again).
    static PID: AtomicI32 = AtomicI32::new(0);
    static STACK: AtomicU64 = AtomicU64::new(0);
    static BRK: AtomicU64 = AtomicU64::new(0);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if PID.load(Ordering::Acquire) == pid {
        return (STACK.load(Ordering::Acquire), BRK.load(Ordering::Acquire));
    }
    let Ok(stat) = read_file(c"/proc/self/stat") else {
        return (0, 0);
    };
    let stat = stat.as_slice();
    // Fields from the third on follow the last ')' (the name may hold anything).
    let Some(close) = stat.iter().rposition(|&b| b == b')') else {
        return (0, 0);
    };
    let field = |n: usize| -> u64 {
        stat[close + 1..]
            .split(|&b| b == b' ')
            .filter(|f| !f.is_empty())
            .nth(n - 3)
            .and_then(|f| std::str::from_utf8(f).ok()?.trim().parse().ok())
            .unwrap_or(0)
    };
    let (stack, brk) = (field(28), field(47));
    STACK.store(stack, Ordering::Release);
    BRK.store(brk, Ordering::Release);
    PID.store(pid, Ordering::Release);
    (stack, brk)
}

/// Whether a mapping's name is one of the kernel's special ones (`[stack]`, `[vdso]`, …) rather
/// than the heap or a named anonymous mapping.
fn is_special(name: &[u8]) -> bool {
    name.first() == Some(&b'[') && !name.starts_with(b"[heap]") && !name.starts_with(b"[anon")
}

pub(crate) fn read_file(path: &std::ffi::CStr) -> std::io::Result<BookVec<u8>> {
    let file = crate::sys::RawFile::open(path, libc::O_RDONLY)?;
    let mut buf: BookVec<u8> = BookVec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn hex(s: &[u8]) -> Option<usize> {
    let mut v = 0usize;
    for &c in s {
        v = v.checked_mul(16)? + (c as char).to_digit(16)? as usize;
    }
    Some(v)
}

/// Parses `start-end perms offset dev inode [name]`.
#[cfg(test)]
fn parse_line(line: &[u8]) -> Option<Mapping> {
    parse_line_named(line).map(|(m, _)| m)
}

/// Parses a line into the mapping and its name.
fn parse_line_named(line: &[u8]) -> Option<(Mapping, &[u8])> {
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
    let _dev = fields.next()?;
    let inode = fields.next()?;
    // The name is the rest of the line (a path may contain spaces).
    let name = match fields.next() {
        Some(first) => {
            let at = first.as_ptr() as usize - line.as_ptr() as usize;
            &line[at..]
        }
        None => &[],
    };
    let special = is_special(name);
    let dev_cow = name == b"/dev/cow";
    Some((
        Mapping {
            start,
            end,
            prot,
            shared,
            special,
            offset,
            dev_cow,
            file: inode != b"0",
            heap: name == b"[heap]",
        },
        name,
    ))
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
    fn the_query_returns_the_writable_lines_of_the_text() {
        // Both read twice, in opposite orders, so a mapping made in between (a test thread's
        // allocation) shows up as a difference in at most one pair.
        let agree = || {
            let fast = read_writable().unwrap();
            let mut text = read().unwrap();
            text.retain(Mapping::is_writable);
            fast.as_slice() == text.as_slice()
        };
        assert!((0..5).any(|_| agree()));
        assert!(read_writable()
            .unwrap()
            .as_slice()
            .iter()
            .any(|m| m.special));
    }

    #[test]
    fn reads_own_maps() {
        let maps = read().unwrap();
        assert!(maps.as_slice().iter().any(|m| m.special));
        assert!(maps.as_slice().windows(2).all(|w| w[0].start < w[1].start));
    }
}
