//! The lmc backend: compiler-instrumented checkpoints (LMC, DSN 2015; vusec/osiris `ltckpt`).
//!
//! Code compiled with `cowcc` calls [`__cow_lmc_write`] before every store, atomic
//! read-modify-write, cmpxchg and `memcpy`/`memmove`/`memset` that is not provably into its own
//! stack frame — after an inlined check of a **shadow tag** per 128-byte region: the generation
//! in which the region was last saved. A region not yet saved in the current generation is
//! copied into the undo log of the newest snapshot first. So:
//! - **snapshot**: a new generation and an empty log (O(1): nothing is copied or protected);
//! - **restore `S_k`**: the logs of `S_k` and newer are copied back, newest first (the oldest
//!   image at or after `S_k` lands last), then a new generation starts;
//! - **drop**: a log merges into the one before it (older images win).
//!
//! What is covered is what instrumented code writes, wherever it is (heap, globals, mappings),
//! except libcow's book and the writing thread's own stack. Memory that code not compiled with
//! `cowcc` writes is covered where cowcc wraps the writer (`read(2)`, `strcpy`, …, and its
//! own allocator instead of glibc's); elsewhere it is not. With several threads a snapshot is
//! a consistent cut gathered at every thread's safe point (`lmc_cut`).
//!
//! Restores and reads go through `process_vm_writev`/`process_vm_readv` on this process, so a
//! region unmapped since the snapshot is skipped (reads: `EFAULT`) instead of crashing.

use super::pagetable::PageTable;
use super::{Backend, Stats};
use crate::book::{self, BookVec};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU16, AtomicU64, AtomicUsize, Ordering};

/// log2 of the region size: one shadow tag per 128 bytes, as in LMC — or per 2^N bytes when
/// `COW_LMC_REGION_SHIFT=N` (6 to 12) is set while building (libcow, the pass and cowcc's
/// wrappers read the same variable; `cowctl bench --lmc` measures a build).
pub const REGION_SHIFT: u32 = match option_env!("COW_LMC_REGION_SHIFT") {
    Some(n) => region_shift(n),
    None => 7,
};

