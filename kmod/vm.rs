// SPDX-License-Identifier: GPL-2.0
//! The VMA side of a space: `mmap` setup and the two fault hooks.
//!
//! `fault` maps a page read-only (or writable for a write fault, after the first-write rule);
//! `page_mkwrite` is the first-write hook for pages mapped read-only. Both run the rule and
//! install the PTE with the space's mutex held, so snapshots and restores never race a PTE.

use crate::mm;
use crate::space::FaultPage;
use crate::Space;
use kernel::{bindings, mm::virt::VmaNew, prelude::*};

/// The space's vm operations. `page_mkwrite` being set also makes the core map shared pages
/// read-only until written (`vma_wants_writenotify`), which is what arms the first-write hook.
static COW_VM_OPS: VmOps = VmOps({
    let mut ops: bindings::vm_operations_struct = pin_init::zeroed();
    ops.fault = Some(cow_fault);
    ops.page_mkwrite = Some(cow_page_mkwrite);
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
    let (space, pgoff) = unsafe {
        let vma = (*vmf).__bindgen_anon_1.vma;
        (&*((*vma).vm_private_data as *const Space), (*vmf).__bindgen_anon_1.pgoff as usize)
    };
    // Defence in depth: the offset was checked in `mmap`, and VM_DONTEXPAND keeps it so, but a
    // VMA the driver never saw must get SIGBUS, never an underflow.
    let limit = 1usize << crate::abi::COW_SPACE_PAGES_SHIFT;
    let Some(idx) = pgoff.checked_sub(space.base).filter(|&i| i < limit) else {
        return bindings::vm_fault_reason_VM_FAULT_SIGBUS;
    };
    let mut state = space.state.lock();
    match state.fault(idx, write, expected) {
        // SAFETY: live vm_fault (caller); the page is owned by the space, which keeps it until
        // it zaps this PTE under the same mutex we hold now.
        Ok(FaultPage::Map(page)) => unsafe { mm::insert(vmf, page, write) },
        Ok(FaultPage::Stale) => bindings::vm_fault_reason_VM_FAULT_NOPAGE,
        Err(e) if e == ENOMEM => bindings::vm_fault_reason_VM_FAULT_OOM,
        Err(_) => bindings::vm_fault_reason_VM_FAULT_SIGBUS,
    }
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
