// SPDX-License-Identifier: GPL-2.0
//! cow.ko — copy-on-write memory snapshots as a kernel primitive.
//!
//! Registers the misc device `/dev/cow`. Each open file is one *space*: the memory a process
//! maps from it (shared mappings at offsets it chooses) is owned by the module, which saves each
//! page's contents at its first write after a snapshot. See `space.rs` for the scheme, `vm.rs`
//! for the fault hooks and `abi/src/cow_abi.rs` (shared verbatim with libcow) for the ioctls.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    mm::virt::VmaNew,
    new_mutex,
    page::PAGE_SIZE,
    prelude::*,
    sync::Mutex,
};

// The ABI is shared verbatim with userland, so its items are `pub` and some (the encoders of
// command numbers) are only used on the userland side.
#[allow(unreachable_pub, dead_code)]
#[path = "../abi/src/cow_abi.rs"]
mod abi;
mod held_page;
mod mm;
mod space;
mod uarg;
mod vm;

use space::{gfp_user_sized, Limits, SpaceState, GFP};

module! {
    type: CowModule,
    name: "cow",
    authors: ["Delorean developers"],
    description: "Copy-on-write memory snapshots (/dev/cow)",
    license: "GPL",
}

#[pin_data]
struct CowModule {
    #[pin]
    _miscdev: MiscDeviceRegistration<Space>,
}

impl kernel::InPlaceModule for CowModule {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        pr_info!("/dev/cow ready, ABI version {}\n", abi::COW_ABI_VERSION);
        try_pin_init!(Self {
            _miscdev <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"cow" }),
        })
    }
}

/// Space ids: one bit per live space; id `n` owns page offsets `[(n+1) << 32, (n+2) << 32)`.
const MAX_SPACES: usize = 65536;
static SPACE_IDS: [AtomicU64; MAX_SPACES / 64] = [const { AtomicU64::new(0) }; MAX_SPACES / 64];

fn alloc_space_id() -> Result<usize> {
    for (w, word) in SPACE_IDS.iter().enumerate() {
        let mut cur = word.load(Ordering::Relaxed);
        while cur != u64::MAX {
            let bit = (!cur).trailing_zeros() as u64;
            let prev = word.fetch_or(1 << bit, Ordering::AcqRel);
            if prev & (1 << bit) == 0 {
                return Ok(w * 64 + bit as usize);
            }
            cur = prev | (1 << bit);
        }
    }
    Err(ENOSPC)
}

fn free_space_id(id: usize) {
    SPACE_IDS[id / 64].fetch_and(!(1u64 << (id % 64)), Ordering::AcqRel);
}

/// The state behind one open `/dev/cow`: the covered memory of one process.
#[pin_data(PinnedDrop)]
pub(crate) struct Space {
    id: usize,
    /// First page offset of this space in the device mapping.
    pub(crate) base: usize,
    /// The file's `f_mapping`: where the space's VMAs are linked (for rmap walks and zaps).
    mapping: *mut kernel::bindings::address_space,
    #[pin]
    pub(crate) state: Mutex<SpaceState>,
}

// SAFETY: `mapping` is only passed to kernel functions that lock the mapping themselves; it
// stays valid while the file (which owns the space) is open. Everything else is behind `state`.
unsafe impl Send for Space {}
// SAFETY: as above; shared access goes through the mutex.
unsafe impl Sync for Space {}

#[pinned_drop]
impl PinnedDrop for Space {
    fn drop(self: Pin<&mut Self>) {
        // The pages and snapshots are freed with `state`; no VMA can remain (each held the file).
        free_space_id(self.id);
    }
}

/// The module parameters as limits: (most snapshots, most bytes of pre-images).
fn module_caps() -> (u32, u64) {
    let (max_snapshots, max_held_mib) = mm::params();
    (max_snapshots.max(1), max_held_mib.saturating_mul(1 << 20))
}

/// Largest `COW_IOC_READ` length per call.
const MAX_READ: u64 = 64 << 20;

impl Space {
    fn snapshot(&self, quiesced: bool) -> Result<u64> {
        let mapping = self.mapping;
        let base = self.base;
        self.state.lock().snapshot(quiesced, |first, count, run| {
            mm::wrprotect_run(mapping, base, first, count, run);
        })
    }

