//! The event-loop wait calls, interposed as recovery points (`cowctl run --recover`, see
//! `cow::recovery`): `epoll_wait`, `epoll_pwait`, `epoll_pwait2`, `poll`, `ppoll`, `select`,
//! `pselect`. Entering one ends the calling thread's iteration; returning events begins the
//! next, named by the descriptors the events are about. Without `--recover` each is a plain
//! call to libc's.
//!
//! An `epoll_event` carries the program's data, not a descriptor: `epoll_ctl` is interposed to
//! learn which descriptor each data value stands for.

use crate::raw::next;
use cow::backend::mprotect::before_kernel_write;
use cow::recovery::{self, CallerRegs};
use std::ffi::c_int;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Descriptors whose epoll data is remembered (higher ones are not shut down on a rollback).
const TRACKED_FDS: usize = 1 << 16;
/// Descriptors remembered per iteration.
const MAX_EVENT_FDS: usize = 1024;

/// The data each descriptor was registered with (`epoll_ctl` ADD/MOD), by descriptor.
static EPOLL_DATA: [AtomicU64; TRACKED_FDS] = [const { AtomicU64::new(0) }; TRACKED_FDS];
/// The epoll set (its descriptor + 1; 0: none) and events each descriptor was last registered
/// with, so that a connection severed by a rollback can be registered again (see
/// `cow::recovery`).
static EPOLL_SET: [AtomicI32; TRACKED_FDS] = [const { AtomicI32::new(0) }; TRACKED_FDS];
static EPOLL_EVENTS: [AtomicU32; TRACKED_FDS] = [const { AtomicU32::new(0) }; TRACKED_FDS];
/// The epoll set whose wait began the current iteration (+ 1; 0: a poll or select).
static ITERATION_SET: AtomicI32 = AtomicI32::new(0);
/// One past the highest descriptor registered.
static EPOLL_MAX_FD: AtomicUsize = AtomicUsize::new(0);

static REAL_EPOLL_CTL: AtomicUsize = AtomicUsize::new(0);
static REAL_EPOLL_WAIT: AtomicUsize = AtomicUsize::new(0);
static REAL_EPOLL_PWAIT: AtomicUsize = AtomicUsize::new(0);
static REAL_EPOLL_PWAIT2: AtomicUsize = AtomicUsize::new(0);
static REAL_POLL: AtomicUsize = AtomicUsize::new(0);
static REAL_PPOLL: AtomicUsize = AtomicUsize::new(0);
static REAL_SELECT: AtomicUsize = AtomicUsize::new(0);
static REAL_PSELECT: AtomicUsize = AtomicUsize::new(0);

/// libc's `name`, as a function of type `F` (None if libc lacks it).
fn real<F: Copy>(slot: &AtomicUsize, name: &std::ffi::CStr) -> Option<F> {
    let f = next(slot, name);
    // SAFETY: `F` is the function pointer type of libc's `name`, which has the same size.
    (f != 0).then(|| unsafe { std::mem::transmute_copy::<usize, F>(&f) })
}

fn no_symbol() -> c_int {
    // SAFETY: writing this thread's errno.
    unsafe { *libc::__errno_location() = libc::ENOSYS };
    -1
}

/// `epoll_ctl(2)`, as the program calls it: remembers which descriptor a data value names.
///
/// # Safety
///
/// As `epoll_ctl`.
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
    let Some(f) = real::<F>(&REAL_EPOLL_CTL, c"epoll_ctl") else {
        return no_symbol();
    };
    // SAFETY: forwarded unchanged.
    let rc = unsafe { f(epfd, op, fd, event) };
    let Some(i) = usize::try_from(fd).ok().filter(|&i| i < TRACKED_FDS) else {
        return rc;
    };
    if rc == 0 && (op == libc::EPOLL_CTL_ADD || op == libc::EPOLL_CTL_MOD) && !event.is_null() {
        // SAFETY: `event` is valid (the call succeeded with it).
        let (data, events) = unsafe { ((*event).u64, (*event).events) };
        EPOLL_DATA[i].store(data, Ordering::Relaxed);
        EPOLL_SET[i].store(epfd + 1, Ordering::Relaxed);
        EPOLL_EVENTS[i].store(events, Ordering::Relaxed);
        EPOLL_MAX_FD.fetch_max(i + 1, Ordering::Relaxed);
    } else if rc == 0 && op == libc::EPOLL_CTL_DEL {
        EPOLL_SET[i].store(0, Ordering::Relaxed);
    }
    rc
}

