// SPDX-License-Identifier: GPL-2.0
//! The few mm operations cow.ko needs, each a thin wrapper over an exported kernel function.
//!
//! 7.3's Rust `mm` abstractions cover VMAs but not `vm_operations_struct`, page copies or the
//! rmap-based write-protection of a file range, so these are raw calls, each with its proof.

use kernel::bindings;

// Pointers are declared as `c_void`: the bindgen structs contain zero-sized members that the
// improper_ctypes lint rejects in hand-written declarations.
// All of these are in `cow_helpers.c`, which includes the kernel headers that declare what they
// wrap (`mapping_wrprotect_range` is in `linux/rmap.h`, absent from the Rust bindings).
extern "C" {
    fn cow_wrprotect_page(
        mapping: *mut core::ffi::c_void,
        pgoff: core::ffi::c_ulong,
        page: *mut core::ffi::c_void,
    ) -> core::ffi::c_int;
    fn cow_can_wrprotect_range() -> bool;
    fn cow_wrprotect_range(
        mapping: *mut core::ffi::c_void,
        first: core::ffi::c_ulong,
        nr: core::ffi::c_ulong,
    ) -> core::ffi::c_ulong;
    fn cow_page_maybe_pinned(page: *mut core::ffi::c_void) -> bool;
    fn cow_capable_sys_resource() -> bool;
    fn cow_current_alone() -> bool;
    fn cow_cond_resched();
    fn cow_sort_u64(v: *mut u64, n: usize);
    fn cow_param_max_snapshots() -> core::ffi::c_uint;
    fn cow_param_max_held_mib() -> core::ffi::c_ulong;
    fn cow_param_fault_around() -> core::ffi::c_uint;
    fn cow_map_writable_at(
        vmf: *mut core::ffi::c_void,
        ahead: core::ffi::c_ulong,
        page: *mut core::ffi::c_void,
    ) -> core::ffi::c_uint;
}

/// The `max_snapshots` and `max_held_mib` module parameters (sysfs-visible, defined in
/// `cow_helpers.c`), as they are now.
pub(crate) fn params() -> (u32, u64) {
    // SAFETY: both helpers only READ_ONCE a module-lifetime static.
    unsafe { (cow_param_max_snapshots(), cow_param_max_held_mib() as u64) }
}

/// The `fault_around` module parameter: most pages a sequential first write saves ahead of
/// the writer.
pub(crate) fn fault_around_param() -> usize {
    // SAFETY: the helper only READ_ONCEs a module-lifetime static.
    unsafe { cow_param_fault_around() as usize }
}

/// Copies the contents of page `src` into page `dst`: a fresh page, or (an in-place restore)
/// a current page whose user mappings nobody uses during the call.
pub(crate) fn copy_page(dst: *mut bindings::page, src: *mut bindings::page) {
    // SAFETY: both pointers come from `Page` values the caller owns (order-0 pages from
    // `alloc_page`, so each page is its own folio: `page_folio(p) == p`, which makes the cast
    // exactly what C's `page_folio()` computes). `folio_copy` kmaps and copies one page. The
    // destination is a fresh page nobody else can see, or a mapped page the caller promised
    // nobody touches meanwhile; had a user thread broken that promise, it would only see or
    // leave mixed bytes of plain data (as with any copy of user memory), never kernel state.
    unsafe { bindings::folio_copy(dst.cast(), src.cast()) }
}

