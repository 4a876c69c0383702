//! The `/dev/cow` ioctl ABI as a userland crate.
//!
//! The definitions live in [`cow_abi.rs`](cow_abi.rs), a file with no dependencies beyond `core`
//! that the kernel module includes verbatim (`kmod/cow.rs` uses `#[path]`), so the kernel and
//! libcow are compiled from the very same text and cannot disagree.
#![no_std]

#[path = "cow_abi.rs"]
mod cow_abi;
pub use cow_abi::*;