/// Registers `fd` (just severed by a rollback: a new file under the same number, which the
/// epoll set no longer watches) with the epoll set of the iteration, as the program last did,
/// so the program hears of the end of the connection and closes it. Async-signal-safe.
extern "C" fn reregister(fd: c_int) {
    let Some(i) = usize::try_from(fd).ok().filter(|&i| i < TRACKED_FDS) else {
        return;
    };
    let set = EPOLL_SET[i].load(Ordering::Relaxed);
    if set == 0 || set != ITERATION_SET.load(Ordering::Relaxed) {
        return;
    }
    type F = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
    let Some(f) = real::<F>(&REAL_EPOLL_CTL, c"epoll_ctl") else {
        return;
    };
    let mut event = libc::epoll_event {
        events: EPOLL_EVENTS[i].load(Ordering::Relaxed),
        u64: EPOLL_DATA[i].load(Ordering::Relaxed),
    };
    // SAFETY: adding a descriptor of ours to the program's epoll set with a valid event.
    unsafe { f(set - 1, libc::EPOLL_CTL_ADD, fd, &mut event) };
}

/// The descriptor registered with `data` (several may share it: the first is taken).
fn fd_of(data: u64) -> Option<i32> {
    let max = EPOLL_MAX_FD.load(Ordering::Relaxed);
    // A common case first: the program stored the descriptor itself as its data.
    if let Ok(fd) = usize::try_from(data) {
        if fd < max && EPOLL_DATA[fd].load(Ordering::Relaxed) == data {
            return Some(fd as i32);
        }
    }
    (0..max)
        .find(|&fd| EPOLL_DATA[fd].load(Ordering::Relaxed) == data)
        .map(|fd| fd as i32)
}

/// Begins an iteration for `n` epoll events.
fn begin_epoll(epfd: usize, regs: *const CallerRegs, events: *const libc::epoll_event, n: c_int) {
    ITERATION_SET.store(epfd as c_int + 1, Ordering::Relaxed);
    let mut fds = [0i32; MAX_EVENT_FDS];
    let mut k = 0;
    for i in 0..(n as usize).min(MAX_EVENT_FDS) {
        // SAFETY: the wait filled `n` events.
        let data = unsafe { (*events.add(i)).u64 };
        if let Some(fd) = fd_of(data) {
            fds[k] = fd;
            k += 1;
        }
    }
    // SAFETY: `regs` was saved by the shim for the call returning now.
    unsafe { recovery::begin(&*regs, &fds[..k], -1) };
}

/// Begins an iteration for the ready entries of a `poll` set.
fn begin_poll(regs: *const CallerRegs, set: *const libc::pollfd, nfds: usize) {
    ITERATION_SET.store(0, Ordering::Relaxed);
    let mut fds = [0i32; MAX_EVENT_FDS];
    let mut k = 0;
    for i in 0..nfds {
        // SAFETY: the set has `nfds` entries.
        let p = unsafe { &*set.add(i) };
        if p.revents != 0 && k < MAX_EVENT_FDS {
            fds[k] = p.fd;
            k += 1;
        }
    }
    // SAFETY: as in `begin_epoll`.
    unsafe { recovery::begin(&*regs, &fds[..k], -1) };
}

