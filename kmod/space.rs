// SPDX-License-Identifier: GPL-2.0
//! A space: the covered memory of one process (every region it mapped from one open
//! `/dev/cow`) and its snapshots.
//!
//! # The copy-on-write scheme
//!
//! `pages` holds the current page of every page index that was ever touched. Snapshot `S` owns
//! `saved`: for each page first written in the epoch that followed `S` (until the next snapshot),
//! the page's contents as of `S` (`Some(copy)`), or `None` when the page did not exist at `S`.
//! Invariant: a page's PTEs are writable only if its index is in the newest snapshot's `saved`
//! (or no snapshot exists). Hence:
//!
//! - **first write** (`page_mkwrite`): if the newest snapshot lacks the index, copy the page into
//!   its `saved`; then make the PTE writable. One page copy per page per epoch.
//! - **snapshot**: write-protect the pages in the newest `saved` (those written in the epoch now
//!   ending) and push an empty snapshot. Cost grows with the pages written, not the space size.
//! - **restore to `S_k`**: for `j` from newest down to `k`, move `S_j.saved` back into `pages`
//!   (older entries win), zapping each page's PTEs first. Pages are swapped, not copied.
//!   Snapshots newer than `k` disappear; `S_k` stays, empty, so it can be restored again.
//! - **restore in place** (the caller promises nothing touches the space): the newer snapshots'
//!   entries merge into `S_k` (older entries win) and each image is copied into its current
//!   page, staying in `S_k` as that page's pre-image; PTEs stay (the invariant holds: the page
//!   is in the newest snapshot's `saved`). Only pages absent at `S_k` are zapped and removed.
//! - **read `S_k`**: the first `S_j` (j ≥ k) whose `saved` has the index holds its contents at
//!   `S_k`; if none does, the current page does.
//! - **drop `S_j`**: its `saved` entries move into the next older snapshot unless that one already
//!   has an older image of the same page; without an older snapshot they are freed.
//!
//! Every PTE of a space is installed, write-protected or zapped with the space's mutex held, so
//! a snapshot or restore is atomic with respect to the writers of all threads: a thread that
//! faults during one waits for it.

use crate::abi;
use crate::held_page::HeldPage;
use crate::mm;
use kernel::{
    alloc::flags::{GFP_KERNEL_ACCOUNT, __GFP_NOWARN, __GFP_ZERO},
    alloc::Flags,
    page::PAGE_SIZE,
    prelude::*,
    rbtree::{Entry, RBTree, RBTreeNodeReservation},
};

/// Every allocation a space makes is charged to the caller's memory cgroup.
pub(crate) const GFP: Flags = GFP_KERNEL_ACCOUNT;
/// Allocations whose size a caller chooses (lists of pages): charged, and failing with `ENOMEM`
/// instead of a page-allocator warning when they are too big.
pub(crate) fn gfp_user_sized() -> Flags {
    GFP_KERNEL_ACCOUNT | __GFP_NOWARN
}

/// Retention window of a space.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_snapshots: u32,
    pub(crate) policy: u32,
    pub(crate) max_bytes: u64,
}

/// One snapshot: the pre-images of the pages first written in the epoch that followed it.
pub(crate) struct Snapshot {
    pub(crate) id: u64,
    pub(crate) taken_ns: u64,
    /// Page index → its contents at this snapshot (`None`: the page did not exist yet).
    saved: RBTree<usize, Option<HeldPage>>,
    /// Number of `Some` entries in `saved`.
    copies: u64,
    /// Pages pre-copied into `saved` at this snapshot and left writable (sorted): at the next
    /// snapshot the unchanged ones are dropped again.
    precopied: KVVec<usize>,
    /// Pages saved ahead of a sequential writer at a first write and made writable with it
    /// (fault-around): at the next snapshot the unchanged ones are dropped again.
    around: KVVec<usize>,
    /// The space's `removals` when this snapshot was taken (or last restored): while they are
    /// equal, every page this snapshot or a newer one holds an image of is still present.
    removals_at: u64,
}

impl Snapshot {
    pub(crate) fn saved_pages(&self) -> u64 {
        self.copies
    }

    /// Takes over the entries of a newer snapshot's `saved` that this one lacks (its own image
    /// of a page is older, so it wins; the newer one is freed). `bytes_held` grows by the
    /// copies taken over: the caller has already subtracted all of the newer snapshot's.
    fn absorb(&mut self, mut newer: RBTree<usize, Option<HeldPage>>, bytes_held: &mut u64) {
        while let Some(cursor) = newer.cursor_front_mut() {
            let (idx, is_copy) = {
                let (idx, image) = cursor.current();
                (*idx, image.is_some())
            };
            let (_, node) = cursor.remove_current();
            if self.saved.get(&idx).is_some() {
                continue;
            }
            self.saved.insert(node);
            if is_copy {
                self.copies += 1;
                *bytes_held += PAGE_SIZE as u64;
            }
            mm::cond_resched();
        }
    }
}

