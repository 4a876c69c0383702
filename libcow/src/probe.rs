//! Probes of the running kernel's snapshot-relevant features, by trying them (never by version).
//!
//! Each probe performs the real system call on a scratch mapping of this process and reports
//! what happened, so `cowctl status` tells the truth about the machine it runs on.

use serde::Serialize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Outcome of one probe.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Probe {
    /// Whether the feature works here.
    pub available: bool,
    /// How that was established, or why it is not there.
    pub detail: String,
}

impl Probe {
    fn yes(detail: impl Into<String>) -> Self {
        Probe {
            available: true,
            detail: detail.into(),
        }
    }
    fn no(detail: impl Into<String>) -> Self {
        Probe {
            available: false,
            detail: detail.into(),
        }
    }
}

/// The kernel features the mainline backends build on.
#[derive(Debug, Clone, Serialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub kernel_release: String,
    /// userfaultfd with `UFFD_FEATURE_WP_ASYNC` (Linux ≥ 6.7).
    pub uffd_wp_async: Probe,
    /// The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux ≥ 6.7).
    pub pagemap_scan: Probe,
    /// Soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`).
    pub soft_dirty: Probe,
}

/// Runs every probe.
pub fn kernel_features() -> KernelFeatures {
    KernelFeatures {
        kernel_release: kernel_release(),
        uffd_wp_async: probe_uffd_wp_async(),
        pagemap_scan: probe_pagemap_scan(),
        soft_dirty: probe_soft_dirty(),
    }
}

fn kernel_release() -> String {
    with_release(|r| String::from_utf8_lossy(r).into_owned())
}

/// The running kernel's `(major, minor)` version, from `uname` (no allocation); `(0, 0)` if
/// unreadable.
pub(crate) fn kernel_version() -> (u32, u32) {
    with_release(|release| {
        let mut numbers = release
            .split(|b| !b.is_ascii_digit())
            .map(|d| std::str::from_utf8(d).ok().and_then(|d| d.parse().ok()));
        (
            numbers.next().flatten().unwrap_or(0),
            numbers.next().flatten().unwrap_or(0),
        )
    })
}

/// Calls `f` with `uname`'s release string (`"unknown"` if uname fails).
fn with_release<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    // SAFETY: `utsname` is plain old data; uname fills it and NUL-terminates its fields.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return f(b"unknown");
        }
        f(std::ffi::CStr::from_ptr(u.release.as_ptr()).to_bytes())
    }
}

// userfaultfd uapi (linux/userfaultfd.h). Debian 12's headers predate WP_ASYNC, so spell it out.
/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: handle only user-mode faults (allowed to unprivileged users).
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// `UFFD_FEATURE_WP_UNPOPULATED`.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default, Debug)]
pub struct UffdioApi {
    /// In: `UFFD_API`.
    pub api: u64,
    /// In: requested features; out: supported ones.
    pub features: u64,
    /// Out: supported ioctls.
    pub ioctls: u64,
}

/// `UFFDIO_API` = `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u32 = cow_abi::ioc(
    cow_abi::IOC_READ | cow_abi::IOC_WRITE,
    0xAA,
    0x3F,
    std::mem::size_of::<UffdioApi>(),
);

fn userfaultfd() -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn probe_uffd_wp_async() -> Probe {
    let fd = match userfaultfd() {
        Ok(fd) => fd,
        Err(e) => return Probe::no(format!("userfaultfd(2) failed: {e}")),
    };
    // With features = 0 the kernel answers with every feature it supports.
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: `api` is a valid `uffdio_api` that UFFDIO_API reads and writes.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as libc::c_ulong, &mut api) };
    if rc != 0 {
        return Probe::no(format!(
            "UFFDIO_API failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if api.features & UFFD_FEATURE_WP_ASYNC != 0 {
        Probe::yes(format!("UFFDIO_API features = {:#x}", api.features))
    } else {
        Probe::no(format!(
            "UFFDIO_API features = {:#x} lack WP_ASYNC",
            api.features
        ))
    }
}

// PAGEMAP_SCAN uapi (linux/fs.h, Linux 6.7).
/// `PAGE_IS_WRITTEN` category.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT` category.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;

/// `struct page_region`, one result of `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct PageRegion {
    /// First address of the run.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Categories of the run.
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default, Debug)]
pub struct PmScanArg {
    /// `size_of::<PmScanArg>()`.
    pub size: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Start of the range.
    pub start: u64,
    /// End of the range.
    pub end: u64,
    /// Out: where the walk stopped.
    pub walk_end: u64,
    /// Output array of `PageRegion`.
    pub vec: u64,
    /// Its length.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all match.
    pub category_mask: u64,
    /// Categories of which one must match.
    pub category_anyof_mask: u64,
    /// Categories reported in results.
    pub return_mask: u64,
}

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u32 = cow_abi::ioc(
    cow_abi::IOC_READ | cow_abi::IOC_WRITE,
    b'f' as u32,
    16,
    std::mem::size_of::<PmScanArg>(),
);