/// Begins an iteration for the descriptors left in `select`'s sets.
fn begin_select(regs: *const CallerRegs, nfds: c_int, sets: [*mut libc::fd_set; 3]) {
    ITERATION_SET.store(0, Ordering::Relaxed);
    let mut fds = [0i32; MAX_EVENT_FDS];
    let mut k = 0;
    for fd in 0..nfds.clamp(0, libc::FD_SETSIZE as c_int) {
        // SAFETY: non-null sets are the program's, sized for FD_SETSIZE.
        let ready = sets
            .iter()
            .any(|&s| !s.is_null() && unsafe { libc::FD_ISSET(fd, s) });
        if ready && k < MAX_EVENT_FDS {
            fds[k] = fd;
            k += 1;
        }
    }
    // SAFETY: as in `begin_epoll`.
    unsafe { recovery::begin(&*regs, &fds[..k], -1) };
}

cow::recovery_point! {
    /// `epoll_wait(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `epoll_wait`.
    fn epoll_wait(epfd: c_int, events: *mut libc::epoll_event, max: c_int, timeout: c_int)
        => epoll_wait_impl
}

extern "C" fn epoll_wait_impl(
    epfd: usize,
    events: usize,
    max: usize,
    timeout: usize,
    _: usize,
    _: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_EPOLL_WAIT, c"epoll_wait") else {
        return no_symbol();
    };
    let events = events as *mut libc::epoll_event;
    let n = writing_events(events, max, || {
        waited_ms(timeout as c_int, |timeout| {
            // SAFETY: the program's arguments, forwarded (the timeout maybe 0, to look first).
            unsafe { f(epfd as c_int, events, max as c_int, timeout) }
        })
    });
    if n > 0 && recovery::enabled() {
        begin_epoll(epfd, regs, events, n);
    }
    n
}

cow::recovery_point! {
    /// `epoll_pwait(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `epoll_pwait`.
    fn epoll_pwait(
        epfd: c_int,
        events: *mut libc::epoll_event,
        max: c_int,
        timeout: c_int,
        sigmask: *const libc::sigset_t
    ) => epoll_pwait_impl
}

extern "C" fn epoll_pwait_impl(
    epfd: usize,
    events: usize,
    max: usize,
    timeout: usize,
    sigmask: usize,
    _: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        c_int,
        *const libc::sigset_t,
    ) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_EPOLL_PWAIT, c"epoll_pwait") else {
        return no_symbol();
    };
    let mut buf = crate::masks::empty_set();
    // SAFETY: the program's mask, null or valid.
    let sigmask = unsafe { crate::masks::kernel_mask(sigmask as *const libc::sigset_t, &mut buf) };
    let events = events as *mut libc::epoll_event;
    let n = writing_events(events, max, || {
        waited_ms(timeout as c_int, |timeout| {
            // SAFETY: the program's arguments, forwarded (the mask maybe our copy, the timeout
            // maybe 0, to look first).
            unsafe { f(epfd as c_int, events, max as c_int, timeout, sigmask) }
        })
    });
    if n > 0 && recovery::enabled() {
        begin_epoll(epfd, regs, events, n);
    }
    n
}

cow::recovery_point! {
    /// `epoll_pwait2(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `epoll_pwait2`.
    fn epoll_pwait2(
        epfd: c_int,
        events: *mut libc::epoll_event,
        max: c_int,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t
    ) => epoll_pwait2_impl
}

extern "C" fn epoll_pwait2_impl(
    epfd: usize,
    events: usize,
    max: usize,
    timeout: usize,
    sigmask: usize,
    _: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_EPOLL_PWAIT2, c"epoll_pwait2") else {
        return no_symbol();
    };
    let mut buf = crate::masks::empty_set();
    // SAFETY: the program's mask, null or valid.
    let sigmask = unsafe { crate::masks::kernel_mask(sigmask as *const libc::sigset_t, &mut buf) };
    let events = events as *mut libc::epoll_event;
    let n = writing_events(events, max, || {
        let wait = |timeout| {
            // SAFETY: the program's arguments, forwarded (the mask maybe our copy, the
            // timeout maybe zero, to look first).
            unsafe { f(epfd as c_int, events, max as c_int, timeout, sigmask) }
        };
        // SAFETY: the program's timeout, null or valid.
        unsafe { waited_timespec(timeout as *const libc::timespec, wait) }
    });
    if n > 0 && recovery::enabled() {
        begin_epoll(epfd, regs, events, n);
    }
    n
}

