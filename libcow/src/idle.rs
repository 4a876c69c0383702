//! Threads blocked in a wait that announced itself: a stop holds them without a signal.
//!
//! Stopping a thread by signal ([`crate::world`]) wakes it twice per snapshot — to stop, then
//! to go on — even when it sits in a condition-variable wait and would not have run at all:
//! redis' four background threads cost ≈ 100 µs of every uffd snapshot that way. So
//! libcow_preload's condition-variable waits announce themselves: before blocking, the thread
//! marks its slot *idle* ([`begin`]); a stop that finds the slot idle marks it *held* (one
//! compare-and-swap, no signal, no wake-up); a thread whose wait returns while it is held
//! waits in [`end`] until the stop is over. A program's signal handler that runs during the
//! wait passes the same gate first ([`interrupt`], from libcow_preload's handler wrapper).
//!
//! What a held thread can still write: nothing of the program's, except when its wait ends
//! during the stop (a timed wait timing out): libc then re-locks the wait's mutex before our
//! gate, so that one word may be seen by the snapshot either way — as when a signal stops a
//! thread just after it took a lock.
//!
//! A restore holds them too, but may rewind the words a held thread sleeps on: a wait says
//! which memory it sleeps on ([`begin_on`]: a condition variable and its mutex), and a restore
//! that rewrote it wakes the thread after the release ([`crate::world::Stopped::rewound`]), so
//! that libc looks at them again — a spurious wake-up, which every condition-variable wait
//! allows. (cow.ko restores in the kernel, unseen: there a restore signals idle threads, see
//! [`crate::world::stop_others_for_restore`].) libcow_preload turns this on under uffd and
//! fork, not mprotect (see its `holds_idle_threads`).
//!
//! Slots live in the book (no restore rewinds them) and are found by thread id; a thread
//! keeps its slot until it exits (a thread-specific-data destructor frees it; a child forked
//! from a threaded parent frees every slot but its own). The two statics below are set before
//! the first snapshot and never change after, so a restore that rewinds them changes nothing.

use crate::book;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most threads with a slot at once; more wait the slow way (by signal).
const SLOTS: usize = 1024;

/// No thread owns the slot.
const FREE: u32 = 0;
/// Its thread runs (or waits unannounced): a stop signals it.
const RUNNING: u32 = 1;
/// Its thread is blocked in an announced wait.
const IDLE: u32 = 2;
/// A stop holds it; the thread, if its wait returned, waits to go on.
const HELD: u32 = 3;
/// As `HELD`, and the thread sleeps on the slot's futex (the stop must wake it).
const HELD_WAITING: u32 = 4;

struct Slot {
    state: AtomicU32,
    tid: AtomicI32,
    /// An address on the thread's stack (so its stack is not covered).
    stack_pointer: AtomicUsize,
    /// Its thread pointer (glibc's `struct pthread`, not covered either).
    thread_pointer: AtomicUsize,
    /// The program memory its wait sleeps on (a condition variable, its mutex; 0: none).
    waits_on: [AtomicUsize; 2],
}

struct Table {
    slots: [Slot; SLOTS],
    /// Slots ever used: `slots[..used]` is all a stop looks at.
    used: AtomicUsize,
    /// The thread-specific-data key whose destructor frees a thread's slot when it exits.
    key: AtomicUsize,
    /// See [`activity`] (here, in the book: libcow's statics are covered memory, which a
    /// restore rewinds and mprotect write-protects).
    activity: std::sync::atomic::AtomicU64,
}

static TABLE: OnceLock<&'static Table> = OnceLock::new();

/// Times a thread of the program may have begun running program code: a thread left an
/// announced wait, a signal handler of the program began, a thread stopped by signal went on.
/// Unchanged across an interval, no thread but the caller ran program code in it (provided
/// every other thread was idle or stopped at its start): what lets recovery keep a checkpoint
/// taken before a wait blocked ([`crate::recovery`]). 0 until waits announce themselves.
pub fn activity() -> u64 {
    TABLE.get().map_or(0, |t| t.activity.load(Ordering::SeqCst))
}