    fn hint(&self, arg: &abi::CowHint) -> Result {
        if arg.flags != 0 || arg.count > abi::COW_MAX_HINT_PAGES {
            return Err(EINVAL);
        }
        // Copy the list in before taking the lock (it may live in covered memory). Its size is
        // the caller's choice: charged, and ENOMEM rather than an allocator warning.
        let n = arg.count as usize;
        let mut pages: KVVec<usize> = KVVec::with_capacity(n, gfp_user_sized())?;
        let mut reader = kernel::uaccess::UserSlice::new(
            kernel::uaccess::UserPtr::from_addr(arg.pages as usize),
            n * 8,
        )
        .reader();
        let limit = 1u64 << abi::COW_SPACE_PAGES_SHIFT;
        for i in 0..n {
            let idx: u64 = reader.read()?;
            if idx >= limit {
                return Err(EINVAL);
            }
            pages.push_within_capacity(idx as usize).map_err(|_| ENOMEM)?;
            if i % 4096 == 4095 {
                mm::cond_resched();
            }
        }
        mm::sort_indices(pages.as_mut_slice());
        self.state.lock().hint = pages;
        Ok(())
    }

    fn restore(&self, id: u64, in_place: bool) -> Result {
        let mapping = self.mapping;
        let base = self.base;
        self.state
            .lock()
            .restore(id, in_place, |first, count| mm::zap(mapping, base + first, count))
    }

    fn discard(&self, arg: &abi::CowRange) -> Result {
        let page = PAGE_SIZE as u64;
        let end = arg.offset.checked_add(arg.len).ok_or(EINVAL)?;
        if arg.flags != 0
            || arg.offset % page != 0
            || arg.len % page != 0
            || end > (1u64 << (abi::COW_SPACE_PAGES_SHIFT + kernel::bindings::PAGE_SHIFT))
        {
            return Err(EINVAL);
        }
        let mapping = self.mapping;
        let base = self.base;
        let (first, count) = ((arg.offset / page) as usize, (arg.len / page) as usize);
        self.state
            .lock()
            .discard(first, count, |first, count| mm::zap(mapping, base + first, count))
    }

    fn list(&self, arg: &abi::CowList) -> Result<u32> {
        let mut infos = KVVec::new();
        let count = {
            let state = self.state.lock();
            let n = state.snapshots.len().min(arg.capacity as usize);
            infos.reserve(n, gfp_user_sized())?;
            for s in state.snapshots.iter().take(n) {
                infos
                    .push_within_capacity(abi::CowSnapshotInfo {
                        id: s.id,
                        saved_pages: s.saved_pages(),
                        bytes_held: s.saved_pages() * PAGE_SIZE as u64,
                        taken_ns: s.taken_ns,
                    })
                    .map_err(|_| ENOMEM)?;
            }
            state.snapshots.len() as u32
        };
        // Copy out with the lock dropped: the buffer may itself be covered memory, whose faults
        // take the lock.
        for (i, info) in infos.iter().enumerate() {
            use kernel::transmute::AsBytes;
            uarg::write_bytes(
                arg.entries + (i * core::mem::size_of::<abi::CowSnapshotInfo>()) as u64,
                info.as_bytes(),
            )?;
        }
        Ok(count)
    }

    fn read(&self, arg: &abi::CowRead) -> Result {
        if arg.flags != 0 || arg.len > MAX_READ {
            return Err(EINVAL);
        }
        let end = arg.offset.checked_add(arg.len).ok_or(EINVAL)?;
        if end > (1u64 << (abi::COW_SPACE_PAGES_SHIFT + kernel::bindings::PAGE_SHIFT)) {
            return Err(EINVAL);
        }
        // An unknown id is ENOENT even for zero bytes.
        self.state.lock().position(arg.id)?;
        // Page by page through a bounce buffer: never touch user memory under the lock.
        let mut bounce = KVec::from_elem(0u8, PAGE_SIZE, GFP)?;
        let mut pos = arg.offset;
        while pos < end {
            let idx = (pos / PAGE_SIZE as u64) as usize;
            let in_page = (pos % PAGE_SIZE as u64) as usize;
            let n = core::cmp::min(PAGE_SIZE - in_page, (end - pos) as usize);
            {
                let state = self.state.lock();
                match state.image_at(arg.id, idx)? {
                    Some(p) => mm::copy_from_page(p, &mut bounce),
                    None => bounce.as_mut_slice().fill(0),
                }
            }
            uarg::write_bytes(arg.buf + (pos - arg.offset), &bounce[in_page..in_page + n])?;
            pos += n as u64;
            mm::cond_resched();
        }
        Ok(())
    }

