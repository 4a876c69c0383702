//! Periodic checkpoints: a thread that snapshots the whole process every `every`, keeping the
//! newest `keep` snapshots (older ones are dropped), for programs that never call libcow.
//!
//! `cowctl run --every MS` starts it in libcow_preload. The thread goes through the C API's
//! snapshot path, so speculation, heap quiescing and stopping the other threads are the same
//! as for a program's own `cow_snapshot`. Its state lives in the book: a restore of the
//! program's memory never rewinds the checkpointer. `start` returns only once the thread has
//! run a whole checkpoint (a warm-up snapshot, then dropped), so everything the thread and its
//! runtime allocate for themselves in the covered heap is there before the program's first
//! snapshot: above all glibc's list of the thread's TLS destructors (`__cxa_thread_atexit_impl`
//! allocates it with `calloc`), which a restore to an earlier snapshot would otherwise free
//! under the thread's feet, and which glibc then calls through at the thread's exit.
//!
//! Effect on the program: every snapshot briefly holds the covered heap's locks (and, while a
//! speculation policy hints pages, stops the other threads with a signal; interrupted system
//! calls restart, except those Linux never restarts, such as `nanosleep`, which return early
//! with `EINTR`).

use crate::book;
use crate::sys::monotonic_ns;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Latency samples kept for the summary's percentiles (later snapshots are still counted).
const MAX_SAMPLES: usize = 1 << 16;

/// What to do, from the environment (`COW_CHECKPOINT_MS`, `COW_CHECKPOINT_KEEP`).
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Time between snapshots.
    pub every: Duration,
    /// Snapshots kept; the oldest beyond it is dropped.
    pub keep: usize,
    /// Take one checkpoint (and drop it) before `start` returns (see the module's doc). Not
    /// for lmc, whose checkpoints happen at the program's own safe points.
    pub warm_up: bool,
}

impl Config {
    /// The configuration `cowctl run --every MS [--keep N]` passes, if any.
    pub fn from_env() -> Option<Config> {
        let ms: f64 = crate::sys::env_var("COW_CHECKPOINT_MS")?.parse().ok()?;
        let keep = crate::sys::env_var("COW_CHECKPOINT_KEEP")
            .and_then(|k| k.parse().ok())
            .unwrap_or(8usize)
            .max(1);
        (ms > 0.0 && ms.is_finite()).then(|| Config {
            every: Duration::from_secs_f64(ms / 1e3),
            keep,
            warm_up: true,
        })
    }
}

/// What the checkpointer did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Snapshots taken.
    pub snapshots: u64,
    /// Snapshots that failed (the errno of the last one in `last_errno`).
    pub failures: u64,
    /// The errno of the last failure (0: none).
    pub last_errno: i32,
    /// Snapshot latency as the checkpointer saw it (heap quiescing and thread stops included):
    /// median, 99th percentile and maximum, in µs.
    pub snapshot_us_median: f64,
    /// See `snapshot_us_median`.
    pub snapshot_us_p99: f64,
    /// See `snapshot_us_median`.
    pub snapshot_us_max: f64,
}

struct State {
    stop: AtomicBool,
    snapshots: AtomicU64,
    failures: AtomicU64,
    last_errno: AtomicU64,
    /// The newest checkpoint kept (0: none yet).
    newest: AtomicU64,
    /// The thread's id (0 until it runs).
    tid: std::sync::atomic::AtomicI32,
    /// Held while a checkpoint is in progress, so that `stop` waits for it.
    busy: Mutex<()>,
    /// Set by the thread once its warm-up checkpoint is done.
    ready: AtomicBool,
    /// Latencies in ns, `min(snapshots, MAX_SAMPLES)` of them.
    samples: &'static mut [AtomicU64],
}

static STATE: OnceLock<&'static State> = OnceLock::new();

/// Starts the checkpointer thread: `snapshot` takes a snapshot (returning its id or a negative
/// errno), `drop` drops one. Returns an error if it is already running or the thread cannot
/// be created.
pub fn start(cfg: Config, snapshot: fn() -> i64, drop: fn(i64) -> i32) -> std::io::Result<()> {
    let samples_mem = book::alloc_uncovered(MAX_SAMPLES * 8);
    // SAFETY: the book hands out 8-aligned zeroed memory; zero is a valid AtomicU64, and the
    // slice is this state's alone.
    let samples = unsafe {
        std::slice::from_raw_parts_mut(samples_mem.as_mut_ptr().cast::<AtomicU64>(), MAX_SAMPLES)
    };
    let state: &'static State = book::leak(State {
        stop: AtomicBool::new(false),
        snapshots: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        last_errno: AtomicU64::new(0),
        newest: AtomicU64::new(0),
        tid: std::sync::atomic::AtomicI32::new(0),
        busy: Mutex::new(()),
        ready: AtomicBool::new(false),
        samples,
    });
    if STATE.set(state).is_err() {
        return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    }
    std::thread::Builder::new()
        .name("cow-checkpoint".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            state
                .tid
                .store(unsafe { libc::gettid() }, Ordering::Release);
            crate::world::block_process_signals();
            // Sleeps end within a µs of the deadline, not the default 50 µs slack later (a
            // sixth of the period at 3 kHz).
            // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64) };
            run(state, cfg, snapshot, drop)
        })?;
    // Wait for the warm-up (see the module's doc); a thread that cannot take it still runs.
    let deadline = monotonic_ns() + 5_000_000_000;
    while !state.ready.load(Ordering::Acquire) && monotonic_ns() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn sleep_until(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // Sleeping writes nothing: snapshots (the program's own) need not signal us.
    let wait = crate::idle::begin();
    // SAFETY: an absolute monotonic sleep on a timespec of ours; EINTR just ends it early.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
    crate::idle::end(wait);
}