/// The mutable state of a space, behind its mutex.
pub(crate) struct SpaceState {
    /// Current page of every page index touched so far.
    pages: RBTree<usize, HeldPage>,
    /// Snapshots, oldest first; the last one is the newest.
    pub(crate) snapshots: KVVec<Snapshot>,
    next_id: u64,
    pub(crate) limits: Limits,
    pub(crate) stats: abi::CowStats,
    /// Page indices to pre-copy at quiesced snapshots (sorted).
    pub(crate) hint: KVVec<usize>,
    /// The sequential run the first writes of this epoch are following, for fault-around.
    sequence: Sequence,
    /// Pages removed from `pages` so far (discards, restores to before a page existed). A page
    /// leaves `pages` no other way, so an in-place restore to a snapshot with no removal since
    /// it was taken has no image without a page and need not look for one.
    removals: u64,
}

/// Most pages one first write saves ahead of the writer (the `fault_around` parameter is capped
/// here): bounds the copies made in one fault and the list the fault hook keeps on its stack.
pub(crate) const MAX_AROUND: usize = 32;

/// A sequential writer detected by its first writes, as readahead detects a sequential reader:
/// a first write at `next` (the page right after what the previous first write made writable)
/// continues the run and doubles the window saved ahead of it; any other resets it.
#[derive(Clone, Copy)]
struct Sequence {
    next: usize,
    window: usize,
    /// Pages the previous first write saved ahead (the newest snapshot's last `around` entries).
    saved: usize,
}

impl Sequence {
    const NONE: Sequence = Sequence { next: usize::MAX, window: 0, saved: 0 };
}

/// Pages a first write saved ahead of the writer: the current pages at `idx + 1 ..`, for the
/// fault hook to map writable with the faulting page.
pub(crate) struct Ahead {
    pub(crate) pages: [*mut kernel::bindings::page; MAX_AROUND],
    pub(crate) len: usize,
}

impl Ahead {
    pub(crate) fn new() -> Self {
        Ahead { pages: [core::ptr::null_mut(); MAX_AROUND], len: 0 }
    }
}

/// Drops the images in `snap` of the pages listed in `list` (copied ahead of any write and
/// left writable, now write-protected or quiesced) whose current page still equals the image:
/// nothing wrote them, so the image is the page itself. Returns how many were written.
fn drop_unwritten(
    list: &[usize],
    snap: &mut Snapshot,
    pages: &RBTree<usize, HeldPage>,
    bytes_held: &mut u64,
) -> u64 {
    let mut written = 0;
    for &idx in list {
        let unchanged = match (snap.saved.get(&idx), pages.get(&idx)) {
            (Some(Some(copy)), Some(page)) => mm::same_page(copy.as_ptr(), page.as_ptr()),
            _ => false,
        };
        if unchanged {
            snap.saved.remove(&idx);
            snap.copies -= 1;
            *bytes_held -= PAGE_SIZE as u64;
        } else {
            written += 1;
        }
    }
    written
}

/// What a fault found, for the caller to install.
pub(crate) enum FaultPage {
    /// Map this page (read-only, or writable for a write fault).
    Map(*mut kernel::bindings::page),
    /// The faulting page is not the current one any more (a restore swapped it): retry.
    Stale,
}

/// Pages written in one epoch lying at most this many pages apart are write-protected by one
/// walk over the read-only pages between them: visiting a few PTEs costs less than another
/// walk of the mapping's VMAs, another mmu-notifier round and another TLB flush. Measured in
/// TCG, 4096 written pages 16 or 64 apart: bridging 64 instead of 16 (and spans of 4096
/// instead of 1024) took their snapshot from 5.3 to 2.9 ms and from 13.4 to 7.8 ms; bridging
/// 256 gained nothing more.
const WP_GAP: usize = 64;

/// Most pages one write-protection run spans: bounds the run's list and the time spent in one
/// walk without a chance to reschedule.
const WP_MAX_SPAN: usize = 4096;

/// Write-protects the pages gathered in `run` (sorted page indices) as one range, then adds
/// those that may be pinned for DMA to `pinned` (checked after the protection: a pin taken
/// before it is seen, one taken after it needs a write fault), and empties `run`.
fn flush_run(
    run: &mut KVVec<(usize, *mut kernel::bindings::page)>,
    pinned: &mut KVVec<(usize, *mut kernel::bindings::page)>,
    wrprotect: &mut impl FnMut(usize, usize, &[(usize, *mut kernel::bindings::page)]),
) -> Result {
    if let (Some(&(first, _)), Some(&(last, _))) = (run.first(), run.last()) {
        wrprotect(first, last + 1 - first, run.as_slice());
    }
    for &(idx, page) in run.iter() {
        if mm::maybe_pinned(page) {
            pinned.push((idx, page), gfp_user_sized())?;
        }
    }
    run.clear();
    mm::cond_resched();
    Ok(())
}

