// SPDX-License-Identifier: GPL-2.0
//! The VMA side of a space: `mmap` setup and the two fault hooks.
//!
//! `fault` maps a page read-only (or writable for a write fault, after the first-write rule);
//! `page_mkwrite` is the first-write hook for pages mapped read-only. Both run the rule and
//! install the PTE with the space's mutex held, so snapshots and restores never race a PTE.

use crate::mm;
use crate::space::{Ahead, FaultPage};
use crate::Space;
use kernel::{
    bindings,
    mm::virt::{VmaNew, VmaRef},
    prelude::*,
};

/// The space's vm operations. `page_mkwrite` being set also makes the core map shared pages
/// read-only until written (`vma_wants_writenotify`), which is what arms the first-write hook.
/// `map_pages` being set tells the core that the hooks need no `mmap_lock` (the kernel's own
/// convention, `vmf_can_call_fault`): without it every fault taken under the per-VMA lock is
/// given up and retried under `mmap_lock`, twice the work and contention with `mmap` callers.
static COW_VM_OPS: VmOps = VmOps({
    let mut ops: bindings::vm_operations_struct = pin_init::zeroed();
    ops.fault = Some(cow_fault);
    ops.page_mkwrite = Some(cow_page_mkwrite);
    ops.map_pages = Some(cow_map_pages);
    ops
});

/// A `vm_operations_struct` that can live in a `static`.
#[repr(transparent)]
struct VmOps(bindings::vm_operations_struct);
// SAFETY: the table is immutable after initialisation; its raw pointers (all null but the two
// hook functions) are never written, so sharing it between threads is sound.
unsafe impl Sync for VmOps {}

/// Sets up a new VMA of `space`: shared mappings only, offsets within the space's range.
pub(crate) fn mmap(space: &Space, vma: &VmaNew) -> Result {
    use kernel::mm::virt::flags;
    if vma.flags() & flags::SHARED == 0 {
        // A private mapping would give the process anonymous COW copies the module never sees.
        return Err(EINVAL);
    }
    let pages = (vma.end() - vma.start()) >> bindings::PAGE_SHIFT;
    // No mremap growth past the range checked here (as fb_defio). The flag also keeps the core
    // from merging a later mmap of the same file into this VMA without calling us: its flags
    // differ until ->mmap has run.
    vma.set_dontexpand();
    let raw = vma.as_ptr();
    // SAFETY: `raw` is the VMA being set up by this mmap call (VmaNew guarantees exclusive
    // access during setup). The space outlives the VMA: the VMA holds a reference on the file,
    // whose private data is the space. Rewriting vm_pgoff before the VMA is linked into the
    // mapping gives each space a disjoint range of page offsets in the shared device mapping.
    unsafe {
        let pgoff = (*raw).vm_pgoff as usize;
        let limit = 1usize << crate::abi::COW_SPACE_PAGES_SHIFT;
        if pgoff >= limit || pages > limit - pgoff {
            return Err(EINVAL);
        }
        (*raw).vm_pgoff = (space.base + pgoff) as _;
        (*raw).vm_ops = &COW_VM_OPS.0;
        (*raw).vm_private_data = space as *const Space as *mut core::ffi::c_void;
    }
    Ok(())
}

/// Common body of both hooks.
///
/// # Safety
///
/// `vmf` is the live fault of a VMA set up by [`mmap`].
unsafe fn handle(vmf: *mut bindings::vm_fault, write: bool, expected: Option<*mut bindings::page>) -> bindings::vm_fault_t {
    // SAFETY: the caller passes a live vm_fault whose VMA was set up by `mmap`, so
    // vm_private_data points at the space, alive while the VMA holds the file.
    // The VMA is locked for the fault in progress (mmap or per-VMA read lock), as `VmaRef`
    // requires.
    let (space, pgoff, room) = unsafe {
        let raw = (*vmf).__bindgen_anon_1.vma;
        let vma = VmaRef::from_raw(raw);
        // Pages the VMA maps after the faulting one: how far fault-around may go.
        let address = (*vmf).__bindgen_anon_1.address as usize;
        let room = ((vma.end() - address) >> bindings::PAGE_SHIFT).saturating_sub(1);
        (&*((*raw).vm_private_data as *const Space), (*vmf).__bindgen_anon_1.pgoff as usize, room)
    };
    // Defence in depth: the offset was checked in `mmap`, and VM_DONTEXPAND keeps it so, but a
    // VMA the driver never saw must get SIGBUS, never an underflow.
    let limit = 1usize << crate::abi::COW_SPACE_PAGES_SHIFT;
    let Some(idx) = pgoff.checked_sub(space.base).filter(|&i| i < limit) else {
        return bindings::vm_fault_reason_VM_FAULT_SIGBUS;
    };
    let mut ahead = Ahead::new();
    let mut state = space.state.lock();
    match state.fault(idx, write, expected, room, &mut ahead) {
        Ok(FaultPage::Map(page)) => {
            // SAFETY: live vm_fault (caller); the page is owned by the space, which keeps it
            // until it zaps this PTE under the same mutex we hold now.
            let code = unsafe { mm::insert(vmf, page, write) };
            // Fault-around: the pages saved ahead of the writer become writable too, still
            // under the mutex. A failure only leaves a page read-only: its next write faults
            // and finds its image already saved.
            for (i, &next) in ahead.pages[..ahead.len].iter().enumerate() {
                // SAFETY: live vm_fault of this VMA; `space.fault` kept `i + 1 <= room`, so the
                // address is inside the VMA, and `next` is the current page at `pgoff + i + 1`,
                // owned by the space until it zaps the PTE under the mutex held here.
                unsafe { mm::insert_ahead(vmf, i + 1, next) };
            }
            code
        }
        Ok(FaultPage::Stale) => bindings::vm_fault_reason_VM_FAULT_NOPAGE,
        Err(e) if e == ENOMEM => bindings::vm_fault_reason_VM_FAULT_OOM,
        Err(_) => bindings::vm_fault_reason_VM_FAULT_SIGBUS,
    }
}

/// `vm_ops->map_pages`: read fault-around, called under RCU before `fault`, where the space's
/// mutex cannot be taken: it maps nothing, and the core then calls `fault` for the faulting
/// page. Its presence is what lets the hooks run under the per-VMA lock: they never needed
/// `mmap_lock` — every PTE they install is serialised by the space's mutex and the PTE lock,
/// the VMA cannot go away under its read lock, and snapshots and restores reach the PTEs
/// through the file's rmap (`i_mmap` lock), never through the mm.
unsafe extern "C" fn cow_map_pages(
    _vmf: *mut bindings::vm_fault,
    _start: usize,
    _end: usize,
) -> bindings::vm_fault_t {
    0
}

/// `vm_ops->fault`: no PTE at the address.
unsafe extern "C" fn cow_fault(vmf: *mut bindings::vm_fault) -> bindings::vm_fault_t {
    // SAFETY: the core calls `fault` with a live vm_fault of one of our VMAs.
    unsafe {
        let write = (*vmf).flags & bindings::fault_flag_FAULT_FLAG_WRITE != 0;
        handle(vmf, write, None)
    }
}

/// `vm_ops->page_mkwrite`: a write to a page mapped read-only — the first-write hook.
unsafe extern "C" fn cow_page_mkwrite(vmf: *mut bindings::vm_fault) -> bindings::vm_fault_t {
    // SAFETY: the core calls `page_mkwrite` with a live vm_fault of one of our VMAs whose
    // `page` is the page the read-only PTE maps.
    unsafe { handle(vmf, true, Some((*vmf).page)) }
}