/// Write-protects every PTE that maps the page offsets `base + [first, first + count)` of
/// `mapping`, where `pages` (index, page) are the pages of that run that may be writable. With
/// `wp_shared_mapping_range` in the kernel and more than one page, that is one page-table walk
/// per VMA and one TLB flush for the run; else one rmap walk and flush per listed page.
pub(crate) fn wrprotect_run(
    mapping: *mut bindings::address_space,
    base: usize,
    first: usize,
    count: usize,
    pages: &[(usize, *mut bindings::page)],
) {
    // A lone page goes the per-page way: the range walk's fixed part (mmu-notifier range, TLB
    // flush pending count, cache flush) costs more than one rmap walk (measured: 15% slower
    // snapshots of 4096 pages scattered 64 apart).
    // SAFETY: the helper only reads a compile-time constant and a module parameter.
    if pages.len() > 1 && unsafe { cow_can_wrprotect_range() } {
        // SAFETY: `mapping` is the `f_mapping` of the open `/dev/cow` file, which outlives the
        // space (the space is the file's private data). wp_shared_mapping_range takes the
        // mapping's i_mmap lock for reading, walks the page tables of every VMA mapping the
        // range (each PTE under its lock) and flushes the TLB of what it changed. Offsets with
        // no VMA or no page table are skipped.
        unsafe { cow_wrprotect_range(mapping.cast(), (base + first) as _, count as _) };
        return;
    }
    for &(idx, page) in pages {
        // SAFETY: `mapping` as above; `page` is a live page owned by the space (the caller
        // holds its lock). mapping_wrprotect_range walks the mapping's VMAs under its own locks
        // and changes only PTEs that map exactly this page at `pgoff`, flushing the TLB.
        unsafe { cow_wrprotect_page(mapping.cast(), (base + idx) as _, page.cast()) };
    }
}

/// Whether `page` may be pinned for DMA (`pin_user_pages`: O_DIRECT, vmsplice): such a page
/// can be written behind its write-protected PTEs, so a snapshot must copy it at once.
pub(crate) fn maybe_pinned(page: *mut bindings::page) -> bool {
    // SAFETY: `page` is a live order-0 page owned by the space (caller holds its lock);
    // folio_maybe_dma_pinned only reads the folio's counters.
    unsafe { cow_page_maybe_pinned(page.cast()) }
}

/// Whether the calling process is alone with its memory: a single thread and no other holder
/// of its address space.
pub(crate) fn current_alone() -> bool {
    // SAFETY: called from an ioctl, in process context; the helper only reads the current
    // task's thread count and its mm's user count.
    unsafe { cow_current_alone() }
}

/// Whether the calling task has `CAP_SYS_RESOURCE` (in the initial user namespace).
pub(crate) fn capable_sys_resource() -> bool {
    // SAFETY: capable() only inspects the current task's credentials.
    unsafe { cow_capable_sys_resource() }
}

/// Yields the CPU if a reschedule is due: per-page loops over big spaces call it, unlocked.
pub(crate) fn cond_resched() {
    // SAFETY: called from process context without spinlocks held (callers only hold mutexes,
    // or nothing), where sleeping is allowed.
    unsafe { cow_cond_resched() }
}

/// A page index: an unsigned 64-bit integer ([`sort_indices`] sorts them as `u64`).
pub(crate) trait PageIndex: Ord + Copy {}
impl PageIndex for u64 {}
impl PageIndex for usize {}
const _: () = assert!(core::mem::size_of::<usize>() == core::mem::size_of::<u64>());

/// Sorts page indices ascending. Sorted input (the usual case: libcow sends hints sorted, one
/// snapshot's pages come out of an ordered tree) costs one pass; the rest goes to the kernel's
/// heapsort. Not core's `sort_unstable`: its ordering-violation panic path is a function that
/// objtool of kernels built with an older rustc (Debian's 7.3, rustc 1.85) does not know
/// never returns, so it warns that the sort "falls through".
pub(crate) fn sort_indices<T: PageIndex>(v: &mut [T]) {
    if v.is_sorted() {
        return;
    }
    // SAFETY: `T` is `u64` or `usize` (`PageIndex` is implemented for nothing else), both
    // 8-byte unsigned integers with `u64`'s layout (asserted above); `v` is a live, exclusively
    // borrowed slice of `v.len()` of them, which `cow_sort_u64` only permutes in place.
    unsafe { cow_sort_u64(v.as_mut_ptr().cast(), v.len()) }
}