/// Calls `zap(first, count)` once per run of consecutive indices in `indices` (ascending):
/// one rmap walk and one TLB flush per run instead of per page.
fn zap_runs(indices: impl Iterator<Item = usize>, zap: &mut impl FnMut(usize, usize)) {
    let mut run: Option<(usize, usize)> = None;
    for idx in indices {
        run = match run {
            Some((first, count)) if first + count == idx => Some((first, count + 1)),
            Some((first, count)) => {
                zap(first, count);
                Some((idx, 1))
            }
            None => Some((idx, 1)),
        };
    }
    if let Some((first, count)) = run {
        zap(first, count);
    }
}

fn now_ns() -> u64 {
    // SAFETY: ktime_get has no preconditions; it reads the monotonic clock.
    unsafe { kernel::bindings::ktime_get() as u64 }
}

impl SpaceState {
    pub(crate) fn new(limits: Limits) -> Self {
        SpaceState {
            pages: RBTree::new(),
            snapshots: KVVec::new(),
            next_id: 1,
            limits,
            stats: abi::CowStats::default(),
            hint: KVVec::new(),
            sequence: Sequence::NONE,
            removals: 0,
        }
    }

    fn held_bytes(&self) -> u64 {
        self.stats.bytes_held
    }

    /// Looks up (or creates, zeroed) the current page at `idx` for a fault, and applies the
    /// first-write rule when `write` is set. `expected` is the page the faulting PTE mapped, for
    /// write-protect faults (`page_mkwrite`). A first write that continues a sequential run
    /// also saves up to `room` pages after `idx` (those the faulting VMA maps) into `ahead`,
    /// for the caller to map writable with the faulting page.
    pub(crate) fn fault(
        &mut self,
        idx: usize,
        write: bool,
        expected: Option<*mut kernel::bindings::page>,
        room: usize,
        ahead: &mut Ahead,
    ) -> Result<FaultPage> {
        let present = self.pages.get(&idx).map(|p| p.as_ptr());
        let page_ptr = match (present, expected) {
            (Some(p), Some(e)) if p != e => return Ok(FaultPage::Stale),
            (None, Some(_)) => return Ok(FaultPage::Stale),
            (Some(p), _) => p,
            (None, None) => {
                // Allocate everything first: a page created without its "did not exist" mark
                // would survive a restore.
                let page = HeldPage::alloc(GFP | __GFP_ZERO)?;
                let node = RBTreeNodeReservation::new(GFP)?;
                let mark = match self.snapshots.last() {
                    Some(_) => Some(RBTreeNodeReservation::new(GFP)?),
                    None => None,
                };
                let ptr = page.as_ptr();
                self.pages.insert(node.into_node(idx, page));
                self.stats.pages_present += 1;
                // The page did not exist at the newest snapshot: a restore must remove it. Unless
                // the snapshot already holds its image (the page was discarded in this epoch):
                // that image is what a restore brings back.
                if let (Some(newest), Some(mark)) = (self.snapshots.last_mut(), mark) {
                    if newest.saved.get(&idx).is_none() {
                        newest.saved.insert(mark.into_node(idx, None));
                    }
                }
                ptr
            }
        };
        if write {
            if self.save_pre_image(idx, page_ptr)? {
                self.save_ahead(idx, room, ahead);
            }
        } else {
            self.stats.other_faults += 1;
        }
        Ok(FaultPage::Map(page_ptr))
    }

    /// The first-write rule: unless the newest snapshot holds an image of page `idx`, copy the
    /// current page (`page`) into it, looking the index up once (the tree's entry is where the
    /// copy goes). The byte budget evicts older snapshots only: the newest one (the one a
    /// program is about to roll back to) is never lost silently; its pre-images are bounded by
    /// the space's size (one per page).
    /// Returns whether it copied (a true first write).
    fn save_pre_image(&mut self, idx: usize, page: *mut kernel::bindings::page) -> Result<bool> {
        let max_bytes = self.limits.max_bytes;
        if self.held_bytes() + PAGE_SIZE as u64 > max_bytes
            && self.snapshots.last().is_some_and(|newest| newest.saved.get(&idx).is_none())
        {
            while self.held_bytes() + PAGE_SIZE as u64 > max_bytes && self.snapshots.len() > 1 {
                self.evict_oldest();
            }
        }
        let Some(newest) = self.snapshots.last_mut() else {
            // Nothing to preserve before the first snapshot.
            self.stats.other_faults += 1;
            return Ok(false);
        };
        let Entry::Vacant(slot) = newest.saved.entry(idx) else {
            self.stats.other_faults += 1;
            return Ok(false);
        };
        let start = now_ns();
        let copy = HeldPage::alloc(GFP)?;
        let node = RBTreeNodeReservation::new(GFP)?;
        mm::copy_page(copy.as_ptr(), page);
        slot.insert(Some(copy), node);
        newest.copies += 1;
        self.stats.pages_saved += 1;
        self.stats.bytes_held += PAGE_SIZE as u64;
        self.stats.first_write_faults += 1;
        self.stats.fault_ns += now_ns().saturating_sub(start);
        Ok(true)
    }

