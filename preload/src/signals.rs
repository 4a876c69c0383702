//! `sigaction` and `signal`, interposed: under the mprotect backend libcow's SIGSEGV handler
//! must stay installed (every first write to covered memory faults into it), so a program
//! installing its own SIGSEGV handler — most servers do, to log a crash — gets it chained
//! behind libcow's instead: faults that are not libcow's reach it as before. Under
//! `--recover` the crash signals' actions are kept aside the same way (libcow's recovery
//! handler stays first and runs the program's when it does not roll back). Under uffd and
//! fork the handlers of asynchronous signals are wrapped (see [`wrapped`]).
//! An action's mask goes to the kernel as `crate::masks` says; the stop signal's action is not
//! the program's to change (`EINVAL`). Every other call goes to libc unchanged. (`sigset`,
//! `sysv_signal` and `bsd_signal` are not interposed: handlers installed through them are not
//! wrapped.)

use crate::raw::next;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

type SigactionFn =
    unsafe extern "C" fn(i32, *const libc::sigaction, *mut libc::sigaction) -> libc::c_int;
type SignalFn = unsafe extern "C" fn(i32, libc::sighandler_t) -> libc::sighandler_t;

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);

/// Whether a SIGSEGV action change is the mprotect backend's to answer.
fn ours(sig: i32) -> bool {
    sig == libc::SIGSEGV && crate::in_process_backend() == Some(c"mprotect")
}

/// `sigaction(2)`, as the program calls it: the action's mask in the kernel's terms both ways
/// ([`cow::segv_mask`]), the action itself kept by libcow where it must be (see
/// [`route_sigaction`]).
///
/// # Safety
///
/// As `sigaction`: `act` null or valid, `old` null or writable.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: i32,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    // SAFETY: `act` null or valid (caller).
    if cow::world::takes_stop_signal(sig, unsafe { act.as_ref() }) {
        return einval(-1);
    }
    let mut copy;
    let act = if act.is_null() {
        act
    } else {
        // SAFETY: `act` is valid (caller).
        copy = unsafe { *act };
        crate::masks::to_kernel(&mut copy.sa_mask);
        &copy as *const libc::sigaction
    };
    // SAFETY: forwarded from our caller's contract (`act` maybe our copy).
    let rc = unsafe { route_sigaction(sig, act, old) };
    if rc == 0 && !old.is_null() {
        // SAFETY: `old` is writable (caller) and now filled in.
        cow::segv_mask::to_program(unsafe { &mut (*old).sa_mask });
    }
    rc
}

/// Sets errno to `EINVAL` and returns `failure`.
fn einval<T>(failure: T) -> T {
    // SAFETY: writing this thread's errno.
    unsafe { *libc::__errno_location() = libc::EINVAL };
    failure
}

/// Who answers a `sigaction`: libcow's recovery or mprotect backend (which keep the program's
/// action aside), the wrapper of asynchronous handlers, or libc.
///
/// # Safety
///
/// As `sigaction`.
unsafe fn route_sigaction(
    sig: i32,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    // SAFETY: forwarded from our caller's contract.
    if let Some(rc) = unsafe { cow::recovery::program_sigaction(sig, act, old) } {
        return rc;
    }
    if ours(sig) {
        // SAFETY: forwarded from our caller's contract.
        if let Some(rc) = unsafe { cow::backend::mprotect::program_sigaction(act, old) } {
            return rc;
        }
    }
    if wrapped(sig) {
        // SAFETY: forwarded from our caller's contract.
        return unsafe { wrapped_sigaction(sig, act, old) };
    }
    let f = next(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        return -1;
    }
    // SAFETY: libc's sigaction has this signature; arguments forwarded unchanged.
    unsafe { std::mem::transmute::<usize, SigactionFn>(f)(sig, act, old) }
}

