// SPDX-License-Identifier: GPL-2.0
//! The `/dev/cow` ioctl ABI: command numbers and argument structs.
//!
//! This one file is compiled into both the kernel module (`kmod/cow.rs` includes it with
//! `#[path]`) and userland (the `cow-abi` crate). It uses nothing but `core` types so it builds in
//! both worlds. Rules that keep it stable:
//!
//! - A command is identified by its type (magic) and number. The size bits of the ioctl number
//!   carry the size of the *first* version of the argument struct, for tools like strace, but the
//!   module dispatches on type and number only.
//! - Every argument struct starts with `size: u32`, set by the caller to `size_of` its own
//!   version of the struct. The module accepts any size from the first version's size up to a
//!   page: it reads what it knows, requires unknown trailing input bytes to be zero (`EINVAL`
//!   otherwise) and zero-fills output bytes it does not know. Structs only ever grow at the end.
//! - [`COW_ABI_VERSION`] changes only on an incompatible change; libcow refuses a module whose
//!   version differs.
//! - Unknown commands fail with `ENOTTY`; bad sizes, flags or offsets with `EINVAL`; unknown
//!   snapshot ids with `ENOENT`.

/// Incompatible-change counter of this ABI. libcow and the module must agree on it.
pub const COW_ABI_VERSION: u32 = 1;

/// ioctl type ("magic") of every `/dev/cow` command. 0xC7 is unassigned in the kernel's
/// `Documentation/userspace-api/ioctl/ioctl-number.rst`.
pub const COW_IOC_MAGIC: u32 = 0xC7;

/// Largest argument struct the module accepts; bigger `size` fields are garbage.
pub const COW_MAX_ARG_SIZE: u32 = 4096;

// The generic Linux `_IOC` encoding (asm-generic/ioctl.h, used by x86 and arm64).
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
/// `_IOC_WRITE`: userland writes the argument.
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: userland reads the argument.
pub const IOC_READ: u32 = 2;

/// Encodes an ioctl number exactly like the kernel's `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32 & 0x3fff) << IOC_SIZESHIFT)
}

/// The type (magic) byte of an ioctl number, like `_IOC_TYPE`.
pub const fn ioc_type(cmd: u32) -> u32 {
    (cmd >> IOC_TYPESHIFT) & 0xff
}

/// The command number byte of an ioctl number, like `_IOC_NR`.
pub const fn ioc_nr(cmd: u32) -> u32 {
    (cmd >> IOC_NRSHIFT) & 0xff
}

/// `_IOWR(COW_IOC_MAGIC, nr, T)`.
const fn cow_iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, COW_IOC_MAGIC, nr, size)
}

/// Command numbers (`_IOC_NR`). Numbers start at 0x10: the VFS swallows some small numbers
/// (`FIBMAP` = 1, `FIGETBSZ` = 2) before a driver sees them.
pub mod nr {
    /// [`super::COW_IOC_VERSION`].
    pub const VERSION: u32 = 0x10;
    /// [`super::COW_IOC_SNAPSHOT`].
    pub const SNAPSHOT: u32 = 0x11;
    /// [`super::COW_IOC_RESTORE`].
    pub const RESTORE: u32 = 0x12;
    /// [`super::COW_IOC_DROP`].
    pub const DROP: u32 = 0x13;
    /// [`super::COW_IOC_LIST`].
    pub const LIST: u32 = 0x14;
    /// [`super::COW_IOC_STATS`].
    pub const STATS: u32 = 0x15;
    /// [`super::COW_IOC_READ`].
    pub const READ: u32 = 0x16;
    /// [`super::COW_IOC_DIRTY`].
    pub const DIRTY: u32 = 0x17;
    /// [`super::COW_IOC_LIMITS`].
    pub const LIMITS: u32 = 0x18;
    /// [`super::COW_IOC_HINT`].
    pub const HINT: u32 = 0x19;
    /// [`super::COW_IOC_DISCARD`].
    pub const DISCARD: u32 = 0x1A;
}

/// Feature bits reported in [`CowVersion::features`].
pub mod features {
    /// Snapshot, restore, drop, list, stats, read, dirty and limits are implemented.
    pub const SNAPSHOTS: u64 = 1 << 0;
    /// Speculative pre-copy: `COW_IOC_HINT` and [`super::COW_SNAPSHOT_QUIESCED`].
    pub const PRECOPY: u64 = 1 << 1;
    /// `COW_IOC_DISCARD`: pages of a range read as zero again (`MADV_DONTNEED`, `munmap`).
    pub const DISCARD: u64 = 1 << 2;
    /// [`super::COW_RESTORE_QUIESCED`] and [`super::COW_RESTORE_IN_PLACE_IF_ALONE`]: restores
    /// that copy pages back in place.
    pub const RESTORE_IN_PLACE: u64 = 1 << 3;
    /// [`super::COW_SNAPSHOT_QUIESCED_IF_ALONE`].
    pub const SNAPSHOT_IF_ALONE: u64 = 1 << 4;
}