/// A thread goes on running program code (see [`activity`]). Async-signal-safe.
pub(crate) fn note_activity() {
    if let Some(t) = TABLE.get() {
        t.activity.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whether stops hold idle threads (libcow_preload turned it on, see [`enable`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire) != 0
}

/// Whether waits announce themselves and stops hold idle threads: libcow_preload turns it on
/// under uffd and fork, having wrapped the program's signal handlers (a handler may run in an
/// idle thread: it must pass [`interrupt`] first).
static ENABLED: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// This thread's slot index + 1 (0: none yet). A restore may rewind the main thread's
    /// copy (its static TLS is covered memory): then the slot is found again by thread id.
    static MINE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Lets waits announce themselves and stops hold idle threads from now on. The caller makes
/// every signal handler of the program call [`interrupt`] and [`resume`] around itself.
pub fn enable() {
    table();
    if ENABLED.swap(1, Ordering::AcqRel) == 0 {
        // SAFETY: registering a fork handler that only touches the table and this thread.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    }
}

fn table() -> &'static Table {
    TABLE.get_or_init(|| {
        let t = book::leak(Table {
            slots: [const {
                Slot {
                    state: AtomicU32::new(FREE),
                    tid: AtomicI32::new(0),
                    stack_pointer: AtomicUsize::new(0),
                    thread_pointer: AtomicUsize::new(0),
                    waits_on: [AtomicUsize::new(0), AtomicUsize::new(0)],
                }
            }; SLOTS],
            used: AtomicUsize::new(0),
            key: AtomicUsize::new(usize::MAX),
            activity: std::sync::atomic::AtomicU64::new(0),
        });
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: creating a key whose destructor only touches the table (static).
        if unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) } == 0 {
            t.key.store(key as usize, Ordering::Release);
        }
        t
    })
}

extern "C" fn on_thread_exit(value: *mut libc::c_void) {
    let Some(t) = TABLE.get() else { return };
    if let Some(slot) = (value as usize).checked_sub(1).and_then(|i| t.slots.get(i)) {
        slot.tid.store(0, Ordering::Release);
        slot.state.store(FREE, Ordering::Release);
    }
}