/// `signal(3)`, as the program calls it (glibc's BSD semantics: `SA_RESTART`).
///
/// # Safety
///
/// As `signal`.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: i32, handler: libc::sighandler_t) -> libc::sighandler_t {
    if sig == cow::world::signal() {
        return einval(libc::SIG_ERR); // libcow's (see `cow::world::takes_stop_signal`)
    }
    if ours(sig) || cow::recovery::enabled() && cow::recovery::SIGNALS.contains(&sig) {
        // SAFETY: an all-zero sigaction is valid; filled in below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both point to live locals.
        let answered = unsafe {
            cow::recovery::program_sigaction(sig, &act, &mut old)
                .or_else(|| cow::backend::mprotect::program_sigaction(&act, &mut old))
        };
        if answered.is_some() {
            return old.sa_sigaction;
        }
    }
    if wrapped(sig) {
        // glibc's `signal`: the signal blocked in its handler, interrupted calls restarted.
        // SAFETY: an all-zero sigaction is valid; filled in below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: building the mask on our local; both point to live locals.
        let rc = unsafe {
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaddset(&mut act.sa_mask, sig);
            wrapped_sigaction(sig, &act, &mut old)
        };
        return if rc == 0 {
            old.sa_sigaction
        } else {
            libc::SIG_ERR
        };
    }
    let f = next(&REAL_SIGNAL, c"signal");
    if f == 0 {
        return libc::SIG_ERR;
    }
    // SAFETY: libc's signal has this signature; arguments forwarded unchanged.
    unsafe { std::mem::transmute::<usize, SignalFn>(f)(sig, handler) }
}

/// A program's handler of a wrapped signal: its address and whether it takes `siginfo`.
struct ProgramHandler {
    handler: AtomicUsize,
    siginfo: AtomicBool,
}

/// The program's handlers of the wrapped signals, by signal number. In the book: a restore
/// must not rewind them, as it does not rewind the kernel's dispositions.
static PROGRAM_HANDLERS: OnceLock<&'static [ProgramHandler; 65]> = OnceLock::new();

/// Whether `sig`'s handlers are wrapped: when snapshots hold idle threads (see
/// `holds_idle_threads`), every asynchronous signal a program may catch. A handler can run
/// in a thread blocked in a condition-variable wait, which a snapshot holds without a signal
/// (`cow::idle`): the wrapper first waits for the snapshot to end, as the thread would.
fn wrapped(sig: i32) -> bool {
    (1..=64).contains(&sig)
        && ![libc::SIGKILL, libc::SIGSTOP, cow::world::signal()].contains(&sig)
        && !cow::world::SYNCHRONOUS.contains(&sig)
        && crate::holds_idle_threads()
}

fn program_handlers() -> &'static [ProgramHandler; 65] {
    PROGRAM_HANDLERS.get_or_init(|| {
        cow::book::leak(
            [const {
                ProgramHandler {
                    handler: AtomicUsize::new(0),
                    siginfo: AtomicBool::new(false),
                }
            }; 65],
        )
    })
}

/// Installs `act` with the program's handler replaced by [`on_program_signal`] and reports
/// the program's own action in `old`.
///
/// # Safety
///
/// As `sigaction`, for a signal [`wrapped`] says yes to.
unsafe fn wrapped_sigaction(
    sig: i32,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    let f = next(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        return -1;
    }
    let real = |act: *const libc::sigaction, old: *mut libc::sigaction| {
        // SAFETY: libc's sigaction has this signature; `act` is the caller's or our copy of
        // it, `old` our local.
        unsafe { std::mem::transmute::<usize, SigactionFn>(f)(sig, act, old) }
    };
    let entry = &program_handlers()[sig as usize];
    let before = (
        entry.handler.load(Ordering::Acquire),
        entry.siginfo.load(Ordering::Acquire),
    );
    // SAFETY: an all-zero sigaction is valid.
    let mut kernel_old: libc::sigaction = unsafe { std::mem::zeroed() };
    let rc = if act.is_null() {
        real(act, &mut kernel_old)
    } else {
        // SAFETY: `act` is valid (caller).
        let mut ours = unsafe { *act };
        let handler = ours.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            let rc = real(&ours, &mut kernel_old);
            if rc == 0 {
                entry.handler.store(0, Ordering::Release);
            }
            rc
        } else {
            // The record first: the wrapper may run as soon as the kernel has it.
            entry
                .siginfo
                .store(ours.sa_flags & libc::SA_SIGINFO != 0, Ordering::Release);
            entry.handler.store(handler, Ordering::Release);
            ours.sa_sigaction = on_program_signal as *const () as usize;
            ours.sa_flags |= libc::SA_SIGINFO;
            let rc = real(&ours, &mut kernel_old);
            if rc != 0 {
                entry.handler.store(before.0, Ordering::Release);
                entry.siginfo.store(before.1, Ordering::Release);
            }
            rc
        }
    };
    if rc == 0 && !old.is_null() {
        if kernel_old.sa_sigaction == on_program_signal as *const () as usize {
            kernel_old.sa_sigaction = before.0;
            if !before.1 {
                kernel_old.sa_flags &= !libc::SA_SIGINFO;
            }
        }
        // SAFETY: `old` is writable (caller).
        unsafe { *old = kernel_old };
    }
    rc
}

