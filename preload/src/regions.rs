//! Every private writable mapping of the program, in `/dev/cow` (cow.ko).
//!
//! The covered heap and the covered table below are mapped by this library itself. Everything
//! else a program keeps state in is made covered here:
//! - at start-up (the constructor, before the program's own constructors and threads), the
//!   writable segment of every loaded object (`.data`, `.bss`, minus RELRO; the executable,
//!   libc's stdio state, every shared library) and the break's `[heap]` are **moved in**: a
//!   `/dev/cow` region at a fresh space offset receives their bytes and then replaces them at
//!   the same address in one `mremap` (no instant where the memory reads as zero);
//! - `dlopen` moves in the objects it loaded;
//! - `mmap` of private anonymous memory (any protection, `MAP_FIXED`, `MAP_NORESERVE`,
//!   `MAP_POPULATE`) maps `/dev/cow` at a fresh offset instead — the same zeroed, private-looking
//!   memory, but the kernel snapshots it; a private *file* mapping made writable is moved in;
//! - `munmap` (and `MAP_FIXED` over covered memory) throws the pages away in the space
//!   (`COW_IOC_DISCARD`): the newest snapshot keeps them for a restore;
//! - `madvise(MADV_DONTNEED | MADV_DONTNEED_LOCKED | MADV_FREE | MADV_REMOVE)` discards, so the
//!   pages read as zero as the program expects (jemalloc relies on it); `mprotect` and the
//!   other advice act on the shared mapping as they would on the private one;
//! - `mremap` (grow, shrink, move) moves the existing pages with the kernel's `mremap` (a
//!   `/dev/cow` mapping keeps its offsets when it moves) and maps fresh offsets for growth.
//!
//! The table of covered mappings (address range → space offset, protection) exists twice: once
//! in covered memory, so a restore returns it to what the process had mapped at the snapshot,
//! and once outside (in libcow's book), what is mapped now. After a restore the difference is
//! applied: mappings made since are unmapped, mappings unmapped since are mapped again at their
//! old offsets (whose pages the restore brought back), protections are put back.
//!
//! All of it runs under one lock, which snapshots, restores and `fork` also take (through
//! [`hold`]), so the covered table always describes the mappings exactly at a snapshot.
//!
//! Not covered, by design: stacks (a restore cannot rewind a running thread's registers; the
//! TLS of threads other than the main one lives in their stack blocks), this library's own
//! state and libcow's book. Not covered for lack of a hook: memory mapped
//! with a direct system call or inside glibc without an interposable symbol. `cowctl run
//! --coverage` lists what is left (see `coverage.rs`).

use crate::raw;
use std::cell::UnsafeCell;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Most covered mappings at once.
const MAX_ENTRIES: usize = 16 * 1024;
/// Space offsets handed to the mappings covered here: `[1 << 42, 1 << 43)` (4 TiB). The heap
/// and libcow's regions use offsets from 0; a second libcow handle on the space from `1 << 43`.
const OFFSETS_BASE: u64 = 1 << 42;
const OFFSETS_END: u64 = 1 << 43;

/// `madvise` advice that throws pages of private anonymous memory away.
const MADV_DONTNEED_LOCKED: i32 = 24;

/// One covered mapping: `[start, end)` maps the space from `offset` on, with `prot`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) offset: u64,
    pub(crate) prot: i32,
    reserved: u32,
}

impl Entry {
    fn new(start: usize, end: usize, offset: u64, prot: i32) -> Self {
        Entry {
            start,
            end,
            offset,
            prot,
            reserved: 0,
        }
    }

    /// The space offset of address `a` of this mapping.
    fn offset_at(&self, a: usize) -> u64 {
        self.offset + (a - self.start) as u64
    }

    /// The part `[a, b)` of this mapping.
    fn piece(&self, a: usize, b: usize) -> Entry {
        Entry::new(a, b, self.offset_at(a), self.prot)
    }

    /// Whether `other` maps address `a` to the same space offset.
    fn same_offset_at(&self, other: &Entry, a: usize) -> bool {
        self.offset_at(a) == other.offset_at(a)
    }
}

/// Covered mappings, sorted by address, not overlapping; and the next free space offset.
#[repr(C)]
struct Table {
    next_offset: u64,
    count: usize,
    entries: [Entry; MAX_ENTRIES],
}

impl Table {
    fn entries(&self) -> &[Entry] {
        &self.entries[..self.count]
    }

    /// Index of the first entry that ends after `addr`.
    fn first_after(&self, addr: usize) -> usize {
        self.entries().partition_point(|e| e.end <= addr)
    }

    /// Space offsets for `len` bytes (a guard page of offsets after them, so the kernel never
    /// merges two mappings); `None` when the window is used up.
    fn alloc_offsets(&mut self, len: usize) -> Option<u64> {
        let off = self.next_offset.max(OFFSETS_BASE);
        let next = off.checked_add(len as u64 + raw::page_size() as u64)?;
        if next > OFFSETS_END {
            return None;
        }
        self.next_offset = next;
        Some(off)
    }