/// `COW_LMC_REGION_SHIFT`'s value, checked at compile time.
const fn region_shift(n: &str) -> u32 {
    let b = n.as_bytes();
    let mut v = 0u32;
    let mut i = 0;
    while i < b.len() {
        assert!(
            b[i].is_ascii_digit(),
            "COW_LMC_REGION_SHIFT: a number from 6 to 12"
        );
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    assert!(
        v >= 6 && v <= 12,
        "COW_LMC_REGION_SHIFT: a number from 6 to 12"
    );
    v
}
/// Bytes per region.
pub const REGION: usize = 1 << REGION_SHIFT;
/// User addresses are below 2^47 on x86-64: the shadow has one `u16` per region of that.
const SHADOW_BYTES: usize = (1usize << 47) >> REGION_SHIFT << 1;

/// The current generation (0: no snapshot is held, nothing is saved). Read by the inlined
/// check of instrumented code.
#[no_mangle]
pub static __cow_lmc_gen: AtomicU16 = AtomicU16::new(0);

/// The shadow tags: `u16` per region, indexed by `address >> REGION_SHIFT` (a `MAP_NORESERVE`
/// reservation; pages exist once tagged). Null until `cow_init("lmc")`.
#[no_mangle]
pub static __cow_lmc_shadow: AtomicPtr<u16> = AtomicPtr::new(std::ptr::null_mut());

/// Instrumented object files linked into the process (each registers from `.init_array`).
static MODULES: AtomicUsize = AtomicUsize::new(0);

/// Called once per instrumented object file at load time (an `.init_array` entry `cowcc`'s
/// pass adds) with the poll page of the executable or library it was linked into (its safe
/// points read it, see `lmc_cut`), so that `cow_init("lmc")` can refuse a program that was not
/// compiled with it. Under `cowctl run --backend lmc` (`COW_BACKEND=lmc`) the first call
/// initialises lmc and, with `--every`, starts the periodic checkpoints.
#[no_mangle]
pub extern "C" fn __cow_lmc_register(poll_page: *mut u8) {
    super::lmc_cut::register_poll_page(poll_page as usize);
    if MODULES.fetch_add(1, Ordering::Relaxed) == 0
        && crate::sys::env_var("COW_BACKEND").as_deref() == Some("lmc")
    {
        start_under_cowctl();
    }
}

/// cowcc's `sigaction`/`signal` wrappers, for `SIGSEGV`: while lmc's handler is installed
/// (safe points fault to take a checkpoint), the program's action is kept as the one that
/// handler passes every other fault to. Returns 1 if it did so (`old`, if not null, receives
/// the program's previous action), 0 if the wrapper is to call libc's `sigaction` itself.
///
/// # Safety
/// `act` and `old` are null or valid, as for `sigaction(2)`.
#[no_mangle]
pub unsafe extern "C" fn __cow_lmc_sigsegv_action(
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> i32 {
    // SAFETY: the caller's pointers, as documented.
    unsafe { super::lmc_cut::program_segv_action(act.as_ref(), old.as_mut()) as i32 }
}

/// Set once the program has started a thread (cowcc's `pthread_create` wrapper).
static THREADS_STARTED: AtomicBool = AtomicBool::new(false);

/// cowcc's `pthread_create` wrapper: from now on the program's own snapshots gather every
/// thread at a safe point first.
#[no_mangle]
pub extern "C" fn __cow_lmc_threads_started() {
    THREADS_STARTED.store(true, Ordering::Release);
}

/// Whether the program has started a thread.
pub(super) fn threads_started() -> bool {
    THREADS_STARTED.load(Ordering::Acquire)
}

/// A snapshot for `lmc_cut` (every other thread parked or none): its id or a negative errno.
pub(super) fn snapshot_for_cut() -> i64 {
    match Lmc::snapshot_now() {
        Ok(id) => id as i64,
        Err(e) => -(e.errno() as i64),
    }
}

/// Saves `[start, start + len)` in the current generation: a range a wrapper call saved before
/// the generation changed under it, and is about to write.
pub(super) fn save_again(start: usize, len: usize) {
    // SAFETY: the range a wrapper call in progress is about to write: mapped and writable.
    unsafe { __cow_lmc_write(start as *mut u8, len as u64) }
}

/// Whether lmc's lock is held (by any thread): a thread interrupted in the slow path must not
/// park, the snapshot needs the lock.
pub(super) fn lock_held() -> bool {
    LOCK.load(Ordering::Acquire)
}

/// A snapshot as a consistent cut: every other thread of the program parked at a safe point or
/// a system-call boundary first; the ranges parked wrapper calls saved are saved again in the
/// new generation.
fn snapshot_as_cut() -> i64 {
    super::lmc_cut::cut(snapshot_for_cut, save_again)
}

/// The checkpointer's snapshot under lmc: a consistent cut of the whole program — taken by the
/// program's thread itself when it has only one.
fn checkpoint_at_safe_point() -> i64 {
    if !threads_started() {
        if let Some(tid) = super::lmc_cut::single_program_thread() {
            let id = super::lmc_cut::take_alone(tid);
            if id != -(libc::EAGAIN as i64) {
                return id;
            }
        }
    }
    snapshot_as_cut()
}

/// `cowctl run --backend lmc [--every MS]`: lmc from the first instruction of the program, the
/// checkpointer if asked for, the report at exit.
fn start_under_cowctl() {
    // SAFETY: a NUL-terminated name.
    let rc = unsafe { crate::ffi::cow_init(c"lmc".as_ptr()) };
    if rc != 0 {
        eprintln!("libcow: cannot use lmc: errno {}", -rc);
        return;
    }
    if let Some(cfg) = crate::checkpoint::Config::from_env() {
        let cfg = crate::checkpoint::Config {
            warm_up: false,
            ..cfg
        };
        if let Err(e) =
            crate::checkpoint::start(cfg, checkpoint_at_safe_point, |id| crate::ffi::cow_drop(id))
        {
            eprintln!("libcow: cannot start the checkpointer: {e}");
        }
    }
    REPORTS.store(true, Ordering::Release);
}

/// Whether this process writes the `cowctl run` report at exit.
static REPORTS: AtomicBool = AtomicBool::new(false);

#[used]
#[link_section = ".fini_array"]
static REPORT_AT_EXIT: extern "C" fn() = report_at_exit;

extern "C" fn report_at_exit() {
    if REPORTS.load(Ordering::Acquire) {
        crate::report::write_at_exit();
    }
}

/// Instrumented object files registered so far.
pub fn instrumented_modules() -> usize {
    MODULES.load(Ordering::Relaxed)
}

/// Most shared mappings remembered as not covered.
const MAX_EXCLUDED: usize = 256;
/// Shared mappings (`[start, end)`; 0, 0: a free slot): not covered, as with every backend.
/// Touched only with [`LOCK`] held.
static mut EXCLUDED: [(usize, usize); MAX_EXCLUDED] = [(0, 0); MAX_EXCLUDED];
/// Slots of [`EXCLUDED`] ever used (the slow path scans only those). Under [`LOCK`].
static EXCLUDED_USED: AtomicUsize = AtomicUsize::new(0);

/// cowcc's `mmap` wrapper: `[p, p + n)` is a shared mapping, not covered.
#[no_mangle]
pub extern "C" fn __cow_lmc_exclude(p: *mut u8, n: u64) {
    let _held = Locked::take();
    // SAFETY: LOCK held: nobody else touches EXCLUDED.
    let excluded = unsafe { &mut *std::ptr::addr_of_mut!(EXCLUDED) };
    // The kernel maps whole pages: so is the range (a region never straddles its end).
    let end = (p as usize)
        .saturating_add(n as usize)
        .next_multiple_of(4096);
    if let Some(i) = excluded.iter().position(|e| e.1 == 0) {
        excluded[i] = (p as usize, end);
        EXCLUDED_USED.fetch_max(i + 1, Ordering::Relaxed);
    }
}

/// cowcc's `munmap` wrapper: whatever `[p, p + n)` held is gone (shared mappings in it are
/// forgotten whole: a partial unmap of one is rare, and forgetting only widens coverage).
#[no_mangle]
pub extern "C" fn __cow_lmc_include(p: *mut u8, n: u64) {
    let (start, end) = (
        p as usize,
        (p as usize)
            .saturating_add(n as usize)
            .next_multiple_of(4096),
    );
    let _held = Locked::take();
    // SAFETY: LOCK held.
    let excluded = unsafe { &mut *std::ptr::addr_of_mut!(EXCLUDED) };
    for e in excluded.iter_mut().filter(|e| e.0 < end && start < e.1) {
        *e = (0, 0);
    }
}

/// Whether `[a, b)` lies in a shared mapping. LOCK held by the caller.
fn excluded(a: usize, b: usize) -> bool {
    // SAFETY: read under LOCK (caller).
    let excluded = unsafe { &*std::ptr::addr_of!(EXCLUDED) };
    excluded[..EXCLUDED_USED.load(Ordering::Relaxed)]
        .iter()
        .any(|e| a >= e.0 && b <= e.1)
}

/// Guards the logs against concurrent slow paths, snapshots and restores (a spin lock: the
/// slow path runs inside arbitrary program code and must not depend on anything covered).
static LOCK: AtomicBool = AtomicBool::new(false);

struct Locked;
impl Locked {
    fn take() -> Locked {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        Locked
    }
}
impl Drop for Locked {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

struct Snap {
    id: u64,
    /// region key → block of `REGION` bytes in `images`: the region's contents at this
    /// snapshot, saved at its first write after it.
    log: PageTable,
    images: Arena,
}

/// Bytes of one chunk of saved images.
const CHUNK: usize = 64 << 10;
/// Chunks kept for reuse when snapshots go (beyond it they return to the book).
const MAX_SPARE_CHUNKS: usize = 256;

/// Where one snapshot's saved images live: `REGION`-sized blocks handed out in order from
/// chunks of [`CHUNK`] bytes, freed all at once with the snapshot. (Allocating each block
/// from the book — a lock and a free list of cold blocks — cost a quarter of an instrumented
/// program's run time at 100 Hz.)
struct Arena {
    chunks: BookVec<usize>,
    next: usize,
    end: usize,
}

impl Arena {
    fn new() -> Arena {
        Arena {
            chunks: BookVec::new(),
            next: 0,
            end: 0,
        }
    }

    /// A block of `REGION` bytes, from a spare chunk or the book when this chunk is full.
    fn alloc(&mut self, spare: &mut BookVec<usize>) -> *mut u8 {
        if self.next == self.end {
            let chunk = match spare.as_slice().last() {
                Some(&c) => {
                    spare.truncate(spare.len() - 1);
                    c
                }
                None => book::book().alloc(CHUNK) as usize,
            };
            self.chunks.push(chunk);
            (self.next, self.end) = (chunk, chunk + CHUNK);
        }
        let block = self.next;
        self.next += REGION;
        block as *mut u8
    }

    /// Gives every chunk back (to `spare` up to its bound, else to the book).
    fn release(&mut self, spare: &mut BookVec<usize>) {
        for &chunk in self.chunks.as_slice() {
            if spare.len() < MAX_SPARE_CHUNKS {
                spare.push(chunk);
            } else {
                book::book().free(chunk as *mut u8, CHUNK);
            }
        }
        self.chunks.clear();
        (self.next, self.end) = (0, 0);
    }
}

/// The state, in the book (a restore never rewinds it). Touched only with [`LOCK`] held.
struct State {
    /// Pointers to book-allocated `Snap`s, oldest first.
    snaps: BookVec<usize>,
    next_id: u64,
    /// The last generation handed out (generations are never reused before a shadow reset).
    last_gen: u16,
    regions_saved: u64,
    /// Chunks of released arenas, ready for reuse.
    spare: BookVec<usize>,
    snapshot_ns: u64,
    restore_ns: u64,
}

static STATE: AtomicPtr<State> = AtomicPtr::new(std::ptr::null_mut());
static BOOK_START: AtomicUsize = AtomicUsize::new(0);
static BOOK_END: AtomicUsize = AtomicUsize::new(0);
static SAVES: AtomicU64 = AtomicU64::new(0);

/// The page table hashes page numbers: key regions by index shifted into that place.
fn key(region: usize) -> usize {
    (region >> REGION_SHIFT) << 12
}

fn unkey(k: usize) -> usize {
    (k >> 12) << REGION_SHIFT
}

fn err(op: &'static str, errno: i32) -> Error {
    Error::Os { op, errno }
}

/// # Safety
///
/// The caller holds [`LOCK`] and the backend was opened.
unsafe fn state() -> &'static mut State {
    // SAFETY: set once by `Lmc::open` before any use; exclusive under LOCK (caller).
    unsafe { &mut *STATE.load(Ordering::Acquire) }
}

fn snap(st: &mut State, i: usize) -> &mut Snap {
    // SAFETY: entries point at live book-allocated Snaps, each owned by the list (touched only
    // under LOCK, through the exclusive borrow of the state).
    unsafe { &mut *(st.snaps.as_slice()[i] as *mut Snap) }
}

thread_local! {
    /// This thread's stack block `[low, high)` (0, 0: not known yet).
    static STACK: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// This thread's stack block: stacks are not covered (a restore cannot rewind registers), and
/// instrumented code writes its caller's frames through pointers.
fn own_stack() -> (usize, usize) {
    let known = STACK.with(|s| s.get());
    if known.1 != 0 {
        return known;
    }
    // SAFETY: querying this thread's attributes into a zeroed attr, destroyed afterwards.
    let range = unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return (0, 0);
        }
        let mut addr = std::ptr::null_mut();
        let mut size = 0usize;
        libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (addr as usize, addr as usize + size)
    };
    STACK.with(|s| s.set(range));
    range
}

/// Tags every region of `[start, end)` with `gen`.
fn tag_range(shadow: *mut u16, start: usize, end: usize, gen: u16) {
    let mut region = start & !(REGION - 1);
    while region < end {
        // SAFETY: the shadow covers every user address.
        let tag = unsafe { &*(shadow.add(region >> REGION_SHIFT) as *const AtomicU16) };
        tag.store(gen, Ordering::Relaxed);
        region += REGION;
    }
}

/// The slow path of instrumented writes: saves every region of `[p, p + n)` not saved yet in
/// the current generation into the newest snapshot's log, then tags it.
///
/// # Safety
///
/// `[p, p + n)` is memory the caller is about to write (so it is mapped and writable).
#[no_mangle]
pub unsafe extern "C" fn __cow_lmc_write(p: *mut u8, n: u64) {
    let gen = __cow_lmc_gen.load(Ordering::Acquire);
    let shadow = __cow_lmc_shadow.load(Ordering::Acquire);
    if gen == 0 || n == 0 || shadow.is_null() {
        return;
    }
    let start = p as usize;
    let end = start.saturating_add(n as usize);
    let (book_start, book_end) = (
        BOOK_START.load(Ordering::Relaxed),
        BOOK_END.load(Ordering::Relaxed),
    );
    let (stack_low, stack_high) = own_stack();
    if (start >= book_start && end <= book_end) || (start >= stack_low && end <= stack_high) {
        // Not covered: nothing to save, but tagged, so that further writes there in this
        // generation stay on the fast path (stack writes through pointers are frequent).
        tag_range(shadow, start, end, gen);
        return;
    }
    let _held = Locked::take();
    // SAFETY: the backend is open (the shadow exists) and LOCK is held.
    let st = unsafe { state() };
    let Some(newest) = st.snaps.len().checked_sub(1) else {
        return;
    };
    let mut saved = 0;
    let log_ptr = st.snaps.as_slice()[newest] as *mut Snap;
    // SAFETY: a live book-allocated Snap, a separate object from the state (whose `spare` is
    // borrowed below); LOCK held.
    let log = unsafe { &mut *log_ptr };
    let mut region = start & !(REGION - 1);
    while region < end {
        let next = region + REGION;
        let outside = (region >= book_start && next <= book_end)
            || (region >= stack_low && next <= stack_high)
            || excluded(region, next);
        // SAFETY: the shadow covers every user address (region < 2^47).
        let tag = unsafe { &*(shadow.add(region >> REGION_SHIFT) as *const AtomicU16) };
        if outside {
            tag.store(gen, Ordering::Relaxed);
        } else if tag.load(Ordering::Relaxed) != gen {
            let k = key(region);
            if log.log.get(k).is_none() {
                let block = log.images.alloc(&mut st.spare);
                // SAFETY: the region lies in the page the caller is about to write (regions
                // never cross pages), so it is readable; `block` is a fresh book block.
                unsafe { std::ptr::copy_nonoverlapping(region as *const u8, block, REGION) };
                log.log.insert(k, block as usize);
                saved += 1;
            }
            tag.store(gen, Ordering::Release);
        }
        region = next;
    }
    st.regions_saved += saved;
    SAVES.fetch_add(1, Ordering::Relaxed);
}

/// The check for writes the pass found only at the end of the optimization pipeline (made by
/// the optimizer from others): the inlined check's logic, out of line.
///
/// # Safety
///
/// As [`__cow_lmc_write`].
#[no_mangle]
pub unsafe extern "C" fn __cow_lmc_check(p: *mut u8, n: u64) {
    let gen = __cow_lmc_gen.load(Ordering::Acquire);
    let shadow = __cow_lmc_shadow.load(Ordering::Acquire);
    if gen == 0 || n == 0 || shadow.is_null() {
        return;
    }
    let (first, last) = (p as usize, p as usize + (n as usize - 1));
    if first >> REGION_SHIFT == last >> REGION_SHIFT {
        // SAFETY: the shadow covers every user address.
        let tag = unsafe { &*(shadow.add(first >> REGION_SHIFT) as *const AtomicU16) };
        if tag.load(Ordering::Relaxed) == gen {
            return;
        }
    }
    // SAFETY: the caller's guarantee.
    unsafe { __cow_lmc_write(p, n) }
}

/// The lmc backend (one per process: the shadow and the generation are process-wide).
pub struct Lmc;

impl Lmc {
    /// Reserves the shadow and the state. `ENOTSUP` when no object file of this process was
    /// compiled with `cowcc` (nothing would be covered).
    pub fn open() -> Result<Lmc> {
        if instrumented_modules() == 0 {
            return Err(err(
                "lmc: no code of this process was compiled with cowcc",
                libc::ENOTSUP,
            ));
        }
        let _held = Locked::take();
        if !STATE.load(Ordering::Acquire).is_null() {
            return Ok(Lmc);
        }
        // SAFETY: a fresh private anonymous reservation; nothing else refers to it.
        let shadow = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SHADOW_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if shadow == libc::MAP_FAILED {
            return Err(err("lmc: reserve the shadow tags", libc::ENOMEM));
        }
        // Sparse tags: under THP "always" each first touch would make a 2 MiB huge page.
        // SAFETY: advice on the reservation just made.
        unsafe { libc::madvise(shadow, SHADOW_BYTES, libc::MADV_NOHUGEPAGE) };
        let (a, b) = book::book().range();
        BOOK_START.store(a, Ordering::Relaxed);
        BOOK_END.store(b, Ordering::Relaxed);
        STATE.store(
            book::leak(State {
                snaps: BookVec::new(),
                next_id: 1,
                last_gen: 0,
                regions_saved: 0,
                spare: BookVec::new(),
                snapshot_ns: 0,
                restore_ns: 0,
            }),
            Ordering::Release,
        );
        __cow_lmc_shadow.store(shadow.cast(), Ordering::Release);
        // Known before a signal handler may need it (its first lookup is not async-signal-safe).
        own_stack();
        super::lmc_cut::install();
        Ok(Lmc)
    }

    /// The snapshot itself: a new generation and an empty log.
    fn snapshot_now() -> Result<u64> {
        let t = crate::sys::monotonic_ns();
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        let id = st.next_id;
        st.next_id += 1;
        Self::start_epoch(st, id);
        st.snapshot_ns += crate::sys::monotonic_ns() - t;
        Ok(id)
    }

    fn position(st: &mut State, id: u64) -> Result<usize> {
        (0..st.snaps.len())
            .find(|&i| snap(st, i).id == id)
            .ok_or(err("no such snapshot", libc::ENOENT))
    }

    /// Starts a new generation (every tag becomes stale); after 65 535 of them the tags are
    /// cleared and numbering starts again.
    fn new_generation(st: &mut State) {
        let mut g = st.last_gen.wrapping_add(1);
        if g == 0 {
            // SAFETY: zeroing the shadow reservation (MADV_DONTNEED: its pages read as zero).
            unsafe {
                libc::madvise(
                    __cow_lmc_shadow.load(Ordering::Acquire).cast(),
                    SHADOW_BYTES,
                    libc::MADV_DONTNEED,
                )
            };
            g = 1;
        }
        st.last_gen = g;
        __cow_lmc_gen.store(g, Ordering::Release);
    }

    /// Pushes snapshot `id` with an empty log (memory equals it now) and starts a generation.
    fn start_epoch(st: &mut State, id: u64) {
        let s = book::leak(Snap {
            id,
            log: PageTable::default(),
            images: Arena::new(),
        });
        st.snaps.push(s as *mut Snap as usize);
        Self::new_generation(st);
    }

    fn free_snap(st: &mut State, i: usize) {
        let p = st.snaps.as_slice()[i];
        // SAFETY: `p` is a live book-allocated Snap, removed from the list just below.
        let mut s = unsafe { std::ptr::read(p as *const Snap) };
        s.images.release(&mut st.spare);
        drop(s);
        book::book().free(p as *mut u8, std::mem::size_of::<Snap>());
        let rest: Vec<usize> = st.snaps.as_slice()[i + 1..].to_vec();
        st.snaps.truncate(i);
        st.snaps.extend_from_slice(&rest);
    }
}

/// Writes `blocks` (region address, book block) into this process's memory in one
/// `process_vm_writev` per batch; a region that is no longer mapped writable is skipped.
fn write_back(blocks: &[(usize, usize)]) {
    const BATCH: usize = 512;
    let pid = std::process::id() as libc::pid_t;
    let mut i = 0;
    while i < blocks.len() {
        let batch = &blocks[i..(i + BATCH).min(blocks.len())];
        let local: Vec<libc::iovec> = batch
            .iter()
            .map(|&(_, b)| libc::iovec {
                iov_base: b as *mut libc::c_void,
                iov_len: REGION,
            })
            .collect();
        let remote: Vec<libc::iovec> = batch
            .iter()
            .map(|&(r, _)| libc::iovec {
                iov_base: r as *mut libc::c_void,
                iov_len: REGION,
            })
            .collect();
        // SAFETY: local iovecs point at book blocks of REGION bytes; the kernel checks the
        // remote ones (this process's own memory) and stops at the first it cannot write.
        let done = unsafe {
            libc::process_vm_writev(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        // Whole regions written; the one after them (if any) failed and is skipped.
        let written = if done < 0 { 0 } else { done as usize / REGION };
        i += if written >= batch.len() {
            batch.len()
        } else {
            written + 1
        };
    }
}

impl Backend for Lmc {
    fn name(&self) -> &'static str {
        "lmc"
    }

    fn map(&self, len: usize) -> Result<*mut u8> {
        if len == 0 {
            return Err(err("map", libc::EINVAL));
        }
        // Plain private memory: instrumented writes to it are covered.
        super::shadow::map_anonymous(len)
    }

    fn snapshot(&self) -> Result<u64> {
        if !THREADS_STARTED.load(Ordering::Acquire) {
            return Self::snapshot_now();
        }
        match snapshot_as_cut() {
            id if id > 0 => Ok(id as u64),
            e => Err(err(
                "snapshot: gather the threads at safe points",
                -e as i32,
            )),
        }
    }

    fn restore(&self, id: u64) -> Result<()> {
        let t = crate::sys::monotonic_ns();
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        let k = Self::position(st, id)?;
        let mut blocks: Vec<(usize, usize)> = Vec::new();
        for i in (k..st.snaps.len()).rev() {
            blocks.clear();
            blocks.extend(snap(st, i).log.iter().map(|(r, b)| (unkey(r), b)));
            write_back(&blocks);
        }
        while st.snaps.len() > k {
            Self::free_snap(st, st.snaps.len() - 1);
        }
        // S_k stays, with an empty log: memory equals it again.
        Self::start_epoch(st, id);
        st.restore_ns += crate::sys::monotonic_ns() - t;
        Ok(())
    }

    fn drop_snapshot(&self, id: u64) -> Result<()> {
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        let j = Self::position(st, id)?;
        if j > 0 {
            // Images S_j-1 lacks move down (the region did not change between the two).
            let moved: Vec<(usize, usize)> = snap(st, j).log.iter().collect();
            for (k, block) in moved {
                let older = snap(st, j - 1);
                if older.log.get(k).is_none() {
                    older.log.insert(k, block);
                }
            }
            // The moved images stay where they are: S_j-1 takes over S_j's chunks.
            let chunks: Vec<usize> = snap(st, j).images.chunks.as_slice().to_vec();
            snap(st, j).images.chunks.clear();
            snap(st, j - 1).images.chunks.extend_from_slice(&chunks);
        }
        Self::free_snap(st, j);
        if st.snaps.is_empty() {
            // Nothing held: stop saving (and tag nothing) until the next snapshot.
            __cow_lmc_gen.store(0, Ordering::Release);
        }
        Ok(())
    }

    fn read(&self, id: u64, addr: usize, buf: &mut [u8]) -> Result<()> {
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        let k = Self::position(st, id)?;
        let end = addr
            .checked_add(buf.len())
            .ok_or(err("read", libc::EFAULT))?;
        // The current bytes first (EFAULT if any is unmapped), then the images over them.
        if !buf.is_empty() {
            let n = crate::sys::read_process(std::process::id() as i32, addr, buf);
            if n != buf.len() as isize {
                return Err(err("read", libc::EFAULT));
            }
        }
        let mut region = addr & !(REGION - 1);
        while region < end {
            let image = (k..st.snaps.len()).find_map(|i| snap(st, i).log.get(key(region)));
            if let Some(block) = image {
                let (a, b) = (region.max(addr), (region + REGION).min(end));
                // SAFETY: `block` holds REGION bytes of `region`; [a, b) lies in both.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (block + (a - region)) as *const u8,
                        buf.as_mut_ptr().add(a - addr),
                        b - a,
                    )
                };
            }
            region += REGION;
        }
        Ok(())
    }

    fn dirty_since(&self, id: u64) -> Result<Vec<usize>> {
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        let k = Self::position(st, id)?;
        let mut pages = Vec::new();
        for i in k..st.snaps.len() {
            pages.extend(snap(st, i).log.iter().map(|(r, _)| unkey(r) & !4095));
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    fn list(&self) -> Result<Vec<u64>> {
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        Ok((0..st.snaps.len()).map(|i| snap(st, i).id).collect())
    }

    fn stats(&self) -> Stats {
        let _held = Locked::take();
        // SAFETY: LOCK held; the backend is open.
        let st = unsafe { state() };
        Stats {
            snapshots: st.snaps.len() as u64,
            write_faults: SAVES.load(Ordering::Relaxed),
            pages_saved: st.regions_saved * REGION as u64 / 4096,
            // The chunks of saved images (in use or spare).
            bytes_held: ((0..st.snaps.len())
                .map(|i| snap(st, i).images.chunks.len())
                .sum::<usize>()
                + st.spare.len()) as u64
                * CHUNK as u64,
            snapshot_ns: st.snapshot_ns,
            restore_ns: st.restore_ns,
            precopied: 0,
            precopy_useful: 0,
            around_pages: 0,
            around_useful: 0,
        }
    }
}
