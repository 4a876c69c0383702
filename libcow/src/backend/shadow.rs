//! The shadow engine shared by the mainline backends.
//!
//! The kernel tells these backends *which* pages were written, not what they held, so the
//! engine keeps a **shadow**: a copy of every covered page as of the last snapshot (only pages
//! that were ever non-zero; a missing entry means a zero page). Each snapshot `S_j` owns an
//! **undo log**: the contents at `S_j` of the pages written (or unmapped) before `S_j+1`.
//!
//! - **snapshot**: stop the other threads; ask the tracker for the pages written since the last
//!   snapshot (it re-arms them); for each, move its shadow page into the newest undo log and
//!   copy the page into a fresh shadow page (one copy per written page). Memory that appeared
//!   since (new mappings, a grown heap) is shadowed (present pages only) and armed; memory that
//!   vanished moves its shadow pages into the undo log. The covered ranges, the program break
//!   and the thread ids are recorded with the snapshot.
//! - **restore `S_k`**: stop the other threads (the thread set must be the snapshot's); put the
//!   program break back and re-create mappings of `S_k` that are gone; every page written since
//!   the last snapshot or named in an undo log of `S_k` or later gets its image at `S_k` (the
//!   oldest undo entry at or after `S_k`, else the shadow). Undo pages move into the shadow
//!   rather than being copied twice. Mappings created after `S_k` are left alone (their owner's
//!   bookkeeping, restored, no longer knows them) and stop being covered until the next
//!   snapshot.
//! - **read `S_k`**: the oldest undo entry at or after `S_k`, else the shadow.
//!
//! All state lives in the book, which no restore touches. Memory cost: one shadow page per
//! non-zero covered page, plus one undo page per page written per retained epoch.

use super::pagetable::PageTable;
use super::{Backend, Stats};
use crate::book::{self, BookVec};
use crate::error::{Error, Result};
use crate::{maps, world};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const PAGE: usize = 4096;
/// Most snapshots held; past it the oldest is merged away (`COW_MAX_SNAPSHOTS` overrides).
const DEFAULT_MAX_SNAPSHOTS: usize = 64;

/// A covered address range and its original protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First address (page-aligned).
    pub start: usize,
    /// End (exclusive, page-aligned).
    pub end: usize,
    /// `PROT_*` of the mapping as the program set it.
    pub prot: i32,
}

/// How a backend learns which covered pages were written.
pub trait Tracker: Send + 'static {
    /// The backend's name.
    const NAME: &'static str;
    /// Starts tracking writes to `r` (new covered memory). Other threads are stopped.
    fn arm(&mut self, r: Range) -> Result<()>;
    /// Stops tracking `r`, which is still mapped (it stopped being covered).
    fn disarm(&mut self, r: Range);
    /// Tracks exactly `ranges` from now on (sorted, disjoint), after `arm`/`disarm` calls.
    fn set_ranges(&mut self, ranges: &[Range]);
    /// Appends the pages written since the last call and re-arms them.
    fn collect(&mut self, out: &mut BookVec<usize>) -> Result<()>;
    /// Appends the pages written since the last `collect`, without re-arming.
    fn peek(&mut self, out: &mut BookVec<usize>) -> Result<()>;
    /// Lets libcow itself write `page` (during a restore).
    fn open_for_write(&mut self, page: usize, prot: i32);
    /// A restore wrote `pages` (sorted; no other thread wrote since the last `collect`): a
    /// tracker that would miss later writes to them re-arms them (one that cannot re-arm pages
    /// one by one collects); one that reports them as written at its next `collect` may leave
    /// them so — they then compare equal to their shadow pages.
    fn rearm_restored(&mut self, _pages: &[usize]) -> Result<()> {
        let mut ignored = BookVec::new();
        self.collect(&mut ignored)
    }
    /// Leaves `pages` writable after a snapshot (speculation: their next writes do not fault;
    /// the next `collect` reports them as possibly written). Trackers whose writes cost no
    /// fault worth saving ignore it.
    fn keep_writable(&mut self, _pages: &[usize]) {}
    /// Whether [`Tracker::keep_writable`] saves anything (speculation is offered).
    const SPECULATES: bool = false;
    /// Write faults seen so far.
    fn faults(&self) -> u64 {
        0
    }
    /// What one tracked first write costs the writing thread, in ns (for the adaptive
    /// speculation policy), measured on scratch memory. Other threads are stopped.
    fn measure_fault_ns(&mut self) -> Option<f64> {
        None
    }
    /// Whether `prot` from /proc/self/maps may hide a covered, write-protected range
    /// (mprotect rewrites permissions; uffd does not).
    const REWRITES_PROT: bool;
    /// Whether pages the program zaps (`MADV_DONTNEED`: they read as zero afterwards) are
    /// reported as written. uffd reports them (an unpopulated page in a uffd-wp range counts as
    /// written); mprotect does not, so the engine looks for them itself.
    const SEES_ZAPS: bool;
}

struct Snap {
    id: u64,
    brk: usize,
    tids: BookVec<i32>,
    ranges: BookVec<Range>,
    /// (page, shadow slot or 0 for a zero page), sorted by page once sealed.
    undo: BookVec<(usize, usize)>,
    /// Covered ranges that were unmapped in the epoch after this snapshot: their zero pages
    /// have no undo entry, so a restore zero-fills what of them is mapped again.
    vanished: BookVec<Range>,
}

