//! Stopping the process's other threads around a snapshot or restore.
//!
//! The in-process backends read and rewrite memory that other threads may be writing. Before a
//! snapshot or restore, every other thread of the process is sent a real-time signal whose
//! handler records its stack pointer (so its stack is not covered), announces itself and waits
//! on a futex until the operation is over. Threads created meanwhile are found by listing
//! `/proc/self/task` again until the set is stable. The handler is async-signal-safe: atomics and
//! raw futex calls only, and it preserves `errno`.
//!
//! **Parking.** Waking a sleeping thread to stop it costs tens of µs (a context switch, often an
//! idle vCPU's wake-up), which dominates a snapshot taken every event-loop iteration. With a
//! parking time set ([`set_parking`]), a stopped thread is not woken when the operation ends: it
//! stays parked in the handler until its parking time has passed, and a stop meanwhile holds it
//! again for free. A parked thread leaves on its own at its deadline (even if the caller is
//! blocked on a lock that thread holds, so parking cannot deadlock), so other threads are
//! delayed by at most the parking time after a stop; the futex protocol means no wake-up they
//! were sent meanwhile is lost.

use crate::book::{self, BookVec};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most threads stopped at once.
const MAX_THREADS: usize = 4096;

/// A slot's state word: the stop epoch in the high bits, one of these kinds in the low two.
const FREE: u32 = 0;
/// Stopped by the operation of the epoch in the high bits.
const HELD: u32 = 1;
/// Not needed now, but staying until its deadline (parking).
const PARKED: u32 = 2;
/// Told to go.
const RELEASED: u32 = 3;
/// How long a held thread sleeps before it looks whether the operation it waits for was given up.
const HELD_RECHECK_NS: u64 = 1_000_000;

/// One stopped (or parked) thread.
struct Slot {
    tid: AtomicI32,
    state: AtomicU32,
    stack_pointer: AtomicUsize,
    thread_pointer: AtomicUsize,
}

struct World {
    /// Odd while an operation holds the threads; incremented at its start and end.
    epoch: AtomicU32,
    /// Slots in use are below this.
    high: AtomicUsize,
    /// The process the slots belong to (a forked child inherits them, not the threads).
    pid: AtomicI32,
    parking_ns: AtomicU64,
    slots: [Slot; MAX_THREADS],
}

static WORLD: OnceLock<&'static World> = OnceLock::new();

/// The real-time signal that stops a thread; a program must not block it (libcow_preload's
/// `pthread_sigmask` leaves it out, as glibc leaves out its own internal signals).
pub fn signal() -> i32 {
    libc::SIGRTMAX() - 3
}

/// Lets stopped threads stay parked for `ns` after an operation (0: they go at once).
pub fn set_parking(ns: u64) {
    world().parking_ns.store(ns, Ordering::Relaxed);
}

fn world() -> &'static World {
    WORLD.get_or_init(|| {
        let w = book::leak(World {
            epoch: AtomicU32::new(0),
            high: AtomicUsize::new(0),
            pid: AtomicI32::new(0),
            parking_ns: AtomicU64::new(0),
            slots: [const {
                Slot {
                    tid: AtomicI32::new(0),
                    state: AtomicU32::new(FREE),
                    stack_pointer: AtomicUsize::new(0),
                    thread_pointer: AtomicUsize::new(0),
                }
            }; MAX_THREADS],
        });
        // SAFETY: installing our handler for a signal reserved for libcow; SA_RESTART keeps
        // interrupted system calls going in the stopped threads.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal(), &sa, std::ptr::null_mut());
        }
        w
    })
}

const fn word(epoch: u32, kind: u32) -> u32 {
    ((epoch & EPOCH_MASK) << 2) | kind
}

/// The bits of an epoch a state word keeps.
const EPOCH_MASK: u32 = u32::MAX >> 2;

const fn kind(state: u32) -> u32 {
    state & 3
}

/// Waits while `word` holds `val`, at most `timeout_ns` (none if 0).
fn futex_wait(word: &AtomicU32, val: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    let timeout = if timeout_ns == 0 {
        std::ptr::null()
    } else {
        &ts as *const libc::timespec
    };
    // SAFETY: a futex wait on a live 32-bit atomic with a relative timeout or none.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            timeout,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a futex wake on a live 32-bit atomic.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        )
    };
}

