//! Stopping the process's other threads around a snapshot or restore.
//!
//! The in-process backends read and rewrite memory that other threads may be writing. Before a
//! snapshot or restore, every other thread of the process is sent a real-time signal whose
//! handler records its stack pointer (so its stack is not covered), announces itself and waits
//! on a futex until the operation is over. Threads created meanwhile are found by listing
//! `/proc/self/task` again until the set is stable. The handler is async-signal-safe: atomics and
//! raw futex calls only, and it preserves `errno`. Threads blocked in a wait that announced
//! itself ([`crate::idle`]: libcow_preload's condition-variable waits) are held without a
//! signal.

use crate::book::{self, BookVec};
use crate::sys;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most threads stopped at once.
const MAX_THREADS: usize = 4096;

struct World {
    generation: AtomicU32,
    arrived: AtomicUsize,
    next: AtomicUsize,
    stack_pointers: [AtomicUsize; MAX_THREADS],
    thread_pointers: [AtomicUsize; MAX_THREADS],
}

static WORLD: OnceLock<&'static World> = OnceLock::new();

/// Signals the kernel raises in a thread for what it does (a fault, a trap, `abort`): never
/// blocked by libcow, as blocking them does not defer them but kills the process.
pub const SYNCHRONOUS: [i32; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGABRT,
];

/// The real-time signal that stops a thread; a program must not block it (libcow_preload's
/// `pthread_sigmask` leaves it out, as glibc leaves out its own internal signals).
pub fn signal() -> i32 {
    libc::SIGRTMAX() - 3
}

/// Whether `sigaction(sig, act)` would take the stop signal from libcow (anything but libcow's
/// own handler): a program resetting every signal's action (daemons do, `SIG_DFL` or
/// `SIG_IGN` for 1..NSIG) made the next stop kill it, or be lost and the snapshot fail. It is
/// refused with `EINVAL`, as glibc refuses its own internal signals.
pub fn takes_stop_signal(sig: i32, act: Option<&libc::sigaction>) -> bool {
    sig == signal() && act.is_some_and(|a| a.sa_sigaction != on_stop as *const () as usize)
}

/// Blocks, in the calling thread (one of libcow's own), every signal but libcow's stop signal
/// and the synchronous faults: a signal sent to the process (`kill PID`) must reach a thread
/// of the program. Python's handlers, for one, only run when the main thread is woken: a
/// SIGUSR1 taken by libcow's control thread left python asleep.
pub fn block_process_signals() {
    // SAFETY: building a signal set on the stack and setting this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigdelset(&mut set, signal());
        for sig in SYNCHRONOUS {
            libc::sigdelset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn world() -> &'static World {
    WORLD.get_or_init(|| {
        let w = book::leak(World {
            generation: AtomicU32::new(0),
            arrived: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            stack_pointers: [const { AtomicUsize::new(0) }; MAX_THREADS],
            thread_pointers: [const { AtomicUsize::new(0) }; MAX_THREADS],
        });
        install_handler();
        w
    })
}

/// Installs the stop signal's handler (once).
fn install_handler() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    // SAFETY: installing our handler for a signal reserved for libcow; SA_RESTART keeps
    // interrupted system calls going in the stopped threads. Every asynchronous signal is
    // blocked while a thread is stopped: a program's handler (SIGTERM's, say) must not run in
    // a thread that is meant to be still, writing memory a snapshot is reading.
    INSTALLED.call_once(|| unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_stop as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        for sig in SYNCHRONOUS {
            libc::sigdelset(&mut sa.sa_mask, sig);
        }
        libc::sigaction(signal(), &sa, std::ptr::null_mut());
    });
}

/// Changes the calling thread's mask for the stop signal alone with `how` (`SIG_BLOCK` or
/// `SIG_UNBLOCK`) and returns the mask before. The system call itself: libcow_preload's
/// `pthread_sigmask` never blocks the stop signal, by design.
fn mask_stop_signal(how: i32) -> libc::sigset_t {
    crate::sys::sigprocmask_raw(how, &crate::sys::sigset_of(&[signal()]))
}

/// Blocks the stop signal in the calling thread, which is about to exec; returns the mask to
/// put back with [`restore_mask`] if the exec fails. A stop signal sent to a thread that execs
/// stays pending in the new process image, where no handler catches it any more: unblocked,
/// its default action ends the process (seen: `cowctl run --every 10` of a shell script that
/// execs, killed by signal 61). Blocked, it waits for the new image's libcow, which installs
/// its handler first ([`adopt_after_exec`]); a stopper waiting for this thread either dies
/// with the exec or sees it arrive once the mask is put back.
pub fn block_for_exec() -> libc::sigset_t {
    mask_stop_signal(libc::SIG_BLOCK)
}

/// Puts back the mask [`block_for_exec`] returned (the exec failed).
pub fn restore_mask(old: &libc::sigset_t) {
    crate::sys::sigprocmask_raw(libc::SIG_SETMASK, old);
}