struct State<T: Tracker> {
    tracker: T,
    armed: BookVec<Range>,
    shadow: PageTable,
    snaps: BookVec<usize>, // pointers to book-allocated Snap, oldest first
    next_id: u64,
    max_snapshots: usize,
    slots_held: u64,
    stats: Stats,
    /// Speculation: the policy, and the pages left writable at the last snapshot (sorted).
    speculator: Option<crate::speculate::Speculator>,
    left_open: BookVec<usize>,
    /// Whether `left_open` came from a probe of the adaptive policy.
    left_open_probe: bool,
    /// A hint given directly (tests), used when there is no policy.
    manual_hint: BookVec<usize>,
    faults_at_last: u64,
    /// Time the last snapshot spent on speculation itself.
    spec_ns: u64,
}

/// A mainline backend: the shadow engine driven by tracker `T`.
pub struct Shadow<T: Tracker> {
    state: &'static Mutex<State<T>>,
    faults_base: AtomicU64,
}

pub(super) fn err(op: &'static str, errno: i32) -> Error {
    Error::Os { op, errno }
}

pub(super) fn io_err(op: &'static str, e: std::io::Error) -> Error {
    err(op, e.raw_os_error().unwrap_or(libc::EIO))
}

pub(super) use crate::sys::monotonic_ns as now_ns;

pub(super) fn current_brk() -> usize {
    // SAFETY: brk(0) only reports the current break.
    unsafe { libc::syscall(libc::SYS_brk, 0) as usize }
}

fn new_slot_copy(page: usize) -> usize {
    let slot = book::book().alloc(PAGE);
    // SAFETY: `page` is a readable covered page (the world is stopped; only we run); `slot` is a
    // fresh page-sized block of the book.
    unsafe { std::ptr::copy_nonoverlapping(page as *const u8, slot, PAGE) };
    slot as usize
}

/// A copy of `page` in a new slot, unless it equals `shadow` (then `None`): one pass that
/// copies and compares together. Most written pages differ, and a separate `memcmp` first
/// read both pages up to the difference before the copy read the page again (in redis on uffd
/// the comparisons cost 1.5× the copies).
fn new_slot_if_changed(page: usize, shadow: usize) -> Option<usize> {
    const WORDS: usize = PAGE / 8;
    let slot = book::book().alloc(PAGE);
    // SAFETY: `page` is a readable covered page and `shadow` a book page (the world is stopped;
    // only we run); `slot` is a fresh page-sized block of the book; all three are page-aligned,
    // so u64 reads and writes are aligned.
    let differ = unsafe {
        let (src, old, dst) = (page as *const u64, shadow as *const u64, slot as *mut u64);
        let mut differ = 0u64;
        for i in 0..WORDS {
            let v = src.add(i).read();
            dst.add(i).write(v);
            differ |= v ^ old.add(i).read();
        }
        differ
    };
    if differ == 0 {
        book::book().free(slot, PAGE);
        None
    } else {
        Some(slot as usize)
    }
}

fn free_slot(slot: usize) {
    if slot != 0 {
        book::book().free(slot as *mut u8, PAGE);
    }
}

/// The covered ranges now: private, non-special mappings that are writable (or tracked and
/// write-protected by us), minus the book, every thread's stack, and every thread's control
/// block (glibc's `struct pthread` at the thread pointer: the kernel writes its rseq area and
/// its exit futex, and must never find them write-protected or rewound).
pub(super) fn covered_now(
    armed: &[Range],
    stopped: &world::Stopped,
    rewrites_prot: bool,
) -> Result<BookVec<Range>> {
    covered_for(
        armed,
        stopped.stack_pointers(),
        stopped.thread_pointers(),
        rewrites_prot,
    )
}

pub(super) fn covered_for(
    armed: &[Range],
    stack_pointers: &[usize],
    thread_pointers: &[usize],
    rewrites_prot: bool,
) -> Result<BookVec<Range>> {
    // Without rewritten permissions, only writable mappings can be covered: the kernel lists
    // just those, faster.
    let maps = if rewrites_prot {
        maps::read()
    } else {
        maps::read_writable()
    }
    .map_err(|e| io_err("read /proc/self/maps", e))?;
    // Stacks: the kernel may merge a thread's stack with an adjacent anonymous mapping of the
    // program, so the stack is not the whole mapping that holds its stack pointer. glibc puts
    // a thread's control block (`struct pthread`, at the thread pointer) at the very top of its
    // stack block, so the stack block is the mapping's part from its start (above the guard
    // page) to the page boundary just above the thread pointer. The main thread's control
    // block lives elsewhere: its two pages are excluded (the kernel writes its rseq area).
    let mut holes: BookVec<Range> = BookVec::new();
    for (i, &sp) in stack_pointers.iter().enumerate() {
        let tp = thread_pointers.get(i).copied().unwrap_or(0);
        let Some(m) = maps
            .as_slice()
            .iter()
            .find(|m| (m.start..m.end).contains(&sp))
        else {
            continue;
        };
        if m.special {
            let start = tp & !(PAGE - 1);
            holes.push(Range {
                start,
                end: start + 2 * PAGE,
                prot: 0,
            });
        } else if (m.start..m.end).contains(&tp) {
            holes.push(Range {
                start: m.start,
                end: (tp + 1).next_multiple_of(PAGE),
                prot: 0,
            });
        } else {
            holes.push(Range {
                start: m.start,
                end: m.end,
                prot: 0,
            });
        }
    }
    if rewrites_prot {
        thread_stack_blocks(&maps, &mut holes);
    }
    holes.as_mut_slice().sort_unstable_by_key(|r| r.start);
    let covered = covered_maps(&maps, armed, rewrites_prot);
    let mut out = BookVec::new();
    subtract(covered.as_slice(), holes.as_slice(), &mut out);
    Ok(out)
}