/// [`CowId::flags`] of `COW_IOC_SNAPSHOT`: the caller guarantees that nothing writes the
/// space during the call (the process is single-threaded, or its other threads are stopped).
/// Only then are hinted pages pre-copied and left writable: with concurrent writers that would
/// break the snapshot's atomicity, so without the flag hints are ignored.
pub const COW_SNAPSHOT_QUIESCED: u32 = 1;

/// [`CowId::flags`] of `COW_IOC_SNAPSHOT`: quiesced (as [`COW_SNAPSHOT_QUIESCED`]) if the module
/// finds the calling process alone (as for [`COW_RESTORE_IN_PLACE_IF_ALONE`]), else an ordinary
/// snapshot that ignores the hint. On return `flags` is [`COW_SNAPSHOT_QUIESCED`] if the
/// snapshot was taken quiesced, else zero. Saves a single-threaded caller (a fuzzer's loop) from
/// stopping threads it does not have.
pub const COW_SNAPSHOT_QUIESCED_IF_ALONE: u32 = 2;

/// [`CowId::flags`] of `COW_IOC_RESTORE`: the caller guarantees that nothing reads or writes
/// the space during the call (its other threads are stopped and no other process maps it).
/// The module then copies each restored page's image back into the page in place and keeps
/// the image as the snapshot's pre-image: PTEs stay (no rmap walk, no TLB flush, no refault
/// afterwards) and a restored page written again does not fault. Without the flag, pages are
/// swapped back and their PTEs dropped, which is atomic against concurrent writers.
pub const COW_RESTORE_QUIESCED: u32 = 1;

/// [`CowId::flags`] of `COW_IOC_RESTORE`: restore in place (as [`COW_RESTORE_QUIESCED`]) if the
/// module finds the calling process alone — one thread, and nothing else holding its address
/// space (no `/proc` reader, debugger access or vfork child) — else as without flags. Saves a
/// single-threaded caller from finding that out with a system call of its own.
pub const COW_RESTORE_IN_PLACE_IF_ALONE: u32 = 2;

/// [`CowDirty::flags`]: only the pages written in the epoch right after snapshot `id` (until
/// the next snapshot), rather than everything since `id`.
pub const COW_DIRTY_EPOCH: u32 = 1;

/// Regions of a space live at mmap offsets below `2^COW_SPACE_PAGES_SHIFT` pages (16 TiB);
/// the module gives each space its own range of the device's page offsets.
pub const COW_SPACE_PAGES_SHIFT: u32 = 32;

/// Argument of [`COW_IOC_VERSION`]: the module's ABI version and capabilities.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowVersion {
    /// In: `size_of::<CowVersion>()` as the caller knows it.
    pub size: u32,
    /// Out: the module's [`COW_ABI_VERSION`].
    pub abi_version: u32,
    /// Out: the page size the module snapshots at, in bytes.
    pub page_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Out: bit set of [`features`].
    pub features: u64,
}

/// Argument of [`COW_IOC_SNAPSHOT`], [`COW_IOC_RESTORE`] and [`COW_IOC_DROP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowId {
    /// In: `size_of::<CowId>()`.
    pub size: u32,
    /// In: [`COW_SNAPSHOT_QUIESCED`] or [`COW_SNAPSHOT_QUIESCED_IF_ALONE`] (SNAPSHOT; out:
    /// whether it was quiesced), [`COW_RESTORE_QUIESCED`] or [`COW_RESTORE_IN_PLACE_IF_ALONE`]
    /// (RESTORE), or zero.
    pub flags: u32,
    /// SNAPSHOT: out, the new snapshot's id. RESTORE, DROP: in, the snapshot's id.
    pub id: u64,
}

/// One entry of [`COW_IOC_LIST`]'s output array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowSnapshotInfo {
    /// The snapshot's id.
    pub id: u64,
    /// Pre-images held for it: pages first written in the epoch that followed it.
    pub saved_pages: u64,
    /// Bytes of page memory those pre-images take.
    pub bytes_held: u64,
    /// `CLOCK_MONOTONIC` time it was taken, in nanoseconds.
    pub taken_ns: u64,
}

