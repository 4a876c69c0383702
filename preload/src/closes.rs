//! `close`, `close_range`, `closefrom`, `dup2` and `dup3`, interposed: libcow's own descriptors
//! (its userfaultfd, `/dev/cow`, pagemap, control socket: `cow::fds`) are not the program's to
//! close. A daemon closing every descriptor it did not open made every later snapshot fail
//! (uffd: 50 of 50 in a 0.5 s run). To the program such a descriptor is not open: `close`
//! says `EBADF`, `close_range` and `closefrom` close everything else in the range, and `dup2`
//! or `dup3` onto it say `EBUSY` (Linux's answer while a descriptor is being opened).

use crate::raw::next;
use cow::fds::is_own;
use std::sync::atomic::AtomicUsize;

static REAL_CLOSE: AtomicUsize = AtomicUsize::new(0);
static REAL_DUP2: AtomicUsize = AtomicUsize::new(0);
static REAL_DUP3: AtomicUsize = AtomicUsize::new(0);

/// Sets errno and returns -1.
fn fail(errno: i32) -> libc::c_int {
    // SAFETY: writing this thread's errno.
    unsafe { *libc::__errno_location() = errno };
    -1
}

/// `close(2)`, as the program calls it.
#[no_mangle]
pub extern "C" fn close(fd: libc::c_int) -> libc::c_int {
    if is_own(fd) {
        return fail(libc::EBADF);
    }
    let f = next(&REAL_CLOSE, c"close");
    if f == 0 {
        // SAFETY: the close system call on the caller's descriptor.
        return unsafe { libc::syscall(libc::SYS_close, fd) } as libc::c_int;
    }
    // SAFETY: libc's close has this signature.
    unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int) -> libc::c_int>(f)(fd) }
}

/// `close_range(2)` itself, on `[first, last]`.
fn sys_close_range(first: u32, last: u32, flags: libc::c_int) -> libc::c_int {
    // SAFETY: the close_range system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) as libc::c_int }
}

/// `close_range(2)`, as the program calls it: the range around libcow's descriptors.
/// (`CLOSE_RANGE_CLOEXEC` closes nothing: libcow's are close-on-exec already.)
#[no_mangle]
pub extern "C" fn close_range(first: u32, last: u32, flags: libc::c_int) -> libc::c_int {
    if flags & libc::CLOSE_RANGE_CLOEXEC as libc::c_int != 0 || first > last {
        return sys_close_range(first, last, flags);
    }
    let mut from = first;
    for own in cow::fds::own_in(first, last) {
        let own = own as u32;
        if own > from {
            let rc = sys_close_range(from, own - 1, flags);
            if rc != 0 {
                return rc;
            }
        }
        from = own + 1;
    }
    if from > last {
        return 0; // the range ended on one of libcow's
    }
    sys_close_range(from, last, flags)
}

/// `closefrom(3)`, as the program calls it (glibc's own goes to the system call directly).
#[no_mangle]
pub extern "C" fn closefrom(first: libc::c_int) {
    close_range(first.max(0) as u32, u32::MAX, 0);
}

/// `dup2(2)`, as the program calls it.
#[no_mangle]
pub extern "C" fn dup2(old: libc::c_int, new: libc::c_int) -> libc::c_int {
    if old != new && is_own(new) {
        return fail(libc::EBUSY);
    }
    let f = next(&REAL_DUP2, c"dup2");
    if f == 0 {
        return fail(libc::ENOSYS);
    }
    type F = extern "C" fn(libc::c_int, libc::c_int) -> libc::c_int;
    // SAFETY: libc's dup2 has this signature.
    unsafe { std::mem::transmute::<usize, F>(f)(old, new) }
}

/// `dup3(2)`, as the program calls it.
#[no_mangle]
pub extern "C" fn dup3(old: libc::c_int, new: libc::c_int, flags: libc::c_int) -> libc::c_int {
    if old != new && is_own(new) {
        return fail(libc::EBUSY);
    }
    let f = next(&REAL_DUP3, c"dup3");
    if f == 0 {
        return fail(libc::ENOSYS);
    }
    type F = extern "C" fn(libc::c_int, libc::c_int, libc::c_int) -> libc::c_int;
    // SAFETY: libc's dup3 has this signature.
    unsafe { std::mem::transmute::<usize, F>(f)(old, new, flags) }
}

/// Looks up the libc functions this file forwards to, now (see `signals::resolve_symbols`).
pub(crate) fn resolve_symbols() {
    next(&REAL_CLOSE, c"close");
    next(&REAL_DUP2, c"dup2");
    next(&REAL_DUP3, c"dup3");
}