/// glibc's thread stack blocks that no running thread's stack pointer names: stacks in
/// glibc's cache, and a stack `pthread_create` is about to start a thread on. The new thread
/// runs with every signal blocked until glibc's `start_thread` unblocks them, so its first
/// pushes onto a page write-protected by the mprotect backend would be a blocked SIGSEGV —
/// fatal. glibc maps a stack block with its guard at the low end (`PROT_NONE`), then opens the
/// rest: a private anonymous writable mapping directly above a private anonymous inaccessible
/// one of at most `MAX_GUARD`. A malloc arena's heap also sits above the inaccessible tail of
/// the previous one, but always at a `HEAP_MAX` boundary: excluded. Only where `MAP_STACK`
/// keeps a stack block from merging with its neighbours (Linux ≥ 6.7 with transparent huge
/// pages: it sets `VM_NOHUGEPAGE`); elsewhere the mapping could be a stack merged with the
/// program's memory, which must stay covered.
fn thread_stack_blocks(maps: &BookVec<maps::Mapping>, holes: &mut BookVec<Range>) {
    const MAX_GUARD: usize = 1 << 20;
    const HEAP_MAX: usize = 64 << 20;
    if !stacks_kept_apart() {
        return;
    }
    let anonymous = |m: &maps::Mapping| !m.file && !m.shared && !m.special && !m.heap;
    for pair in maps.as_slice().windows(2) {
        let (guard, block) = (&pair[0], &pair[1]);
        if anonymous(guard)
            && anonymous(block)
            && guard.prot == libc::PROT_NONE
            && guard.end == block.start
            && guard.end - guard.start <= MAX_GUARD
            && block.is_writable()
            && block.start % HEAP_MAX != 0
        {
            holes.push(Range {
                start: block.start,
                end: block.end,
                prot: 0,
            });
        }
    }
}

/// Whether this kernel keeps `MAP_STACK` mappings apart from their neighbours: Linux ≥ 6.7
/// with transparent huge pages (then `MAP_STACK` sets `VM_NOHUGEPAGE`). Asked once.
fn stacks_kept_apart() -> bool {
    // 0: not asked yet, 1: yes, 2: no.
    static KNOWN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    match KNOWN.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: access with a NUL-terminated path.
            let thp = crate::probe::kernel_version() >= (6, 7)
                && unsafe {
                    libc::access(c"/sys/kernel/mm/transparent_hugepage".as_ptr(), libc::F_OK)
                } == 0;
            KNOWN.store(if thp { 1 } else { 2 }, Ordering::Relaxed);
            thp
        }
    }
}

fn covered_maps(
    maps: &BookVec<maps::Mapping>,
    armed: &[Range],
    rewrites_prot: bool,
) -> BookVec<Range> {
    let (book_start, book_end) = book::book().range();
    let mut out: BookVec<Range> = BookVec::new();
    let push = |r: Range, out: &mut BookVec<Range>| {
        if r.start >= r.end {
            return;
        }
        match out.as_mut_slice().last_mut() {
            Some(last) if last.end == r.start && last.prot == r.prot => last.end = r.end,
            _ => out.push(r),
        }
    };
    for m in maps.as_slice() {
        if m.shared || m.special {
            continue;
        }
        // The kernel merges an adjacent anonymous mapping with the same flags into the book's
        // VMA (jemalloc maps with MAP_NORESERVE, as the book does): cover what lies outside it.
        let pieces = [
            (m.start, m.end.min(book_start)),
            (m.start.max(book_end), m.end),
        ];
        for (start, end) in pieces {
            if start >= end {
                continue;
            }
            if m.prot & libc::PROT_WRITE != 0 {
                push(
                    Range {
                        start,
                        end,
                        prot: m.prot,
                    },
                    &mut out,
                );
            } else if rewrites_prot {
                for a in armed {
                    let (s, e) = (a.start.max(start), a.end.min(end));
                    if s < e {
                        push(
                            Range {
                                start: s,
                                end: e,
                                prot: a.prot,
                            },
                            &mut out,
                        );
                    }
                }
            }
        }
    }
    out
}

/// Maps `len` bytes of fresh private anonymous memory (covered from the next snapshot on).
pub(super) fn map_anonymous(len: usize) -> Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::last_os("mmap"));
    }
    Ok(p.cast())
}

