//! The covered heap: one `/dev/cow` region split into shards, each a talc allocator whose
//! control block sits at the start of its own shard.
//!
//! Everything the allocator knows lives in covered memory, so a restore returns the heap's
//! bookkeeping and its contents to the same instant. Only the locks stay outside (in this
//! library's `.bss`): a restore must never bring back a lock "held" by a thread that has since
//! moved on. Each thread has a home shard (handed out round-robin at its first allocation), so
//! threads rarely contend. libcow's own allocations (its set-up, the checkpointer's work) go to
//! a shard of their own, so a deterministic program gets the same heap layout every run
//! whatever libcow does meanwhile (what an oracle replaying recorded write sets, or a journal
//! comparing runs, relies on).

use std::alloc::Layout;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use talc::base::Talc;
use talc::source::Manual;
use talc::DefaultBinning;

type Allocator = Talc<Manual, DefaultBinning>;

/// Number of shards (independent allocators with their own locks).
const SHARDS: usize = 8;
/// Default heap size (virtual; pages are allocated by the module at first touch).
const DEFAULT_HEAP_MIB: u64 = 4096;
/// Every block starts with a header of this size holding the caller's size and alignment.
const HEADER: usize = 16;

static BASE: AtomicUsize = AtomicUsize::new(0);
/// Space offset of the heap region (for reads of old images).
static OFFSET: AtomicUsize = AtomicUsize::new(0);
static SHARD_SIZE: AtomicUsize = AtomicUsize::new(0);
/// Highest address handed out per shard: a fork copies only up to it.
static HIGH_WATER: [AtomicUsize; SHARDS] = [const { AtomicUsize::new(0) }; SHARDS];

/// Shard locks: plain pthread mutexes, so that they can be held across `fork()` and around a
/// snapshot and released later from the same thread.
struct Locks([UnsafeCell<libc::pthread_mutex_t>; SHARDS]);
// SAFETY: pthread mutexes are made to be shared between threads; we only pass their addresses
// to pthread_mutex_lock/unlock.
unsafe impl Sync for Locks {}
static LOCKS: Locks = Locks([const { UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER) }; SHARDS]);

/// Holds shard `i`'s lock until dropped.
struct ShardGuard(usize);
impl ShardGuard {
    fn lock(i: usize) -> Self {
        lock(i);
        ShardGuard(i)
    }
}
impl Drop for ShardGuard {
    fn drop(&mut self) {
        unlock(self.0);
    }
}

fn lock(i: usize) {
    // SAFETY: a statically initialised mutex that is never moved or destroyed.
    unsafe { libc::pthread_mutex_lock(LOCKS.0[i].get()) };
}

fn unlock(i: usize) {
    // SAFETY: as above; called only by the thread that locked it.
    unsafe { libc::pthread_mutex_unlock(LOCKS.0[i].get()) };
}

/// Takes every shard lock, in order: the heap is quiescent until [`release_all`] (around a
/// snapshot, a restore, or a fork).
pub(crate) fn hold_all() {
    (0..SHARDS).for_each(lock);
}

/// Releases what [`hold_all`] took.
pub(crate) fn release_all() {
    (0..SHARDS).rev().for_each(unlock);
}

/// For each shard, the part that may hold data: `[shard start, high-water mark)`.
pub(crate) fn used_ranges() -> impl Iterator<Item = (usize, usize)> {
    let base = BASE.load(Ordering::Acquire);
    let size = SHARD_SIZE.load(Ordering::Relaxed);
    (0..SHARDS).filter(move |_| base != 0).map(move |i| {
        let start = base + i * size;
        let hwm = HIGH_WATER[i]
            .load(Ordering::Relaxed)
            .max(start + 2 * crate::raw::page_size());
        (start, hwm.min(start + size))
    })
}

/// Maps the heap region and sets up one allocator per shard.
pub(crate) fn init(cow: &cow::Cow) -> Result<(), &'static str> {
    let mib = crate::raw::env_u64(c"COW_HEAP_MIB")
        .unwrap_or(DEFAULT_HEAP_MIB)
        .max(64);
    let region = cow
        .map_region((mib as usize) << 20)
        .map_err(|_| "cannot map the covered heap from /dev/cow")?;
    let shard_size = (region.len / SHARDS) & !(crate::raw::page_size() - 1);
    let control = std::mem::size_of::<Allocator>().next_multiple_of(64);
    for i in 0..SHARDS {
        let start = region.addr as usize + i * shard_size;
        let talc = start as *mut Allocator;
        // SAFETY: the shard is fresh covered memory that nothing else uses: the control block
        // goes at its start, and talc is given the rest to manage.
        unsafe {
            talc.write(Talc::new(Manual));
            (*talc)
                .claim((start + control) as *mut u8, shard_size - control)
                .ok_or("talc refused the heap shard")?;
        }
    }
    SHARD_SIZE.store(shard_size, Ordering::Relaxed);
    OFFSET.store(region.offset as usize, Ordering::Relaxed);
    BASE.store(region.addr as usize, Ordering::Release);
    Ok(())
}

/// The covered heap's `[start, end)`, once initialised.
pub(crate) fn range() -> Option<(usize, usize)> {
    let base = BASE.load(Ordering::Acquire);
    (base != 0).then(|| (base, base + SHARDS * SHARD_SIZE.load(Ordering::Relaxed)))
}