    /// Fault-around: after a first write at `idx` that continues a sequential run, saves the
    /// next pages (at most the window, `room` and [`MAX_AROUND`]) into the newest snapshot as
    /// if they had been written, and lists them in `ahead` to be mapped writable now, so the
    /// writer's next pages cost no fault. A window grows by doubling while the writer keeps
    /// reaching its end; a random writer continues a run only by chance, and then wastes one
    /// copy. Stops at the first page that is absent, already saved, or over the byte budget
    /// (fault-around never evicts a snapshot); a failed allocation just ends it.
    fn save_ahead(&mut self, idx: usize, room: usize, ahead: &mut Ahead) {
        if idx != self.sequence.next {
            // Not a continuation (the common case of a scattered writer): nothing to save, and
            // no clock read on the fault path.
            self.sequence = Sequence { next: idx + 1, window: 0, saved: 0 };
            return;
        }
        let max = mm::fault_around_param().min(MAX_AROUND);
        let window = if max > 0 { (self.sequence.window * 2).clamp(1, max) } else { 0 };
        let start = now_ns();
        if let Some(newest) = self.snapshots.last_mut() {
            // The writer ran through the previous window to its end: count it written, so the
            // next snapshot compares only the last window of a run (a window the writer skipped
            // part of only keeps an image equal to its page, which restores the same).
            let len = newest.around.len();
            let confirmed = self.sequence.saved.min(len);
            newest.around.truncate(len - confirmed);
            self.stats.around_useful += confirmed as u64;
            for j in idx + 1..=idx + window.min(room) {
                let Some(page) = self.pages.get(&j).map(|p| p.as_ptr()) else { break };
                let held = self.stats.bytes_held + (ahead.len as u64 + 1) * PAGE_SIZE as u64;
                if held > self.limits.max_bytes {
                    break;
                }
                let Entry::Vacant(slot) = newest.saved.entry(j) else { break };
                let (Ok(copy), Ok(node)) = (HeldPage::alloc(GFP), RBTreeNodeReservation::new(GFP))
                else {
                    break;
                };
                if newest.around.push(j, GFP).is_err() {
                    break;
                }
                mm::copy_page(copy.as_ptr(), page);
                slot.insert(Some(copy), node);
                newest.copies += 1;
                ahead.pages[ahead.len] = page;
                ahead.len += 1;
            }
        }
        let saved = ahead.len as u64;
        self.stats.pages_saved += saved;
        self.stats.bytes_held += saved * PAGE_SIZE as u64;
        self.stats.around_pages += saved;
        self.stats.fault_ns += now_ns().saturating_sub(start);
        self.sequence = Sequence { next: idx + 1 + ahead.len, window, saved: ahead.len };
    }

    /// Merges the oldest snapshot away (nothing older needs its pre-images).
    fn evict_oldest(&mut self) {
        if self.snapshots.is_empty() {
            return;
        }
        if let Ok(old) = self.snapshots.remove(0) {
            self.stats.bytes_held -= old.copies * PAGE_SIZE as u64;
            self.stats.evicted += 1;
        }
    }

