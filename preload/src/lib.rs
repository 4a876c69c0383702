//! libcow_preload.so — puts an unmodified program's memory under libcow.
//!
//! Loaded with `LD_PRELOAD` (by `cowctl run`). With `COW_BACKEND=uffd` or `mprotect` it only
//! initialises that backend (which covers every private writable mapping of the process, the
//! heap libc serves included) and the checkpointer. With cow.ko (`kmod`, the default) it
//! - serves the heap (`malloc`, `free`, `calloc`, `realloc`, `posix_memalign`, `aligned_alloc`,
//!   `memalign`, `valloc`, `pvalloc`, `malloc_usable_size`) from one large `/dev/cow` region,
//!   split into shards, each a [talc](https://crates.io/crates/talc) allocator whose whole state
//!   (its control block and free lists) lives inside the covered region itself, so a restore
//!   puts the allocator back exactly where the memory it manages was;
//! - covers every other private writable mapping (see `regions.rs`): every loaded object's
//!   writable segment (moved into `/dev/cow` memory at start-up, before the program's own
//!   constructors run, and at `dlopen`), and the anonymous memory the program maps itself
//!   (`mmap`, `munmap`, `mremap`, `mprotect` and `madvise` are interposed);
//! - keeps `fork()` POSIX: the child gets a private copy of the covered memory as it was at the
//!   fork, the parent keeps its space (see `fork.rs`).
//!
//! The space's descriptor is published in `COW_SPACE_FD`, so libcow's C API (`cow_init`) in the
//! same process drives the same space, and `cowctl` finds it by pid.

mod closes;
mod cond_waits;
mod coverage;
mod exec;
mod fork;
mod heap;
mod malloc_api;
mod masks;
mod output;
mod raw;
mod reads;
mod regions;
mod signals;
mod waits;

use std::sync::atomic::{AtomicU8, Ordering};

/// Not initialised yet.
const UNINIT: u8 = 0;
/// Initialisation in progress (allocations meanwhile go to libc).
const INITIALISING: u8 = 1;
/// The heap is served from cow memory.
const READY: u8 = 2;
/// cow.ko could not be used: everything goes to libc.
const FALLBACK: u8 = 3;
/// An in-process backend (uffd, mprotect) covers the whole process: the heap is libc's.
const IN_PROCESS: u8 = 4;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);

/// The process's space, valid once `STATE` is `READY`.
static SPACE: std::sync::OnceLock<cow::Cow> = std::sync::OnceLock::new();

/// Runs before the program's own constructors (the dynamic loader initialises preloaded
/// objects first).
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    // First: an exec under libcow may have left the stop signal blocked and pending.
    cow::world::adopt_after_exec();
    output::resolve_symbols();
    cond_waits::resolve_symbols();
    reads::resolve_symbols();
    signals::resolve_symbols();
    masks::resolve_symbols();
    closes::resolve_symbols();
    waits::resolve_symbols();
    if let Some(name) = in_process_backend() {
        if holds_idle_threads() {
            // The program's signal handlers are wrapped from now on (signals.rs).
            cow::idle::enable();
        }
        init_in_process(name);
        return;
    }
    if ensure_init() {
        if let Some(space) = space() {
            // libcow's set-up (cost probes, a replayed recording) is not the program's
            // progress.
            heap::internal(|| {
                cow::ffi::install(
                    space,
                    cow::ffi::PreloadHooks {
                        hold: hold_all,
                        release: release_all,
                        progress: heap::allocations,
                        restored: regions::after_restore,
                    },
                )
            });
        }
        regions::init();
        fork::install_handlers();
        publish_fd();
        cow::recovery::enable_from_env();
        // SAFETY: getpid has no preconditions.
        OWNER_PID.store(unsafe { libc::getpid() }, Ordering::Release);
        // `cowctl snapshot|restore PID` come through it: a restore must run in the process,
        // which re-creates the mappings the restored memory describes.
        if let Err(e) = heap::internal(cow::control::serve) {
            eprintln!("libcow_preload: no live control (cowctl restore PID): {e}");
        }
        heap::internal(start_checkpointer);
    }
}

/// The in-process backend `cowctl run --backend` asked for (`COW_BACKEND`), if any.
fn in_process_backend() -> Option<&'static std::ffi::CStr> {
    match raw::env_bytes(c"COW_BACKEND")? {
        b"uffd" => Some(c"uffd"),
        b"mprotect" => Some(c"mprotect"),
        b"fork" => Some(c"fork"),
        _ => None,
    }
}

/// Whether snapshots hold threads blocked in a condition-variable wait without a signal
/// (`cow::idle`): under uffd and fork. Not under mprotect: a held thread whose timed wait
/// returns during a snapshot re-locks its mutex, in covered memory, before it reaches the
/// gate; on mprotect that write faults into libcow's handler while the snapshot re-protects
/// pages, which only a stopped thread may not do. (On uffd the kernel records the write; a
/// fork copies memory at one instant.)
fn holds_idle_threads() -> bool {
    matches!(in_process_backend(), Some(b) if b != c"mprotect")
}

