//! Thin wrappers over the raw system calls libcow needs, each returning `Result`.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd};

/// `ioctl(fd, cmd, arg)` with a pointer to a `#[repr(C)]` argument struct.
pub(crate) fn ioctl_ptr<T>(
    fd: BorrowedFd<'_>,
    cmd: u32,
    arg: &mut T,
    op: &'static str,
) -> Result<i32> {
    // SAFETY: `arg` is a live, exclusively borrowed `T` for the duration of the call, and the
    // commands libcow sends read and write at most `size_of::<T>()` bytes through it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, arg as *mut T) };
    if rc < 0 {
        Err(Error::last_os(op))
    } else {
        Ok(rc)
    }
}

extern "C" {
    static environ: *const *const std::ffi::c_char;
}

/// The environment variable `name`, read from `environ` itself rather than through `getenv`:
/// a program may define its own `getenv` (bash does, answering from its shell variables), and
/// libcow_preload's constructor runs before such a program has set itself up.
pub(crate) fn env_var(name: &str) -> Option<String> {
    // SAFETY: `environ` is the process's NULL-terminated array of NUL-terminated strings; it is
    // read without modification, from the constructor or at exit, when nothing rewrites it
    // concurrently.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return None;
        }
        while !(*p).is_null() {
            let entry = std::ffi::CStr::from_ptr(*p).to_bytes();
            if let Some(value) = entry
                .strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                return Some(String::from_utf8_lossy(value).into_owned());
            }
            p = p.add(1);
        }
    }
    None
}

/// `CLOCK_MONOTONIC` in nanoseconds (no allocation; usable in libcow's critical sections).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes `bytes` to descriptor 2 with the raw system call (no allocation, no interposed
/// `write`: usable in a signal handler).
pub(crate) fn write_stderr(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to descriptor 2; errors are ignored (nowhere to report).
    unsafe { libc::syscall(libc::SYS_write, 2, bytes.as_ptr(), bytes.len()) };
}

/// `process_vm_readv` of `buf.len()` bytes at `addr` of process `pid` (this one included) into
/// `buf`, in one iovec: the bytes read, or -1 with errno set. The kernel checks the remote
/// range, so an unmapped address is an error (or a short read), never a fault.
pub fn read_process(pid: i32, addr: usize, buf: &mut [u8]) -> isize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` is `buf`, ours and writable for its length; the remote iovec is only
    // read by the kernel, which checks it against `pid`'s mappings.
    unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) }
}
