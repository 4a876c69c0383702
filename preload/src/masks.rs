//! Signal masks and sets, interposed: what the kernel must see of them. Masks the program
//! hands the kernel (to block, unblock, set, wait with, start a thread with) never block
//! libcow's stop signal and carry SIGSEGV's stand-in for SIGSEGV ([`to_kernel`]); masks it
//! reads back show its own view; sets of signals it takes for itself (`sigwait` and its kin,
//! `signalfd`) never take the stop signal ([`taken_set`]).

use crate::raw::next;
use std::sync::atomic::AtomicUsize;

static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);

type SigmaskFn =
    unsafe extern "C" fn(i32, *const libc::sigset_t, *mut libc::sigset_t) -> libc::c_int;

/// A mask the program hands the kernel (to block, unblock, set, wait with or block in a
/// handler), made what the kernel must see: without libcow's stop signal — a thread that blocks
/// every signal (jemalloc's background thread does), or a handler with every signal in its
/// mask, must still stop for a snapshot, or the snapshot would wait for it — and with SIGSEGV's
/// stand-in for SIGSEGV ([`cow::segv_mask`]).
pub(crate) fn to_kernel(set: &mut libc::sigset_t) {
    // SAFETY: removing one signal from a set we hold exclusively.
    unsafe { libc::sigdelset(set, cow::world::signal()) };
    cow::segv_mask::to_kernel(set);
}

/// A signal set to copy a program's mask into (see [`kernel_mask`]).
pub(crate) fn empty_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid (and empty).
    unsafe { std::mem::zeroed() }
}

/// [`to_kernel`] of the program's mask `set`, copied into `buf`; `set` itself if null.
///
/// # Safety
///
/// `set` is null or points to a valid mask.
pub(crate) unsafe fn kernel_mask(
    set: *const libc::sigset_t,
    buf: &mut libc::sigset_t,
) -> *const libc::sigset_t {
    if set.is_null() {
        return set;
    }
    // SAFETY: `set` is valid (caller).
    *buf = unsafe { *set };
    to_kernel(buf);
    buf
}