/// A private anonymous scratch mapping, unmapped on drop.
struct Scratch {
    addr: *mut u8,
    len: usize,
}

impl Scratch {
    fn new(pages: usize) -> std::io::Result<Self> {
        let len = pages * page_size();
        // SAFETY: a fresh anonymous private mapping aliases nothing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Scratch {
            addr: addr.cast(),
            len,
        })
    }
    fn touch(&self) {
        for off in (0..self.len).step_by(page_size()) {
            // SAFETY: `off` is inside the mapping, which is readable and writable.
            unsafe { self.addr.add(off).write_volatile(1) };
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this struct created and exclusively owns.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn probe_pagemap_scan() -> Probe {
    let scratch = match Scratch::new(4) {
        Ok(s) => s,
        Err(e) => return Probe::no(format!("mmap failed: {e}")),
    };
    scratch.touch();
    let pagemap = match std::fs::File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(e) => return Probe::no(format!("/proc/self/pagemap: {e}")),
    };
    let mut out = [PageRegion::default(); 4];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start: scratch.addr as u64,
        end: scratch.addr as u64 + scratch.len as u64,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        category_mask: PAGE_IS_PRESENT,
        return_mask: PAGE_IS_PRESENT,
        ..Default::default()
    };
    // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `out`, `vec_len` entries long.
    let rc = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as libc::c_ulong, &mut arg) };
    if rc < 0 {
        return Probe::no(format!(
            "PAGEMAP_SCAN failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let pages: u64 = out[..rc as usize]
        .iter()
        .map(|r| (r.end - r.start) / page_size() as u64)
        .sum();
    if pages == 4 {
        Probe::yes("PAGEMAP_SCAN found the 4 present pages of a scratch mapping")
    } else {
        Probe::no(format!(
            "PAGEMAP_SCAN answered but found {pages} of 4 present pages"
        ))
    }
}

/// Bit 55 of a pagemap entry: the page is soft-dirty.
const PM_SOFT_DIRTY: u64 = 1 << 55;

fn pagemap_entry(addr: usize) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / page_size() * 8) as u64)?;
    Ok(u64::from_ne_bytes(b))
}

fn probe_soft_dirty() -> Probe {
    let scratch = match Scratch::new(1) {
        Ok(s) => s,
        Err(e) => return Probe::no(format!("mmap failed: {e}")),
    };
    scratch.touch();
    // "4" clears the soft-dirty bits of this process; afterwards a write must set the bit again.
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "4") {
        return Probe::no(format!("/proc/self/clear_refs: {e}"));
    }
    let before = pagemap_entry(scratch.addr as usize);
    scratch.touch();
    let after = pagemap_entry(scratch.addr as usize);
    match (before, after) {
        (Ok(b), Ok(a)) if b & PM_SOFT_DIRTY == 0 && a & PM_SOFT_DIRTY != 0 => {
            Probe::yes("a write after clear_refs set pagemap bit 55")
        }
        (Ok(_), Ok(_)) => Probe::no(
            "a write after clear_refs did not set pagemap bit 55 (CONFIG_MEM_SOFT_DIRTY off)",
        ),
        (Err(e), _) | (_, Err(e)) => Probe::no(format!("/proc/self/pagemap: {e}")),
    }
}