    /// Adds `e`, which overlaps no entry. False when the table is full.
    fn insert(&mut self, e: Entry) -> bool {
        if self.count == MAX_ENTRIES {
            return false;
        }
        let at = self.entries().partition_point(|x| x.start < e.start);
        self.entries.copy_within(at..self.count, at + 1);
        self.entries[at] = e;
        self.count += 1;
        true
    }

    fn remove_at(&mut self, i: usize) {
        self.entries.copy_within(i + 1..self.count, i);
        self.count -= 1;
    }

    /// Splits the entry that strictly contains `addr` (if any) in two at `addr`.
    fn split_at(&mut self, addr: usize) -> bool {
        let i = self.first_after(addr);
        match self.entries().get(i).copied() {
            Some(e) if e.start < addr => {
                self.entries[i].end = addr;
                self.insert(e.piece(addr, e.end))
            }
            _ => true,
        }
    }

    /// Removes `[start, end)` from the table; `gone` receives each removed piece.
    fn remove_range(&mut self, start: usize, end: usize, mut gone: impl FnMut(Entry)) -> bool {
        if !self.split_at(start) || !self.split_at(end) {
            return false;
        }
        let i = self.first_after(start);
        while i < self.count && self.entries[i].start < end {
            gone(self.entries[i]);
            self.remove_at(i);
        }
        true
    }

    /// Sets the protection of the covered parts of `[start, end)`.
    fn set_prot(&mut self, start: usize, end: usize, prot: i32) -> bool {
        if !self.split_at(start) || !self.split_at(end) {
            return false;
        }
        let mut i = self.first_after(start);
        while i < self.count && self.entries[i].start < end {
            self.entries[i].prot = prot;
            i += 1;
        }
        true
    }

    /// The covered pieces of `[start, end)`.
    fn pieces(&self, start: usize, end: usize) -> impl Iterator<Item = Entry> + '_ {
        self.entries()[self.first_after(start)..]
            .iter()
            .take_while(move |e| e.start < end)
            .map(move |e| e.piece(e.start.max(start), e.end.min(end)))
    }

    fn copy_from(&mut self, other: &Table) {
        self.next_offset = other.next_offset;
        self.count = other.count;
        self.entries[..other.count].copy_from_slice(other.entries());
    }
}

/// The table in covered memory (what a restore rewinds) and the one in the book (what is
/// mapped now); null until [`init`].
static COVERED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The covered table's own region: `(address, length, space offset)`.
static TABLE_REGION: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];
/// Interposition is on (cow.ko backend, after [`init`], not in a detached fork child).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// A failure to cover was reported (once).
static WARNED: AtomicBool = AtomicBool::new(false);

/// The lock of both tables: a plain pthread mutex, held across `fork()` and snapshots.
struct Lock(UnsafeCell<libc::pthread_mutex_t>);
// SAFETY: a pthread mutex is made to be shared between threads; only its address is used.
unsafe impl Sync for Lock {}
static LOCK: Lock = Lock(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

/// Takes the tables' lock (snapshots, restores and `fork` hold it with the heap's).
pub(crate) fn hold() {
    // SAFETY: a statically initialised mutex that is never moved or destroyed.
    unsafe { libc::pthread_mutex_lock(LOCK.0.get()) };
}

/// Releases what [`hold`] took.
pub(crate) fn release() {
    // SAFETY: as above; called by the thread that locked it.
    unsafe { libc::pthread_mutex_unlock(LOCK.0.get()) };
}

/// Both tables, with the lock held until the guard drops.
struct Tables {
    covered: &'static mut Table,
    live: &'static mut Table,
}

impl Tables {
    fn lock() -> Option<Tables> {
        if !ACTIVE.load(Ordering::Acquire) || crate::space().is_none() {
            return None;
        }
        hold();
        // SAFETY: both tables were set up by `init` and are only touched with the lock held,
        // which we now hold until `Tables` drops.
        Some(unsafe { Self::assume_locked() })
    }

    /// # Safety
    ///
    /// The caller holds the lock and the tables exist.
    unsafe fn assume_locked() -> Tables {
        // SAFETY: by the caller's guarantee.
        unsafe {
            Tables {
                covered: &mut *(COVERED.load(Ordering::Acquire) as *mut Table),
                live: &mut *(LIVE.load(Ordering::Acquire) as *mut Table),
            }
        }
    }

    /// Applies the same change to both tables.
    fn both(&mut self, mut op: impl FnMut(&mut Table) -> bool) -> bool {
        let a = op(self.covered);
        let b = op(self.live);
        a && b
    }

    fn alloc_offsets(&mut self, len: usize) -> Option<u64> {
        let off = self.live.alloc_offsets(len)?;
        self.covered.next_offset = self.live.next_offset;
        Some(off)
    }

    /// Records a new covered mapping (forgetting whatever stale entries it overlaps).
    fn add(&mut self, e: Entry) {
        debug(b"add", e.start, e.end);
        self.forget(e.start, e.end);
        if !self.both(|t| t.insert(e)) {
            warn(b"libcow_preload: too many covered mappings; later ones are NOT snapshotted\n");
        }
    }

    /// Forgets the covered pieces of `[start, end)`, which are no longer mapped, and throws
    /// their pages away in the space.
    fn forget(&mut self, start: usize, end: usize) {
        debug(b"forget", start, end);
        let cow = crate::space();
        let ok = self.live.remove_range(start, end, |piece| {
            if let Some(cow) = cow {
                let _ = cow.discard(piece.offset, (piece.end - piece.start) as u64);
            }
        });
        let ok = ok && self.covered.remove_range(start, end, |_| {});
        if !ok {
            warn(b"libcow_preload: too many covered mappings; the table lost one\n");
        }
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        release();
    }
}

/// `COW_DEBUG_REGIONS=1`: every change of the tables on stderr.
fn debug(what: &[u8], a: usize, b: usize) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| raw::env_bytes(c"COW_DEBUG_REGIONS").is_some()) {
        return;
    }
    let mut line = [0u8; 96];
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for &c in bytes {
            if n < line.len() {
                line[n] = c;
                n += 1;
            }
        }
    };
    put(b"regions: ");
    put(what);
    for v in [a, b] {
        put(b" ");
        for shift in (0..16).rev() {
            put(&[b"0123456789abcdef"[(v >> (shift * 4)) & 15]]);
        }
    }
    put(b"\n");
    raw::write_stderr(&line[..n]);
}

