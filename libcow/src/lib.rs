//! libcow — copy-on-write memory snapshots for Linux.
//!
//! The fast path is the `cow.ko` kernel module (`/dev/cow`): memory it owns is snapshotted by the
//! kernel itself, saving each page's old contents at its first write after a snapshot.
//!
//! - [`Cow`] is a handle on `/dev/cow` (one per process space).
//! - [`probe`] finds out, by trying, which mainline kernel mechanisms this kernel offers.
//! - [`ffi`] is the C ABI declared in `include/cow.h`.

pub mod backend;
pub mod book;
pub mod checkpoint;
pub mod control;
pub mod device;
pub mod error;
pub mod fds;
pub mod ffi;
pub mod idle;
pub mod maps;
pub mod probe;
pub mod recovery;
pub mod report;
pub mod segv_mask;
pub mod speculate;
mod sys;
/// A number in decimal into a stack buffer, without allocating.
pub use sys::format_decimal;
/// CLOCK_MONOTONIC in nanoseconds (the clock cow.ko's snapshot times use).
pub use sys::monotonic_ns;
pub use sys::read_process;
pub mod world;

pub use cow_abi as abi;
pub use device::{Cow, Region, COW_DEVICE_PATH};
pub use error::{Error, Result};
