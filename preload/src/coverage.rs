//! `cowctl run --coverage`: which private writable memory cow.ko covers, and why the rest is not.
//!
//! At exit (`COW_COVERAGE=FILE`) every private writable mapping of the process is written to
//! FILE, one per line: `START END covered|uncovered REASON NAME` (tab-separated, addresses in
//! hex). Nothing is silently missing: a mapping is `covered` only when it is `/dev/cow` memory.

use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;

/// Why a private writable mapping is not covered (`None`: it is).
fn why_uncovered(
    m: &cow::maps::Mapping,
    name: &[u8],
    previous: Option<&cow::maps::Mapping>,
) -> Option<&'static str> {
    if m.dev_cow {
        return None;
    }
    let (book_start, book_end) = cow::book::book().range();
    Some(if name == b"[stack]" {
        "stack of the main thread (stacks are not covered: a restore cannot rewind registers)"
    } else if m.start < book_end && book_start < m.end {
        "libcow's own bookkeeping (the book)"
    } else if is_own(m.start) {
        "libcow_preload's own state"
    } else if libcow_thread_stacks()
        .iter()
        .any(|&sp| (m.start..m.end).contains(&sp))
    {
        "stack of a libcow thread (the control or checkpointer thread; stacks are not covered)"
    } else if previous.is_some_and(|p| p.end == m.start && p.prot == 0 && !m.file) {
        "stack of a thread of the program (glibc maps it without an interposable call; \
         stacks are not covered)"
    } else if m.file {
        "a private file mapping made writable by mprotect (only writable ones are moved in)"
    } else {
        "anonymous memory mapped by a direct system call, or before libcow_preload started"
    })
}

/// Stack pointers of libcow's own threads (named `libcow-…`), blocked in a system call as
/// they are when the program exits: `/proc/self/task/TID/syscall` ends with `SP PC`.
fn libcow_thread_stacks() -> Vec<usize> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("libcow"))
        })
        .filter_map(|t| {
            let line = std::fs::read_to_string(t.path().join("syscall")).ok()?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let sp = fields.get(fields.len().checked_sub(2)?)?;
            usize::from_str_radix(sp.trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

/// Whether `addr` belongs to this library's own segments.
fn is_own(addr: usize) -> bool {
    // SAFETY: dladdr fills `info` for any address; both calls only read the loader's tables.
    unsafe {
        let mut mine: libc::Dl_info = std::mem::zeroed();
        let mut there: libc::Dl_info = std::mem::zeroed();
        libc::dladdr(is_own as *const libc::c_void, &mut mine);
        libc::dladdr(addr as *const libc::c_void, &mut there) != 0
            && there.dli_fbase == mine.dli_fbase
    }
}

/// Writes the coverage of the process's private writable memory to `COW_COVERAGE`, if set
/// (only in the process `cowctl run` started, as the exit report).
pub(crate) fn write_at_exit() {
    let Some(path) = crate::raw::env_bytes(c"COW_COVERAGE") else {
        return;
    };
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
    if let Some(parent) = crate::raw::env_u64(c"COW_REPORT_PARENT") {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } as u64 != parent {
            return;
        }
    }
    let mut out = Vec::new();
    let mut previous: Option<cow::maps::Mapping> = None;
    let (book_start, book_end) = cow::book::book().range();
    let read = cow::maps::for_each_named(|m, name| {
        if m.is_writable() && (!m.shared || m.dev_cow) && !m.special || name == b"[stack]" {
            // The kernel may have merged a neighbour into the book's VMA: report the book
            // apart from the rest.
            let cuts = [
                m.start,
                book_start.clamp(m.start, m.end),
                book_end.clamp(m.start, m.end),
                m.end,
            ];
            for w in cuts.windows(2).filter(|w| w[0] < w[1]) {
                let piece = cow::maps::Mapping {
                    start: w[0],
                    end: w[1],
                    ..m
                };
                let why = why_uncovered(&piece, name, previous.as_ref());
                let state = if why.is_some() {
                    "uncovered"
                } else {
                    "covered"
                };
                let name = String::from_utf8_lossy(name);
                let why = why.unwrap_or("-");
                let _ = writeln!(out, "{:x}\t{:x}\t{state}\t{why}\t{name}", w[0], w[1]);
            }
        }
        previous = Some(m);
    });
    if let Err(e) = read.and_then(|()| std::fs::write(path, &out)) {
        eprintln!(
            "libcow_preload: cannot write the coverage to {}: {e}",
            path.display()
        );
    }
}