fn warn(msg: &[u8]) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        raw::write_stderr(msg);
    }
}

fn space_fd() -> i32 {
    crate::space().map_or(-1, |cow| cow.as_fd().as_raw_fd())
}

/// Maps `[addr, addr + len)` (or anywhere, if `addr` is 0 without `MAP_FIXED`) from the space
/// at `offset`; the raw system call's result.
fn map_space(addr: usize, len: usize, prot: i32, flags: i32, offset: u64) -> isize {
    raw::sys_mmap(
        addr,
        len,
        prot,
        flags | libc::MAP_SHARED,
        space_fd(),
        offset as i64,
    )
}

/// Whether page `p` holds any non-zero byte.
///
/// # Safety
///
/// `p` is a readable page.
unsafe fn page_has_data(p: usize, page: usize) -> bool {
    // SAFETY: by the caller's guarantee the page is readable; word reads stay inside it.
    unsafe {
        std::slice::from_raw_parts(p as *const u64, page / 8)
            .iter()
            .any(|&w| w != 0)
    }
}

/// Moves `[start, end)` (readable, writable, private) into the space at the same address.
fn move_in(t: &mut Tables, start: usize, end: usize, prot: i32) -> bool {
    let len = end - start;
    let page = raw::page_size();
    let Some(off) = t.alloc_offsets(len) else {
        return false;
    };
    let tmp = map_space(0, len, libc::PROT_READ | libc::PROT_WRITE, 0, off);
    if tmp < 0 {
        return false;
    }
    let tmp = tmp as usize;
    for p in (start..end).step_by(page) {
        // SAFETY: the range is a readable mapping (caller) and `tmp` a fresh writable mapping
        // of the same length; untouched pages of either read as zero and are skipped.
        unsafe {
            if page_has_data(p, page) {
                std::ptr::copy_nonoverlapping(p as *const u8, (tmp + p - start) as *mut u8, page);
            }
        }
    }
    if prot != libc::PROT_READ | libc::PROT_WRITE {
        raw::sys_mprotect(tmp, len, prot);
    }
    if raw::sys_mremap(
        tmp,
        len,
        len,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
        start,
    ) < 0
    {
        raw::sys_munmap(tmp, len);
        if let Some(cow) = crate::space() {
            let _ = cow.discard(off, len as u64);
        }
        return false;
    }
    t.add(Entry::new(start, end, off, prot));
    true
}

/// Sets up both tables and moves in what is already loaded. Called once, in the constructor
/// (single-threaded), after the heap exists.
pub(crate) fn init() {
    let Some(cow) = crate::space() else { return };
    if raw::env_bytes(c"COW_COVER") == Some(b"heap") {
        return; // the heap and the executable's globals only, as before this module existed
    }
    let size = std::mem::size_of::<Table>().next_multiple_of(raw::page_size());
    let Ok(region) = cow.map_region(size) else {
        raw::write_stderr(
            b"libcow_preload: no table for covered mappings; only the heap is covered\n",
        );
        return;
    };
    let live = cow::book::alloc_uncovered(size);
    COVERED.store(region.addr as usize, Ordering::Release);
    LIVE.store(live.as_mut_ptr() as usize, Ordering::Release);
    TABLE_REGION[0].store(region.addr as usize, Ordering::Relaxed);
    TABLE_REGION[1].store(region.len, Ordering::Relaxed);
    TABLE_REGION[2].store(region.offset as usize, Ordering::Relaxed);
    ACTIVE.store(true, Ordering::Release);
    adopt_loaded_objects();
    adopt_anonymous();
}