/// At the start of a process image: installs the stop signal's handler, then unblocks the
/// signal, which an exec under libcow left blocked ([`block_for_exec`]). A stop signal still
/// pending from the image before then reaches the handler, which returns at once: this image
/// has stopped nothing.
pub fn adopt_after_exec() {
    install_handler();
    mask_stop_signal(libc::SIG_UNBLOCK);
}

/// A futex operation on `word` (private; no timeout).
pub(crate) fn futex(word: &AtomicU32, op: i32, val: u32) {
    // SAFETY: a futex call on a live 32-bit atomic; no timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            val,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

extern "C" fn on_stop(_sig: i32) {
    // SAFETY: reading and restoring this thread's errno around our system calls.
    let saved_errno = unsafe { *libc::__errno_location() };
    // Nothing stopped yet in this process image: a signal left pending by the image before an
    // exec (see `block_for_exec`).
    let Some(w) = WORLD.get() else { return };
    let marker = 0u8;
    let gen = w.generation.load(Ordering::Acquire);
    let i = w.next.fetch_add(1, Ordering::AcqRel);
    if i < MAX_THREADS {
        w.stack_pointers[i].store(&marker as *const u8 as usize, Ordering::Release);
        // SAFETY: pthread_self only reads the thread pointer.
        w.thread_pointers[i].store(unsafe { libc::pthread_self() } as usize, Ordering::Release);
    }
    w.arrived.fetch_add(1, Ordering::AcqRel);
    while w.generation.load(Ordering::Acquire) == gen {
        futex(&w.generation, libc::FUTEX_WAIT, gen);
    }
    crate::idle::note_activity();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// The other threads, stopped until this value is dropped.
pub struct Stopped {
    tids: BookVec<i32>,
    /// Stack pointers of every thread, including the caller's.
    stack_pointers: BookVec<usize>,
    /// Thread pointers (glibc's `struct pthread`, which holds the rseq area the kernel writes)
    /// of every thread, including the caller's.
    thread_pointers: BookVec<usize>,
    /// The idle threads held without a signal ([`crate::idle`]).
    held: BookVec<crate::idle::Held>,
    /// Futex words to wake once every thread is released ([`Stopped::rewound`]).
    wake: BookVec<usize>,
}

/// Whether thread `tid` of process `pid` is gone or exiting (no longer runs user code): gone
/// from the kernel's tables, or a zombie (`Z`), dead (`X`) or otherwise past its exit in
/// `/proc/self/task/TID/stat`.
fn exiting(pid: i32, tid: i32) -> bool {
    // SAFETY: signal 0 to a thread of our own process only checks that it exists.
    if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    let mut path = [0u8; 64];
    let path = sys::path_with_number(&mut path, b"/proc/self/task/", tid as u64, b"/stat");
    let Ok(file) = sys::RawFile::open(path, libc::O_RDONLY) else {
        return true;
    };
    let mut buf = [0u8; 512];
    let len = file.read(&mut buf).unwrap_or(0);
    let stat = &buf[..len];
    // The state follows the last ')' (the name may hold any bytes).
    let state = stat
        .iter()
        .rposition(|&b| b == b')')
        .and_then(|i| stat.get(i + 2));
    matches!(state, Some(b'Z' | b'X' | b'x'))
}

/// The calling thread's id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Lists the thread ids of this process.
pub(crate) fn list_tids(out: &mut BookVec<i32>) -> std::io::Result<()> {
    static TASKS: sys::ProcSelfFile =
        sys::ProcSelfFile::new(c"/proc/self/task", libc::O_RDONLY | libc::O_DIRECTORY, 0);
    out.clear();
    TASKS.with_position(|dir| {
        // SAFETY: rewinding a directory descriptor of ours; procfs lists the threads anew.
        if unsafe { libc::lseek(dir, 0, libc::SEEK_SET) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        read_tids(dir, out)
    })
}

/// The thread ids in directory `dir` (at its start) appended to `out`.
fn read_tids(dir: i32, out: &mut BookVec<i32>) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: getdents64 fills our stack buffer with linux_dirent64 records.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
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
    Ok(())
}

/// Stops every other thread of the process, holding those idle in an announced wait without
/// a signal ([`crate::idle`]). Fails with `ETIMEDOUT` if some thread does not stop within 5 s
/// (it blocks the signal, say); then nothing stays stopped. A restore that rewrites memory
/// under held threads says which pages with [`Stopped::rewound`].
pub fn stop_others() -> std::io::Result<Stopped> {
    stop(true)
}

/// [`stop_others`] for a restore whose pages libcow does not see (cow.ko restores in the
/// kernel): idle threads are signalled too. Such a restore may rewind the condition variable a
/// thread sleeps on: the interrupted futex wait, restarted after the stop, compares its word
/// again and, if the restore changed it, returns to libc, which re-reads the condition
/// variable; a thread held in the kernel would sleep on regardless.
pub fn stop_others_for_restore() -> std::io::Result<Stopped> {
    stop(false)
}

fn stop(hold_idle: bool) -> std::io::Result<Stopped> {
    let w = world();
    w.arrived.store(0, Ordering::Release);
    w.next.store(0, Ordering::Release);
    let me = gettid();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut signalled: BookVec<i32> = BookVec::new();
    // Threads idle in an announced wait, held without a signal.
    let mut held: BookVec<crate::idle::Held> = BookVec::new();
    let mut now: BookVec<i32> = BookVec::new();
    // The threads signalled or held so far, sorted at the top of each round.
    let mut known: BookVec<i32> = BookVec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let stopped = loop {
        list_tids(&mut now)?;
        known.sort_dedup();
        let mut new = 0;
        if hold_idle {
            // Not a thread signalled already: one that marked itself idle as the signal came
            // is stopped in the handler.
            let signalled_or_held = known.as_slice();
            let except = |tid| tid == me || signalled_or_held.binary_search(&tid).is_ok();
            crate::idle::hold_all(except, |h| {
                held.push(h);
                new += 1;
            });
            for h in &held.as_slice()[held.len() - new..] {
                known.push(h.tid);
            }
            known.sort_dedup();
        }
        let settled = known.len();
        for &tid in now.as_slice() {
            if tid == me || known.as_slice()[..settled].binary_search(&tid).is_ok() {
                continue;
            }
            // SAFETY: tgkill to a thread of our own process.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) } == 0 {
                signalled.push(tid);
                known.push(tid);
                new += 1;
            }
        }
        let mut spins = 0u32;
        while w.arrived.load(Ordering::Acquire) < signalled.len() {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                // A thread that was exiting (just joined, say) is still listed and takes the
                // signal, but never runs a handler again.
                signalled.retain(|&tid| !exiting(pid, tid));
            }
            if std::time::Instant::now() > deadline {
                release(w);
                for h in held.as_slice() {
                    crate::idle::release(h.slot);
                }
                return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            std::thread::yield_now();
        }
        if new == 0 {
            break signalled;
        }
    };
    let mut stack_pointers = BookVec::new();
    let mut thread_pointers = BookVec::new();
    let marker = 0u8;
    stack_pointers.push(&marker as *const u8 as usize);
    // SAFETY: pthread_self only reads the thread pointer.
    thread_pointers.push(unsafe { libc::pthread_self() } as usize);
    for i in 0..w.next.load(Ordering::Acquire).min(MAX_THREADS) {
        stack_pointers.push(w.stack_pointers[i].load(Ordering::Acquire));
        thread_pointers.push(w.thread_pointers[i].load(Ordering::Acquire));
    }
    let mut tids = stopped;
    for h in held.as_slice() {
        tids.push(h.tid);
        stack_pointers.push(h.stack_pointer);
        thread_pointers.push(h.thread_pointer);
    }
    tids.push(me);
    tids.as_mut_slice().sort_unstable();
    Ok(Stopped {
        tids,
        stack_pointers,
        thread_pointers,
        held,
        wake: BookVec::new(),
    })
}

fn release(w: &World) {
    w.generation.fetch_add(1, Ordering::AcqRel);
    futex(&w.generation, libc::FUTEX_WAKE, i32::MAX as u32);
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

    /// A restore rewrote `pages` (sorted page addresses) while the threads were stopped: a
    /// held thread whose wait sleeps on memory there (its condition variable or mutex) is
    /// woken once released, so that libc reads the words as they are now — held in the
    /// kernel, it would sleep on, perhaps on a word the restore rewound (a wake-up nobody will
    /// send). Spurious wake-ups are part of every condition-variable wait's contract.
    pub fn rewound(&mut self, pages: &[usize]) {
        /// Every futex word of a `pthread_cond_t` (48 bytes) or `pthread_mutex_t` (40 bytes)
        /// lies in its first 48 bytes.
        const WAIT_OBJECT: usize = 48;
        const PAGE: usize = 4096;
        for i in 0..self.held.len() {
            for object in self.held.as_slice()[i].waits_on {
                if object == 0 {
                    continue;
                }
                let first = object & !(PAGE - 1);
                let last = (object + WAIT_OBJECT - 1) & !(PAGE - 1);
                if pages.binary_search(&first).is_err() && pages.binary_search(&last).is_err() {
                    continue;
                }
                for word in (object..object + WAIT_OBJECT).step_by(4) {
                    self.wake.push(word);
                }
            }
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        release(world());
        for h in self.held.as_slice() {
            crate::idle::release(h.slot);
        }
        // After the release: a woken thread finds its wait's words rewound and, should it
        // sleep again, sleeps on their values now.
        for &word in self.wake.as_slice() {
            // SAFETY: FUTEX_WAKE only wakes waiters on the address (none is harmless); it
            // never reads the word. Private and shared: libc chooses per object.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word,
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    i32::MAX,
                );
                libc::syscall(libc::SYS_futex, word, libc::FUTEX_WAKE, i32::MAX);
            }
        }
    }
}
