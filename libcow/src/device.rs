//! [`Cow`]: an open handle on `/dev/cow`, the kernel module's device.

use crate::error::{Error, Result};
use crate::sys::ioctl_ptr;
use cow_abi::{CowVersion, COW_ABI_VERSION, COW_IOC_VERSION};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Where the module's misc device appears.
pub const COW_DEVICE_PATH: &str = "/dev/cow";

/// An open `/dev/cow` whose ABI version matches this library.
#[derive(Debug)]
pub struct Cow {
    fd: OwnedFd,
    version: CowVersion,
}

impl Cow {
    /// Opens `/dev/cow` and checks that the module speaks this library's ABI.
    ///
    /// Fails with [`Error::ModuleNotLoaded`] when the device does not exist and with
    /// [`Error::AbiMismatch`] when the module is from another ABI version.
    pub fn open() -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(COW_DEVICE_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
                    Error::ModuleNotLoaded
                }
                errno => Error::Os {
                    op: "open /dev/cow",
                    errno: errno.unwrap_or(libc::EIO),
                },
            })?;
        Self::from_fd(file.into())
    }

    /// Adopts an already open `/dev/cow` descriptor (for example one taken from another process
    /// with `pidfd_getfd`) after checking its ABI version.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let version = query_version(fd.as_fd())?;
        if version.abi_version != COW_ABI_VERSION {
            return Err(Error::AbiMismatch {
                module: version.abi_version,
                library: COW_ABI_VERSION,
            });
        }
        Ok(Cow { fd, version })
    }

    /// The module's ABI version (equal to [`COW_ABI_VERSION`] once opened).
    pub fn abi_version(&self) -> u32 {
        self.version.abi_version
    }

    /// The page size the module snapshots at.
    pub fn page_size(&self) -> u32 {
        self.version.page_size
    }

    /// The module's feature bits (`cow_abi::features`).
    pub fn features(&self) -> u64 {
        self.version.features
    }
}

impl AsFd for Cow {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Asks the module behind `fd` for its version with `COW_IOC_VERSION`.
pub fn query_version(fd: BorrowedFd<'_>) -> Result<CowVersion> {
    let mut v = CowVersion {
        size: std::mem::size_of::<CowVersion>() as u32,
        ..Default::default()
    };
    ioctl_ptr(fd, COW_IOC_VERSION, &mut v, "COW_IOC_VERSION")?;
    Ok(v)
}