/// Moves in the private anonymous memory mapped before us (the break's `[heap]`, the main
/// thread's static TLS and control block, what the loader and the constructors that ran before
/// ours mapped): all but the main thread's stack and libcow's book. Single-threaded (the
/// constructor).
///
/// Unlike the in-process backends, cow.ko can cover the main thread's control block: the
/// kernel writes its rseq area with page faults disabled on the way back to user mode, and
/// when that write faults it retries from a context that may fault, where cow.ko's first-write
/// hook runs like for any other write. Its TLS must be covered: jemalloc keeps its per-thread
/// state there, which must rewind with the arenas it describes.
fn adopt_anonymous() {
    let mut ranges: cow::book::BookVec<(usize, usize, i32)> = cow::book::BookVec::new();
    // Left out: libcow's book and this library's own `.bss` tail. The kernel merges an
    // anonymous mapping made next to either (jemalloc's first chunk, say) into its VMA, so
    // only their own ranges are cut out of what is found.
    let mut excluded: cow::book::BookVec<(usize, usize)> = cow::book::BookVec::new();
    excluded.push(cow::book::book().range());
    own_writable_segments(|a, b| excluded.push((a, b)));
    let _ = cow::maps::for_each_named(|m, _| {
        let eligible = !m.shared
            && !m.file
            && !m.dev_cow
            && !m.special
            && m.is_writable()
            && m.prot & libc::PROT_READ != 0;
        if eligible {
            let mut start = m.start;
            let mut cuts = [(m.end, m.end); 8];
            let mut n = 0;
            for &(a, b) in excluded.as_slice() {
                let (a, b) = (a.max(m.start), b.min(m.end));
                if a < b && n < cuts.len() - 1 {
                    cuts[n] = (a, b);
                    n += 1;
                }
            }
            cuts[..n].sort_unstable();
            for (a, b) in cuts.into_iter().take(n + 1) {
                if start < a {
                    ranges.push((start, a, m.prot));
                }
                start = start.max(b);
            }
        }
    });
    let Some(mut t) = Tables::lock() else { return };
    for &(start, end, prot) in ranges.as_slice() {
        if !move_in(&mut t, start, end, prot) {
            warn(b"libcow_preload: anonymous memory mapped before start-up could NOT be covered\n");
        }
    }
}

/// The writable, non-RELRO page ranges of every loaded object but this library.
fn writable_segments(mut found: impl FnMut(usize, usize)) {
    writable_segments_named(|_, a, b| found(a, b));
}

/// [`writable_segments`], with the object's file name (without its directory).
fn writable_segments_named(found: impl FnMut(&[u8], usize, usize)) {
    segments(false, found);
}

/// This library's own writable segments, `.bss` included (whose tail beyond the file is an
/// anonymous mapping, which must not be taken for the program's).
fn own_writable_segments(mut found: impl FnMut(usize, usize)) {
    segments(true, |_, a, b| found(a, b));
}

/// The writable segments of this library (`own`) or of every other loaded object.
fn segments(own: bool, mut found: impl FnMut(&[u8], usize, usize)) {
    struct Ctx<'a> {
        own_base: usize,
        own: bool,
        found: &'a mut dyn FnMut(&[u8], usize, usize),
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for each object and our `data`.
        unsafe {
            let ctx = &mut *(data as *mut Ctx);
            let info = &*info;
            let bias = info.dlpi_addr as usize;
            if (bias == ctx.own_base) != ctx.own || info.dlpi_phnum == 0 {
                return 0;
            }
            let page = raw::page_size();
            let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            let relro_end = phdrs
                .iter()
                .filter(|ph| ph.p_type == libc::PT_GNU_RELRO)
                .map(|ph| bias + ph.p_vaddr as usize + ph.p_memsz as usize)
                .max()
                .unwrap_or(0);
            for ph in phdrs {
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 {
                    let first = bias + ph.p_vaddr as usize;
                    let end = (first + ph.p_memsz as usize).next_multiple_of(page);
                    // The segment's first page is ours unless RELRO (read-only after
                    // relocation) reaches into it.
                    let mut start = first & !(page - 1);
                    if relro_end > start {
                        start = relro_end.next_multiple_of(page);
                    }
                    if start < end {
                        let path = if info.dlpi_name.is_null() {
                            &[][..]
                        } else {
                            std::ffi::CStr::from_ptr(info.dlpi_name).to_bytes()
                        };
                        let name = path.rsplit(|&c| c == b'/').next().unwrap_or(path);
                        (ctx.found)(name, start, end);
                    }
                }
            }
        }
        0
    }
    let mut ctx = Ctx {
        own_base: own_load_base(),
        own,
        found: &mut found,
    };
    // SAFETY: the callback only reads the program headers it is given.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut ctx as *mut Ctx).cast()) };
}

/// This library's load address (its own state is never covered).
fn own_load_base() -> usize {
    // SAFETY: dladdr fills `info` for an address inside this library.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        libc::dladdr(own_load_base as *const libc::c_void, &mut info);
        info.dli_fbase as usize
    }
}

/// Moves in the writable segments of loaded objects that are not covered yet.
fn adopt_loaded_objects() {
    let mut ranges = cow::book::BookVec::new();
    writable_segments(|start, end| ranges.push((start, end)));
    let Some(mut t) = Tables::lock() else { return };
    for &(start, end) in ranges.as_slice() {
        if t.live.pieces(start, end).next().is_some() {
            continue; // covered already (loaded before, or mapped by us)
        }
        if !move_in(&mut t, start, end, libc::PROT_READ | libc::PROT_WRITE) {
            warn(b"libcow_preload: a loaded object's globals could NOT be covered\n");
        }
    }
}