/// Calls libc's `name` (`pthread_sigmask` or `sigprocmask`) with `set` in the kernel's terms
/// ([`kernel_mask`]), and reports the mask before in the program's.
///
/// # Safety
///
/// As `pthread_sigmask`.
unsafe fn set_mask(
    slot: &AtomicUsize,
    name: &std::ffi::CStr,
    how: i32,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> libc::c_int {
    let f = next(slot, name);
    if f == 0 {
        return libc::ENOSYS;
    }
    let mut buf = empty_set();
    // SAFETY: `set` null or valid (caller).
    let set = unsafe { kernel_mask(set, &mut buf) };
    // SAFETY: libc's function has this signature; arguments forwarded (`set` maybe our copy).
    let rc = unsafe { std::mem::transmute::<usize, SigmaskFn>(f)(how, set, old) };
    if rc == 0 && !old.is_null() {
        // SAFETY: `old` is writable (caller) and now filled in.
        cow::segv_mask::to_program(unsafe { &mut *old });
    }
    rc
}

/// `pthread_sigmask(3)`, as the program calls it (masks in the kernel's terms: [`kernel_mask`]).
///
/// # Safety
///
/// As `pthread_sigmask`.
#[no_mangle]
pub unsafe extern "C" fn pthread_sigmask(
    how: i32,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> libc::c_int {
    // SAFETY: forwarded from our caller's contract.
    unsafe { set_mask(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask", how, set, old) }
}

/// `sigprocmask(2)`, as the program calls it (as [`pthread_sigmask`]).
///
/// # Safety
///
/// As `sigprocmask`.
#[no_mangle]
pub unsafe extern "C" fn sigprocmask(
    how: i32,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> libc::c_int {
    // SAFETY: forwarded from our caller's contract.
    let rc = unsafe { set_mask(&REAL_SIGPROCMASK, c"sigprocmask", how, set, old) };
    // sigprocmask reports failure through errno, pthread_sigmask through its result.
    if rc == libc::ENOSYS {
        // SAFETY: writing this thread's errno.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    rc
}

/// A set of signals the program takes for itself (`sigwait` and its kin wait for them,
/// `signalfd` reads them), in `buf`, without libcow's stop signal: a program's signal thread
/// waiting for every signal (the POSIX idiom: `sigfillset`, then `sigwait` in a loop, or a
/// `signalfd` in its event loop) took it for its own — the program received signal 61, and
/// the snapshot waited for that thread in vain and failed.
///
/// # Safety
///
/// `set` is null or points to a valid set.
unsafe fn taken_set(set: *const libc::sigset_t, buf: &mut libc::sigset_t) -> *const libc::sigset_t {
    if set.is_null() {
        return set;
    }
    // SAFETY: `set` is valid (caller); removing one signal from our copy.
    unsafe {
        *buf = *set;
        libc::sigdelset(buf, cow::world::signal());
    }
    buf
}

/// Defines `$name`, libc's function of that signature, called with its signal set `$set`
/// passed through `$fix` (a copy on our stack); `$missing` if libc lacks it.
macro_rules! with_set {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;
     $real:ident, $set:ident via $fix:ident, missing $missing:expr) => {
        static $real: AtomicUsize = AtomicUsize::new(0);

        $(#[$m])*
        ///
        /// # Safety
        ///
        #[doc = concat!("As `", stringify!($name), "`.")]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let name = concat!(stringify!($name), "\0").as_bytes();
            let f = next(&$real, std::ffi::CStr::from_bytes_with_nul(name).expect("NUL-ended"));
            if f == 0 {
                return $missing;
            }
            let mut buf = empty_set();
            // SAFETY: the program's set, null or valid (its caller's contract).
            let $set = unsafe { $fix($set, &mut buf) };
            type F = unsafe extern "C" fn($($ty),*) -> $ret;
            // SAFETY: libc's function has this signature; the arguments are the program's,
            // the set maybe our copy of it.
            unsafe { std::mem::transmute::<usize, F>(f)($($arg),*) }
        }
    };
}

/// -1 with errno `ENOSYS` (libc lacks the function).
fn enosys() -> libc::c_int {
    // SAFETY: writing this thread's errno.
    unsafe { *libc::__errno_location() = libc::ENOSYS };
    -1
}

with_set! {
    /// `sigsuspend(2)`, as the program calls it (its mask: [`kernel_mask`]).
    fn sigsuspend(set: *const libc::sigset_t) -> libc::c_int;
    REAL_SIGSUSPEND, set via kernel_mask, missing enosys()
}

with_set! {
    /// `pthread_attr_setsigmask_np(3)`, as the program calls it: the mask a new thread starts
    /// with ([`kernel_mask`]).
    fn pthread_attr_setsigmask_np(attr: *mut libc::pthread_attr_t, set: *const libc::sigset_t)
        -> libc::c_int;
    REAL_ATTR_SETSIGMASK, set via kernel_mask, missing libc::ENOSYS
}

with_set! {
    /// `sigwait(3)`, as the program calls it (see [`taken_set`]).
    fn sigwait(set: *const libc::sigset_t, sig: *mut i32) -> libc::c_int;
    REAL_SIGWAIT, set via taken_set, missing libc::ENOSYS
}

with_set! {
    /// `sigwaitinfo(2)`, as the program calls it (see [`taken_set`]).
    fn sigwaitinfo(set: *const libc::sigset_t, info: *mut libc::siginfo_t) -> libc::c_int;
    REAL_SIGWAITINFO, set via taken_set, missing enosys()
}

with_set! {
    /// `sigtimedwait(2)`, as the program calls it (see [`taken_set`]).
    fn sigtimedwait(
        set: *const libc::sigset_t,
        info: *mut libc::siginfo_t,
        timeout: *const libc::timespec
    ) -> libc::c_int;
    REAL_SIGTIMEDWAIT, set via taken_set, missing enosys()
}

with_set! {
    /// `signalfd(2)`, as the program calls it (see [`taken_set`]).
    fn signalfd(fd: i32, set: *const libc::sigset_t, flags: i32) -> libc::c_int;
    REAL_SIGNALFD, set via taken_set, missing enosys()
}

/// Looks up the libc functions this file forwards to, now (see `signals::resolve_symbols`).
pub(crate) fn resolve_symbols() {
    next(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask");
    next(&REAL_SIGPROCMASK, c"sigprocmask");
    next(&REAL_SIGSUSPEND, c"sigsuspend");
    next(&REAL_ATTR_SETSIGMASK, c"pthread_attr_setsigmask_np");
    next(&REAL_SIGWAIT, c"sigwait");
    next(&REAL_SIGWAITINFO, c"sigwaitinfo");
    next(&REAL_SIGTIMEDWAIT, c"sigtimedwait");
    next(&REAL_SIGNALFD, c"signalfd");
}