/// Puts the process's layout back as it was at a snapshot, before its contents: the program
/// break, then every covered range of the snapshot that is no longer mapped (re-created as
/// anonymous memory, zero-filled). Returns what is mapped now (before the re-creation; only
/// if `want_mapped`, else empty) and what was re-created.
pub(super) fn restore_layout(
    ranges: &[Range],
    brk: usize,
    want_mapped: bool,
) -> Result<(BookVec<Range>, BookVec<Range>)> {
    if current_brk() != brk {
        // SAFETY: moving the break back to where it was at the snapshot.
        unsafe { libc::syscall(libc::SYS_brk, brk) };
    }
    // Usually nothing was unmapped: `msync(MS_ASYNC)` fails with ENOMEM on a range with a hole
    // and otherwise does nothing (a walk of the mappings, no text: reading /proc/self/maps was
    // a third of a recovery in redis).
    let all_mapped = ranges.iter().all(|r| {
        // SAFETY: MS_ASYNC only checks that the page-aligned range is mapped.
        unsafe {
            libc::msync(
                r.start as *mut libc::c_void,
                r.end - r.start,
                libc::MS_ASYNC,
            ) == 0
        }
    });
    if all_mapped && !want_mapped {
        return Ok((BookVec::new(), BookVec::new()));
    }
    let maps = maps::read().map_err(|e| io_err("read /proc/self/maps", e))?;
    let mut mapped = BookVec::new();
    for m in maps.as_slice() {
        mapped.push(Range {
            start: m.start,
            end: m.end,
            prot: m.prot,
        });
    }
    let mut missing = BookVec::new();
    subtract(ranges, mapped.as_slice(), &mut missing);
    for r in missing.as_slice() {
        // SAFETY: re-creating anonymous memory where the program had it at the snapshot;
        // nothing is mapped there now (it is in no mapping of /proc/self/maps).
        let p = unsafe {
            libc::mmap(
                r.start as *mut libc::c_void,
                r.end - r.start,
                r.prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(
                "restore: re-create a mapping of the snapshot",
            ));
        }
    }
    Ok((mapped, missing))
}

/// `n` as a divisor (at least 1).
fn dirty_pages(n: usize) -> u64 {
    n.max(1) as u64
}

/// `a − b` for sorted, disjoint range lists.
pub(super) fn subtract(a: &[Range], b: &[Range], out: &mut BookVec<Range>) {
    for r in a {
        let mut start = r.start;
        for x in b.iter().filter(|x| x.end > r.start && x.start < r.end) {
            if x.start > start {
                out.push(Range {
                    start,
                    end: x.start,
                    prot: r.prot,
                });
            }
            start = start.max(x.end);
        }
        if start < r.end {
            out.push(Range {
                start,
                end: r.end,
                prot: r.prot,
            });
        }
    }
}

pub(super) fn contains(ranges: &[Range], page: usize) -> Option<Range> {
    let i = ranges.partition_point(|r| r.end <= page);
    ranges.get(i).copied().filter(|r| r.start <= page)
}

/// Pages of `r` that are present or swapped (so possibly non-zero), from /proc/self/pagemap.
fn present_pages(r: Range, out: &mut BookVec<usize>) -> Result<()> {
    pagemap_filter(r, |e| e & (3 << 62) != 0, out)
}

/// Pages of `r` that are absent (neither present nor swapped) or present but not mapped
/// exclusively by us (the shared zero page, or pages shared with a forked child).
fn maybe_zapped_pages(r: Range, out: &mut BookVec<usize>) -> Result<()> {
    pagemap_filter(
        r,
        |e| e & (3 << 62) == 0 || (e & (1 << 63) != 0 && e & (1 << 56) == 0),
        out,
    )
}

fn pagemap_filter(r: Range, keep: impl Fn(u64) -> bool, out: &mut BookVec<usize>) -> Result<()> {
    let pagemap = crate::sys::RawFile::open(c"/proc/self/pagemap", libc::O_RDONLY)
        .map_err(|_| Error::last_os("open /proc/self/pagemap"))?;
    let mut entries = [0u64; 512];
    let mut page = r.start;
    while page < r.end {
        let n = ((r.end - page) / PAGE).min(entries.len());
        // SAFETY: reading n entries into our stack buffer at the page's pagemap offset.
        let got = unsafe {
            libc::pread(
                pagemap.fd(),
                entries.as_mut_ptr().cast(),
                n * 8,
                (page / PAGE * 8) as libc::off_t,
            )
        };
        if got <= 0 {
            break;
        }
        for (i, e) in entries[..got as usize / 8].iter().enumerate() {
            if keep(*e) {
                out.push(page + i * PAGE);
            }
        }
        page += got as usize / 8 * PAGE;
    }
    Ok(())
}

/// Merges two sorted undo logs of consecutive epochs into one for the older snapshot: where
/// both have a page, the older entry (the earlier image) wins and the newer page is freed.
/// Returns the merged log and how many book pages were freed.
fn merge_undo(
    older: &[(usize, usize)],
    newer: &[(usize, usize)],
) -> (BookVec<(usize, usize)>, u64) {
    let mut merged = BookVec::new();
    merged.reserve(older.len() + newer.len());
    let (mut a, mut b, mut freed) = (0, 0, 0);
    while a < older.len() || b < newer.len() {
        if b == newer.len() || (a < older.len() && older[a].0 < newer[b].0) {
            merged.push(older[a]);
            a += 1;
        } else if a == older.len() || newer[b].0 < older[a].0 {
            merged.push(newer[b]);
            b += 1;
        } else {
            merged.push(older[a]);
            if newer[b].1 != 0 {
                freed += 1;
            }
            free_slot(newer[b].1);
            a += 1;
            b += 1;
        }
    }
    (merged, freed)
}