/// Puts the mappings back to what the restored memory describes: called right after a
/// restore, with the lock held (by the restore's `hold`) and the other threads stopped.
pub(crate) fn after_restore() {
    if !ACTIVE.load(Ordering::Acquire) || crate::space().is_none() {
        return;
    }
    debug(b"restore", 0, 0);
    // SAFETY: the restore path holds the lock (through `hold`) and the tables exist.
    let t = unsafe { Tables::assume_locked() };
    let (live, restored) = (&*t.live, &*t.covered);
    // Unmap what is mapped now but not, at the same offsets, in the restored table.
    for l in live.entries() {
        let mut at = l.start;
        for r in restored.pieces(l.start, l.end) {
            if !l.same_offset_at(&r, r.start) {
                continue;
            }
            if at < r.start {
                debug(b"restore: unmap", at, r.start);
                raw::sys_munmap(at, r.start - at);
            }
            at = r.end;
        }
        if at < l.end {
            debug(b"restore: unmap", at, l.end);
            raw::sys_munmap(at, l.end - at);
        }
    }
    // Map what the restored table has and is not mapped now; put protections back.
    for r in restored.entries() {
        let mut at = r.start;
        for l in live.pieces(r.start, r.end) {
            if !r.same_offset_at(&l, l.start) {
                continue;
            }
            if at < l.start {
                remap(r, at, l.start);
            }
            if l.prot != r.prot {
                raw::sys_mprotect(l.start, l.end - l.start, r.prot);
            }
            at = l.end;
        }
        if at < r.end {
            remap(r, at, r.end);
        }
    }
    t.live.copy_from(t.covered);
    // `t` drops without releasing: the restore's `release` does.
    std::mem::forget(t);
}

/// Maps `[a, b)` of restored entry `r` again.
fn remap(r: &Entry, a: usize, b: usize) {
    debug(b"restore: map", a, b);
    if map_space(a, b - a, r.prot, libc::MAP_FIXED, r.offset_at(a)) < 0 {
        raw::write_stderr(b"libcow_preload: restore: cannot map a covered range back\n");
    }
}

/// Covered pieces made private in the parent around `fork()` (see [`swap_out_for_fork`]):
/// `(start, end, space offset, prot)`, in this library's own (uncovered) state.
struct Swapped {
    count: usize,
    pieces: [Entry; 16],
}
struct SwappedCell(UnsafeCell<Swapped>);
// SAFETY: written only by the forking thread between `swap_out_for_fork` and
// `swap_back_after_fork` (and read by the child's handler, a single thread).
unsafe impl Sync for SwappedCell {}
static SWAPPED: SwappedCell = SwappedCell(UnsafeCell::new(Swapped {
    count: 0,
    pieces: [Entry {
        start: 0,
        end: 0,
        offset: 0,
        prot: 0,
        reserved: 0,
    }; 16],
}));

fn swapped() -> &'static mut Swapped {
    // SAFETY: see `SwappedCell`: one thread at a time.
    unsafe { &mut *SWAPPED.0.get() }
}

/// The calling thread's thread pointer (`%fs` base on x86-64).
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reads the first word of the thread control block, which glibc sets to the
    // block's own address (`tcb->tcb = tcb`); no memory is written.
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly)) };
    tp
}

/// Before glibc's `fork()`: the memory glibc itself writes in the child before any fork
/// handler runs (libc's and the loader's globals — thread counts, stack lists, lock
/// re-initialisations — and the forking thread's control block and TLS) is made private here,
/// in the parent, so those writes land in the child's own copy instead of the shared
/// `/dev/cow` pages the parent maps. [`swap_back_after_fork`] moves it back.
pub(crate) fn swap_out_for_fork() {
    let Some(t) = Tables::lock() else { return };
    let mut ranges = cow::book::BookVec::new();
    glibc_segments(|a, b| ranges.push((a, b)));
    let tp = thread_pointer();
    if let Some(e) = t.live.pieces(tp, tp + 1).next() {
        let e = t.live.entries()[t.live.first_after(e.start)];
        ranges.push((e.start, e.end));
    }
    let sw = swapped();
    sw.count = 0;
    for &(a, b) in ranges.as_slice() {
        for p in t.live.pieces(a, b) {
            if sw.count == sw.pieces.len() {
                break;
            }
            let len = p.end - p.start;
            let anonymous = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            let copy = raw::sys_mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, anonymous, -1, 0);
            if copy < 0 || p.prot & libc::PROT_READ == 0 {
                continue;
            }
            let copy = copy as usize;
            // SAFETY: `p` is a readable covered mapping, `copy` a fresh one of the same size.
            unsafe { std::ptr::copy_nonoverlapping(p.start as *const u8, copy as *mut u8, len) };
            raw::sys_mprotect(copy, len, p.prot);
            let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            if raw::sys_mremap(copy, len, len, flags, p.start) < 0 {
                raw::sys_munmap(copy, len);
                continue;
            }
            sw.pieces[sw.count] = p;
            sw.count += 1;
        }
    }
}

