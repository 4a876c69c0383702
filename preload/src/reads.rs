//! The read calls, interposed for the mprotect backend: the kernel writing into a
//! write-protected page for the program fails with `EFAULT` instead of faulting, so the pages
//! of the buffer are made writable first (`cow::backend::mprotect::before_kernel_write`, a
//! no-op under any other backend). `read`, `pread`, `readv`, `recv`, `recvfrom`, `recvmsg`.
//! A snapshot taken between that and the call protects them again (the checkpointer thread
//! stops this one anywhere): the call then fails with `EFAULT` having written nothing, and is
//! made again.

use crate::raw::next;
use cow::backend::mprotect::before_kernel_write;
use std::ffi::c_int;
use std::sync::atomic::AtomicUsize;

static REAL_READ: AtomicUsize = AtomicUsize::new(0);
static REAL_PREAD: AtomicUsize = AtomicUsize::new(0);
static REAL_READV: AtomicUsize = AtomicUsize::new(0);
static REAL_RECV: AtomicUsize = AtomicUsize::new(0);
static REAL_RECVFROM: AtomicUsize = AtomicUsize::new(0);
static REAL_RECVMSG: AtomicUsize = AtomicUsize::new(0);

/// libc's `name` as a function of type `F`; the process cannot go on without it.
fn real<F: Copy>(slot: &AtomicUsize, name: &std::ffi::CStr) -> F {
    crate::output::real(slot, name)
}

/// `call` after `prepare`, again while it fails with `EFAULT` (a snapshot re-protected the
/// buffers in between), a few times at most.
pub(crate) fn retrying(prepare: impl Fn(), call: impl Fn() -> isize) -> isize {
    let mut r = -1;
    for _ in 0..8 {
        prepare();
        r = call();
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EFAULT) {
            break;
        }
    }
    r
}

fn before_iovecs(iov: *const libc::iovec, n: c_int) {
    for i in 0..n.max(0) as usize {
        // SAFETY: the caller's `n` iovecs.
        let v = unsafe { &*iov.add(i) };
        before_kernel_write(v.iov_base as usize, v.iov_len);
    }
}

/// `read(2)`, as the program calls it.
///
/// # Safety
///
/// As `read`.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut libc::c_void, n: usize) -> isize {
    type F = unsafe extern "C" fn(c_int, *mut libc::c_void, usize) -> isize;
    retrying(
        || before_kernel_write(buf as usize, n),
        // SAFETY: forwarded unchanged.
        || unsafe { real::<F>(&REAL_READ, c"read")(fd, buf, n) },
    )
}

/// `pread(2)`, as the program calls it.
///
/// # Safety
///
/// As `pread`.
#[no_mangle]
pub unsafe extern "C" fn pread(
    fd: c_int,
    buf: *mut libc::c_void,
    n: usize,
    offset: libc::off_t,
) -> isize {
    type F = unsafe extern "C" fn(c_int, *mut libc::c_void, usize, libc::off_t) -> isize;
    retrying(
        || before_kernel_write(buf as usize, n),
        // SAFETY: forwarded unchanged.
        || unsafe { real::<F>(&REAL_PREAD, c"pread")(fd, buf, n, offset) },
    )
}

/// `readv(2)`, as the program calls it.
///
/// # Safety
///
/// As `readv`.
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, n: c_int) -> isize {
    type F = unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> isize;
    retrying(
        || before_iovecs(iov, n),
        // SAFETY: forwarded unchanged.
        || unsafe { real::<F>(&REAL_READV, c"readv")(fd, iov, n) },
    )
}

/// `recv(2)`, as the program calls it.
///
/// # Safety
///
/// As `recv`.
#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut libc::c_void, n: usize, flags: c_int) -> isize {
    type F = unsafe extern "C" fn(c_int, *mut libc::c_void, usize, c_int) -> isize;
    retrying(
        || before_kernel_write(buf as usize, n),
        // SAFETY: forwarded unchanged.
        || unsafe { real::<F>(&REAL_RECV, c"recv")(fd, buf, n, flags) },
    )
}

/// `recvfrom(2)`, as the program calls it.
///
/// # Safety
///
/// As `recvfrom`.
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut libc::c_void,
    n: usize,
    flags: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> isize {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::c_void,
        usize,
        c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> isize;
    let prepare = || {
        before_kernel_write(buf as usize, n);
        if !addr.is_null() && !len.is_null() {
            // SAFETY: `len` is readable (caller).
            before_kernel_write(addr as usize, unsafe { *len } as usize);
        }
    };
    // SAFETY: forwarded unchanged.
    retrying(prepare, || unsafe {
        real::<F>(&REAL_RECVFROM, c"recvfrom")(fd, buf, n, flags, addr, len)
    })
}

/// `recvmsg(2)`, as the program calls it.
///
/// # Safety
///
/// As `recvmsg`.
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> isize {
    type F = unsafe extern "C" fn(c_int, *mut libc::msghdr, c_int) -> isize;
    let prepare = || {
        if !msg.is_null() {
            // SAFETY: `msg` is valid (caller).
            let m = unsafe { &*msg };
            before_iovecs(m.msg_iov, m.msg_iovlen as c_int);
            before_kernel_write(m.msg_control as usize, m.msg_controllen);
            before_kernel_write(m.msg_name as usize, m.msg_namelen as usize);
        }
    };
    // SAFETY: forwarded unchanged.
    retrying(prepare, || unsafe {
        real::<F>(&REAL_RECVMSG, c"recvmsg")(fd, msg, flags)
    })
}

/// Looks up every libc function this file forwards to, now: a lookup stores into this
/// library's own data, which the mprotect backend write-protects, and a first call may come
/// from a signal handler, where that fault would be fatal.
pub(crate) fn resolve_symbols() {
    next(&REAL_READ, c"read");
    next(&REAL_PREAD, c"pread");
    next(&REAL_READV, c"readv");
    next(&REAL_RECV, c"recv");
    next(&REAL_RECVFROM, c"recvfrom");
    next(&REAL_RECVMSG, c"recvmsg");
}
