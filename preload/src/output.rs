//! Socket output and accepted connections, interposed for `cowctl run --recover` (see
//! `cow::recovery`): the first socket output of an iteration commits it — a reply may
//! acknowledge what the iteration changed, so it is never rolled back — and a connection
//! accepted in an iteration is closed if the iteration is rolled back (the program no longer
//! knows it). `write`, `writev`, `send`, `sendto`, `sendmsg`, `accept`, `accept4`. Each is
//! otherwise a plain call to libc's.

use crate::raw::next;
use cow::recovery;
use std::ffi::c_int;
use std::sync::atomic::AtomicUsize;

static REAL_WRITE: AtomicUsize = AtomicUsize::new(0);
static REAL_WRITEV: AtomicUsize = AtomicUsize::new(0);
static REAL_SEND: AtomicUsize = AtomicUsize::new(0);
static REAL_SENDTO: AtomicUsize = AtomicUsize::new(0);
static REAL_SENDMSG: AtomicUsize = AtomicUsize::new(0);
static REAL_ACCEPT: AtomicUsize = AtomicUsize::new(0);
static REAL_ACCEPT4: AtomicUsize = AtomicUsize::new(0);

/// libc's `name` as a function of type `F`; the process cannot go on without it.
pub(crate) fn real<F: Copy>(slot: &AtomicUsize, name: &std::ffi::CStr) -> F {
    let f = next(slot, name);
    if f == 0 {
        crate::raw::write_stderr(b"libcow_preload: libc lacks an interposed function\n");
        // SAFETY: abort has no preconditions.
        unsafe { libc::abort() };
    }
    // SAFETY: `F` is the function pointer type of libc's `name`, which has the same size.
    unsafe { std::mem::transmute_copy::<usize, F>(&f) }
}

/// Output to `fd` is about to be sent: if it is a socket, the open iteration is committed.
fn output_to(fd: c_int) {
    if !recovery::uncommitted() {
        return;
    }
    // SAFETY: fstat into a local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
        recovery::note_output();
    }
}

/// `write(2)`, as the program calls it.
///
/// # Safety
///
/// As `write`.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const libc::c_void, n: usize) -> isize {
    type F = unsafe extern "C" fn(c_int, *const libc::c_void, usize) -> isize;
    output_to(fd);
    // SAFETY: forwarded unchanged.
    unsafe { real::<F>(&REAL_WRITE, c"write")(fd, buf, n) }
}

/// `writev(2)`, as the program calls it.
///
/// # Safety
///
/// As `writev`.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, n: c_int) -> isize {
    type F = unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> isize;
    output_to(fd);
    // SAFETY: forwarded unchanged.
    unsafe { real::<F>(&REAL_WRITEV, c"writev")(fd, iov, n) }
}

/// `send(2)`, as the program calls it.
///
/// # Safety
///
/// As `send`.
#[no_mangle]
pub unsafe extern "C" fn send(
    fd: c_int,
    buf: *const libc::c_void,
    n: usize,
    flags: c_int,
) -> isize {
    type F = unsafe extern "C" fn(c_int, *const libc::c_void, usize, c_int) -> isize;
    output_to(fd);
    // SAFETY: forwarded unchanged.
    unsafe { real::<F>(&REAL_SEND, c"send")(fd, buf, n, flags) }
}

/// `sendto(2)`, as the program calls it.
///
/// # Safety
///
/// As `sendto`.
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const libc::c_void,
    n: usize,
    flags: c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> isize {
    type F = unsafe extern "C" fn(
        c_int,
        *const libc::c_void,
        usize,
        c_int,
        *const libc::sockaddr,
        libc::socklen_t,
    ) -> isize;
    output_to(fd);
    // SAFETY: forwarded unchanged.
    unsafe { real::<F>(&REAL_SENDTO, c"sendto")(fd, buf, n, flags, addr, len) }
}

/// `sendmsg(2)`, as the program calls it.
///
/// # Safety
///
/// As `sendmsg`.
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> isize {
    type F = unsafe extern "C" fn(c_int, *const libc::msghdr, c_int) -> isize;
    output_to(fd);
    // SAFETY: forwarded unchanged.
    unsafe { real::<F>(&REAL_SENDMSG, c"sendmsg")(fd, msg, flags) }
}

/// `accept(2)`, as the program calls it.
///
/// # Safety
///
/// As `accept`.
#[no_mangle]
pub unsafe extern "C" fn accept(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> c_int;
    // SAFETY: forwarded unchanged.
    let conn = unsafe { real::<F>(&REAL_ACCEPT, c"accept")(fd, addr, len) };
    if conn >= 0 {
        recovery::note_accepted(conn);
    }
    conn
}

/// `accept4(2)`, as the program calls it.
///
/// # Safety
///
/// As `accept4`.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
    flags: c_int,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, *mut libc::sockaddr, *mut libc::socklen_t, c_int) -> c_int;
    // SAFETY: forwarded unchanged.
    let conn = unsafe { real::<F>(&REAL_ACCEPT4, c"accept4")(fd, addr, len, flags) };
    if conn >= 0 {
        recovery::note_accepted(conn);
    }
    conn
}

/// Looks up every libc function this file forwards to, now: a lookup stores into this
/// library's own data, which the mprotect backend write-protects, and a first call may come
/// from a signal handler, where that fault would be fatal.
pub(crate) fn resolve_symbols() {
    next(&REAL_WRITE, c"write");
    next(&REAL_WRITEV, c"writev");
    next(&REAL_SEND, c"send");
    next(&REAL_SENDTO, c"sendto");
    next(&REAL_SENDMSG, c"sendmsg");
    next(&REAL_ACCEPT, c"accept");
    next(&REAL_ACCEPT4, c"accept4");
}