/// The calling thread's slot, claimed on first use; `None` if every slot is taken.
fn my_slot() -> Option<usize> {
    let cached = MINE.with(|m| m.get());
    if cached != 0 {
        return Some(cached - 1);
    }
    let t = table();
    let me = crate::world::gettid();
    let used = t.used.load(Ordering::Acquire);
    let found = (0..used).find(|&i| {
        t.slots[i].state.load(Ordering::Acquire) != FREE
            && t.slots[i].tid.load(Ordering::Acquire) == me
    });
    let i = match found {
        Some(i) => i,
        None => {
            let i = (0..SLOTS).find(|&i| {
                t.slots[i]
                    .state
                    .compare_exchange(FREE, RUNNING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })?;
            t.slots[i].tid.store(me, Ordering::Release);
            t.used.fetch_max(i + 1, Ordering::AcqRel);
            let key = t.key.load(Ordering::Acquire);
            if key != usize::MAX {
                // SAFETY: setting this thread's value of our key (a small integer, no pointer).
                unsafe {
                    libc::pthread_setspecific(key as libc::pthread_key_t, (i + 1) as *const _)
                };
            }
            i
        }
    };
    MINE.with(|m| m.set(i + 1));
    Some(i)
}

/// An announced wait: returned by [`begin`], given back to [`end`].
#[derive(Clone, Copy, Debug)]
pub struct Wait(Option<usize>);

/// The calling thread is about to block in a wait that writes none of the program's memory
/// until it returns and sleeps on none of it (libcow's own waits): a stop may hold it instead
/// of signalling it.
pub fn begin() -> Wait {
    begin_on([0, 0])
}

/// [`begin`] for a wait that sleeps on futex words in program memory: `waits_on` are the
/// addresses of the objects holding them (a condition variable and its mutex; 0: none). A
/// restore that rewrites their pages wakes the thread.
pub fn begin_on(waits_on: [usize; 2]) -> Wait {
    if ENABLED.load(Ordering::Acquire) == 0 {
        return Wait(None);
    }
    let Some(i) = my_slot() else {
        return Wait(None);
    };
    let slot = &table().slots[i];
    let marker = 0u8;
    slot.stack_pointer
        .store(&marker as *const u8 as usize, Ordering::Relaxed);
    // SAFETY: pthread_self only reads the thread pointer.
    slot.thread_pointer
        .store(unsafe { libc::pthread_self() } as usize, Ordering::Relaxed);
    for (word, &addr) in slot.waits_on.iter().zip(&waits_on) {
        word.store(addr, Ordering::Relaxed);
    }
    // Everything this thread wrote before happens-before a stop that holds it (SeqCst pairs
    // with the stop's compare-and-swap).
    slot.state.store(IDLE, Ordering::SeqCst);
    Wait(Some(i))
}

/// The announced wait returned: once no stop holds the thread, it runs again.
pub fn end(w: Wait) {
    if let Some(i) = w.0 {
        run(&table().slots[i]);
    }
}

/// Makes `slot`'s thread running, waiting while a stop holds it.
fn run(slot: &Slot) {
    loop {
        match slot
            .state
            .compare_exchange(IDLE, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {
                note_activity();
                return;
            }
            Err(HELD) => {
                let _ = slot.state.compare_exchange(
                    HELD,
                    HELD_WAITING,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            Err(HELD_WAITING) => crate::world::futex(&slot.state, libc::FUTEX_WAIT, HELD_WAITING),
            Err(_) => return,
        }
    }
}

/// A signal handler of the program is about to run in this thread: if the thread was idle,
/// it runs now (after any stop that holds it). Returns what [`resume`] needs.
pub fn interrupt() -> Wait {
    note_activity();
    let cached = MINE.with(|m| m.get());
    let Some(t) = TABLE.get() else {
        return Wait(None);
    };
    let Some(slot) = cached.checked_sub(1).and_then(|i| t.slots.get(i)) else {
        return Wait(None);
    };
    match slot.state.load(Ordering::SeqCst) {
        IDLE | HELD | HELD_WAITING => {
            run(slot);
            Wait(Some(cached - 1))
        }
        _ => Wait(None),
    }
}

/// The handler [`interrupt`] let run returned: the thread is back in its wait.
pub fn resume(w: Wait) {
    if let Some(i) = w.0 {
        table().slots[i].state.store(IDLE, Ordering::SeqCst);
    }
}

/// An idle thread a stop holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    /// Its thread id.
    pub tid: i32,
    /// Its slot, for [`release`].
    pub slot: usize,
    /// An address on its stack.
    pub stack_pointer: usize,
    /// Its thread pointer.
    pub thread_pointer: usize,
    /// What its wait sleeps on ([`begin_on`]).
    pub waits_on: [usize; 2],
}

/// Holds every idle thread not in `except`, in one pass over the slots, calling `held` for
/// each. A slot is idle only while its thread is alive and in its wait (an exiting thread frees
/// its slot).
pub(crate) fn hold_all(except: impl Fn(i32) -> bool, mut held: impl FnMut(Held)) {
    let Some(t) = TABLE.get() else { return };
    if ENABLED.load(Ordering::Acquire) == 0 {
        return;
    }
    for (i, slot) in t.slots[..t.used.load(Ordering::Acquire)].iter().enumerate() {
        let tid = slot.tid.load(Ordering::Acquire);
        if except(tid)
            || slot
                .state
                .compare_exchange(IDLE, HELD, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            continue;
        }
        held(Held {
            tid,
            slot: i,
            stack_pointer: slot.stack_pointer.load(Ordering::Relaxed),
            thread_pointer: slot.thread_pointer.load(Ordering::Relaxed),
            waits_on: [
                slot.waits_on[0].load(Ordering::Relaxed),
                slot.waits_on[1].load(Ordering::Relaxed),
            ],
        });
    }
}

/// Lets the thread of slot `i`, held by [`hold_all`], go on.
pub(crate) fn release(i: usize) {
    let Some(t) = TABLE.get() else { return };
    let slot = &t.slots[i];
    let to_idle = |from| {
        slot.state
            .compare_exchange(from, IDLE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    };
    // Compare-and-swap, not a store: a thread that exited meanwhile (cancelled in its wait)
    // freed its slot.
    if !to_idle(HELD) && to_idle(HELD_WAITING) {
        crate::world::futex(&slot.state, libc::FUTEX_WAKE, i32::MAX as u32);
    }
}

/// In a child just forked: only the calling thread exists (under a new id), every other slot
/// is free.
extern "C" fn after_fork_in_child() {
    let Some(t) = TABLE.get() else { return };
    let me = MINE.with(|m| m.get());
    for (i, slot) in t.slots.iter().enumerate() {
        if i + 1 != me {
            slot.tid.store(0, Ordering::Release);
            slot.state.store(FREE, Ordering::Release);
        }
    }
    if let Some(mine) = me.checked_sub(1).and_then(|i| t.slots.get(i)) {
        mine.tid.store(crate::world::gettid(), Ordering::Release);
        mine.state.store(RUNNING, Ordering::Release);
    }
}
