//! Consistent cuts of a multi-threaded program on lmc.
//!
//! lmc's snapshot is a generation bump. It is a consistent cut if, at that instant, no thread is
//! between an instrumented write's check and the write (nor between a cowcc wrapper's save and
//! the libc call that writes). Such a point is:
//! - a **safe point** (function entry, loop back-edge: the pass never puts one between a check
//!   and its store). A safe point reads a page of its object (the pass defines one per
//!   executable or library, registered from `.init_array`); a request makes those pages
//!   inaccessible, and the `SIGSEGV` handler
//!   parks the thread that faulted there. Every other fault goes to the program's own action
//!   (cowcc wraps `sigaction` and `signal` for `SIGSEGV`), or the default one;
//! - a **system-call boundary** in a thread blocked in the kernel (it would reach no safe
//!   point): the checkpointer sends it [`signal`]; the handler parks only if the interrupted
//!   instruction is a `syscall` or follows one and lmc's lock is free (else it returns and is
//!   asked again). Instrumented code never makes a system call between a check and its store;
//!   a wrapper may (`read` is the store), so every wrapper publishes the ranges it saved for
//!   its call, and the checkpointer saves them again in the new generation before it lets the
//!   threads go (they are unchanged: their writer is parked).
//!
//! The checkpointer lists `/proc/self/task` until every thread but libcow's own is parked, takes
//! the snapshot, re-saves the published ranges and releases everyone. A thread parked at a safe
//! point inside a wrapper call (qsort's comparator is instrumented code) publishes its ranges
//! too.
//!
//! A program with one thread (it never called `pthread_create`, and `/proc/self/task` agrees)
//! does not park: its thread takes the checkpoint itself, at its next safe point or in the
//! handler at a system-call boundary, and saves its wrapper ranges again at once
//! ([`take_alone`]); it waits for nobody. A thread that never
//! parks (it blocks the signal while blocked in the kernel) makes the cut fail with
//! `ETIMEDOUT` after [`TIMEOUT_NS`]; nothing is left parked.

use crate::world::{futex, gettid};
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// Most threads parked at once.
const MAX_THREADS: usize = 1024;
/// Most ranges the parked threads publish.
const MAX_RANGES: usize = 4096;
/// A cut that has not gathered every thread by then fails.
const TIMEOUT_NS: u64 = 1_000_000_000;
/// Parked threads spin this long before sleeping on the futex (a cut of a busy program is
/// over within microseconds).
const SPIN_NS: u64 = 20_000;

/// The cut in progress (0: none); cuts are numbered from 1.
static ACTIVE: AtomicU32 = AtomicU32::new(0);
/// The last cut that is over: parked threads wait until it reaches theirs.
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// `(cut << 32) | tid` of each parked thread; entries of older cuts are ignored.
static PARKED: [AtomicU64; MAX_THREADS] = [const { AtomicU64::new(0) }; MAX_THREADS];
static NEXT_PARKED: AtomicUsize = AtomicUsize::new(0);
/// `(start, len, stack pointer of the thread)` ranges published by threads parked in the
/// signal handler.
static RANGES: [(AtomicUsize, AtomicUsize, AtomicUsize); MAX_RANGES] = [const {
    (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    )
}; MAX_RANGES];
static NEXT_RANGE: AtomicUsize = AtomicUsize::new(0);
/// A single-threaded checkpoint is requested ([`take_alone`]): the thread takes it itself.
static ALONE: AtomicBool = AtomicBool::new(false);
/// What the thread's own checkpoint returned (0: not yet).
static TAKEN: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// A checkpoint is requested (1): the next safe point takes it.
static PENDING: AtomicU8 = AtomicU8::new(0);

/// Most instrumented objects (executable and libraries) with a poll page.
const MAX_POLL_PAGES: usize = 64;
/// The poll pages registered so far (addresses; 0: free slot).
static POLL_PAGES: [AtomicUsize; MAX_POLL_PAGES] = [const { AtomicUsize::new(0) }; MAX_POLL_PAGES];
/// The poll pages are inaccessible: safe points fault.
static POLL_ARMED: AtomicBool = AtomicBool::new(false);
/// The program's own `SIGSEGV` action, which lmc's handler passes every fault but a safe
/// point's to (null: the default). Replaced, never freed: a handler may be reading the old one.
static PROGRAM_SEGV: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
/// lmc's `SIGSEGV` handler is installed.
static SEGV_INSTALLED: AtomicBool = AtomicBool::new(false);

