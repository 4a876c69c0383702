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