/// Removes every PTE that maps page offsets `[pgoff, pgoff + nr)` of `mapping`, flushing the TLB
/// once for the whole range.
pub(crate) fn zap(mapping: *mut bindings::address_space, pgoff: usize, nr: usize) {
    // SAFETY: `mapping` outlives the space (see `wrprotect`); unmap_mapping_pages takes the
    // mapping's i_mmap lock itself and tolerates offsets with no mapping. `even_cows = false`:
    // the module refuses private mappings, so there are no COW copies to keep or drop.
    unsafe { bindings::unmap_mapping_pages(mapping, pgoff as _, nr as _, false) }
}

/// Installs `page` at the faulting address, writable if `write`; upgrades an existing
/// read-only PTE of the same page to writable. Returns the fault code for the core.
///
/// # Safety
///
/// `vmf` must be the live `vm_fault` of a fault on a cow VMA, and `page` a live page that the
/// space keeps until it zaps this PTE.
pub(crate) unsafe fn insert(vmf: *mut bindings::vm_fault, page: *mut bindings::page, write: bool) -> bindings::vm_fault_t {
    // SAFETY: guaranteed by the caller; vmf_insert_page_mkwrite takes its own page reference
    // and the PTE lock, and returns VM_FAULT_NOPAGE on success.
    unsafe { bindings::vmf_insert_page_mkwrite(vmf, page, write) }
}

/// Maps `page` writable `ahead` pages past the faulting address of `vmf` (fault-around of a
/// first write). Returns the fault code (`VM_FAULT_NOPAGE` on success).
///
/// # Safety
///
/// As for [`insert`], and the address `ahead` pages on must lie inside the faulting VMA, at
/// the page offset whose current page is `page`.
pub(crate) unsafe fn insert_ahead(vmf: *mut bindings::vm_fault, ahead: usize, page: *mut bindings::page) -> bindings::vm_fault_t {
    // SAFETY: guaranteed by the caller: the VMA's lock is held for the fault in progress, the
    // address is inside it, and the page is the current one at that offset, so the helper's
    // vmf_insert_page_mkwrite either upgrades a read-only PTE of this very page or installs it.
    unsafe { cow_map_writable_at(vmf.cast(), ahead as _, page.cast()) }
}

/// Copies a whole page into `dst` (at least a page long).
pub(crate) fn copy_from_page(page: *mut bindings::page, dst: &mut [u8]) {
    assert!(dst.len() >= kernel::page::PAGE_SIZE);
    // SAFETY: `page` is a live page owned by the space (the caller holds the space's lock, so it
    // cannot be freed); kmap_local_page maps it for this thread until kunmap_local. Userland may
    // write the page concurrently through a writable PTE, as with any copy of user memory; the
    // bytes are copied as plain data and never interpreted.
    unsafe {
        let src = bindings::kmap_local_page(page);
        core::ptr::copy_nonoverlapping(src.cast::<u8>(), dst.as_mut_ptr(), kernel::page::PAGE_SIZE);
        bindings::kunmap_local(src);
    }
}

/// Whether two pages hold the same bytes.
pub(crate) fn same_page(a: *mut bindings::page, b: *mut bindings::page) -> bool {
    // SAFETY: both are live pages owned by the space (the caller holds its lock);
    // kmap_local_page maps each for this thread until kunmap_local (reverse order). Nothing
    // writes them meanwhile: the page is write-protected or the caller is quiesced.
    unsafe {
        let pa = bindings::kmap_local_page(a).cast::<u8>();
        let pb = bindings::kmap_local_page(b).cast::<u8>();
        let same = core::slice::from_raw_parts(pa, kernel::page::PAGE_SIZE)
            == core::slice::from_raw_parts(pb, kernel::page::PAGE_SIZE);
        bindings::kunmap_local(pb.cast());
        bindings::kunmap_local(pa.cast());
        same
    }
}