/// cowcc's wrappers: copies this thread's current `(start, len)` ranges into the buffer (at
/// most `cap` pairs) and returns how many it has, or `usize::MAX` if they do not fit (see
/// [`__cow_lmc_ranges_hook`]).
static RANGES_HOOK: AtomicUsize = AtomicUsize::new(0);

/// The real-time signal that asks a thread blocked in the kernel to park.
pub fn signal() -> i32 {
    libc::SIGRTMAX() - 4
}

/// cowcc's wrappers: a mask the program hands the kernel (to block, unblock, set, wait with or
/// block in a handler), made what the kernel must see. Without [`signal`]: a thread that
/// blocks every signal and waits in the kernel (for a pipe, in `sigwait`) must still park, or
/// every checkpoint would time out waiting for it. With SIGSEGV's stand-in for SIGSEGV
/// ([`crate::segv_mask`]): a safe point reached with SIGSEGV blocked would end the process.
///
/// # Safety
///
/// `set` points to a valid, writable mask.
#[no_mangle]
pub unsafe extern "C" fn __cow_lmc_mask_to_kernel(set: *mut libc::sigset_t) {
    // SAFETY: valid and writable (caller).
    let set = unsafe { &mut *set };
    // SAFETY: removing one signal from a set we hold exclusively.
    unsafe { libc::sigdelset(set, signal()) };
    crate::segv_mask::to_kernel(set);
}

/// cowcc's wrappers: a set of signals the program takes for itself (`sigwait` and its kin,
/// `signalfd`), without [`signal`] (a program's signal thread waiting for every signal would
/// take it for its own).
///
/// # Safety
///
/// `set` points to a valid, writable set.
#[no_mangle]
pub unsafe extern "C" fn __cow_lmc_taken_set(set: *mut libc::sigset_t) {
    // SAFETY: valid and writable (caller); removing one signal.
    unsafe { libc::sigdelset(set, signal()) };
}

/// cowcc's wrappers: whether `sig` is lmc's own (its action is not the program's to change: a
/// program resetting every signal's action would take [`signal`] from lmc; refused with
/// `EINVAL`, as glibc refuses its internal signals).
#[no_mangle]
pub extern "C" fn __cow_lmc_reserved_signal(sig: i32) -> bool {
    sig == signal()
}

/// cowcc's wrappers: a mask read back from the kernel, as the program set it
/// ([`crate::segv_mask::to_program`]).
///
/// # Safety
///
/// `set` points to a valid, writable mask.
#[no_mangle]
pub unsafe extern "C" fn __cow_lmc_mask_to_program(set: *mut libc::sigset_t) {
    // SAFETY: valid and writable (caller).
    crate::segv_mask::to_program(unsafe { &mut *set });
}

/// Called by cowcc's wrappers at start-up: `hook(buf, cap)` fills `buf` with this thread's
/// ranges saved for the libc call in progress (`[start, len]` pairs) and returns their count.
#[no_mangle]
pub extern "C" fn __cow_lmc_ranges_hook(hook: extern "C" fn(*mut usize, usize) -> usize) {
    RANGES_HOOK.store(hook as usize, Ordering::Release);
}

/// Installs the handler of [`signal`] and the one of `SIGSEGV` that safe points fault into
/// (once, when lmc opens); the program's `SIGSEGV` action is kept for every other fault.
pub fn install() {
    // SAFETY: our handlers, installed with sigaction; `previous` receives the program's.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        // SA_RESTART: interrupted system calls go on after the cut.
        sa.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(signal(), &sa, std::ptr::null_mut());

        if SEGV_INSTALLED.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut previous: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        // SA_ONSTACK: a program's handler for stack overflows runs on its alternate stack.
        sa.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigaction(libc::SIGSEGV, &sa, &mut previous);
        keep_program_segv(previous);
    }
    crate::segv_mask::activate();
}