/// The handler installed for a program's handler of a wrapped signal.
extern "C" fn on_program_signal(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(entry) = PROGRAM_HANDLERS.get().and_then(|h| h.get(sig as usize)) else {
        return;
    };
    let handler = entry.handler.load(Ordering::Acquire);
    if handler == 0 {
        return; // Set back to the default or ignored meanwhile.
    }
    // SAFETY: reading and restoring this thread's errno around our futex calls.
    let errno = unsafe { *libc::__errno_location() };
    let wait = cow::idle::interrupt();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
    if entry.siginfo.load(Ordering::Acquire) {
        type F = extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void);
        // SAFETY: the program installed this SA_SIGINFO handler.
        unsafe { std::mem::transmute::<usize, F>(handler)(sig, info, ctx) };
    } else {
        type F = extern "C" fn(i32);
        // SAFETY: the program installed this one-argument handler.
        unsafe { std::mem::transmute::<usize, F>(handler)(sig) };
    }
    // SAFETY: as above.
    let errno = unsafe { *libc::__errno_location() };
    cow::idle::resume(wait);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

static REAL_SIGALTSTACK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The alternate stack this thread's program asked for (`ss_flags` SS_DISABLE: none).
    static PROGRAM_ALT_STACK: std::cell::Cell<(usize, usize, i32)> =
        const { std::cell::Cell::new((0, 0, libc::SS_DISABLE)) };
}

/// `sigaltstack(2)`, as the program calls it. Under the mprotect backend or `--recover` a
/// signal handler must not run on covered memory (write-protected, or rewritten by a
/// rollback), which is where a program's own alternate stack is: the thread gets one of
/// libcow's instead, and the program is told about its own.
///
/// # Safety
///
/// As `sigaltstack`.
#[no_mangle]
pub unsafe extern "C" fn sigaltstack(
    ss: *const libc::stack_t,
    old: *mut libc::stack_t,
) -> libc::c_int {
    if !(cow::recovery::enabled() || ours(libc::SIGSEGV)) {
        let f = next(&REAL_SIGALTSTACK, c"sigaltstack");
        if f == 0 {
            return -1;
        }
        type F = unsafe extern "C" fn(*const libc::stack_t, *mut libc::stack_t) -> libc::c_int;
        // SAFETY: libc's sigaltstack has this signature; arguments forwarded unchanged.
        return unsafe { std::mem::transmute::<usize, F>(f)(ss, old) };
    }
    let (sp, size, flags) = PROGRAM_ALT_STACK.with(|p| p.get());
    if !old.is_null() {
        // SAFETY: `old` is writable (caller).
        unsafe {
            *old = libc::stack_t {
                ss_sp: sp as *mut libc::c_void,
                ss_flags: flags,
                ss_size: size,
            }
        };
    }
    if !ss.is_null() {
        // SAFETY: `ss` is valid (caller).
        let ss = unsafe { &*ss };
        PROGRAM_ALT_STACK.with(|p| p.set((ss.ss_sp as usize, ss.ss_size, ss.ss_flags)));
        if ss.ss_flags & libc::SS_DISABLE == 0 {
            cow::recovery::ensure_alt_stack();
        }
    }
    0
}

/// Looks up every libc function this file forwards to, now: a lookup stores into this
/// library's own data, which the mprotect backend write-protects, and a first call may come
/// from a signal handler, where that fault would be fatal.
pub(crate) fn resolve_symbols() {
    if crate::holds_idle_threads() {
        program_handlers();
    }
    next(&REAL_SIGACTION, c"sigaction");
    next(&REAL_SIGNAL, c"signal");
    next(&REAL_SIGALTSTACK, c"sigaltstack");
}