/// Argument of [`COW_IOC_LIST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowList {
    /// In: `size_of::<CowList>()`.
    pub size: u32,
    /// In: capacity of `entries`, in entries.
    pub capacity: u32,
    /// Out: how many snapshots the space holds (may exceed `capacity`: call again).
    pub count: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// In: user address of a `CowSnapshotInfo[capacity]` array, oldest first.
    pub entries: u64,
}

/// Argument of [`COW_IOC_STATS`]: counters of one space since it was opened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowStats {
    /// In: `size_of::<CowStats>()`.
    pub size: u32,
    /// Out: snapshots held now.
    pub snapshots: u32,
    /// Pages of covered memory present now.
    pub pages_present: u64,
    /// First-write faults (a pre-image saved, or a page created, in the write-fault path).
    pub first_write_faults: u64,
    /// Faults that only mapped a page (read, or a write to an already-saved page).
    pub other_faults: u64,
    /// Pre-images saved (page copies made at first write).
    pub pages_saved: u64,
    /// Bytes of pre-images held now.
    pub bytes_held: u64,
    /// Snapshots taken since open.
    pub snapshots_taken: u64,
    /// Restores performed since open.
    pub restores: u64,
    /// Pages swapped back by restores.
    pub pages_restored: u64,
    /// Snapshots merged away by the retention window.
    pub evicted: u64,
    /// Nanoseconds spent in first-write faults.
    pub fault_ns: u64,
    /// Nanoseconds spent taking snapshots.
    pub snapshot_ns: u64,
    /// Nanoseconds spent restoring.
    pub restore_ns: u64,
    /// Pages copied eagerly at snapshots because they were hinted (and left writable).
    pub precopied_pages: u64,
    /// Of those, pages that were then written before the next snapshot (useful copies).
    pub precopy_useful: u64,
    /// Nanoseconds spent pre-copying and checking pre-copies at snapshots.
    pub precopy_ns: u64,
    /// Pages saved and made writable ahead of a sequential writer at its first writes
    /// (fault-around; counted in `pages_saved` too).
    pub around_pages: u64,
    /// Of those, pages that were then written before the next snapshot.
    pub around_useful: u64,
    /// Pages the module holds now for all spaces of all processes (current pages and
    /// pre-images): what it costs the system, and zero once every space is gone.
    pub module_pages: u64,
}

/// Argument of [`COW_IOC_READ`]: bytes of covered memory as they were at a snapshot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowRead {
    /// In: `size_of::<CowRead>()`.
    pub size: u32,
    /// In: zero.
    pub flags: u32,
    /// In: snapshot id.
    pub id: u64,
    /// In: byte offset in the space (the mmap offset of a region plus the offset within it).
    pub offset: u64,
    /// In: number of bytes (at most 64 MiB per call).
    pub len: u64,
    /// In: user address of a `len`-byte buffer.
    pub buf: u64,
}

/// Argument of [`COW_IOC_DIRTY`]: pages written since a snapshot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowDirty {
    /// In: `size_of::<CowDirty>()`.
    pub size: u32,
    /// In: zero.
    pub flags: u32,
    /// In: snapshot id.
    pub id: u64,
    /// In: capacity of `pages`, in entries.
    pub capacity: u64,
    /// Out: number of pages written since `id` (may exceed `capacity`: call again).
    pub count: u64,
    /// In: user address of a `u64[capacity]` array of page indices (offset / page size), sorted.
    pub pages: u64,
}

/// Argument of [`COW_IOC_HINT`]: the page indices (space offset / page size) to pre-copy at the
/// following quiesced snapshots, replacing any earlier hint. An empty list switches pre-copy off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowHint {
    /// In: `size_of::<CowHint>()`.
    pub size: u32,
    /// In: zero.
    pub flags: u32,
    /// In: number of page indices (at most [`COW_MAX_HINT_PAGES`]).
    pub count: u64,
    /// In: user address of a `u64[count]` array of page indices.
    pub pages: u64,
}

/// Argument of [`COW_IOC_DISCARD`]: a range of the space whose pages are thrown away, as
/// `MADV_DONTNEED` does to private anonymous memory: afterwards they read as zero. Their contents
/// are not lost for the snapshots: the newest snapshot keeps each page it has no image of yet
/// (the page itself moves there, nothing is copied), so a restore brings them back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowRange {
    /// In: `size_of::<CowRange>()`.
    pub size: u32,
    /// In: zero.
    pub flags: u32,
    /// In: byte offset in the space, page-aligned.
    pub offset: u64,
    /// In: length in bytes, page-aligned.
    pub len: u64,
}