cow::recovery_point! {
    /// `poll(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `poll`.
    fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) => poll_impl
}

extern "C" fn poll_impl(
    fds: usize,
    nfds: usize,
    timeout: usize,
    _: usize,
    _: usize,
    _: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_POLL, c"poll") else {
        return no_symbol();
    };
    let set = fds as *mut libc::pollfd;
    let n = writing_pollfds(set, nfds, || {
        waited_ms(timeout as c_int, |timeout| {
            // SAFETY: the program's arguments, forwarded (the timeout maybe 0, to look first).
            unsafe { f(set, nfds as libc::nfds_t, timeout) }
        })
    });
    if n > 0 && recovery::enabled() {
        begin_poll(regs, set, nfds);
    }
    n
}

cow::recovery_point! {
    /// `ppoll(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `ppoll`.
    fn ppoll(
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t
    ) => ppoll_impl
}

extern "C" fn ppoll_impl(
    fds: usize,
    nfds: usize,
    timeout: usize,
    sigmask: usize,
    _: usize,
    _: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(
        *mut libc::pollfd,
        libc::nfds_t,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_PPOLL, c"ppoll") else {
        return no_symbol();
    };
    let mut buf = crate::masks::empty_set();
    // SAFETY: the program's mask, null or valid.
    let sigmask = unsafe { crate::masks::kernel_mask(sigmask as *const libc::sigset_t, &mut buf) };
    let set = fds as *mut libc::pollfd;
    let n = writing_pollfds(set, nfds, || {
        let wait = |timeout| {
            // SAFETY: the program's arguments, forwarded (the mask maybe our copy, the
            // timeout maybe zero, to look first).
            unsafe { f(set, nfds as libc::nfds_t, timeout, sigmask) }
        };
        // SAFETY: the program's timeout, null or valid.
        unsafe { waited_timespec(timeout as *const libc::timespec, wait) }
    });
    if n > 0 && recovery::enabled() {
        begin_poll(regs, set, nfds);
    }
    n
}

cow::recovery_point! {
    /// `select(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `select`.
    fn select(
        nfds: c_int,
        readfds: *mut libc::fd_set,
        writefds: *mut libc::fd_set,
        exceptfds: *mut libc::fd_set,
        timeout: *mut libc::timeval
    ) => select_impl
}

extern "C" fn select_impl(
    nfds: usize,
    readfds: usize,
    writefds: usize,
    exceptfds: usize,
    timeout: usize,
    _: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *mut libc::timeval,
    ) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_SELECT, c"select") else {
        return no_symbol();
    };
    let sets = [readfds, writefds, exceptfds].map(|s| s as *mut libc::fd_set);
    let mut tv = (timeout != 0).then(|| {
        // SAFETY: the program's timeout, valid when not null (select's contract).
        unsafe { *(timeout as *const libc::timeval) }
    });
    let tv_ptr = tv
        .as_mut()
        .map_or(std::ptr::null_mut(), |t| t as *mut libc::timeval);
    let n = selecting(nfds, sets, regs, |[r, w, e]| {
        // SAFETY: the program's arguments, its timeout replaced by our copy.
        unsafe { f(nfds as c_int, r, w, e, tv_ptr) }
    });
    if let Some(t) = tv {
        // SAFETY: as above; Linux reports the time left in it.
        unsafe { *(timeout as *mut libc::timeval) = t };
    }
    n
}

cow::recovery_point! {
    /// `pselect(2)`, a recovery point.
    ///
    /// # Safety
    ///
    /// As `pselect`.
    fn pselect(
        nfds: c_int,
        readfds: *mut libc::fd_set,
        writefds: *mut libc::fd_set,
        exceptfds: *mut libc::fd_set,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t
    ) => pselect_impl
}