/// After `fork()` in the parent: the pieces [`swap_out_for_fork`] made private go back into
/// the space at their offsets; pages changed meanwhile are written through the space, so
/// their first writes are saved like any other.
pub(crate) fn swap_back_after_fork() {
    let Some(_t) = Tables::lock() else { return };
    let page = raw::page_size();
    let sw = swapped();
    for p in &sw.pieces[..sw.count] {
        let len = p.end - p.start;
        let tmp = map_space(0, len, libc::PROT_READ | libc::PROT_WRITE, 0, p.offset);
        if tmp < 0 {
            raw::write_stderr(b"libcow_preload: fork: cannot map covered memory back\n");
            continue;
        }
        let tmp = tmp as usize;
        for at in (0..len).step_by(page) {
            // SAFETY: both are readable mappings of `len` bytes (the private copy, readable
            // since it was copied; the space's pages through `tmp`, writable).
            unsafe {
                let (src, dst) = ((p.start + at) as *const u8, (tmp + at) as *mut u8);
                if std::slice::from_raw_parts(src, page) != std::slice::from_raw_parts(dst, page) {
                    std::ptr::copy_nonoverlapping(src, dst, page);
                }
            }
        }
        raw::sys_mprotect(tmp, len, p.prot);
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        if raw::sys_mremap(tmp, len, len, flags, p.start) < 0 {
            raw::sys_munmap(tmp, len);
            raw::write_stderr(b"libcow_preload: fork: cannot map covered memory back\n");
        }
    }
    sw.count = 0;
}

/// The writable segments of libc and of the dynamic loader.
fn glibc_segments(mut found: impl FnMut(usize, usize)) {
    let mut all = cow::book::BookVec::new();
    writable_segments_named(|name, a, b| {
        if name.starts_with(b"libc.so") || name.starts_with(b"ld-linux") {
            all.push((a, b));
        }
    });
    for &(a, b) in all.as_slice() {
        found(a, b);
    }
}

/// For a forked child: every covered range (the table's own region first) as
/// `(start, end, space offset, prot)`, less what the parent made private for the fork.
/// Called with the lock held (the fork's `prepare`).
pub(crate) fn for_each_covered(mut f: impl FnMut(usize, usize, u64, i32)) {
    let addr = TABLE_REGION[0].load(Ordering::Relaxed);
    if addr == 0 {
        return;
    }
    f(
        addr,
        addr + TABLE_REGION[1].load(Ordering::Relaxed),
        TABLE_REGION[2].load(Ordering::Relaxed) as u64,
        libc::PROT_READ | libc::PROT_WRITE,
    );
    // SAFETY: the fork holds the lock (prepare → `hold`), and the tables exist.
    let t = unsafe { Tables::assume_locked() };
    let sw = swapped();
    for e in t.live.entries() {
        // The entry less the swapped pieces inside it (private in the child already, with
        // what glibc wrote there for the child).
        let mut at = e.start;
        for p in sw.pieces[..sw.count]
            .iter()
            .filter(|p| p.start < e.end && e.start < p.end)
        {
            if at < p.start {
                f(at, p.start, e.offset_at(at), e.prot);
            }
            at = at.max(p.end);
        }
        if at < e.end {
            f(at, e.end, e.offset_at(at), e.prot);
        }
    }
    sw.count = 0;
    std::mem::forget(t); // the fork's handlers release the lock
}

/// Turns interposition off (a forked child whose memory became private).
pub(crate) fn deactivate() {
    ACTIVE.store(false, Ordering::Release);
}

// ---- The interposed calls -------------------------------------------------------------------