    /// Takes a snapshot; `wrprotect(first, count, pages)` write-protects the PTEs of the page
    /// indices `[first, first + count)`, where `pages` lists the space's pages in that run that
    /// may be writable (those to arm; the others in the run are read-only already). Pages
    /// written in the epoch that ends are armed in runs that bridge gaps of up to [`WP_GAP`]
    /// read-only pages, so a kernel that can protect a range does one page-table walk and one
    /// TLB flush per run instead of an rmap walk and a flush per page. With `quiesced` (nothing
    /// writes the space meanwhile), hinted pages written in the epoch that ends are copied now
    /// and left writable, so the next epoch's writes to them do not fault; no run spans them.
    pub(crate) fn snapshot(
        &mut self,
        quiesced: bool,
        mut wrprotect: impl FnMut(usize, usize, &[(usize, *mut kernel::bindings::page)]),
    ) -> Result<u64> {
        let start = now_ns();
        if self.snapshots.len() >= self.limits.max_snapshots as usize
            || self.held_bytes() >= self.limits.max_bytes
        {
            if self.limits.policy == abi::COW_POLICY_FAIL {
                return Err(ENOMEM);
            }
            while !self.snapshots.is_empty()
                && (self.snapshots.len() >= self.limits.max_snapshots as usize
                    || self.held_bytes() >= self.limits.max_bytes)
            {
                self.evict_oldest();
            }
        }
        // Reserve first so that nothing below can fail half-way.
        self.snapshots.reserve(1, GFP)?;
        // The pages writable now: those made writable in the epoch that ends (every present
        // page before the first snapshot). Hinted ones stay writable (pre-copied below) when
        // nothing can write them meanwhile; the rest are re-armed.
        // Pages that may be pinned for DMA are write-protected and copied at once: a device
        // writes them behind their PTEs, so no first-write fault would save them (as fork does).
        // A failure part-way leaves some pages write-protected early, which only costs a fault.
        let mut keep = KVVec::new();
        let mut pinned = KVVec::new();
        let mut run: KVVec<(usize, *mut kernel::bindings::page)> = KVVec::new();
        {
            let hint = self.hint.as_slice();
            let mut arm = |idx: usize, page: *mut kernel::bindings::page| -> Result {
                if quiesced && hint.binary_search(&idx).is_ok() {
                    flush_run(&mut run, &mut pinned, &mut wrprotect)?;
                    keep.push((idx, page), gfp_user_sized())?;
                } else {
                    let breaks = |&(last, _): &(usize, _)| idx - last > WP_GAP;
                    let too_long = |&(first, _): &(usize, _)| idx - first >= WP_MAX_SPAN;
                    if run.last().is_some_and(breaks) || run.first().is_some_and(too_long) {
                        flush_run(&mut run, &mut pinned, &mut wrprotect)?;
                    }
                    run.push((idx, page), gfp_user_sized())?;
                }
                Ok(())
            };
            match self.snapshots.last() {
                Some(newest) => {
                    for (idx, _) in newest.saved.iter() {
                        if let Some(page) = self.pages.get(idx) {
                            arm(*idx, page.as_ptr())?;
                        }
                    }
                }
                None => {
                    for (idx, page) in self.pages.iter() {
                        arm(*idx, page.as_ptr())?;
                    }
                }
            }
        }
        flush_run(&mut run, &mut pinned, &mut wrprotect)?;
        let mut snap = Snapshot {
            id: self.next_id,
            taken_ns: now_ns(),
            saved: RBTree::new(),
            copies: 0,
            precopied: KVVec::new(),
            around: KVVec::new(),
            removals_at: self.removals,
        };
        // Pinned pages: without their copies the snapshot would not be exact, so a failure here
        // fails the snapshot. Nothing has changed yet but write-protected PTEs, which only
        // cost a fault.
        for &(idx, page) in pinned.iter() {
            let copy = HeldPage::alloc(GFP)?;
            mm::copy_page(copy.as_ptr(), page);
            snap.saved.try_create_and_insert(idx, Some(copy), GFP)?;
            snap.copies += 1;
        }
        let precopy_start = now_ns();
        // Pre-copies and fault-around copies of the epoch that ends that were never written:
        // their image is the page itself, so drop them (every such page is write-protected or
        // quiesced now).
        if let Some(newest) = self.snapshots.last_mut() {
            let precopied = core::mem::take(&mut newest.precopied);
            let around = core::mem::take(&mut newest.around);
            let held = &mut self.stats.bytes_held;
            self.stats.precopy_useful += drop_unwritten(&precopied, newest, &self.pages, held);
            self.stats.around_useful += drop_unwritten(&around, newest, &self.pages, held);
        }
        self.sequence = Sequence::NONE;
        self.stats.bytes_held += snap.copies * PAGE_SIZE as u64;
        self.stats.pages_saved += snap.copies;
        for &(idx, page) in keep.iter() {
            let copied = HeldPage::alloc(GFP).ok().and_then(|copy| {
                mm::copy_page(copy.as_ptr(), page);
                snap.saved.try_create_and_insert(idx, Some(copy), GFP).ok()
            });
            if copied.is_some() && snap.precopied.push(idx, GFP).is_ok() {
                snap.copies += 1;
                self.stats.bytes_held += PAGE_SIZE as u64;
                self.stats.pages_saved += 1;
                self.stats.precopied_pages += 1;
            } else {
                // No memory for the copy: take the ordinary path for this page.
                snap.saved.remove(&idx);
                wrprotect(idx, 1, &[(idx, page)]);
            }
        }
        self.stats.precopy_ns += now_ns().saturating_sub(precopy_start);
        let id = snap.id;
        self.next_id += 1;
        self.snapshots.push(snap, GFP).map_err(|_| ENOMEM)?;
        self.stats.snapshots_taken += 1;
        self.stats.snapshot_ns += now_ns().saturating_sub(start);
        Ok(id)
    }