extern "C" fn pselect_impl(
    nfds: usize,
    readfds: usize,
    writefds: usize,
    exceptfds: usize,
    timeout: usize,
    sigmask: usize,
    regs: *const CallerRegs,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    recovery::leave();
    let Some(f) = real::<F>(&REAL_PSELECT, c"pselect") else {
        return no_symbol();
    };
    let mut buf = crate::masks::empty_set();
    // SAFETY: the program's mask, null or valid.
    let sigmask = unsafe { crate::masks::kernel_mask(sigmask as *const libc::sigset_t, &mut buf) };
    let sets = [readfds, writefds, exceptfds].map(|s| s as *mut libc::fd_set);
    selecting(nfds, sets, regs, |[r, w, e]| {
        // SAFETY: the program's arguments.
        unsafe {
            f(
                nfds as c_int,
                r,
                w,
                e,
                timeout as *const libc::timespec,
                sigmask,
            )
        }
    })
}

/// select's and pselect's common part: `call` on sets of at most `FD_SETSIZE` descriptors
/// gets copies of the program's sets (`LocalSets`), on larger ones (the program allocated
/// them) the program's own, made writable first. An iteration begins when it returns events.
fn selecting(
    nfds: usize,
    sets: [*mut libc::fd_set; 3],
    regs: *const CallerRegs,
    call: impl Fn([*mut libc::fd_set; 3]) -> c_int,
) -> c_int {
    // A C int: the register's upper half is not the caller's.
    let fds = (nfds as c_int).max(0) as usize;
    let n = if fds > libc::FD_SETSIZE {
        let len = fds.min(1 << 20).div_ceil(8);
        crate::reads::retrying(
            || {
                sets.iter().for_each(|&s| {
                    before_kernel_write(s as usize, if s.is_null() { 0 } else { len })
                })
            },
            || call(sets) as isize,
        ) as c_int
    } else {
        let mut local = LocalSets::new(sets, fds);
        let n = call(local.pointers());
        local.copy_back(n);
        n
    };
    if n > 0 && recovery::enabled() {
        begin_select(regs, nfds as c_int, sets);
    }
    n
}

// The kernel writing into a write-protected page fails with `EFAULT` instead of faulting: under
// the mprotect backend the arrays these calls fill (redis' covered `epoll_event` array) are made
// writable first (`before_kernel_write`, a no-op under any other backend), and the call is made
// again if a snapshot protected them in between (epoll puts events it could not copy back on
// its ready list; poll's output is `revents` only). select's sets are input and output both: it
// fills copies on our stack, copied back by the program's own writes.

/// Calls a wait, `call(block)`. Where recovery takes the next iteration's checkpoint before
/// blocking (uffd: see `cow::recovery::checkpoint_before_blocking`) and the wait may
/// block, it looks first without blocking, and takes the checkpoint only if nothing is ready:
/// a server that is busy never blocks and takes its checkpoints as its waits return, an idle
/// one takes them while idle instead of delaying the request that wakes it. The wait's
/// timeout runs from the blocking call: the checkpoint lengthens it by its cost (≈ 0.1–0.2 ms).
/// (select and pselect take theirs after returning: their sets are input and output both.)
fn waited(may_block: bool, call: impl Fn(bool) -> c_int) -> c_int {
    if may_block && recovery::checkpoints_before_blocking() {
        let n = call(false);
        if n != 0 {
            return n;
        }
        recovery::checkpoint_before_blocking();
    }
    call(true)
}

/// [`waited`] for a wait whose timeout is in milliseconds (negative: none): `call(timeout)`.
fn waited_ms(timeout: c_int, call: impl Fn(c_int) -> c_int) -> c_int {
    waited(timeout != 0, |block| call(if block { timeout } else { 0 }))
}

/// [`waited`] for a wait whose timeout is a `timespec` (null: none): `call(timeout)`.
///
/// # Safety
///
/// `timeout` is null or valid.
unsafe fn waited_timespec(
    timeout: *const libc::timespec,
    call: impl Fn(*const libc::timespec) -> c_int,
) -> c_int {
    /// A zero timeout: look without blocking (the kernel writes no time back for it).
    static NO_WAIT: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: by the caller's contract.
    let may_block =
        timeout.is_null() || unsafe { (*timeout).tv_sec != 0 || (*timeout).tv_nsec != 0 };
    waited(may_block, |block| {
        call(if block { timeout } else { &NO_WAIT })
    })
}