/// Registers an object's poll page (inaccessible at once if a checkpoint is requested).
pub fn register_poll_page(page: usize) {
    for slot in &POLL_PAGES {
        match slot.compare_exchange(0, page, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                if POLL_ARMED.load(Ordering::Acquire) {
                    protect(page, libc::PROT_NONE);
                }
                return;
            }
            Err(p) if p == page => return,
            Err(_) => {}
        }
    }
    // More objects than slots: theirs stay accessible, their threads are parked at a
    // system-call boundary or the cut times out (reported as ETIMEDOUT).
}

fn protect(page: usize, prot: i32) {
    // SAFETY: a page-aligned page of an object's .bss that holds nothing else.
    unsafe { libc::mprotect(page as *mut libc::c_void, 4096, prot) };
}

/// The poll pages registered so far.
fn poll_pages() -> impl Iterator<Item = usize> {
    POLL_PAGES
        .iter()
        .map(|slot| slot.load(Ordering::Acquire))
        .take_while(|&page| page != 0)
}

/// Asks every thread for a checkpoint at its next safe point.
fn request() {
    PENDING.store(1, Ordering::Release);
    POLL_ARMED.store(true, Ordering::Release);
    poll_pages().for_each(|page| protect(page, libc::PROT_NONE));
}

/// Makes the poll pages accessible again. Always before the request's outcome is published,
/// so that the next request's pages are never opened by this one.
fn disarm() {
    POLL_ARMED.store(false, Ordering::Release);
    poll_pages().for_each(|page| protect(page, libc::PROT_READ | libc::PROT_WRITE));
}