    /// Index of snapshot `id` in `snapshots`; `ENOENT` if the space holds no such snapshot.
    pub(crate) fn position(&self, id: u64) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id)
            .ok_or(ENOENT)
    }

    /// Restores to snapshot `id`; `zap(first, count)` drops the PTEs of a run of page indices.
    /// With `in_place` (the caller guarantees that nothing touches the space meanwhile), see
    /// [`Self::restore_in_place`].
    pub(crate) fn restore(&mut self, id: u64, in_place: bool, mut zap: impl FnMut(usize, usize)) -> Result {
        if in_place {
            return self.restore_in_place(id, zap);
        }
        let start = now_ns();
        let k = self.position(id)?;
        // Allocate before the first irreversible step: a node for every pre-image whose page
        // no longer exists, plus one for every "absent" mark (draining a newer snapshot's mark
        // removes the page, and an older image of it, saved before a discard, then needs a
        // node again). An upper bound: a page saved by several snapshots counts more than
        // once. Past this point nothing can fail, so a restore never leaves epochs mixed.
        let mut needed = 0usize;
        for snap in &self.snapshots[k..] {
            for (idx, image) in snap.saved.iter() {
                if image.is_none() || self.pages.get(idx).is_none() {
                    needed += 1;
                }
            }
            mm::cond_resched();
        }
        let mut nodes = KVVec::with_capacity(needed, gfp_user_sized())?;
        for _ in 0..needed {
            nodes.push(RBTreeNodeReservation::<usize, HeldPage>::new(GFP)?, GFP)?;
        }
        // First drop the PTEs of every page about to be swapped, in runs of consecutive indices:
        // one rmap walk and one TLB flush per run instead of per page. No fault can map a page
        // again before the swap below: faults need the lock we hold.
        for snap in &self.snapshots[k..] {
            zap_runs(snap.saved.keys().copied(), &mut zap);
            mm::cond_resched();
        }
        let mut j = self.snapshots.len();
        while j > k {
            j -= 1;
            let snap = &mut self.snapshots[j];
            self.stats.bytes_held -= snap.copies * PAGE_SIZE as u64;
            snap.copies = 0;
            let mut saved = core::mem::replace(&mut snap.saved, RBTree::new());
            while let Some(cursor) = saved.cursor_front_mut() {
                let idx = *cursor.current().0;
                let (_, node) = cursor.remove_current();
                let (_, image) = node.to_key_value();
                self.stats.pages_restored += 1;
                match image {
                    Some(page) => match self.pages.get_mut(&idx) {
                        Some(slot) => drop(core::mem::replace(slot, page)),
                        None => {
                            // Counted above, so there is one; the `else` is unreachable.
                            let Some(node) = nodes.pop() else { continue };
                            self.pages.insert(node.into_node(idx, page));
                            self.stats.pages_present += 1;
                        }
                    },
                    None => {
                        if self.pages.remove(&idx).is_some() {
                            self.stats.pages_present -= 1;
                            self.removals += 1;
                        }
                    }
                }
                mm::cond_resched();
            }
        }
        self.snapshots.truncate(k + 1);
        self.snapshots[k].precopied.clear();
        self.snapshots[k].around.clear();
        self.snapshots[k].removals_at = self.removals;
        self.sequence = Sequence::NONE;
        self.stats.restores += 1;
        self.stats.restore_ns += now_ns().saturating_sub(start);
        Ok(())
    }

    /// Restores to snapshot `id` by copying each page's image back into the page in place,
    /// for a caller that guarantees nothing reads or writes the space during the call (its
    /// other threads stopped, no other process mapping it). The newer snapshots' images merge
    /// into `S_k` (the oldest image of a page wins) and stay there as the pages' pre-images, so
    /// the PTEs stay: no rmap walk, no TLB flush, no refault afterwards, and a restored page
    /// written again costs nothing. Pages absent at `S_k` are zapped and removed (their "absent"
    /// marks stay). Cost: one page copy and one tree step per restored page (restoring the
    /// newest snapshot moves no tree node).
    fn restore_in_place(&mut self, id: u64, mut zap: impl FnMut(usize, usize)) -> Result {
        let start = now_ns();
        let k = self.position(id)?;
        // Allocate first (a node for each image whose page no longer exists: it becomes the
        // page again); past this point nothing can fail. Without a removal since S_k was taken
        // there is no such image, and no tree lookup per image to find one.
        let mut needed = 0usize;
        if self.removals != self.snapshots[k].removals_at {
            for snap in &self.snapshots[k..] {
                for (idx, image) in snap.saved.iter() {
                    if image.is_some() && self.pages.get(idx).is_none() {
                        needed += 1;
                    }
                }
                mm::cond_resched();
            }
        }
        let mut nodes = KVVec::with_capacity(needed, gfp_user_sized())?;
        for _ in 0..needed {
            nodes.push(RBTreeNodeReservation::<usize, HeldPage>::new(GFP)?, GFP)?;
        }
        let mut moved: KVVec<usize> = KVVec::with_capacity(needed, gfp_user_sized())?;
        // The newer snapshots' entries move into S_k unless it has the page already (its image
        // is older); the first newer snapshot holding a page has the oldest image of it.
        let newer = self.snapshots.len() - (k + 1);
        for _ in 0..newer {
            let Ok(snap) = self.snapshots.remove(k + 1) else { break };
            self.stats.bytes_held -= snap.copies * PAGE_SIZE as u64;
            self.snapshots[k].absorb(snap.saved, &mut self.stats.bytes_held);
        }
        let snap = &mut self.snapshots[k];
        // Pages absent at S_k lose their PTEs first, in runs; nothing faults meanwhile (the
        // caller's promise, and faults need the lock we hold).
        let pages = &self.pages;
        let absent = snap
            .saved
            .iter()
            .filter(|(idx, image)| image.is_none() && pages.get(idx).is_some())
            .map(|(&idx, _)| idx);
        zap_runs(absent, &mut zap);
        // Copy every image back; note the pages discarded since S_k (unmapped: their image
        // becomes the page) and the pages absent at S_k (removed).
        let mut discarded = 0usize;
        for (&idx, image) in snap.saved.iter() {
            self.stats.pages_restored += 1;
            match (image, self.pages.get(&idx)) {
                (Some(image), Some(page)) => mm::copy_page(page.as_ptr(), image.as_ptr()),
                (Some(_), None) => discarded += 1,
                (None, Some(_)) => {
                    self.pages.remove(&idx);
                    self.stats.pages_present -= 1;
                    self.removals += 1;
                }
                (None, None) => {}
            }
            mm::cond_resched();
        }
        if discarded > 0 {
            for (&idx, image) in snap.saved.iter() {
                if image.is_some() && self.pages.get(&idx).is_none() {
                    // Room for `needed` ≥ `discarded` entries was reserved above.
                    let _ = moved.push_within_capacity(idx);
                }
            }
            for &idx in moved.iter() {
                let Some(Some(image)) = snap.saved.remove(&idx) else { continue };
                let Some(slot) = nodes.pop() else { break };
                self.pages.insert(slot.into_node(idx, image));
                self.stats.pages_present += 1;
                snap.copies -= 1;
                self.stats.bytes_held -= PAGE_SIZE as u64;
            }
        }
        snap.precopied.clear();
        snap.around.clear();
        // Every image S_k holds has its page now.
        snap.removals_at = self.removals;
        self.sequence = Sequence::NONE;
        self.stats.restores += 1;
        self.stats.restore_ns += now_ns().saturating_sub(start);
        Ok(())
    }

    /// Throws away the pages `[first, first + count)`: they read as zero afterwards (the
    /// `MADV_DONTNEED` of private anonymous memory, or a region unmapped for good). A page the
    /// newest snapshot has no image of yet moves there as its image — no copy; the others are
    /// freed. `zap(first, count)` drops the range's PTEs first. Cost ∝ present pages in the
    /// range (plus one page-table walk of the range in each mapping).
    pub(crate) fn discard(&mut self, first: usize, count: usize, zap: impl FnOnce(usize, usize)) -> Result {
        let end = first.checked_add(count).ok_or(EINVAL)?;
        // Allocate first: a node for each page that becomes an image. Past this point nothing
        // can fail, so a discard never leaves a range half-thrown-away.
        let mut needed = 0usize;
        if let Some(newest) = self.snapshots.last() {
            let mut at = first;
            while let Some(cursor) = self.pages.cursor_lower_bound(&at) {
                let idx = *cursor.current().0;
                if idx >= end {
                    break;
                }
                if newest.saved.get(&idx).is_none() {
                    needed += 1;
                }
                at = idx + 1;
            }
        }
        let mut nodes = KVVec::with_capacity(needed, gfp_user_sized())?;
        for _ in 0..needed {
            nodes.push(RBTreeNodeReservation::<usize, Option<HeldPage>>::new(GFP)?, GFP)?;
        }
        // No fault can map a page of the range again before it is gone: faults need our lock.
        zap(first, count);
        while let Some(cursor) = self.pages.cursor_lower_bound_mut(&first) {
            if *cursor.current().0 >= end {
                break;
            }
            let (_, node) = cursor.remove_current();
            let (idx, page) = node.to_key_value();
            self.stats.pages_present -= 1;
            self.removals += 1;
            if let Some(newest) = self.snapshots.last_mut() {
                if newest.saved.get(&idx).is_none() {
                    // Counted above, so there is one; the `else` is unreachable.
                    let Some(node) = nodes.pop() else { continue };
                    newest.saved.insert(node.into_node(idx, Some(page)));
                    newest.copies += 1;
                    self.stats.bytes_held += PAGE_SIZE as u64;
                }
            }
            mm::cond_resched();
        }
        Ok(())
    }

    /// Drops snapshot `id`, merging its pre-images into the next older snapshot.
    pub(crate) fn drop_snapshot(&mut self, id: u64) -> Result {
        let j = self.position(id)?;
        // The only allocation comes first: the dropped snapshot's pre-copies join the older
        // one's list. After `remove` nothing can fail.
        if j > 0 {
            let (n, m) = (self.snapshots[j].precopied.len(), self.snapshots[j].around.len());
            self.snapshots[j - 1].precopied.reserve(n, gfp_user_sized())?;
            self.snapshots[j - 1].around.reserve(m, gfp_user_sized())?;
        }
        let gone = self.snapshots.remove(j).map_err(|_| EINVAL)?;
        self.sequence = Sequence::NONE;
        self.stats.bytes_held -= gone.copies * PAGE_SIZE as u64;
        if j == 0 {
            return Ok(()); // nothing older: the pre-images are not needed by anyone
        }
        let older = &mut self.snapshots[j - 1];
        // Pre-copied pages of the dropped snapshot are still writable: the older one checks them.
        for &idx in gone.precopied.iter() {
            older.precopied.push_within_capacity(idx).map_err(|_| ENOMEM)?;
        }
        mm::sort_indices(older.precopied.as_mut_slice());
        for &idx in gone.around.iter() {
            older.around.push_within_capacity(idx).map_err(|_| ENOMEM)?;
        }
        older.absorb(gone.saved, &mut self.stats.bytes_held);
        Ok(())
    }

    /// The page holding the contents of page `idx` as they were at snapshot `id` (`None`: the
    /// page did not exist then, so it reads as zeros).
    pub(crate) fn image_at(&self, id: u64, idx: usize) -> Result<Option<*mut kernel::bindings::page>> {
        let k = self.position(id)?;
        // The first snapshot at or after `id` that saved the page holds its contents at `id`
        // (it was not written in between); if none did, the page is unchanged since `id`.
        for snap in &self.snapshots[k..] {
            if let Some(image) = snap.saved.get(&idx) {
                return Ok(image.as_ref().map(|p| p.as_ptr()));
            }
        }
        Ok(self.pages.get(&idx).map(|p| p.as_ptr()))
    }

    /// Page indices written (or created) since snapshot `id` (or, with `epoch_only`, in the
    /// epoch right after it), sorted and unique.
    pub(crate) fn dirty_since(&self, id: u64, epoch_only: bool) -> Result<KVVec<u64>> {
        let k = self.position(id)?;
        let end = if epoch_only { k + 1 } else { self.snapshots.len() };
        // Pages the open epoch copied ahead of any write (pre-copies, fault-around) and that
        // still equal their image were not written: they are not reported.
        let mut unwritten = KVVec::new();
        if let Some(newest) = self.snapshots[k..end].last().filter(|_| end == self.snapshots.len()) {
            for &idx in Iterator::chain(newest.precopied.iter(), newest.around.iter()) {
                if let (Some(Some(copy)), Some(page)) = (newest.saved.get(&idx), self.pages.get(&idx)) {
                    if mm::same_page(copy.as_ptr(), page.as_ptr()) {
                        unwritten.push(idx, gfp_user_sized())?;
                    }
                }
                mm::cond_resched();
            }
            mm::sort_indices(unwritten.as_mut_slice());
        }
        let mut out = KVVec::new();
        for (i, snap) in self.snapshots[k..end].iter().enumerate() {
            let newest = k + i + 1 == self.snapshots.len();
            for (idx, _) in snap.saved.iter() {
                if newest && unwritten.binary_search(idx).is_ok() {
                    continue;
                }
                out.push(*idx as u64, gfp_user_sized())?;
            }
            mm::cond_resched();
        }
        mm::sort_indices(out.as_mut_slice());
        let mut w = 0;
        let v = out.as_mut_slice();
        for r in 0..v.len() {
            if w == 0 || v[w - 1] != v[r] {
                v[w] = v[r];
                w += 1;
            }
        }
        out.truncate(w);
        Ok(out)
    }
}