fn set_errno(e: i32) {
    // SAFETY: writing the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// A raw system call result as the C convention: `-1` and errno on failure.
fn c_result(r: isize) -> isize {
    if (-4095..0).contains(&r) {
        set_errno(-r as i32);
        -1
    } else {
        r
    }
}

fn page_up(len: usize) -> Option<usize> {
    len.checked_next_multiple_of(raw::page_size())
}

/// `mmap(2)`: private anonymous memory comes from the space.
#[no_mangle]
pub extern "C" fn mmap(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
) -> *mut libc::c_void {
    let r = mmap_covered(addr, len, prot, flags, fd, offset);
    if r != libc::MAP_FAILED && private_anonymous(flags) && under_mprotect() {
        cow::backend::mprotect::program_protection(r as usize, len, Some(prot));
    }
    r
}

/// Whether `mmap` flags ask for private anonymous memory.
fn private_anonymous(flags: libc::c_int) -> bool {
    flags & 0x0f == libc::MAP_PRIVATE && flags & libc::MAP_ANONYMOUS != 0
}

/// Whether the mprotect backend covers the process (it wants to know what the program makes
/// read-only itself).
fn under_mprotect() -> bool {
    crate::in_process_backend() == Some(c"mprotect")
}

/// `mmap`, covering what is to be covered under cow.ko.
fn mmap_covered(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
) -> *mut libc::c_void {
    let private = flags & 0x0f == libc::MAP_PRIVATE;
    let anonymous = flags & libc::MAP_ANONYMOUS != 0;
    let fixed = flags & libc::MAP_FIXED != 0;
    let stack_like = flags & (libc::MAP_GROWSDOWN | libc::MAP_STACK | libc::MAP_HUGETLB) != 0;
    let file_written = private && !anonymous && prot & libc::PROT_WRITE != 0;
    let to_space = private_anonymous(flags) && !stack_like;
    let interesting = to_space || fixed || file_written;
    let Some(mut t) = interesting.then(Tables::lock).flatten() else {
        return c_result(raw::sys_mmap(addr as usize, len, prot, flags, fd, offset)) as _;
    };
    let Some(len) = page_up(len).filter(|&l| l > 0) else {
        set_errno(libc::EINVAL);
        return libc::MAP_FAILED;
    };
    if to_space {
        if let Some(off) = t.alloc_offsets(len) {
            let keep = flags & !(0x0f | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE);
            let r = map_space(addr as usize, len, prot, keep, off);
            if r >= 0 {
                let start = r as usize;
                t.add(Entry::new(start, start + len, off, prot));
                return start as _;
            }
            // Refused as a shared mapping (a noexec /dev for PROT_EXEC, …): the program gets
            // its private memory, uncovered, rather than a failure.
        }
        warn(b"libcow_preload: an anonymous mapping could NOT be covered\n");
    }
    let r = raw::sys_mmap(addr as usize, len, prot, flags, fd, offset);
    if r >= 0 {
        let start = r as usize;
        if fixed {
            t.forget(start, start + len); // whatever was covered there is gone
        }
        if file_written && prot & libc::PROT_READ != 0 && !move_in(&mut t, start, start + len, prot)
        {
            warn(b"libcow_preload: a private file mapping could NOT be covered\n");
        }
    }
    c_result(r) as _
}

/// `mmap64(2)`, the same on 64-bit.
#[no_mangle]
pub extern "C" fn mmap64(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
) -> *mut libc::c_void {
    mmap(addr, len, prot, flags, fd, offset)
}

/// `munmap(2)`: covered pages are thrown away in the space (a snapshot keeps them).
#[no_mangle]
pub extern "C" fn munmap(addr: *mut libc::c_void, len: libc::size_t) -> libc::c_int {
    if under_mprotect() {
        cow::backend::mprotect::program_protection(addr as usize, len, None);
    }
    let Some(mut t) = Tables::lock() else {
        return c_result(raw::sys_munmap(addr as usize, len)) as _;
    };
    let r = raw::sys_munmap(addr as usize, len);
    if r == 0 {
        if let Some(len) = page_up(len) {
            t.forget(addr as usize, addr as usize + len);
        }
    }
    c_result(r) as _
}

/// `mprotect(2)`: the covered table follows the protection (a restore puts it back).
#[no_mangle]
pub extern "C" fn mprotect(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
) -> libc::c_int {
    let Some(mut t) = Tables::lock() else {
        let r = raw::sys_mprotect(addr as usize, len, prot);
        if r == 0 && under_mprotect() {
            cow::backend::mprotect::program_protection(addr as usize, len, Some(prot));
        }
        return c_result(r) as _;
    };
    let r = raw::sys_mprotect(addr as usize, len, prot);
    if r == 0 {
        if let Some(len) = page_up(len) {
            let prot = prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC);
            let (a, b) = (addr as usize, addr as usize + len);
            if !t.both(|table| table.set_prot(a, b, prot)) {
                warn(b"libcow_preload: too many covered mappings; the table lost one\n");
            }
        }
    }
    c_result(r) as _
}

/// `madvise(2)`: advice that throws private anonymous pages away discards covered ones.
#[no_mangle]
pub extern "C" fn madvise(
    addr: *mut libc::c_void,
    len: libc::size_t,
    advice: libc::c_int,
) -> libc::c_int {
    let discards = matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE | MADV_DONTNEED_LOCKED
    );
    let t = discards.then(Tables::lock).flatten();
    let (Some(t), Some(len)) = (t, page_up(len)) else {
        return c_result(raw::sys_madvise(addr as usize, len, advice)) as _;
    };
    let (start, end) = (addr as usize, addr as usize + len);
    if start % raw::page_size() != 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    let cow = crate::space();
    let mut at = start;
    let mut rc = 0;
    for piece in t.live.pieces(start, end) {
        if at < piece.start {
            rc = rc.min(c_result(raw::sys_madvise(at, piece.start - at, advice)));
        }
        debug(b"madvise discard", piece.start, piece.end);
        if let Some(cow) = cow {
            if cow
                .discard(piece.offset, (piece.end - piece.start) as u64)
                .is_err()
            {
                set_errno(libc::EINVAL);
                rc = -1;
            }
        }
        at = piece.end;
    }
    if at < end {
        rc = rc.min(c_result(raw::sys_madvise(at, end - at, advice)));
    }
    rc as _
}