/// Covers the whole process with an in-process backend and starts the checkpointer. A failure
/// is said once; the program then runs uncovered (`cowctl run` checked the backend works).
fn init_in_process(name: &std::ffi::CStr) {
    // SAFETY: a NUL-terminated backend name.
    let rc = unsafe { cow::ffi::cow_init(name.as_ptr()) };
    if rc < 0 {
        raw::write_stderr(b"libcow_preload: cow_init failed: ");
        // SAFETY: cow_strerror returns a static NUL-terminated string.
        let why = unsafe { std::ffi::CStr::from_ptr(cow::ffi::cow_strerror(rc)) };
        raw::write_stderr(why.to_bytes());
        raw::write_stderr(b"; nothing is covered\n");
        return;
    }
    if let Some(backend) = cow::ffi::current_backend() {
        cow::ffi::speculate_from_env(backend);
    }
    STATE.store(IN_PROCESS, Ordering::Release);
    // SAFETY: getpid has no preconditions.
    OWNER_PID.store(unsafe { libc::getpid() }, Ordering::Release);
    cow::recovery::enable_from_env();
    // Before the first snapshot: what the thread allocates is in every snapshot.
    if let Err(e) = cow::control::serve() {
        eprintln!("libcow_preload: no live control (cowctl snapshot|restore PID): {e}");
    }
    start_checkpointer();
}

/// The covered process (a forked child is no longer covered and has no checkpointer).
static OWNER_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// `cowctl run --every MS`: periodic snapshots, started before the program's first
/// instruction so that every snapshot holds what the checkpointer itself allocated.
fn start_checkpointer() {
    let Some(cfg) = cow::checkpoint::Config::from_env() else {
        return;
    };
    if let Err(e) = cow::checkpoint::start(
        cfg,
        || heap::internal(|| cow::ffi::cow_snapshot()),
        |id| heap::internal(|| cow::ffi::cow_drop(id)),
    ) {
        eprintln!("libcow_preload: cannot start the checkpointer: {e}");
    }
}

/// Runs after the program's own destructors (the loader finalises preloaded objects last).
#[used]
#[link_section = ".fini_array"]
static DESTRUCTOR: extern "C" fn() = destructor;

extern "C" fn destructor() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    // A forked child (no longer covered, and without the checkpointer thread) reports nothing.
    let state = STATE.load(Ordering::Acquire);
    if (state == READY || state == IN_PROCESS) && OWNER_PID.load(Ordering::Acquire) == me {
        cow::report::write_at_exit();
        coverage::write_at_exit();
    }
}

/// Makes covered memory quiescent: no mapping changes (the tables' lock), no allocation
/// (every heap shard's lock). Around snapshots, restores and `fork`.
pub(crate) fn hold_all() {
    regions::hold();
    heap::hold_all();
}

/// Releases what [`hold_all`] took.
pub(crate) fn release_all() {
    heap::release_all();
    regions::release();
}

/// Initialises the covered heap once; returns whether it is served from cow memory.
pub(crate) fn ensure_init() -> bool {
    match STATE.load(Ordering::Acquire) {
        READY => return true,
        FALLBACK | INITIALISING | IN_PROCESS => return false,
        _ => {}
    }
    if in_process_backend().is_some() {
        // The heap stays libc's: the in-process backend covers it where it is.
        let _ = STATE.compare_exchange(UNINIT, FALLBACK, Ordering::AcqRel, Ordering::Acquire);
        return false;
    }
    if STATE
        .compare_exchange(UNINIT, INITIALISING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another thread is initialising: wait for it (start-up, so this is brief).
        while STATE.load(Ordering::Acquire) == INITIALISING {
            std::hint::spin_loop();
        }
        return STATE.load(Ordering::Acquire) == READY;
    }
    match open_space().and_then(|cow| heap::init(&cow).map(|()| cow)) {
        Ok(cow) => {
            let _ = SPACE.set(cow);
            STATE.store(READY, Ordering::Release);
            true
        }
        Err(why) => {
            raw::write_stderr(b"libcow_preload: ");
            raw::write_stderr(why.as_bytes());
            raw::write_stderr(b"; the heap is NOT covered (served by libc)\n");
            STATE.store(FALLBACK, Ordering::Release);
            false
        }
    }
}

/// Opens /dev/cow without allocating (we may be inside the first `malloc`).
fn open_space() -> Result<cow::Cow, &'static str> {
    use std::os::fd::FromRawFd;
    // SAFETY: open with a static NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/cow".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err("cannot open /dev/cow (is cow.ko loaded? are you allowed to open it?)");
    }
    // SAFETY: the descriptor was just opened and is owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    cow::Cow::from_fd(fd).map_err(|_| "/dev/cow speaks another ABI version than this libcow")
}

/// Set in a forked child once its covered memory became private: it has no space any more.
static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The covered space, once initialised (none in a forked child).
pub(crate) fn space() -> Option<&'static cow::Cow> {
    if DETACHED.load(Ordering::Relaxed) {
        return None;
    }
    SPACE.get()
}

/// Marks this process (a forked child) as no longer covered.
pub(crate) fn mark_detached() {
    DETACHED.store(true, Ordering::Relaxed);
}

/// Publishes the space's descriptor for libcow's C API and for tools.
fn publish_fd() {
    use std::os::fd::{AsFd, AsRawFd};
    if let Some(cow) = space() {
        let mut buf = [0u8; 24];
        let text = cow::format_decimal(cow.as_fd().as_raw_fd() as u64, &mut buf);
        let mut cstr = [0u8; 24];
        cstr[..text.len()].copy_from_slice(text);
        // SAFETY: both strings are NUL-terminated and outlive the call; setenv copies them.
        unsafe { libc::setenv(c"COW_SPACE_FD".as_ptr(), cstr.as_ptr().cast(), 1) };
    }
}