impl<T: Tracker> State<T> {
    /// The tracker's written pages, plus (for trackers blind to them) shadowed pages that are
    /// no longer present: the program zapped them, so they read as zero now. Sorted, unique.
    fn written(&mut self, rearm: bool, out: &mut BookVec<usize>) -> Result<()> {
        if rearm {
            self.tracker.collect(out)?;
        } else {
            self.tracker.peek(out)?;
        }
        if !T::SEES_ZAPS {
            // A zapped page is absent, or maps the shared zero page once read (present but not
            // exclusive): either way it may no longer hold its shadow's contents.
            let mut absent = BookVec::new();
            for i in 0..self.armed.len() {
                let r = self.armed.as_slice()[i];
                maybe_zapped_pages(r, &mut absent)?;
            }
            for &p in absent.as_slice() {
                if self.shadow.get(p).is_some() {
                    out.push(p);
                }
            }
        }
        out.sort_dedup();
        Ok(())
    }

    /// Speculation at a snapshot: learn from the epoch that ended (`written`, of which
    /// `useful` were pages left writable), then leave the pages the policy predicts writable.
    fn speculate(&mut self, written: &[usize], useful: u64, covered: &[Range], compare_ns: u64) {
        if !T::SPECULATES {
            return;
        }
        let start = now_ns();
        let faults = self.tracker.faults();
        let precopied = self.left_open.len() as u64;
        let mut hint: BookVec<usize> = BookVec::new();
        if let Some(s) = self.speculator.as_mut() {
            let mut w: BookVec<u64> = BookVec::new();
            w.reserve(written.len());
            written.iter().for_each(|&p| w.push(p as u64));
            // Charged to speculation: last time's hinting (unprotecting), and this snapshot's
            // comparisons of the pages it left writable that were not written (written ones
            // are compared and copied with or without speculation).
            let per_page = compare_ns / dirty_pages(written.len());
            let extra = self.spec_ns + per_page * precopied.saturating_sub(useful);
            // Nearly all of it grows with the pages (one mprotect each, comparisons).
            let cost = crate::speculate::PrecopyCost {
                extra_ns: extra,
                per_pages_ns: extra,
                probe: self.left_open_probe,
            };
            s.observe(
                w.as_slice(),
                precopied,
                useful,
                faults - self.faults_at_last,
                cost,
            );
            self.left_open_probe = s.hint_is_probe();
            let mut predicted = BookVec::new();
            s.hint_into(&mut predicted);
            for &p in predicted.as_slice() {
                hint.push(p as usize);
            }
        } else {
            for &p in self.manual_hint.as_slice() {
                hint.push(p);
            }
        }
        self.faults_at_last = faults;
        self.stats.precopy_useful += useful;
        // Only pages that exist, are covered and hold a shadow (a pre-image) may stay open.
        let mut open = BookVec::new();
        for &p in hint.as_slice() {
            if contains(covered, p).is_some() && self.shadow.get(p).is_some() {
                open.push(p);
            }
        }
        open.sort_dedup();
        self.tracker.keep_writable(open.as_slice());
        self.stats.precopied += open.len() as u64;
        self.left_open = open;
        self.spec_ns = now_ns() - start;
    }

    fn snap(&self, i: usize) -> &Snap {
        // SAFETY: every entry of `snaps` points at a live Snap in the book.
        unsafe { &*(self.snaps.as_slice()[i] as *const Snap) }
    }

    fn snap_mut(&mut self, i: usize) -> &mut Snap {
        // SAFETY: as above; exclusive through &mut self.
        unsafe { &mut *(self.snaps.as_slice()[i] as *mut Snap) }
    }

    fn position(&self, id: u64) -> Result<usize> {
        (0..self.snaps.len())
            .find(|&i| self.snap(i).id == id)
            .ok_or(err("no such snapshot", libc::ENOENT))
    }

    /// Frees snapshot `i`'s undo pages and the Snap itself, removing it from the list.
    fn free_snap(&mut self, i: usize) {
        let p = self.snaps.as_slice()[i] as *mut Snap;
        // SAFETY: `p` is a live Snap allocated by `snapshot`; it is read out and freed once.
        let snap = unsafe { p.read() };
        for &(_, slot) in snap.undo.as_slice() {
            if slot != 0 {
                self.slots_held -= 1;
            }
            free_slot(slot);
        }
        book::book().free(p.cast(), std::mem::size_of::<Snap>());
        let v = self.snaps.as_mut_slice();
        v.copy_within(i + 1.., i);
        let n = v.len() - 1;
        self.snaps.truncate(n);
    }