    fn dirty(&self, arg: &mut abi::CowDirty) -> Result {
        if arg.flags & !abi::COW_DIRTY_EPOCH != 0 {
            return Err(EINVAL);
        }
        let epoch_only = arg.flags & abi::COW_DIRTY_EPOCH != 0;
        let pages = self.state.lock().dirty_since(arg.id, epoch_only)?;
        let n = core::cmp::min(pages.len() as u64, arg.capacity) as usize;
        // SAFETY: the first `n` elements of a `[u64]` viewed as bytes: initialised integers,
        // no padding, `n * 8` bytes inside the vector's allocation.
        let raw = unsafe { core::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), n * 8) };
        uarg::write_bytes(arg.pages, raw)?;
        arg.count = pages.len() as u64;
        Ok(())
    }

    fn limits(&self, arg: &mut abi::CowLimits) -> Result {
        let mut state = self.state.lock();
        if arg.flags & abi::COW_LIMITS_SET != 0 {
            if arg.flags & !abi::COW_LIMITS_SET != 0
                || arg.max_snapshots == 0
                || arg.policy > abi::COW_POLICY_FAIL
            {
                return Err(EINVAL);
            }
            // The module parameters are caps an administrator sets: anyone may lower a space's
            // limits, raising them above the caps needs CAP_SYS_RESOURCE (as RLIMITs do).
            let (cap_snapshots, cap_bytes) = module_caps();
            if (arg.max_snapshots > cap_snapshots || arg.max_bytes > cap_bytes)
                && !mm::capable_sys_resource()
            {
                return Err(EPERM);
            }
            state.limits = Limits {
                max_snapshots: arg.max_snapshots,
                policy: arg.policy,
                max_bytes: arg.max_bytes,
            };
        } else if arg.flags != 0 {
            return Err(EINVAL);
        }
        arg.max_snapshots = state.limits.max_snapshots;
        arg.policy = state.limits.policy;
        arg.max_bytes = state.limits.max_bytes;
        Ok(())
    }
}

#[vtable]
impl MiscDevice for Space {
    type Ptr = Pin<KBox<Self>>;

