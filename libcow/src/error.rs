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
            Error::Os { op, errno } => {
                write!(f, "{op}: {}", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

impl std::error::Error for Error {}