/// `mremap(2)` (x86-64: the variadic `new_address` arrives in the fifth argument register,
/// whether or not the caller passed it; it is read only with `MREMAP_FIXED`).
#[no_mangle]
pub extern "C" fn mremap(
    old: *mut libc::c_void,
    old_len: libc::size_t,
    new_len: libc::size_t,
    flags: libc::c_int,
    new_address: *mut libc::c_void,
) -> *mut libc::c_void {
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let target = if fixed { new_address as usize } else { 0 };
    let Some(mut t) = Tables::lock() else {
        return c_result(raw::sys_mremap(
            old as usize,
            old_len,
            new_len,
            flags,
            target,
        )) as _;
    };
    let old = old as usize;
    let (Some(old_len), Some(new_len)) = (page_up(old_len), page_up(new_len)) else {
        set_errno(libc::EINVAL);
        return libc::MAP_FAILED;
    };
    let Some(first) = t.live.pieces(old, old + old_len.max(1)).next() else {
        // Not ours; a fixed target may have been.
        let r = raw::sys_mremap(old, old_len, new_len, flags, target);
        if r >= 0 && fixed {
            t.forget(r as usize, r as usize + new_len);
        }
        return c_result(r) as _;
    };
    // The program sees one mapping where it may be several of ours (a MAP_FIXED or an
    // mprotect inside it split it; private anonymous VMAs would have merged again): all of
    // it must be covered, without holes.
    let mut at = old;
    for p in t.live.pieces(old, old + old_len) {
        if p.start != at {
            break;
        }
        at = p.end;
    }
    if at != old + old_len || old_len == 0 || flags & libc::MREMAP_DONTUNMAP != 0 {
        set_errno(if at != old + old_len {
            libc::EFAULT
        } else {
            libc::EINVAL
        });
        return libc::MAP_FAILED;
    }
    // The protection of the last page: what grown memory gets, as the kernel does.
    let prot = t
        .live
        .pieces(old + old_len - 1, old + old_len)
        .next()
        .map_or(first.prot, |p| p.prot);
    let keep = old_len.min(new_len);
    if !fixed && new_len <= old_len {
        // Shrink in place.
        if new_len < old_len {
            if raw::sys_munmap(old + new_len, old_len - new_len) < 0 {
                set_errno(libc::EINVAL);
                return libc::MAP_FAILED;
            }
            t.forget(old + new_len, old + old_len);
        }
        return old as _;
    }
    if !fixed {
        // Grow in place: fresh offsets right after the mapping, if the addresses are free.
        if let Some(off) = t.alloc_offsets(new_len - old_len) {
            let tail = old + old_len;
            let r = map_space(
                tail,
                new_len - old_len,
                prot,
                libc::MAP_FIXED_NOREPLACE,
                off,
            );
            if r >= 0 {
                t.add(Entry::new(tail, old + new_len, off, prot));
                return old as _;
            }
        }
        if flags & libc::MREMAP_MAYMOVE == 0 {
            set_errno(libc::ENOMEM);
            return libc::MAP_FAILED;
        }
    }
    // Move: reserve the destination, move the kept pages there piece by piece (a /dev/cow
    // mapping keeps its offsets when it moves), map fresh offsets for the growth, drop the
    // rest.
    let dest = if fixed {
        target
    } else {
        let r = raw::sys_mmap(
            0,
            new_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if r < 0 {
            return c_result(r) as _;
        }
        r as usize
    };
    if fixed {
        t.forget(dest, dest + new_len);
    }
    let mut moving = [Entry::default(); 64];
    let mut n = 0;
    for p in t.live.pieces(old, old + keep) {
        if n == moving.len() {
            break;
        }
        moving[n] = p;
        n += 1;
    }
    for p in &moving[..n] {
        let len = p.end - p.start;
        let to = dest + (p.start - old);
        let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        if raw::sys_mremap(p.start, len, len, flags, to) < 0 {
            raw::write_stderr(b"libcow_preload: mremap: moving a covered piece failed\n");
            continue;
        }
        let ok = t.live.remove_range(p.start, p.end, |_| {})
            && t.covered.remove_range(p.start, p.end, |_| {});
        if ok {
            t.add(Entry::new(to, to + len, p.offset, p.prot));
        }
    }
    if old_len > keep {
        raw::sys_munmap(old + keep, old_len - keep);
        t.forget(old + keep, old + old_len);
    }
    if new_len > keep {
        let grown = t.alloc_offsets(new_len - keep).map(|off| {
            let r = map_space(dest + keep, new_len - keep, prot, libc::MAP_FIXED, off);
            (r, off)
        });
        match grown {
            Some((r, off)) if r >= 0 => t.add(Entry::new(dest + keep, dest + new_len, off, prot)),
            _ => warn(b"libcow_preload: mremap growth could NOT be covered\n"),
        }
    }
    dest as _
}

/// `dlopen(3)`: the objects it loaded are moved in.
#[no_mangle]
pub extern "C" fn dlopen(file: *const libc::c_char, mode: libc::c_int) -> *mut libc::c_void {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let f = raw::next(&NEXT, c"dlopen");
    if f == 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: libc's dlopen, with the caller's arguments.
    let handle = unsafe {
        let real: extern "C" fn(*const libc::c_char, libc::c_int) -> *mut libc::c_void =
            std::mem::transmute(f);
        real(file, mode)
    };
    if !handle.is_null() && ACTIVE.load(Ordering::Acquire) {
        adopt_loaded_objects();
    }
    handle
}