fn run(state: &'static State, cfg: Config, snapshot: fn() -> i64, drop: fn(i64) -> i32) {
    // The ids kept, oldest first, in the book: a restore must not rewind them.
    let kept_mem = book::alloc_uncovered(cfg.keep * 8);
    // SAFETY: zeroed, 8-aligned memory of `keep` i64s, this thread's alone.
    let kept =
        unsafe { std::slice::from_raw_parts_mut(kept_mem.as_mut_ptr().cast::<i64>(), cfg.keep) };
    let (mut head, mut len) = (0usize, 0usize);
    // Warm-up: one checkpoint through the same path, dropped at once, before `start` returns.
    if cfg.warm_up {
        let id = snapshot();
        if id > 0 {
            drop(id);
        }
    }
    state.ready.store(true, Ordering::Release);
    let period = cfg.every.as_nanos() as u64;
    let mut next = monotonic_ns() + period;
    let mut first = true;
    loop {
        sleep_until(next);
        if std::mem::take(&mut first) {
            // Only now: registered before libc's own exit handlers (this thread starts in a
            // constructor, before main), it would run after the report.
            crate::report::remember_exit_status();
        }
        let now = monotonic_ns();
        // A late wake-up does not cause a burst of catch-up snapshots.
        next = (next + period).max(now + period / 2);
        let _busy = state.busy.lock().unwrap_or_else(|e| e.into_inner());
        if state.stop.load(Ordering::Acquire) {
            break;
        }
        let t0 = monotonic_ns();
        let id = snapshot();
        let took = monotonic_ns() - t0;
        // However long the snapshot took (a slow machine, a huge epoch), the program runs for
        // at least half a period before the next one: back-to-back checkpoints, each stopping
        // every thread, would starve it (seen on a single-threaded TCG guest at --every=1).
        next = next.max(t0 + took + period / 2);
        if id < 0 {
            if state.stop.load(Ordering::Acquire) {
                break; // withdrawn because the program is exiting: not a failure
            }
            state.failures.fetch_add(1, Ordering::Relaxed);
            state.last_errno.store(-id as u64, Ordering::Relaxed);
            continue;
        }
        let n = state.snapshots.fetch_add(1, Ordering::AcqRel) as usize;
        if let Some(s) = state.samples.get(n) {
            s.store(took, Ordering::Relaxed);
        }
        if len == kept.len() {
            // Dropping may fail if a restore already discarded it: nothing to do then.
            drop(kept[head]);
            head = (head + 1) % kept.len();
            len -= 1;
        }
        kept[(head + len) % kept.len()] = id;
        len += 1;
        state.newest.store(id as u64, Ordering::Release);
    }
    // Stopped (the process is exiting): idle until it ends rather than exit, so the thread set
    // stays the one the checkpoints saw (uffd and mprotect refuse a restore across a change).
    loop {
        std::thread::park();
    }
}

/// Whether the checkpointer thread was started in this process.
pub fn running() -> bool {
    STATE.get().is_some()
}

/// The newest checkpoint the checkpointer took and still keeps (unless the program restored to
/// an older one or dropped it since).
pub fn newest() -> Option<u64> {
    let id = STATE.get()?.newest.load(Ordering::Acquire);
    (id > 0).then_some(id)
}

/// The checkpointer thread's id, once it runs.
pub fn thread_id() -> Option<i32> {
    let tid = STATE.get()?.tid.load(Ordering::Acquire);
    (tid != 0).then_some(tid)
}

/// Whether [`stop`] was called: a snapshot that waits on the program should give up.
pub fn stopping() -> bool {
    STATE.get().is_some_and(|s| s.stop.load(Ordering::Acquire))
}

/// Stops the checkpointer (waiting for a checkpoint in progress) and sums up what it did.
/// `None` if it was never started.
pub fn stop() -> Option<Summary> {
    let state = STATE.get()?;
    {
        // The flag first: a checkpoint in progress that waits on the program (lmc's safe
        // points) gives up when it sees it, and the thread cannot take the lock again first.
        state.stop.store(true, Ordering::Release);
        let _busy = state.busy.lock().unwrap_or_else(|e| e.into_inner());
    }
    Some(summary(state))
}

fn summary(state: &State) -> Summary {
    let snapshots = state.snapshots.load(Ordering::Acquire);
    let mut ns: Vec<u64> = state.samples[..(snapshots as usize).min(MAX_SAMPLES)]
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect();
    ns.sort_unstable();
    let at = |q: f64| {
        ns.get(((ns.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |&v| v as f64 / 1e3)
    };
    Summary {
        snapshots,
        failures: state.failures.load(Ordering::Relaxed),
        last_errno: state.last_errno.load(Ordering::Relaxed) as i32,
        snapshot_us_median: at(0.5),
        snapshot_us_p99: at(0.99),
        snapshot_us_max: at(1.0),
    }
}