extern "C" fn on_stop(_sig: i32) {
    // SAFETY: reading and restoring this thread's errno around our system calls.
    let saved_errno = unsafe { *libc::__errno_location() };
    if let Some(w) = WORLD.get() {
        park(w);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// The stopped thread's side: take a slot, announce, wait until released (or, parking, until
/// its deadline unless held again).
fn park(w: &World) {
    let epoch = w.epoch.load(Ordering::Acquire);
    if epoch.is_multiple_of(2) {
        return; // A signal from an operation that gave up on us: nothing holds us.
    }
    let tid = gettid();
    let Some(i) = (0..MAX_THREADS).find(|&i| {
        w.slots[i]
            .tid
            .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }) else {
        return;
    };
    w.high.fetch_max(i + 1, Ordering::AcqRel);
    let slot = &w.slots[i];
    let marker = 0u8;
    slot.stack_pointer
        .store(&marker as *const u8 as usize, Ordering::Release);
    // SAFETY: pthread_self only reads the thread pointer.
    slot.thread_pointer
        .store(unsafe { libc::pthread_self() } as usize, Ordering::Release);
    slot.state.store(word(epoch, HELD), Ordering::Release);
    let deadline = crate::sys::monotonic_ns() + w.parking_ns.load(Ordering::Relaxed);
    loop {
        let s = slot.state.load(Ordering::Acquire);
        match kind(s) {
            HELD => {
                // The operation that holds us ended without releasing us (it gave up): go.
                if w.epoch.load(Ordering::Acquire) & EPOCH_MASK != s >> 2 {
                    break;
                }
                futex_wait(&slot.state, s, HELD_RECHECK_NS);
            }
            PARKED => {
                let now = crate::sys::monotonic_ns();
                if now >= deadline {
                    if slot
                        .state
                        .compare_exchange(s, FREE, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        break;
                    }
                    continue; // Held again just now.
                }
                futex_wait(&slot.state, s, deadline - now);
            }
            _ => break,
        }
    }
    slot.state.store(FREE, Ordering::Release);
    slot.tid.store(0, Ordering::Release);
}

/// The other threads, stopped until this value is dropped.
pub struct Stopped {
    epoch: u32,
    tids: BookVec<i32>,
    /// Stack pointers of every thread, including the caller's.
    stack_pointers: BookVec<usize>,
    /// Thread pointers (glibc's `struct pthread`, which holds the rseq area the kernel writes)
    /// of every thread, including the caller's.
    thread_pointers: BookVec<usize>,
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Lists the thread ids of this process.
fn list_tids(out: &mut BookVec<i32>) -> std::io::Result<()> {
    out.clear();
    // SAFETY: opening a directory with a NUL-terminated path; closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/task".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: getdents64 fills our stack buffer with linux_dirent64 records.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, char name[].
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(tid) = std::str::from_utf8(name).ok().and_then(|s| s.parse().ok()) {
                out.push(tid);
            }
            off += reclen;
        }
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Stops every other thread of the process. Fails with `ETIMEDOUT` if some thread does not
/// stop within 5 s (it blocks the signal, say); then nothing stays stopped.
pub fn stop_others() -> std::io::Result<Stopped> {
    let w = world();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if w.pid.swap(pid, Ordering::AcqRel) != pid {
        // A forked child: the slots name its parent's threads.
        for slot in &w.slots[..w.high.load(Ordering::Acquire)] {
            slot.state.store(FREE, Ordering::Release);
            slot.tid.store(0, Ordering::Release);
        }
    }
    let epoch = w.epoch.fetch_add(1, Ordering::AcqRel) + 1;
    let me = gettid();
    // Parked threads are held again without a signal.
    let mut held: BookVec<i32> = BookVec::new();
    for slot in &w.slots[..w.high.load(Ordering::Acquire)] {
        let s = slot.state.load(Ordering::Acquire);
        if kind(s) == PARKED
            && slot
                .state
                .compare_exchange(s, word(epoch, HELD), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            held.push(slot.tid.load(Ordering::Acquire));
        }
    }
    let mut signalled: BookVec<i32> = BookVec::new();
    let mut now: BookVec<i32> = BookVec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        list_tids(&mut now)?;
        let mut new = 0;
        for &tid in now.as_slice() {
            if tid == me || held.as_slice().contains(&tid) || signalled.as_slice().contains(&tid) {
                continue;
            }
            // SAFETY: tgkill to a thread of our own process.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) } == 0 {
                signalled.push(tid);
                new += 1;
            }
        }
        while !signalled.as_slice().iter().all(|&tid| holds(w, epoch, tid)) {
            if std::time::Instant::now() > deadline {
                release(w, epoch);
                return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            std::thread::yield_now();
        }
        if new == 0 {
            break;
        }
    }
    let mut tids = BookVec::new();
    let mut stack_pointers = BookVec::new();
    let mut thread_pointers = BookVec::new();
    let marker = 0u8;
    tids.push(me);
    stack_pointers.push(&marker as *const u8 as usize);
    // SAFETY: pthread_self only reads the thread pointer.
    thread_pointers.push(unsafe { libc::pthread_self() } as usize);
    for slot in &w.slots[..w.high.load(Ordering::Acquire)] {
        if slot.state.load(Ordering::Acquire) == word(epoch, HELD) {
            tids.push(slot.tid.load(Ordering::Acquire));
            stack_pointers.push(slot.stack_pointer.load(Ordering::Acquire));
            thread_pointers.push(slot.thread_pointer.load(Ordering::Acquire));
        }
    }
    tids.as_mut_slice().sort_unstable();
    Ok(Stopped {
        epoch,
        tids,
        stack_pointers,
        thread_pointers,
    })
}

/// Whether thread `tid` is in the handler, held by the operation of `epoch`.
fn holds(w: &World, epoch: u32, tid: i32) -> bool {
    w.slots[..w.high.load(Ordering::Acquire)]
        .iter()
        .any(|slot| {
            slot.state.load(Ordering::Acquire) == word(epoch, HELD)
                && slot.tid.load(Ordering::Acquire) == tid
        })
}

/// Ends the operation of `epoch`: its threads park (no wake-up) or go.
fn release(w: &World, epoch: u32) {
    let parking = w.parking_ns.load(Ordering::Relaxed) > 0;
    for slot in &w.slots[..w.high.load(Ordering::Acquire)] {
        let held = word(epoch, HELD);
        let next = if parking { PARKED } else { RELEASED };
        if slot
            .state
            .compare_exchange(held, word(epoch, next), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && !parking
        {
            futex_wake(&slot.state);
        }
    }
    w.epoch.fetch_add(1, Ordering::AcqRel);
}

impl Stopped {
    /// Every thread of the process (sorted), the caller included.
    pub fn tids(&self) -> &[i32] {
        self.tids.as_slice()
    }

    /// A stack pointer of every thread, the caller's first.
    pub fn stack_pointers(&self) -> &[usize] {
        self.stack_pointers.as_slice()
    }

    /// The thread pointer of every thread, the caller's first.
    pub fn thread_pointers(&self) -> &[usize] {
        self.thread_pointers.as_slice()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        release(world(), self.epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// Waits until `done` holds, for at most 10 s.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    // One test: parking is process-wide, and the cases share the worker threads.
    #[test]
    fn stopped_threads_stay_still_and_parked_ones_go_by_their_deadline() {
        let counter = Arc::new(AtomicU64::new(0));
        let lock = Arc::new(Mutex::new(0u64));
        let quit = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (counter, lock, quit) = (counter.clone(), lock.clone(), quit.clone());
                std::thread::spawn(move || {
                    while !quit.load(Ordering::Relaxed) {
                        *lock.lock().unwrap() += 1;
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for parking_ns in [0, 2_000_000] {
            set_parking(parking_ns);
            for _ in 0..20 {
                let stopped = stop_others().unwrap();
                assert!(stopped.tids().len() > 3);
                let before = counter.load(Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
                assert_eq!(
                    counter.load(Ordering::Relaxed),
                    before,
                    "a stopped thread ran"
                );
                drop(stopped);
                // A worker may be parked holding the lock: it leaves by its deadline, so this
                // does not deadlock.
                *lock.lock().unwrap() += 1;
                assert!(eventually(|| counter.load(Ordering::Relaxed) > before + 100));
            }
        }
        set_parking(0);
        quit.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
    }
}