    fn snapshot(&mut self) -> Result<u64> {
        let start = now_ns();
        let stopped = world::stop_others().map_err(|e| io_err("stop the other threads", e))?;
        let covered = covered_now(self.armed.as_slice(), &stopped, T::REWRITES_PROT)?;
        let mut dirty = BookVec::new();
        self.written(true, &mut dirty)?;
        let newest = self.snaps.len().checked_sub(1);
        let mut undo: BookVec<(usize, usize)> = BookVec::new();

        // Memory that vanished: its shadow pages hold its contents at the newest snapshot.
        let mut gone = BookVec::new();
        subtract(self.armed.as_slice(), covered.as_slice(), &mut gone);
        for r in gone.as_slice() {
            for page in (r.start..r.end).step_by(PAGE) {
                if let Some(slot) = self.shadow.remove(page) {
                    undo.push((page, slot));
                }
            }
        }
        // Pages written since the newest snapshot: shadow page → undo, copy → shadow. A page
        // the tracker only suspects (left writable by speculation, say) that still equals its
        // shadow was not written: nothing to save.
        let mut written: BookVec<usize> = BookVec::new();
        let mut useful = 0u64;
        let compare_start = now_ns();
        for &page in dirty.as_slice() {
            if contains(gone.as_slice(), page).is_some()
                || contains(covered.as_slice(), page).is_none()
            {
                continue;
            }
            let copy = match self.shadow.get(page) {
                Some(slot) => match new_slot_if_changed(page, slot) {
                    Some(copy) => copy,
                    None => continue,
                },
                None => new_slot_copy(page),
            };
            written.push(page);
            if self.left_open.as_slice().binary_search(&page).is_ok() {
                useful += 1;
            }
            // The new shadow page is held, and the old one stays held by the undo log.
            let old = self.shadow.insert(page, copy).unwrap_or(0);
            self.slots_held += 1;
            undo.push((page, old));
            self.stats.pages_saved += 1;
        }
        let compare_ns = now_ns() - compare_start;
        // New memory: shadow its present pages, then arm it.
        let mut fresh = BookVec::new();
        subtract(covered.as_slice(), self.armed.as_slice(), &mut fresh);
        let mut present = BookVec::new();
        for &r in fresh.as_slice() {
            present.clear();
            present_pages(r, &mut present)?;
            for &page in present.as_slice() {
                if let Some(old) = self.shadow.insert(page, new_slot_copy(page)) {
                    free_slot(old);
                } else {
                    self.slots_held += 1;
                }
                self.stats.pages_saved += 1;
            }
            self.tracker.arm(r)?;
        }
        self.tracker.set_ranges(covered.as_slice());
        self.speculate(written.as_slice(), useful, covered.as_slice(), compare_ns);

        // Seal the newest snapshot's undo log (or drop it: nothing older needs it).
        undo.as_mut_slice().sort_unstable_by_key(|e| e.0);
        match newest {
            Some(i) => {
                // After a drop of the newest snapshot, the one before it already holds a log:
                // its older images win.
                let (merged, freed) = merge_undo(self.snap(i).undo.as_slice(), undo.as_slice());
                self.slots_held -= freed;
                let snap = self.snap_mut(i);
                snap.undo = merged;
                for &r in gone.as_slice() {
                    snap.vanished.push(r);
                }
            }
            None => {
                for &(_, slot) in undo.as_slice() {
                    if slot != 0 {
                        self.slots_held -= 1;
                    }
                    free_slot(slot);
                }
            }
        }
        if self.snaps.len() >= self.max_snapshots {
            self.merge_oldest_away();
        }
        let mut tids = BookVec::new();
        for &t in stopped.tids() {
            tids.push(t);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut ranges = BookVec::new();
        for &r in covered.as_slice() {
            ranges.push(r);
        }
        let snap = book::leak(Snap {
            id,
            brk: current_brk(),
            tids,
            ranges,
            undo: BookVec::new(),
            vanished: BookVec::new(),
        });
        self.snaps.push(snap as *mut Snap as usize);
        self.armed = covered;
        drop(stopped);
        self.stats.snapshot_ns += now_ns() - start;
        Ok(id)
    }

    fn merge_oldest_away(&mut self) {
        self.free_snap(0);
    }

    fn restore(&mut self, id: u64) -> Result<()> {
        let start = now_ns();
        let k = self.position(id)?;
        let mut stopped = world::stop_others().map_err(|e| io_err("stop the other threads", e))?;
        if stopped.tids() != self.snap(k).tids.as_slice() {
            return Err(err(
                "restore: threads were created or ended since the snapshot",
                libc::EBUSY,
            ));
        }
        // The program break and the mappings of S_k come back first. What is mapped now is
        // only asked for when memory vanished after S_k.
        let vanished = (k..self.snaps.len()).any(|i| !self.snap(i).vanished.is_empty());
        let (mapped, missing) = {
            let snap = self.snap(k);
            restore_layout(snap.ranges.as_slice(), snap.brk, vanished)?
        };

        // The plan: page → its image at S_k (undo entries, oldest at or after S_k win).
        let mut plan = PageTable::default();
        for i in (k..self.snaps.len()).rev() {
            let undo = std::mem::take(&mut self.snap_mut(i).undo);
            for &(page, slot) in undo.as_slice() {
                // Value stored: slot + 1, so that a zero page (slot 0) is not "absent".
                if let Some(newer) = plan.insert(page, slot + 1) {
                    if newer > 1 {
                        self.slots_held -= 1;
                    }
                    free_slot(newer - 1);
                }
            }
        }
        let mut dirty = BookVec::new();
        self.written(true, &mut dirty)?;
        let ranges_k: BookVec<Range> = {
            let mut v = BookVec::new();
            for &r in self.snap(k).ranges.as_slice() {
                v.push(r);
            }
            v
        };
        for &page in dirty.as_slice() {
            if plan.get(page).is_none() && contains(ranges_k.as_slice(), page).is_some() {
                plan.insert(page, usize::MAX); // image = the shadow, unchanged
            }
        }
        // Memory that vanished after S_k and is mapped again holds whatever its new owner put
        // there; pages with no undo entry were zero at S_k.
        for i in k..self.snaps.len() {
            for j in 0..self.snap(i).vanished.len() {
                let r = self.snap(i).vanished.as_slice()[j];
                for page in (r.start..r.end).step_by(PAGE) {
                    if plan.get(page).is_none() && contains(mapped.as_slice(), page).is_some() {
                        plan.insert(page, 1); // slot 0 + 1: a zero page
                    }
                }
            }
            self.snap_mut(i).vanished.clear();
        }
        // Mappings re-created above hold zeros: every shadowed page of them needs its image.
        for r in missing.as_slice() {
            for page in (r.start..r.end).step_by(PAGE) {
                if plan.get(page).is_none() && self.shadow.get(page).is_some() {
                    plan.insert(page, usize::MAX);
                }
            }
        }
        let mut restored = BookVec::new();
        for (page, v) in plan.iter() {
            let Some(r) = contains(ranges_k.as_slice(), page) else {
                if v != usize::MAX && v > 1 {
                    self.slots_held -= 1;
                }
                if v != usize::MAX {
                    free_slot(v - 1);
                }
                continue;
            };
            self.tracker.open_for_write(page, r.prot);
            restored.push(page);
            let image = if v == usize::MAX {
                self.shadow.get(page).unwrap_or(0)
            } else {
                let slot = v - 1;
                // The undo page becomes the shadow page: it is the image at S_k.
                let old = if slot == 0 {
                    self.shadow.remove(page)
                } else {
                    self.shadow.insert(page, slot)
                };
                if let Some(old) = old {
                    if old != 0 {
                        self.slots_held -= 1;
                    }
                    free_slot(old);
                }
                slot
            };
            // SAFETY: `page` is in a mapping of S_k that exists again and is writable to us
            // now; `image` is a page of the book or 0 for zeros. Other threads are stopped.
            unsafe {
                if image == 0 {
                    std::ptr::write_bytes(page as *mut u8, 0, PAGE);
                } else {
                    std::ptr::copy_nonoverlapping(image as *const u8, page as *mut u8, PAGE);
                }
            }
        }
        // Forget what our own writes looked like to the tracker, and stop covering mappings
        // that did not exist at S_k.
        restored.sort_dedup();
        stopped.rewound(restored.as_slice());
        self.tracker.rearm_restored(restored.as_slice())?;
        let mut newer = BookVec::new();
        subtract(self.armed.as_slice(), ranges_k.as_slice(), &mut newer);
        for &r in newer.as_slice() {
            for page in (r.start..r.end).step_by(PAGE) {
                if let Some(slot) = self.shadow.remove(page) {
                    if slot != 0 {
                        self.slots_held -= 1;
                    }
                    free_slot(slot);
                }
            }
            self.tracker.disarm(r);
        }
        let mut armed = BookVec::new();
        for &r in ranges_k.as_slice() {
            armed.push(r);
        }
        self.tracker.set_ranges(armed.as_slice());
        self.armed = armed;
        self.left_open.clear();
        while self.snaps.len() > k + 1 {
            let last = self.snaps.len() - 1;
            self.free_snap(last);
        }
        drop(stopped);
        self.stats.restore_ns += now_ns() - start;
        Ok(())
    }

    fn drop_snapshot(&mut self, id: u64) -> Result<()> {
        let j = self.position(id)?;
        if j == 0 {
            self.free_snap(0);
            return Ok(());
        }
        // Merge S_j's undo log into S_j-1's: entries S_j-1 lacks move down; S_j's vanished
        // ranges too.
        let newer = std::mem::take(&mut self.snap_mut(j).undo);
        let (merged, freed) = merge_undo(self.snap(j - 1).undo.as_slice(), newer.as_slice());
        self.slots_held -= freed;
        self.snap_mut(j - 1).undo = merged;
        let vanished = std::mem::take(&mut self.snap_mut(j).vanished);
        for &r in vanished.as_slice() {
            self.snap_mut(j - 1).vanished.push(r);
        }
        self.free_snap(j);
        Ok(())
    }

    fn image_page(&self, k: usize, page: usize) -> usize {
        for i in k..self.snaps.len() {
            let undo = self.snap(i).undo.as_slice();
            if let Ok(x) = undo.binary_search_by_key(&page, |e| e.0) {
                return undo[x].1;
            }
        }
        self.shadow.get(page).unwrap_or(0)
    }
}

impl<T: Tracker> Shadow<T> {
    /// The engine around `tracker`, its state in the book.
    pub fn new(tracker: T) -> Self {
        let max_snapshots = std::env::var("COW_MAX_SNAPSHOTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_SNAPSHOTS)
            .max(1);
        let state = book::leak(Mutex::new(State {
            tracker,
            armed: BookVec::new(),
            shadow: PageTable::default(),
            snaps: BookVec::new(),
            next_id: 1,
            max_snapshots,
            slots_held: 0,
            stats: Stats::default(),
            speculator: None,
            left_open: BookVec::new(),
            left_open_probe: false,
            manual_hint: BookVec::new(),
            faults_at_last: 0,
            spec_ns: 0,
        }));
        Shadow {
            state,
            faults_base: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Tracker> Backend for Shadow<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn map(&self, len: usize) -> Result<*mut u8> {
        map_anonymous(len)
    }

    fn snapshot(&self) -> Result<u64> {
        self.lock().snapshot()
    }

    fn restore(&self, id: u64) -> Result<()> {
        self.lock().restore(id)
    }

    fn drop_snapshot(&self, id: u64) -> Result<()> {
        self.lock().drop_snapshot(id)
    }

    fn read(&self, id: u64, addr: usize, buf: &mut [u8]) -> Result<()> {
        let st = self.lock();
        let k = st.position(id)?;
        let mut done = 0;
        while done < buf.len() {
            let a = addr + done;
            let page = a & !(PAGE - 1);
            let off = a - page;
            let n = (PAGE - off).min(buf.len() - done);
            let image = st.image_page(k, page);
            if image == 0
                && !st
                    .armed
                    .as_slice()
                    .iter()
                    .any(|r| (r.start..r.end).contains(&page))
            {
                // Neither saved nor covered: the address held no covered memory (the kmod and
                // fork backends answer the same).
                return Err(err("address outside covered memory", libc::EFAULT));
            }
            if image == 0 {
                buf[done..done + n].fill(0);
            } else {
                // SAFETY: `image` is a live page of the book (held under the lock).
                let src = unsafe { std::slice::from_raw_parts((image + off) as *const u8, n) };
                buf[done..done + n].copy_from_slice(src);
            }
            done += n;
        }
        Ok(())
    }

    fn dirty_since(&self, id: u64) -> Result<Vec<usize>> {
        let mut st = self.lock();
        let k = st.position(id)?;
        let mut pages = BookVec::new();
        st.written(false, &mut pages)?;
        // Memory that appeared since the last snapshot is not tracked yet: all of it counts.
        let marker = 0u8;
        // SAFETY: pthread_self only reads the thread pointer.
        let tp = unsafe { libc::pthread_self() } as usize;
        let covered = covered_for(
            st.armed.as_slice(),
            &[&marker as *const u8 as usize],
            &[tp],
            T::REWRITES_PROT,
        )?;
        let mut fresh = BookVec::new();
        subtract(covered.as_slice(), st.armed.as_slice(), &mut fresh);
        for &r in fresh.as_slice() {
            present_pages(r, &mut pages)?;
        }
        let mut out: Vec<usize> = pages.as_slice().to_vec();
        for i in k..st.snaps.len() {
            out.extend(st.snap(i).undo.as_slice().iter().map(|e| e.0));
            // Memory unmapped since (and perhaps mapped again) changed in every page.
            for r in st.snap(i).vanished.as_slice() {
                out.extend((r.start..r.end).step_by(PAGE));
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn list(&self) -> Result<Vec<u64>> {
        let st = self.lock();
        Ok((0..st.snaps.len()).map(|i| st.snap(i).id).collect())
    }

    fn set_speculation(
        &self,
        policy: crate::speculate::Policy,
        recorded: Option<crate::speculate::Recording>,
    ) -> Result<()> {
        if !T::SPECULATES {
            return Err(err(
                "speculation (this backend has no faults to save)",
                libc::ENOTSUP,
            ));
        }
        let costs = crate::speculate::Costs::measure(|| {
            let mut st = self.lock();
            let _stopped = world::stop_others().ok()?;
            st.tracker.measure_fault_ns()
        });
        let s = match (policy, recorded) {
            (crate::speculate::Policy::Oracle, Some(r)) => {
                crate::speculate::Speculator::oracle(r, costs)
            }
            (p, _) => crate::speculate::Speculator::new(p, costs),
        }
        .kept_in_book();
        self.lock().speculator = Some(s);
        Ok(())
    }

    fn speculation(&self) -> Option<crate::speculate::Totals> {
        self.lock().speculator.as_ref().map(|s| s.totals)
    }

    fn hint_addrs(&self, addrs: &[usize]) -> Result<()> {
        if !T::SPECULATES {
            return Err(err("hint", libc::ENOTSUP));
        }
        let mut st = self.lock();
        st.manual_hint.clear();
        for &a in addrs {
            st.manual_hint.push(a & !(PAGE - 1));
        }
        Ok(())
    }

    fn stats(&self) -> Stats {
        let st = self.lock();
        let mut s = st.stats;
        s.snapshots = st.snaps.len() as u64;
        s.write_faults = st.tracker.faults() + self.faults_base.load(Ordering::Relaxed);
        s.bytes_held = st.slots_held * PAGE as u64;
        s
    }
}