/// Space offset of address `addr` of the heap region.
pub(crate) fn offset_of(addr: usize) -> u64 {
    (OFFSET.load(Ordering::Relaxed) + (addr - BASE.load(Ordering::Acquire))) as u64
}

/// Whether `p` was allocated from the covered heap.
pub(crate) fn owns(p: *mut u8) -> bool {
    range().is_some_and(|(s, e)| (s..e).contains(&(p as usize)))
}

fn shard_talc(i: usize) -> *mut Allocator {
    (BASE.load(Ordering::Acquire) + i * SHARD_SIZE.load(Ordering::Relaxed)) as *mut Allocator
}

fn block_layout(size: usize, align: usize) -> Option<(Layout, usize)> {
    let lead = align.max(HEADER);
    let layout = Layout::from_size_align(size.checked_add(lead)?, lead).ok()?;
    Some((layout, lead))
}

/// Next home shard to hand out.
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's home shard (`usize::MAX`: none yet). No destructor, so it stays
    /// readable while the thread exits (allocations happen then too).
    static HOME: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    /// Whether this thread is doing libcow's own work (see [`internal`]).
    static INTERNAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The shard libcow's own allocations come from.
const INTERNAL_SHARD: usize = SHARDS - 1;

/// Runs `f` as libcow's own work: its allocations come from the internal shard and do not
/// advance the progress clock (their amount depends on timing, not on the program).
pub(crate) fn internal<T>(f: impl FnOnce() -> T) -> T {
    let was = INTERNAL.with(|c| c.replace(true));
    let r = f();
    INTERNAL.with(|c| c.set(was));
    r
}

/// Allocations served, counted per home shard (each counter on its own cache line).
#[repr(align(64))]
struct Counter(std::sync::atomic::AtomicU64);
static ALLOCATIONS: [Counter; SHARDS] =
    [const { Counter(std::sync::atomic::AtomicU64::new(0)) }; SHARDS];

/// Allocations served so far: the program's progress clock (deterministic for a
/// deterministic program, unlike time).
pub(crate) fn allocations() -> u64 {
    ALLOCATIONS
        .iter()
        .map(|c| c.0.load(Ordering::Relaxed))
        .sum()
}

/// The calling thread's home shard (never the internal one).
fn home_shard() -> usize {
    HOME.with(|h| {
        if h.get() == usize::MAX {
            h.set(NEXT_HOME.fetch_add(1, Ordering::Relaxed) % INTERNAL_SHARD);
        }
        h.get()
    })
}

/// Allocates `size` bytes aligned to `align` (a power of two). Null when out of memory.
pub(crate) fn alloc(size: usize, align: usize) -> *mut u8 {
    let Some((layout, lead)) = block_layout(size.max(1), align) else {
        return std::ptr::null_mut();
    };
    let home = if INTERNAL.with(|c| c.get()) {
        INTERNAL_SHARD
    } else {
        let home = home_shard();
        ALLOCATIONS[home].0.fetch_add(1, Ordering::Relaxed);
        home
    };
    for k in 0..SHARDS {
        let i = (home + k) % SHARDS;
        let _guard = ShardGuard::lock(i);
        // SAFETY: the shard's allocator was initialised by `init`; its lock is held.
        if let Some(block) = unsafe { (*shard_talc(i)).allocate(layout) } {
            let user = block.as_ptr().wrapping_add(lead);
            let end = block.as_ptr() as usize + layout.size();
            HIGH_WATER[i].fetch_max(end.next_multiple_of(4096), Ordering::Relaxed);
            // SAFETY: the block has `lead` bytes before `user`, of which we use the last 16.
            unsafe {
                let header = user.sub(HEADER).cast::<usize>();
                header.write(size);
                header.add(1).write(align.max(HEADER));
            }
            return user;
        }
    }
    std::ptr::null_mut()
}

/// The size the caller asked for when it allocated `p` (a pointer from [`alloc`]).
///
/// # Safety
///
/// `p` is a live allocation of this heap.
pub(crate) unsafe fn usable_size(p: *mut u8) -> usize {
    // SAFETY: by the caller's guarantee the header precedes `p`.
    unsafe { p.sub(HEADER).cast::<usize>().read() }
}

/// Frees `p`.
///
/// # Safety
///
/// `p` is a live allocation of this heap, freed once.
pub(crate) unsafe fn free(p: *mut u8) {
    // SAFETY: by the caller's guarantee the header precedes `p`.
    let (size, lead) = unsafe {
        let h = p.sub(HEADER).cast::<usize>();
        (h.read(), h.add(1).read())
    };
    let Some((layout, _)) = block_layout(size.max(1), lead) else {
        return;
    };
    let base = BASE.load(Ordering::Acquire);
    let i = (p as usize - base) / SHARD_SIZE.load(Ordering::Relaxed);
    let _guard = ShardGuard::lock(i);
    // SAFETY: the block starts `lead` bytes before `p`, was allocated from shard `i` with this
    // layout, and the shard's lock is held.
    unsafe { (*shard_talc(i)).deallocate(p.sub(lead), layout) };
}
