//! The condition-variable waits, interposed to announce themselves (see `cow::idle`): a
//! snapshot holds a thread blocked in one without signalling it. Background threads of
//! servers and thread pools spend their lives here (redis' `bio` threads, jemalloc's).
//!
//! The wrappers use the "C-unwind" ABI and hold nothing that needs dropping: these waits are
//! cancellation points, and `pthread_cancel` unwinds through them.

use crate::raw::next;
use std::sync::atomic::AtomicUsize;

static REAL_WAIT: AtomicUsize = AtomicUsize::new(0);
static REAL_TIMEDWAIT: AtomicUsize = AtomicUsize::new(0);
static REAL_CLOCKWAIT: AtomicUsize = AtomicUsize::new(0);

type WaitFn =
    unsafe extern "C-unwind" fn(*mut libc::pthread_cond_t, *mut libc::pthread_mutex_t) -> i32;
type TimedWaitFn = unsafe extern "C-unwind" fn(
    *mut libc::pthread_cond_t,
    *mut libc::pthread_mutex_t,
    *const libc::timespec,
) -> i32;
type ClockWaitFn = unsafe extern "C-unwind" fn(
    *mut libc::pthread_cond_t,
    *mut libc::pthread_mutex_t,
    libc::clockid_t,
    *const libc::timespec,
) -> i32;

/// `pthread_cond_wait(3)`, as the program calls it.
///
/// # Safety
///
/// As `pthread_cond_wait`.
#[no_mangle]
pub unsafe extern "C-unwind" fn pthread_cond_wait(
    cond: *mut libc::pthread_cond_t,
    mutex: *mut libc::pthread_mutex_t,
) -> i32 {
    let f = next(&REAL_WAIT, c"pthread_cond_wait");
    if f == 0 {
        return libc::ENOSYS;
    }
    let wait = cow::idle::begin_on([cond as usize, mutex as usize]);
    // SAFETY: libc's function has this signature; arguments forwarded unchanged.
    let rc = unsafe { std::mem::transmute::<usize, WaitFn>(f)(cond, mutex) };
    cow::idle::end(wait);
    rc
}

/// `pthread_cond_timedwait(3)`, as the program calls it.
///
/// # Safety
///
/// As `pthread_cond_timedwait`.
#[no_mangle]
pub unsafe extern "C-unwind" fn pthread_cond_timedwait(
    cond: *mut libc::pthread_cond_t,
    mutex: *mut libc::pthread_mutex_t,
    at: *const libc::timespec,
) -> i32 {
    let f = next(&REAL_TIMEDWAIT, c"pthread_cond_timedwait");
    if f == 0 {
        return libc::ENOSYS;
    }
    let wait = cow::idle::begin_on([cond as usize, mutex as usize]);
    // SAFETY: libc's function has this signature; arguments forwarded unchanged.
    let rc = unsafe { std::mem::transmute::<usize, TimedWaitFn>(f)(cond, mutex, at) };
    cow::idle::end(wait);
    rc
}

/// `pthread_cond_clockwait(3)`, as the program calls it.
///
/// # Safety
///
/// As `pthread_cond_clockwait`.
#[no_mangle]
pub unsafe extern "C-unwind" fn pthread_cond_clockwait(
    cond: *mut libc::pthread_cond_t,
    mutex: *mut libc::pthread_mutex_t,
    clock: libc::clockid_t,
    at: *const libc::timespec,
) -> i32 {
    let f = next(&REAL_CLOCKWAIT, c"pthread_cond_clockwait");
    if f == 0 {
        return libc::ENOSYS;
    }
    let wait = cow::idle::begin_on([cond as usize, mutex as usize]);
    // SAFETY: libc's function has this signature; arguments forwarded unchanged.
    let rc = unsafe { std::mem::transmute::<usize, ClockWaitFn>(f)(cond, mutex, clock, at) };
    cow::idle::end(wait);
    rc
}

/// Looks up the functions this file forwards to, now (see `signals::resolve_symbols`).
pub(crate) fn resolve_symbols() {
    next(&REAL_WAIT, c"pthread_cond_wait");
    next(&REAL_TIMEDWAIT, c"pthread_cond_timedwait");
    next(&REAL_CLOCKWAIT, c"pthread_cond_clockwait");
}
