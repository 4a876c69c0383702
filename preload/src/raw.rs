//! Allocation-free helpers: this library runs inside `malloc`, where nothing may allocate.

/// Writes bytes to stderr with write(2).
pub(crate) fn write_stderr(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to descriptor 2; errors are ignored (nowhere to report).
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" {
    static environ: *const *const std::ffi::c_char;
}

/// Reads an environment variable without allocating.
pub(crate) fn env_bytes(name: &std::ffi::CStr) -> Option<&'static [u8]> {
    // `environ` itself, not getenv: a program may define its own getenv (bash does, answering
    // from shell variables it has not set up yet when we run).
    let name = name.to_bytes();
    // SAFETY: `environ` is the NULL-terminated array of NUL-terminated strings of the process,
    // read without modification during start-up (the first malloc or our constructor); the
    // strings are never freed (a program's setenv replaces pointers, not bytes).
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = std::ffi::CStr::from_ptr(*p).to_bytes();
            if entry.len() > name.len() && entry.starts_with(name) && entry[name.len()] == b'=' {
                return Some(&entry[name.len() + 1..]);
            }
            p = p.add(1);
        }
    }
    None
}

/// Reads a decimal environment variable without allocating.
pub(crate) fn env_u64(name: &std::ffi::CStr) -> Option<u64> {
    let s = env_bytes(name)?;
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// libc's definition of `name` (the next one after ours), cached in `slot`; 0 if none.
pub(crate) fn next(slot: &std::sync::atomic::AtomicUsize, name: &std::ffi::CStr) -> usize {
    use std::sync::atomic::Ordering;
    let mut f = slot.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        slot.store(f, Ordering::Release);
    }
    f
}

/// A system call's result: the value, or `-errno` (without going through libc's wrappers,
/// which libcow_preload interposes).
fn syscall_result(r: libc::c_long) -> isize {
    if r == -1 {
        // SAFETY: reading the calling thread's errno, which `syscall` just set.
        -(unsafe { *libc::__errno_location() }) as isize
    } else {
        r as isize
    }
}

/// `mmap(2)` itself.
pub(crate) fn sys_mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> isize {
    // SAFETY: the mmap system call with plain integer arguments; it maps nothing the caller did
    // not ask for.
    syscall_result(unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) })
}

/// `munmap(2)` itself.
pub(crate) fn sys_munmap(addr: usize, len: usize) -> isize {
    // SAFETY: the caller gives the range up.
    syscall_result(unsafe { libc::syscall(libc::SYS_munmap, addr, len) })
}

/// `mprotect(2)` itself.
pub(crate) fn sys_mprotect(addr: usize, len: usize, prot: i32) -> isize {
    // SAFETY: changes only the protection of the caller's range.
    syscall_result(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) })
}

/// `mremap(2)` itself.
pub(crate) fn sys_mremap(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new: usize,
) -> isize {
    // SAFETY: the caller owns the old range and, with MREMAP_FIXED, gives the new one up.
    syscall_result(unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new) })
}

/// `madvise(2)` itself.
pub(crate) fn sys_madvise(addr: usize, len: usize, advice: i32) -> isize {
    // SAFETY: advice on the caller's range.
    syscall_result(unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) })
}
