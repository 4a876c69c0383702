// SPDX-License-Identifier: GPL-2.0
//! Copying size-prefixed ioctl argument structs between userland and the module.
//!
//! Every `/dev/cow` argument struct starts with `size: u32` (see `cow_abi.rs`). A caller built
//! against an older, smaller struct or a newer, larger one both work: the module reads the
//! common prefix, insists that bytes it does not understand are zero, and writes back only as
//! many bytes as the caller's struct holds.

use crate::abi;
use kernel::{
    prelude::*,
    transmute::{AsBytes, FromBytes},
    uaccess::{UserPtr, UserSlice, UserSliceWriter},
};

/// Marks ABI structs as plain bytes.
macro_rules! plain_bytes {
    ($($t:ty),*) => {$(
        // SAFETY: every ABI struct is `#[repr(C)]`, made only of integers, and has no padding
        // (cow_abi.rs asserts each size equals the sum of its fields), so every byte pattern is
        // a valid value and every byte of a value is initialised.
        unsafe impl FromBytes for $t {}
        // SAFETY: as above: integers only, no padding bytes.
        unsafe impl AsBytes for $t {}
    )*};
}
plain_bytes!(
    abi::CowVersion,
    abi::CowId,
    abi::CowSnapshotInfo,
    abi::CowList,
    abi::CowStats,
    abi::CowRead,
    abi::CowDirty,
    abi::CowLimits,
    abi::CowHint,
    abi::CowRange
);

/// Copies `bytes` to user address `addr`.
pub(crate) fn write_bytes(addr: u64, bytes: &[u8]) -> Result {
    let mut w = UserSlice::new(UserPtr::from_addr(addr as usize), bytes.len()).writer();
    w.write_slice(bytes)
}

/// Where to write an argument struct back, limited to the caller's size.
pub(crate) struct ArgOut {
    writer: UserSliceWriter,
    size: usize,
}

impl ArgOut {
    /// Writes `value` back to the caller, truncated to the caller's struct size.
    pub(crate) fn write<T: AsBytes>(mut self, value: &T) -> Result {
        let bytes = value.as_bytes();
        let n = self.size.min(bytes.len());
        self.writer.write_slice(&bytes[..n])?;
        Ok(())
    }
}

/// Reads a size-prefixed argument struct `T` from user address `arg`.
///
/// `min_size` is the size of the struct's first ABI version: smaller callers are garbage
/// (`EINVAL`), as are sizes beyond [`abi::COW_MAX_ARG_SIZE`] and non-zero bytes past `T`.
pub(crate) fn read<T: FromBytes + AsBytes + Default>(arg: usize, min_size: u32) -> Result<(T, ArgOut)> {
    let ptr = UserPtr::from_addr(arg);
    let mut size_reader = UserSlice::new(ptr, core::mem::size_of::<u32>()).reader();
    let size: u32 = size_reader.read()?;
    if size < min_size || size > abi::COW_MAX_ARG_SIZE {
        return Err(EINVAL);
    }
    let size = size as usize;
    let (mut reader, writer) = UserSlice::new(ptr, size).reader_writer();

    let mut value = T::default();
    let known = size.min(core::mem::size_of::<T>());
    // Handlers must not trust `value.size`: userland may change it after the first read.
    reader.read_slice(&mut value.as_bytes_mut()[..known])?;

    // A newer caller's extra fields must be zero: we cannot honour what we do not know.
    let mut rest = size - known;
    let mut chunk = [0u8; 64];
    while rest > 0 {
        let n = rest.min(chunk.len());
        reader.read_slice(&mut chunk[..n])?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Err(EINVAL);
        }
        rest -= n;
    }
    Ok((value, ArgOut { writer, size }))
}
