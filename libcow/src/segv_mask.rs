//! SIGSEGV stays deliverable while libcow takes faults as events (the mprotect backend's first
//! writes, lmc's safe points). The kernel ends a process whose thread faults with SIGSEGV
//! blocked, before any handler runs — and programs do block it: a thread that blocks every
//! signal (`sigfillset` + `pthread_sigmask`), a handler installed with a full `sa_mask`, a
//! program's own SIGSEGV handler (its signal is blocked while it runs). Each of those died at
//! its first covered write or safe point after a checkpoint request.
//!
//! So, while active, every signal mask the program hands the kernel has SIGSEGV replaced by a
//! stand-in (a real-time signal libcow reserves and never sends), and every mask it reads back
//! the reverse ([`to_kernel`], [`to_program`]: the wrappers of `sigprocmask`,
//! `pthread_sigmask`, `sigaction`, `sigsuspend`, `ppoll`, `pselect`, `epoll_pwait(2)` in
//! libcow_preload and cowcc, which also keep libcow's own signals unblocked). The kernel itself then carries the program's view through
//! handler entries and returns, `siglongjmp` and thread creation. A fault that is the program's
//! own while the stand-in is blocked ends the process, as the kernel would have
//! ([`blocked_by_program`]).

use std::sync::atomic::{AtomicBool, Ordering};

/// Masks are translated (a backend that takes SIGSEGV as events is open).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The signal blocked in SIGSEGV's place (libcow reserves it; nothing sends it).
pub fn stand_in() -> i32 {
    libc::SIGRTMAX() - 5
}

/// From now on SIGSEGV stays deliverable: masks are translated, and the calling thread's own
/// mask is converted (a thread of the program started before this keeps its mask).
pub fn activate() {
    ACTIVE.store(true, Ordering::Release);
    let mut mask = crate::sys::sigprocmask_raw(libc::SIG_BLOCK, &crate::sys::sigset_of(&[]));
    if is_member(&mask, libc::SIGSEGV) {
        to_kernel(&mut mask);
        crate::sys::sigprocmask_raw(libc::SIG_SETMASK, &mask);
    }
}

fn is_member(set: &libc::sigset_t, sig: i32) -> bool {
    // SAFETY: sigismember reads a set we hold a reference to.
    unsafe { libc::sigismember(set, sig) == 1 }
}

/// A mask on its way from the program to the kernel (to block, unblock or set): SIGSEGV
/// becomes the stand-in, if active. Async-signal-safe.
pub fn to_kernel(set: &mut libc::sigset_t) {
    if ACTIVE.load(Ordering::Acquire) && is_member(set, libc::SIGSEGV) {
        // SAFETY: sigdelset/sigaddset on a set we hold exclusively, valid signal numbers.
        unsafe {
            libc::sigdelset(set, libc::SIGSEGV);
            libc::sigaddset(set, stand_in());
        }
    }
}

/// A mask on its way from the kernel to the program: the stand-in becomes SIGSEGV, if active
/// (it stays so once on: masks set meanwhile hold the stand-in). Async-signal-safe.
pub fn to_program(set: &mut libc::sigset_t) {
    if ACTIVE.load(Ordering::Acquire) && is_member(set, stand_in()) {
        // SAFETY: as in to_kernel.
        unsafe {
            libc::sigdelset(set, stand_in());
            libc::sigaddset(set, libc::SIGSEGV);
        }
    }
}

/// Whether the program had SIGSEGV blocked where the thread of `ctx` (the context a SIGSEGV
/// handler received) faulted: then the fault, if it is the program's own, ends the process.
///
/// # Safety
///
/// `ctx` is the `ucontext_t` the kernel passed to a signal handler.
pub unsafe fn blocked_by_program(ctx: *const libc::c_void) -> bool {
    // SAFETY: the kernel's ucontext (caller).
    is_member(
        unsafe { &(*(ctx as *const libc::ucontext_t)).uc_sigmask },
        stand_in(),
    )
}