    fn open(file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<Pin<KBox<Self>>> {
        let id = alloc_space_id()?;
        let (max_snapshots, max_bytes) = module_caps();
        let limits = Limits {
            max_snapshots,
            policy: abi::COW_POLICY_MERGE_OLDEST,
            max_bytes,
        };
        // SAFETY: `file` is being opened; do_dentry_open set f_mapping before calling ->open.
        let mapping = unsafe { (*file.as_ptr()).f_mapping };
        let base = (id + 1) << abi::COW_SPACE_PAGES_SHIFT;
        let space = KBox::try_pin_init(
            try_pin_init!(Space {
                id,
                base,
                mapping,
                state <- new_mutex!(SpaceState::new(limits)),
            }),
            GFP,
        );
        if space.is_err() {
            free_space_id(id);
        }
        space
    }

    fn mmap(space: Pin<&Space>, _file: &File, vma: &VmaNew) -> Result {
        vm::mmap(&space, vma)
    }

    fn ioctl(space: Pin<&Space>, file: &File, cmd: u32, arg: usize) -> Result<isize> {
        // Dispatch on type and number only: the size bits are informational (see cow_abi.rs).
        if abi::ioc_type(cmd) != abi::COW_IOC_MAGIC {
            return Err(ENOTTY);
        }
        // Commands that change the space need a descriptor opened for writing, as write(2)
        // would; a read-only descriptor may still inspect it.
        let changes_state = matches!(
            abi::ioc_nr(cmd),
            abi::nr::SNAPSHOT | abi::nr::RESTORE | abi::nr::DROP | abi::nr::HINT | abi::nr::DISCARD
        );
        let writable = file.flags() & kernel::bindings::O_ACCMODE != kernel::bindings::O_RDONLY;
        if changes_state && !writable {
            return Err(EBADF);
        }
        match abi::ioc_nr(cmd) {
            abi::nr::VERSION => {
                let (mut v, out) =
                    uarg::read::<abi::CowVersion>(arg, abi::COW_VERSION_SIZE_V1)?;
                v.abi_version = abi::COW_ABI_VERSION;
                v.page_size = PAGE_SIZE as u32;
                v.reserved = 0;
                v.features = abi::features::SNAPSHOTS
                    | abi::features::PRECOPY
                    | abi::features::DISCARD
                    | abi::features::RESTORE_IN_PLACE
                    | abi::features::SNAPSHOT_IF_ALONE;
                out.write(&v)?;
            }
            abi::nr::SNAPSHOT => {
                let (mut a, out) = uarg::read::<abi::CowId>(arg, 16)?;
                if a.flags & !(abi::COW_SNAPSHOT_QUIESCED | abi::COW_SNAPSHOT_QUIESCED_IF_ALONE) != 0 {
                    return Err(EINVAL);
                }
                let quiesced = a.flags & abi::COW_SNAPSHOT_QUIESCED != 0
                    || (a.flags & abi::COW_SNAPSHOT_QUIESCED_IF_ALONE != 0 && mm::current_alone());
                a.id = space.snapshot(quiesced)?;
                a.flags = if quiesced { abi::COW_SNAPSHOT_QUIESCED } else { 0 };
                out.write(&a)?;
            }
            abi::nr::RESTORE | abi::nr::DROP => {
                let (a, _) = uarg::read::<abi::CowId>(arg, 16)?;
                let restore = abi::ioc_nr(cmd) == abi::nr::RESTORE;
                let allowed = if restore {
                    abi::COW_RESTORE_QUIESCED | abi::COW_RESTORE_IN_PLACE_IF_ALONE
                } else {
                    0
                };
                if a.flags & !allowed != 0 {
                    return Err(EINVAL);
                }
                if restore {
                    let in_place = a.flags & abi::COW_RESTORE_QUIESCED != 0
                        || (a.flags & abi::COW_RESTORE_IN_PLACE_IF_ALONE != 0 && mm::current_alone());
                    space.restore(a.id, in_place)?;
                } else {
                    space.state.lock().drop_snapshot(a.id)?;
                }
            }
            abi::nr::LIST => {
                let (mut a, out) = uarg::read::<abi::CowList>(arg, 24)?;
                if a.reserved != 0 {
                    return Err(EINVAL);
                }
                a.count = space.list(&a)?;
                out.write(&a)?;
            }
            abi::nr::STATS => {
                let (_, out) = uarg::read::<abi::CowStats>(arg, 8)?;
                let mut s = {
                    let state = space.state.lock();
                    let mut s = state.stats;
                    s.snapshots = state.snapshots.len() as u32;
                    s
                };
                s.module_pages = held_page::module_pages();
                s.size = core::mem::size_of::<abi::CowStats>() as u32;
                out.write(&s)?;
            }
            abi::nr::READ => {
                let (a, _) = uarg::read::<abi::CowRead>(arg, 40)?;
                space.read(&a)?;
            }
            abi::nr::DIRTY => {
                let (mut a, out) = uarg::read::<abi::CowDirty>(arg, 40)?;
                space.dirty(&mut a)?;
                out.write(&a)?;
            }
            abi::nr::HINT => {
                let (a, _) = uarg::read::<abi::CowHint>(arg, 24)?;
                space.hint(&a)?;
            }
            abi::nr::DISCARD => {
                let (a, _) = uarg::read::<abi::CowRange>(arg, 24)?;
                space.discard(&a)?;
            }
            abi::nr::LIMITS => {
                let (mut a, out) = uarg::read::<abi::CowLimits>(arg, 24)?;
                if a.flags & abi::COW_LIMITS_SET != 0 && !writable {
                    return Err(EBADF);
                }
                space.limits(&mut a)?;
                out.write(&a)?;
            }
            _ => return Err(ENOTTY),
        }
        Ok(0)
    }
}
