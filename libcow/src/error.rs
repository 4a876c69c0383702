//! libcow's error type: every failure carries an errno (for the C ABI) and a sentence for people.

use std::fmt;

/// A libcow failure.
#[derive(Debug)]
pub enum Error {
    /// `/dev/cow` does not exist: the module is not loaded.
    ModuleNotLoaded,
    /// The module speaks another ABI version than this library.
    AbiMismatch {
        /// The module's `COW_ABI_VERSION`.
        module: u32,
        /// This library's `COW_ABI_VERSION`.
        library: u32,
    },
    /// The space holds no snapshot with this id.
    NoSnapshot {
        /// The id asked for.
        id: u64,
    },
    /// The retention window is full and its policy is to fail new snapshots.
    WindowFull {
        /// Snapshots held.
        held: u32,
        /// Most snapshots the window holds.
        max_snapshots: u32,
        /// Bytes of pre-images held.
        bytes_held: u64,
        /// Most bytes of pre-images the window holds.
        max_bytes: u64,
    },
    /// A system call failed.
    Os {
        /// What libcow was doing, for the message.
        op: &'static str,
        /// The `errno` it failed with.
        errno: i32,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds [`Error::Os`] from the calling thread's `errno`.
    pub fn last_os(op: &'static str) -> Self {
        Error::Os {
            op,
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        }
    }

    /// The positive errno that the C ABI returns negated.
    pub fn errno(&self) -> i32 {
        match self {
            Error::ModuleNotLoaded => libc::ENODEV,
            Error::AbiMismatch { .. } => libc::EPROTO,
            Error::NoSnapshot { .. } => libc::ENOENT,
            Error::WindowFull { .. } => libc::ENOMEM,
            Error::Os { errno, .. } => *errno,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ModuleNotLoaded => write!(
                f,
                "cow.ko is not loaded: run `scripts/guest -- …` (which loads it) or \
                 `insmod target/kmod/cow.ko`"
            ),
            Error::AbiMismatch { module, library } => write!(
                f,
                "cow.ko speaks ABI version {module} but this libcow speaks {library}: rebuild \
                 and reload the module from the same checkout (scripts/kmod)"
            ),
            Error::NoSnapshot { id } => write!(
                f,
                "no snapshot {id} (never taken, dropped, merged away by the retention window, \
                 or discarded by a restore to an older snapshot)"
            ),
            Error::WindowFull {
                held,
                max_snapshots,
                bytes_held,
                max_bytes,
            } => write!(
                f,
                "the snapshot window is full ({held} of at most {max_snapshots} snapshots, \
                 {:.1} of at most {:.1} MiB of pre-images) and its policy is to fail: drop a \
                 snapshot or raise the limits (cow_set_limits, COW_IOC_LIMITS)",
                *bytes_held as f64 / 1048576.0,
                *max_bytes as f64 / 1048576.0
            ),
            Error::Os { op, errno } => {
                write!(f, "{op}: {}", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

impl std::error::Error for Error {}
