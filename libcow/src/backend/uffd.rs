//! Write tracking with userfaultfd write-protect in `WP_ASYNC` mode and `PAGEMAP_SCAN`.
//!
//! Registered ranges are write-protected (holes too: `WP_UNPOPULATED` installs markers). A write
//! to a protected page is resolved by the kernel itself — no fault reaches userland — and the
//! page's protection is gone. At a snapshot one `PAGEMAP_SCAN` per range reports the pages
//! written since (`PAGE_IS_WRITTEN`) and write-protects them again in the same walk
//! (`PM_SCAN_WP_MATCHING`). Memory that lost registration (unmapped and mapped again at the same
//! place) is found by a second scan for pages that are not wp-capable, reported whole, and
//! registered again.
//!
//! Speculation: pages predicted to be written are write-unprotected after the scan
//! ([`Tracker::keep_writable`]), saving their write-protect faults. They come back as written
//! at the next scan whether written or not; the engine compares them with their shadow copies.
//! Measured on the project's host it never pays: the kernel resolves a `WP_ASYNC` fault in
//! ≈ 0.65 µs, less than an unprotect and a comparison cost (the adaptive policy stays off).

use super::shadow::{Range, Tracker};
use crate::book::BookVec;
use crate::error::{Error, Result};
use crate::fds::KeptFd;
use crate::probe::{
    PageRegion, PmScanArg, UffdioApi, PAGEMAP_SCAN, PAGE_IS_WRITTEN, UFFDIO_API, UFFD_API,
    UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const PAGE: usize = 4096;
/// `PAGE_IS_WPALLOWED`.
const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PM_SCAN_WP_MATCHING`.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const fn iowr(nr: u32, size: usize) -> u32 {
    cow_abi::ioc(cow_abi::IOC_READ | cow_abi::IOC_WRITE, 0xAA, nr, size)
}
const UFFDIO_REGISTER: u32 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u32 = cow_abi::ioc(
    cow_abi::IOC_READ,
    0xAA,
    0x01,
    std::mem::size_of::<UffdioRange>(),
);
const UFFDIO_WRITEPROTECT: u32 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());

/// The uffd tracker.
pub struct Uffd {
    uffd: KeptFd,
    pagemap: KeptFd,
    ranges: BookVec<Range>,
    /// Pages written that had been write-protected: the faults the kernel resolved (pages
    /// left writable by speculation are reported without one).
    faults: u64,
    /// Pages left writable on purpose — by speculation at the last checkpoint, by a restore's
    /// own writes — sorted: the next collect reports them without a fault.
    left_writable: BookVec<usize>,
    /// Whether the userfaultfd is of this process (not another's, as `cowctl` tracking a
    /// live pid): only then may scratch memory of ours be registered to measure a fault.
    own: bool,
}

fn ioctl<T>(fd: &OwnedFd, cmd: u32, arg: &mut T, op: &'static str) -> Result<i32> {
    // SAFETY: `arg` is the live argument struct of command `cmd`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, arg as *mut T) };
    if rc < 0 {
        Err(Error::last_os(op))
    } else {
        Ok(rc)
    }
}

impl Uffd {
    /// Opens a userfaultfd with `WP_ASYNC | WP_UNPOPULATED` and `/proc/self/pagemap`.
    pub fn open() -> Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: userfaultfd takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(Error::last_os("userfaultfd"));
        }
        // SAFETY: a descriptor the kernel just gave us.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut me = Self::with_fd(uffd, c"/proc/self/pagemap")?;
        me.own = true;
        Ok(me)
    }

    /// Tracks another process's memory: `uffd` is a userfaultfd that process created (a
    /// userfaultfd belongs to the address space of its creator, whoever uses it), fresh (no
    /// `UFFDIO_API` yet); `pid` names its pagemap.
    pub fn for_process(uffd: OwnedFd, pid: i32) -> Result<Self> {
        let path = std::ffi::CString::new(format!("/proc/{pid}/pagemap")).expect("no NUL");
        Self::with_fd(uffd, &path)
    }

    fn with_fd(uffd: OwnedFd, pagemap_path: &std::ffi::CStr) -> Result<Self> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl(
            &uffd,
            UFFDIO_API,
            &mut api,
            "UFFDIO_API (WP_ASYNC | WP_UNPOPULATED)",
        )?;
        // SAFETY: opening pagemap with a NUL-terminated path.
        let pm = unsafe { libc::open(pagemap_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if pm < 0 {
            return Err(Error::last_os("open pagemap"));
        }
        // SAFETY: as above.
        let pagemap = unsafe { OwnedFd::from_raw_fd(pm) };
        Ok(Uffd {
            uffd: KeptFd::new(uffd),
            pagemap: KeptFd::new(pagemap),
            ranges: BookVec::new(),
            faults: 0,
            left_writable: BookVec::new(),
            own: false,
        })
    }

    /// One PAGEMAP_SCAN over `r`; appends matching pages.
    fn scan(
        &self,
        r: Range,
        flags: u64,
        inverted: u64,
        mask: u64,
        out: &mut BookVec<usize>,
    ) -> Result<bool> {
        self.scan_runs(r, flags, inverted, mask, |start, end| {
            for page in (start..end).step_by(PAGE) {
                out.push(page);
            }
        })
    }

    /// One PAGEMAP_SCAN over `r`: calls `found(start, end)` for each run of matching pages.
    /// False if the walk stopped early because part of `r` is not mapped (nothing more is
    /// reported from there on).
    fn scan_runs(
        &self,
        r: Range,
        flags: u64,
        inverted: u64,
        mask: u64,
        mut found: impl FnMut(usize, usize),
    ) -> Result<bool> {
        let mut regions = [PageRegion::default(); 256];
        let mut start = r.start as u64;
        while start < r.end as u64 {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start,
                end: r.end as u64,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_inverted: inverted,
                category_mask: mask,
                return_mask: mask,
                ..Default::default()
            };
            let n = match ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg, "PAGEMAP_SCAN") {
                Ok(n) => n as usize,
                // The range is no longer (entirely) mapped: nothing to report there.
                Err(e) if e.errno() == libc::ENOMEM || e.errno() == libc::EINVAL => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            };
            for reg in &regions[..n] {
                found(reg.start as usize, reg.end as usize);
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(true)
    }

    /// Runs of pages of `r` written since they were last write-protected (registered memory
    /// only), write-protected again in the same walk.
    pub fn take_written(&self, r: Range, found: impl FnMut(usize, usize)) -> Result<()> {
        self.take_written_runs(r, found).map(drop)
    }

    /// [`Uffd::take_written`], saying whether the walk covered all of `r` (false: it stopped
    /// at memory that is not mapped).
    fn take_written_runs(&self, r: Range, found: impl FnMut(usize, usize)) -> Result<bool> {
        self.scan_runs(r, PM_SCAN_WP_MATCHING, 0, PAGE_IS_WRITTEN, found)
    }

    /// Runs of pages of `r` in memory that is not registered (new mappings, or mapped anew).
    pub fn unregistered(&self, r: Range, found: impl FnMut(usize, usize)) -> Result<()> {
        self.scan_runs(r, 0, PAGE_IS_WPALLOWED, PAGE_IS_WPALLOWED, found)
            .map(drop)
    }

    /// Write-protects `[start, end)` (`protect`) or lifts its protection.
    fn write_protect(&self, start: usize, end: usize, protect: bool) -> Result<i32> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: (end - start) as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        ioctl(
            &self.uffd,
            UFFDIO_WRITEPROTECT,
            &mut wp,
            "UFFDIO_WRITEPROTECT",
        )
    }

    /// Registers `r` for write-protection and write-protects it whole (holes too).
    pub fn register(&self, r: Range) -> Result<()> {
        let range = UffdioRange {
            start: r.start as u64,
            len: (r.end - r.start) as u64,
        };
        let mut reg = UffdioRegister {
            range,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(
            &self.uffd,
            UFFDIO_REGISTER,
            &mut reg,
            "UFFDIO_REGISTER (WP)",
        )?;
        self.write_protect(r.start, r.end, true)?;
        Ok(())
    }
}

impl Tracker for Uffd {
    const NAME: &'static str = "uffd";
    const REWRITES_PROT: bool = false;
    const SEES_ZAPS: bool = true;

    fn arm(&mut self, r: Range) -> Result<()> {
        self.register(r)
    }

    fn disarm(&mut self, r: Range) {
        let mut range = UffdioRange {
            start: r.start as u64,
            len: (r.end - r.start) as u64,
        };
        let _ = ioctl(
            &self.uffd,
            UFFDIO_UNREGISTER,
            &mut range,
            "UFFDIO_UNREGISTER",
        );
    }

    fn set_ranges(&mut self, ranges: &[Range]) {
        self.ranges.clear();
        for &r in ranges {
            self.ranges.push(r);
        }
    }

    fn collect(&mut self, out: &mut BookVec<usize>) -> Result<()> {
        let before = out.len();
        let ranges = self.ranges.as_slice();
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
            return Ok(());
        };
        // One walk over the span of all ranges rather than one per range: with
        // PM_SCAN_WP_MATCHING the kernel skips unregistered mappings whole, and registered memory
        // is the covered ranges (pages outside them are ignored by the engine).
        let span = Range {
            start: first.start,
            end: last.end,
            prot: 0,
        };
        let push_pages = |out: &mut BookVec<usize>, start: usize, end: usize| {
            for page in (start..end).step_by(PAGE) {
                out.push(page);
            }
        };
        if !self.take_written_runs(span, |s, e| push_pages(out, s, e))? {
            // Stopped early: range by range, as each may be mapped or not (what the span's walk
            // reported is kept: it re-protected those pages, so they are not reported again).
            for i in 0..self.ranges.len() {
                let r = self.ranges.as_slice()[i];
                self.take_written(r, |s, e| push_pages(out, s, e))?;
            }
        }
        // Memory mapped anew at a covered address has no registration: report it all and
        // register it again. Per range: a registered mapping is skipped whole, while one walk
        // over the span would walk the page tables of everything unregistered in it.
        for i in 0..self.ranges.len() {
            let r = self.ranges.as_slice()[i];
            let mut lost: BookVec<(usize, usize)> = BookVec::new();
            self.unregistered(r, |s, e| lost.push((s, e)))?;
            for &(start, end) in lost.as_slice() {
                push_pages(out, start, end);
                self.register(Range {
                    start,
                    end,
                    prot: r.prot,
                })?;
            }
        }
        out.as_mut_slice()[before..].sort_unstable();
        let reported = &out.as_slice()[before..];
        let left = self.left_writable.as_slice();
        self.faults += if left.is_empty() {
            reported.len() as u64
        } else {
            reported
                .iter()
                .filter(|p| left.binary_search(p).is_err())
                .count() as u64
        };
        self.left_writable.clear();
        Ok(())
    }

    fn peek(&mut self, out: &mut BookVec<usize>) -> Result<()> {
        for i in 0..self.ranges.len() {
            let r = self.ranges.as_slice()[i];
            self.scan(r, 0, 0, PAGE_IS_WRITTEN, out)?;
            self.scan(r, 0, PAGE_IS_WPALLOWED, PAGE_IS_WPALLOWED, out)?;
        }
        Ok(())
    }

    fn open_for_write(&mut self, _page: usize, _prot: i32) {
        // WP_ASYNC: the kernel resolves our own writes; the next collect re-protects them.
    }

    fn rearm_restored(&mut self, pages: &[usize]) -> Result<()> {
        // Left writable: the next collect reports them as written, and they compare equal to
        // their shadow pages (the restore made them so), which costs little. Protecting them
        // again cost an ioctl per cluster of pages inside the restore (≈ 15 µs of redis' crash
        // handler) and then a fault at the program's next write — after a rollback it usually
        // writes the same pages again.
        for &p in pages {
            self.left_writable.push(p);
        }
        self.left_writable.sort_dedup();
        Ok(())
    }

    fn faults(&self) -> u64 {
        self.faults
    }

    const SPECULATES: bool = true;

    fn keep_writable(&mut self, pages: &[usize]) {
        // One ioctl per run of consecutive pages (`pages` is sorted). A page that is not
        // registered fails to unprotect and simply stays tracked.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + PAGE {
                j += 1;
            }
            let _ = self.write_protect(pages[i], pages[j - 1] + PAGE, false);
            i = j;
        }
        self.left_writable.clear();
        for &p in pages {
            self.left_writable.push(p);
        }
    }

    fn measure_fault_ns(&mut self) -> Option<f64> {
        if !self.own {
            return None;
        }
        // Scratch pages registered with our userfaultfd: the fault is then exactly the
        // program's (the kernel lifting the write-protection of a populated page).
        const PAGES: usize = 64;
        let start = super::shadow::map_anonymous(PAGES * PAGE).ok()? as usize;
        let end = start + PAGES * PAGE;
        for p in (start..end).step_by(PAGE) {
            // SAFETY: populating a page of the scratch mapping, which nothing else knows.
            unsafe { (p as *mut u8).write_volatile(1) };
        }
        let scratch = Range {
            start,
            end,
            prot: libc::PROT_READ | libc::PROT_WRITE,
        };
        let typical = self.register(scratch).ok().and_then(|()| {
            // Every other page, as scattered writes fault.
            crate::speculate::typical_per_page(crate::speculate::PROBE_ROUNDS, |round| {
                self.write_protect(start, end, true).ok()?;
                let t = std::time::Instant::now();
                for p in (start..end).step_by(2 * PAGE) {
                    // SAFETY: a page of the scratch mapping; the kernel resolves the fault.
                    unsafe { (p as *mut u8).write_volatile(round as u8) };
                }
                Some(t.elapsed().as_nanos() as f64 / (PAGES / 2) as f64)
            })
        });
        self.disarm(scratch);
        // SAFETY: unmapping the scratch mapping, which nothing else knows.
        unsafe { libc::munmap(start as *mut libc::c_void, end - start) };
        typical
    }
}