/// `call` after making `max` events at `events` writable.
fn writing_events(events: *mut libc::epoll_event, max: usize, call: impl Fn() -> c_int) -> c_int {
    let len = (max as c_int).max(0) as usize * std::mem::size_of::<libc::epoll_event>();
    crate::reads::retrying(
        || before_kernel_write(events as usize, len),
        || call() as isize,
    ) as c_int
}

/// `call` after making `nfds` pollfds at `set` writable.
fn writing_pollfds(set: *mut libc::pollfd, nfds: usize, call: impl Fn() -> c_int) -> c_int {
    let len = nfds.min(1 << 20) * std::mem::size_of::<libc::pollfd>();
    crate::reads::retrying(
        || before_kernel_write(set as usize, len),
        || call() as isize,
    ) as c_int
}

/// Copies of select's three sets, on our stack: only the bytes that hold the first `nfds`
/// descriptors (a program may allocate no more: OpenSSH sizes its sets by `nfds`).
struct LocalSets {
    program: [*mut libc::fd_set; 3],
    copies: [libc::fd_set; 3],
    bytes: usize,
}

impl LocalSets {
    fn new(program: [*mut libc::fd_set; 3], nfds: usize) -> Self {
        // SAFETY: an all-zero fd_set is an empty set.
        let mut copies: [libc::fd_set; 3] = unsafe { std::mem::zeroed() };
        // Whole 64-bit words, as the kernel reads and writes them.
        let bytes = nfds.div_ceil(64) * 8;
        debug_assert!(bytes <= std::mem::size_of::<libc::fd_set>());
        for (c, &p) in copies.iter_mut().zip(&program) {
            if !p.is_null() {
                // SAFETY: the program's set holds at least `bytes` bytes (select's contract);
                // our copy is a whole fd_set.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        p as *const u8,
                        c as *mut libc::fd_set as *mut u8,
                        bytes,
                    )
                };
            }
        }
        LocalSets {
            program,
            copies,
            bytes,
        }
    }

    /// Where select writes: our copy of each set the program passed.
    fn pointers(&mut self) -> [*mut libc::fd_set; 3] {
        let program = self.program;
        let mut out = [std::ptr::null_mut(); 3];
        for ((o, c), p) in out.iter_mut().zip(self.copies.iter_mut()).zip(program) {
            if !p.is_null() {
                *o = c as *mut libc::fd_set;
            }
        }
        out
    }

    /// Gives the program select's results (left alone on an error, as select does).
    fn copy_back(&self, n: c_int) {
        if n < 0 {
            return;
        }
        for (c, &p) in self.copies.iter().zip(&self.program) {
            if !p.is_null() {
                // SAFETY: as in `new`; plain writes, which the mprotect backend tracks.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        c as *const libc::fd_set as *const u8,
                        p as *mut u8,
                        self.bytes,
                    )
                };
            }
        }
    }
}

/// Looks up every libc function this file forwards to, now: a lookup stores into this
/// library's own data, which the mprotect backend write-protects, and a first call may come
/// from a signal handler, where that fault would be fatal.
pub(crate) fn resolve_symbols() {
    recovery::set_epoll_reregister(reregister);
    next(&REAL_EPOLL_CTL, c"epoll_ctl");
    next(&REAL_EPOLL_WAIT, c"epoll_wait");
    next(&REAL_EPOLL_PWAIT, c"epoll_pwait");
    next(&REAL_EPOLL_PWAIT2, c"epoll_pwait2");
    next(&REAL_POLL, c"poll");
    next(&REAL_PPOLL, c"ppoll");
    next(&REAL_SELECT, c"select");
    next(&REAL_PSELECT, c"pselect");
}