/// Most pages one hint may name.
pub const COW_MAX_HINT_PAGES: u64 = 1 << 20;

/// [`CowLimits::policy`]: when the window is full, merge the oldest snapshot away.
pub const COW_POLICY_MERGE_OLDEST: u32 = 0;
/// [`CowLimits::policy`]: when the window is full, fail `COW_IOC_SNAPSHOT` with `ENOMEM`.
pub const COW_POLICY_FAIL: u32 = 1;
/// [`CowLimits::flags`]: set the limits (otherwise only read them).
pub const COW_LIMITS_SET: u32 = 1;

/// Argument of [`COW_IOC_LIMITS`]: the retention window of a space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowLimits {
    /// In: `size_of::<CowLimits>()`.
    pub size: u32,
    /// In: [`COW_LIMITS_SET`] to set, 0 to read.
    pub flags: u32,
    /// Most snapshots held at once (≥ 1).
    pub max_snapshots: u32,
    /// [`COW_POLICY_MERGE_OLDEST`] or [`COW_POLICY_FAIL`].
    pub policy: u32,
    /// Most bytes of pre-images held. Past it the oldest snapshot is always merged away (a
    /// write fault cannot fail politely), whatever the policy.
    pub max_bytes: u64,
}

/// `_IOWR(COW_IOC_MAGIC, nr, T)` for a struct type.
const fn iowr_of<T>(nr: u32) -> u32 {
    cow_iowr(nr, core::mem::size_of::<T>())
}

/// Size of the first version of [`CowVersion`]; the smallest `size` the module accepts.
pub const COW_VERSION_SIZE_V1: u32 = 24;

/// Reads the module's ABI version and features. Argument: [`CowVersion`].
pub const COW_IOC_VERSION: u32 = cow_iowr(nr::VERSION, COW_VERSION_SIZE_V1 as usize);
/// Takes a snapshot; returns its id in [`CowId::id`].
pub const COW_IOC_SNAPSHOT: u32 = iowr_of::<CowId>(nr::SNAPSHOT);
/// Restores the space to snapshot [`CowId::id`]; newer snapshots are discarded.
pub const COW_IOC_RESTORE: u32 = iowr_of::<CowId>(nr::RESTORE);
/// Drops snapshot [`CowId::id`] (its pre-images merge into the next older one).
pub const COW_IOC_DROP: u32 = iowr_of::<CowId>(nr::DROP);
/// Lists the snapshots held. Argument: [`CowList`].
pub const COW_IOC_LIST: u32 = iowr_of::<CowList>(nr::LIST);
/// Reads the space's counters. Argument: [`CowStats`].
pub const COW_IOC_STATS: u32 = iowr_of::<CowStats>(nr::STATS);
/// Reads memory as of a snapshot. Argument: [`CowRead`].
pub const COW_IOC_READ: u32 = iowr_of::<CowRead>(nr::READ);
/// Lists pages written since a snapshot. Argument: [`CowDirty`].
pub const COW_IOC_DIRTY: u32 = iowr_of::<CowDirty>(nr::DIRTY);
/// Reads or sets the retention window. Argument: [`CowLimits`].
pub const COW_IOC_LIMITS: u32 = iowr_of::<CowLimits>(nr::LIMITS);
/// Sets the pre-copy hint. Argument: [`CowHint`].
pub const COW_IOC_HINT: u32 = iowr_of::<CowHint>(nr::HINT);
/// Throws away the pages of a range (they read as zero). Argument: [`CowRange`].
pub const COW_IOC_DISCARD: u32 = iowr_of::<CowRange>(nr::DISCARD);

// The struct layouts are the ABI: fail the build, in the kernel and in userland, if one drifts.
const _: () = assert!(core::mem::size_of::<CowVersion>() == COW_VERSION_SIZE_V1 as usize);
const _: () = assert!(core::mem::size_of::<CowId>() == 16);
const _: () = assert!(core::mem::size_of::<CowSnapshotInfo>() == 32);
const _: () = assert!(core::mem::size_of::<CowList>() == 24);
const _: () = assert!(core::mem::size_of::<CowStats>() == 152);
const _: () = assert!(core::mem::size_of::<CowHint>() == 24);
const _: () = assert!(core::mem::size_of::<CowRead>() == 40);
const _: () = assert!(core::mem::size_of::<CowDirty>() == 40);
const _: () = assert!(core::mem::size_of::<CowLimits>() == 24);
const _: () = assert!(core::mem::size_of::<CowRange>() == 24);