/// A safe point with a checkpoint pending (a thread whose stack pointer is `sp` faulted on its
/// poll page): take it (single-threaded) or park in the cut.
fn at_safe_point(sp: usize) {
    if ALONE.load(Ordering::Acquire) {
        take_here();
    } else if ACTIVE.load(Ordering::Acquire) != 0 && publish_ranges(sp) {
        park();
    } else {
        // The request is being withdrawn: its pages open within microseconds.
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// Whether `addr` lies in a registered poll page.
fn in_poll_page(addr: usize) -> bool {
    poll_pages().any(|page| (page..page + 4096).contains(&addr))
}

extern "C" fn on_segv(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes this fault's siginfo.
    let addr = unsafe { (*info).si_addr() } as usize;
    if !in_poll_page(addr) {
        // SAFETY: the arguments of this very signal.
        unsafe { pass_to_program(sig, info, ctx) };
        return;
    }
    // SAFETY: reading and restoring this thread's errno around our system calls.
    let saved_errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes the interrupted context of this thread.
    let sp =
        unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RSP as usize] };
    at_safe_point(sp as usize);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// A fault that is not a safe point's: what the program asked for. Its handler is called as
/// the kernel would (see `sys::run_program_handler`; `SA_RESETHAND` honoured); with no handler,
/// the default action is restored and the faulting instruction runs again, so the process ends
/// as it would have without lmc.
///
/// # Safety
/// The arguments of a `SIGSEGV` being handled.
unsafe fn pass_to_program(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let action = PROGRAM_SEGV.load(Ordering::Acquire);
    // SAFETY: set by keep_program_segv from a leaked box, never freed.
    let Some(action) = (unsafe { action.as_ref() }) else {
        return default_action();
    };
    if action.sa_flags & libc::SA_RESETHAND != 0 {
        // SAFETY: a zeroed sigaction is SIG_DFL.
        keep_program_segv(unsafe { std::mem::zeroed() });
    }
    // SAFETY: the program's own action (kept from sigaction) and this signal's arguments.
    if !unsafe { crate::sys::run_program_handler(action, sig, info, ctx) } {
        default_action();
    }
}

/// Restores `SIGSEGV`'s default action; the faulting instruction, run again, ends the process
/// (from then on the program's own `sigaction` calls go to the kernel again).
fn default_action() {
    SEGV_INSTALLED.store(false, Ordering::Release);
    // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask.
    unsafe {
        let sa: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
    }
}

fn keep_program_segv(action: libc::sigaction) {
    PROGRAM_SEGV.store(Box::into_raw(Box::new(action)), Ordering::Release);
}

/// The program sets or reads its `SIGSEGV` action (cowcc's wrappers): kept for
/// [`pass_to_program`] while lmc's handler is installed. False if it is not: the wrapper calls
/// `sigaction` itself.
pub fn program_segv_action(
    act: Option<&libc::sigaction>,
    old: Option<&mut libc::sigaction>,
) -> bool {
    if !SEGV_INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    let current = PROGRAM_SEGV.load(Ordering::Acquire);
    if let Some(old) = old {
        // SAFETY: null or a leaked box, never freed.
        *old = match unsafe { current.as_ref() } {
            Some(a) => *a,
            // SAFETY: a zeroed sigaction is SIG_DFL.
            None => unsafe { std::mem::zeroed() },
        };
    }
    if let Some(act) = act {
        keep_program_segv(*act);
    }
    true
}

/// The single thread's own checkpoint, if it is still pending: a snapshot, then the ranges of
/// its wrapper call in progress saved again (its own stack is skipped by the slow path).
fn take_here() {
    if PENDING
        .compare_exchange(1, 0, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    let id = if super::lmc::threads_started() {
        -(libc::EAGAIN as i64) // it has just started one: the checkpointer gathers them all
    } else {
        let id = super::lmc::snapshot_for_cut();
        if id > 0 {
            let mut buf = [0usize; 16];
            if let Some(n) = own_ranges(&mut buf) {
                for pair in buf[..2 * n].chunks(2) {
                    super::lmc::save_again(pair[0], pair[1]);
                }
            }
        }
        id
    };
    disarm();
    TAKEN.store(
        if id == 0 { -(libc::EIO as i64) } else { id },
        Ordering::Release,
    );
}

/// The checkpointer's checkpoint of a program whose only thread is `tid`: posted, then taken
/// by that thread itself (signalled while it sits in the kernel). `-EAGAIN` if the program
/// started a thread meanwhile; `-ECANCELED` if the checkpointer stops first; `-ETIMEDOUT` if
/// the thread took none within [`TIMEOUT_NS`] (it blocks the signal in the kernel).
pub fn take_alone(tid: i32) -> i64 {
    TAKEN.store(0, Ordering::Release);
    ALONE.store(true, Ordering::Release);
    request();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let start = crate::sys::monotonic_ns();
    let mut last_signal = start;
    // The signal is for a thread blocked in the kernel; a running one reaches a safe point by
    // itself. Asked at a fixed 50 µs, a thread whose signal delivery takes longer than that (a
    // slow TCG guest) spent all its time in the handler and never reached one: the interval
    // doubles up to 10 ms.
    let mut interval = 50_000u64;
    let id = loop {
        let id = TAKEN.load(Ordering::Acquire);
        if id != 0 {
            break id;
        }
        let now = crate::sys::monotonic_ns();
        let give_up = if crate::checkpoint::stopping() {
            Some(libc::ECANCELED)
        } else if now - start > TIMEOUT_NS {
            Some(libc::ETIMEDOUT)
        } else {
            None
        };
        // Withdrawn only if the thread has not begun taking it.
        if let Some(errno) = give_up {
            if PENDING
                .compare_exchange(1, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                disarm();
                break -(errno as i64);
            }
        }
        if now - last_signal > interval {
            last_signal = now;
            interval = (interval * 2).min(10_000_000);
            ask_to_park(pid, tid);
        }
        std::thread::yield_now();
    };
    ALONE.store(false, Ordering::Release);
    id
}

/// This thread's wrapper ranges (`[start, len]` pairs in `buf`), or None if they do not fit.
fn own_ranges(buf: &mut [usize; 16]) -> Option<usize> {
    let hook = RANGES_HOOK.load(Ordering::Acquire);
    if hook == 0 {
        return Some(0);
    }
    // SAFETY: set by `__cow_lmc_ranges_hook` from a function of that type.
    let hook: extern "C" fn(*mut usize, usize) -> usize = unsafe { std::mem::transmute(hook) };
    let n = hook(buf.as_mut_ptr(), buf.len() / 2);
    (n <= buf.len() / 2).then_some(n)
}

/// Parks the calling thread in the cut in progress, if any, until it is over. Async-signal-safe.
fn park() {
    let cut = ACTIVE.load(Ordering::Acquire);
    if cut == 0 {
        return;
    }
    let i = NEXT_PARKED.fetch_add(1, Ordering::AcqRel);
    if i < MAX_THREADS {
        PARKED[i].store(
            (cut as u64) << 32 | gettid() as u32 as u64,
            Ordering::Release,
        );
    }
    let start = crate::sys::monotonic_ns();
    loop {
        let released = RELEASED.load(Ordering::Acquire);
        if released >= cut {
            return;
        }
        if crate::sys::monotonic_ns() - start < SPIN_NS {
            std::hint::spin_loop();
        } else {
            futex(&RELEASED, libc::FUTEX_WAIT, released);
        }
    }
}

/// Sends thread `tid` of process `pid` (ours) the signal that parks it at a system-call
/// boundary.
fn ask_to_park(pid: i32, tid: i32) {
    // SAFETY: tgkill to a thread of our own process.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) };
}

/// Whether a thread interrupted at `pc` with `rax` is at a system-call boundary where nothing of
/// the call has happened (x86-64 `syscall` is `0f 05`): at the instruction (a call about to
/// start, or to be restarted), or right after one that was interrupted (`-EINTR`). Not right
/// after a call that completed: a `read` there has already written its buffer, and the code
/// that goes with it (`got = buf[0]` in `lmc_threads.c`) has not run — a cut there broke the
/// program's own invariant (a CI failure, rare); the thread is asked again 50 µs later.
fn at_syscall(pc: usize, rax: i64) -> bool {
    // SAFETY: `pc` is in mapped, readable code (the interrupted thread runs it); the bytes
    // before it are read only when they lie in the same page.
    unsafe {
        let here = std::ptr::read_unaligned(pc as *const [u8; 2]);
        let before = if pc & 0xfff >= 2 {
            std::ptr::read_unaligned((pc - 2) as *const [u8; 2])
        } else {
            [0, 0]
        };
        here == [0x0f, 0x05] || (before == [0x0f, 0x05] && rax == -(libc::EINTR as i64))
    }
}

extern "C" fn on_signal(_sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: reading and restoring this thread's errno around our system calls.
    let saved_errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes the interrupted context of this thread.
    let regs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
    let (pc, sp, rax) = (
        regs[libc::REG_RIP as usize] as usize,
        regs[libc::REG_RSP as usize] as usize,
        regs[libc::REG_RAX as usize],
    );
    if at_syscall(pc, rax) && !super::lmc::lock_held() {
        if ALONE.load(Ordering::Acquire) {
            take_here();
        } else if ACTIVE.load(Ordering::Acquire) != 0 && publish_ranges(sp) {
            park();
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Copies the ranges this thread's wrapper call saved into [`RANGES`], with `sp`, a stack
/// pointer of the thread. False if they do not fit: the thread must not park then.
fn publish_ranges(sp: usize) -> bool {
    let mut buf = [0usize; 16];
    let Some(n) = own_ranges(&mut buf) else {
        return false;
    };
    for pair in buf[..2 * n].chunks(2) {
        let i = NEXT_RANGE.fetch_add(1, Ordering::AcqRel);
        if let Some(slot) = RANGES.get(i) {
            slot.0.store(pair[0], Ordering::Relaxed);
            slot.2.store(sp, Ordering::Relaxed);
            slot.1.store(pair[1], Ordering::Release);
        }
    }
    true
}

/// The mapping that holds `addr` (`/proc/self/maps`), if any. Read with system calls into the
/// book: while threads are parked, one of them may hold the allocator's lock.
fn mapping_of(addr: usize) -> Option<(usize, usize)> {
    let text = crate::maps::read_file(c"/proc/self/maps").ok()?;
    let text = std::str::from_utf8(text.as_slice()).ok()?;
    text.lines().find_map(|line| {
        let (a, b) = line.split(' ').next()?.split_once('-')?;
        let (a, b) = (
            usize::from_str_radix(a, 16).ok()?,
            usize::from_str_radix(b, 16).ok()?,
        );
        (a <= addr && addr < b).then_some((a, b))
    })
}

/// The program's only thread, if it has one (libcow's own and the caller's not counted).
pub fn single_program_thread() -> Option<i32> {
    let mut tids = crate::book::BookVec::new();
    program_threads(&mut tids).ok()?;
    (tids.len() == 1).then(|| tids.as_slice()[0])
}

/// Threads of this process but the caller and libcow's own.
fn program_threads(out: &mut crate::book::BookVec<i32>) -> std::io::Result<()> {
    crate::world::list_tids(out)?;
    let me = gettid();
    let ours = crate::checkpoint::thread_id();
    out.retain(|&t| t != me && Some(t) != ours);
    Ok(())
}

/// Every thread but the caller (and libcow's own) parked at a safe point or a system-call
/// boundary, `snapshot` taken, the published ranges saved again with `save`, everyone released.
/// Returns `snapshot`'s result, or `-ETIMEDOUT` / `-EAGAIN` (too many threads or ranges).
pub fn cut(snapshot: impl FnOnce() -> i64, save: impl Fn(usize, usize)) -> i64 {
    // One cut at a time (the checkpointer's and a program thread's own cow_snapshot). A thread
    // waiting here is at a system-call boundary: the other cut parks it.
    static CUTTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CUTTING.lock().unwrap_or_else(|e| e.into_inner());
    let mut tids = crate::book::BookVec::new();
    let mut parked = crate::book::BookVec::new();
    let mut missing = crate::book::BookVec::new();
    let cut = RELEASED.load(Ordering::Acquire) + 1;
    NEXT_PARKED.store(0, Ordering::Release);
    NEXT_RANGE.store(0, Ordering::Release);
    ACTIVE.store(cut, Ordering::Release);
    request();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let start = crate::sys::monotonic_ns();
    let mut last_signal = start;
    let mut interval = 50_000u64; // doubling, as in take_alone
    let outcome = loop {
        if program_threads(&mut tids).is_err() {
            break -(libc::EAGAIN as i64);
        }
        parked.clear();
        for slot in &PARKED[..NEXT_PARKED.load(Ordering::Acquire).min(MAX_THREADS)] {
            let v = slot.load(Ordering::Acquire);
            if (v >> 32) as u32 == cut {
                parked.push(v as u32 as i32);
            }
        }
        // In the book, as everything here: a parked thread may hold the allocator's lock.
        missing.clear();
        for &t in tids.as_slice() {
            if !parked.as_slice().contains(&t) {
                missing.push(t);
            }
        }
        if missing.is_empty() {
            break if NEXT_PARKED.load(Ordering::Acquire) > MAX_THREADS
                || NEXT_RANGE.load(Ordering::Acquire) > MAX_RANGES
            {
                -(libc::EAGAIN as i64)
            } else {
                let id = snapshot();
                if id > 0 {
                    let n = NEXT_RANGE.load(Ordering::Acquire).min(MAX_RANGES);
                    for slot in &RANGES[..n] {
                        let len = slot.1.load(Ordering::Acquire);
                        let (start, sp) = (
                            slot.0.load(Ordering::Relaxed),
                            slot.2.load(Ordering::Relaxed),
                        );
                        // A buffer on the parked thread's own stack is not covered.
                        let on_stack = mapping_of(sp)
                            .is_some_and(|(a, b)| start >= a && start.saturating_add(len) <= b);
                        if !on_stack {
                            save(start, len);
                        }
                    }
                }
                id
            };
        }
        let now = crate::sys::monotonic_ns();
        if now - start > TIMEOUT_NS {
            break -(libc::ETIMEDOUT as i64);
        }
        // Running threads reach a safe point within microseconds; the others are in the
        // kernel: ask them (again) to park at the boundary.
        if now - last_signal > interval {
            last_signal = now;
            interval = (interval * 2).min(10_000_000);
            for &tid in missing.as_slice() {
                ask_to_park(pid, tid);
            }
        }
        std::thread::yield_now();
    };
    disarm();
    PENDING.store(0, Ordering::Release);
    ACTIVE.store(0, Ordering::Release);
    RELEASED.store(cut, Ordering::Release);
    futex(&RELEASED, libc::FUTEX_WAKE, i32::MAX as u32);
    outcome
}
