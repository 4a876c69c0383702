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
}

/// Feature bits reported in [`CowVersion::features`]; none are defined by ABI version 1 yet.
pub mod features {}

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

/// Size of the first version of [`CowVersion`]; the smallest `size` the module accepts.
pub const COW_VERSION_SIZE_V1: u32 = 24;

/// Reads the module's ABI version and features. Argument: [`CowVersion`].
pub const COW_IOC_VERSION: u32 = cow_iowr(nr::VERSION, COW_VERSION_SIZE_V1 as usize);

// The struct layout is the ABI: fail the build, in the kernel and in userland, if it drifts.
const _: () = assert!(core::mem::size_of::<CowVersion>() == COW_VERSION_SIZE_V1 as usize);
