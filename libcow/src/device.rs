//! [`Cow`]: an open handle on `/dev/cow`, the kernel module's device.

use crate::error::{Error, Result};
use crate::sys::ioctl_ptr;
use cow_abi::features;
use cow_abi::{
    CowDirty, CowHint, CowId, CowLimits, CowList, CowRange, CowRead, CowSnapshotInfo, CowStats,
    CowVersion, COW_ABI_VERSION, COW_DIRTY_EPOCH, COW_IOC_DIRTY, COW_IOC_DISCARD, COW_IOC_DROP,
    COW_IOC_HINT, COW_IOC_LIMITS, COW_IOC_LIST, COW_IOC_READ, COW_IOC_RESTORE, COW_IOC_SNAPSHOT,
    COW_IOC_STATS, COW_IOC_VERSION, COW_LIMITS_SET, COW_POLICY_FAIL, COW_RESTORE_IN_PLACE_IF_ALONE,
    COW_RESTORE_QUIESCED, COW_SNAPSHOT_QUIESCED, COW_SNAPSHOT_QUIESCED_IF_ALONE,
};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the module's misc device appears.
pub const COW_DEVICE_PATH: &str = "/dev/cow";

/// An open `/dev/cow` whose ABI version matches this library: one *space*, the covered memory
/// of one process, and its snapshots.
///
/// Memory is covered by mapping it from the space ([`Cow::map_region`]). The same handle also
/// drives a space that belongs to another process, when its descriptor was taken with
/// `pidfd_getfd` ([`Cow::from_fd`]); then only the snapshot operations make sense.
#[derive(Debug)]
pub struct Cow {
    fd: crate::fds::KeptFd,
    version: CowVersion,
    /// Next free mmap offset of this space, in bytes.
    next_offset: AtomicU64,
}

/// A region of covered memory: a shared mapping of the space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub addr: *mut u8,
    /// Length in bytes (a multiple of the page size).
    pub len: usize,
    /// Byte offset of the region in the space (what `read` and `dirty` speak).
    pub offset: u64,
}

// SAFETY: a Region is a plain description of a mapping; it owns nothing.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

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

    /// The space libcow_preload published in `COW_SPACE_FD` (when this process runs under
    /// `cowctl run`), else a new space. An adopted space's new regions use offsets from
    /// `2^43` on, clear of the publisher's.
    pub fn open_published_or_new() -> Result<Self> {
        match Self::adopt_published() {
            Some(cow) => Ok(cow),
            None => Self::open(),
        }
    }

    fn adopt_published() -> Option<Self> {
        // A setuid or setcap program must not drive a descriptor named by whoever set its
        // environment (the dynamic loader ignores LD_PRELOAD there for the same reason).
        // SAFETY: getauxval only reads the auxiliary vector.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            return None;
        }
        let fd: i32 = std::env::var("COW_SPACE_FD").ok()?.parse().ok()?;
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        if target.as_os_str() != COW_DEVICE_PATH {
            return None;
        }
        // SAFETY: duplicating a descriptor we just checked is open; the copy is ours.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return None;
        }
        // SAFETY: `dup` is a fresh descriptor owned by nobody else.
        let owned = unsafe { std::os::fd::FromRawFd::from_raw_fd(dup) };
        let cow = Self::from_fd(owned).ok()?;
        cow.reserve_offsets_from(1 << 43);
        Some(cow)
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
        Ok(Cow {
            fd: crate::fds::KeptFd::new(fd),
            version,
            next_offset: AtomicU64::new(0),
        })
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

impl Cow {
    /// Maps `len` bytes (rounded up to pages) of new covered memory, zero-filled. Pages are
    /// allocated by the module at first touch.
    pub fn map_region(&self, len: usize) -> Result<Region> {
        let page = self.page_size() as usize;
        let len = len.div_ceil(page).max(1) * page;
        // Leave a guard gap of one page between regions' offsets (none is ever mapped there).
        let offset = self
            .next_offset
            .fetch_add((len + page) as u64, Ordering::Relaxed);
        // SAFETY: a new shared mapping of our own device at an offset no other region uses;
        // it aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap /dev/cow"));
        }
        Ok(Region {
            addr: addr.cast(),
            len,
            offset,
        })
    }

    /// Allocates later regions' space offsets at or above `base` (a second handle on a space
    /// keeps its regions clear of the first one's this way).
    pub fn reserve_offsets_from(&self, base: u64) {
        self.next_offset.fetch_max(base, Ordering::Relaxed);
    }

    /// Maps `len` bytes of new covered memory at exactly `addr`, replacing whatever was mapped
    /// there (`MAP_FIXED`).
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must be page-aligned and must not hold anything the caller still
    /// needs: its old contents are gone (copy them first).
    pub unsafe fn map_region_at(&self, addr: *mut u8, len: usize) -> Result<Region> {
        let page = self.page_size() as usize;
        let offset = self.next_offset.fetch_add(
            (len.div_ceil(page) + 1) as u64 * page as u64,
            Ordering::Relaxed,
        );
        // SAFETY: the caller gives up the range; the offset is unused by other regions.
        let got = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(Error::last_os("mmap /dev/cow (fixed)"));
        }
        Ok(Region { addr, len, offset })
    }

    /// Takes a snapshot of every region of the space; returns its id.
    pub fn snapshot(&self) -> Result<u64> {
        let mut a = sized::<CowId>();
        ioctl_ptr(
            self.fd.as_fd(),
            COW_IOC_SNAPSHOT,
            &mut a,
            "COW_IOC_SNAPSHOT",
        )
        .map_err(|e| self.explain_snapshot_failure(e))?;
        Ok(a.id)
    }

    /// Turns the `ENOMEM` of a full window under the `fail` policy into [`Error::WindowFull`].
    fn explain_snapshot_failure(&self, e: Error) -> Error {
        if e.errno() != libc::ENOMEM {
            return e;
        }
        let (Ok(limits), Ok(stats)) = (self.limits(), self.stats()) else {
            return e;
        };
        let full = stats.snapshots >= limits.max_snapshots || stats.bytes_held >= limits.max_bytes;
        if limits.policy == COW_POLICY_FAIL && full {
            return Error::WindowFull {
                held: stats.snapshots,
                max_snapshots: limits.max_snapshots,
                bytes_held: stats.bytes_held,
                max_bytes: limits.max_bytes,
            };
        }
        e
    }

    /// Takes a snapshot, quiesced (hinted pages pre-copied, see [`Self::snapshot_quiesced`]) if
    /// the module finds this process alone, else an ordinary one; returns its id and whether it
    /// was quiesced. `None` if the module cannot tell (an older cow.ko).
    pub fn snapshot_quiesced_if_alone(&self) -> Option<Result<(u64, bool)>> {
        if self.features() & features::SNAPSHOT_IF_ALONE == 0 {
            return None;
        }
        let mut a = CowId {
            flags: COW_SNAPSHOT_QUIESCED_IF_ALONE,
            ..sized()
        };
        let r = ioctl_ptr(
            self.fd.as_fd(),
            COW_IOC_SNAPSHOT,
            &mut a,
            "COW_IOC_SNAPSHOT",
        )
        .map_err(|e| self.explain_snapshot_failure(e))
        .map(|_| (a.id, a.flags & COW_SNAPSHOT_QUIESCED != 0));
        Some(r)
    }

    /// Takes a snapshot, promising that nothing writes the space during the call (the caller
    /// is single-threaded or has stopped its other threads): hinted pages are then pre-copied
    /// and left writable.
    pub fn snapshot_quiesced(&self) -> Result<u64> {
        let mut a = CowId {
            flags: COW_SNAPSHOT_QUIESCED,
            ..sized()
        };
        ioctl_ptr(
            self.fd.as_fd(),
            COW_IOC_SNAPSHOT,
            &mut a,
            "COW_IOC_SNAPSHOT",
        )
        .map_err(|e| self.explain_snapshot_failure(e))?;
        Ok(a.id)
    }

    /// Replaces the pre-copy hint: page indices (space offset / page size) to copy eagerly at
    /// quiesced snapshots. An empty list switches pre-copy off.
    pub fn hint(&self, pages: &[u64]) -> Result<()> {
        let mut a = CowHint {
            count: pages.len() as u64,
            pages: pages.as_ptr() as u64,
            ..sized()
        };
        ioctl_ptr(self.fd.as_fd(), COW_IOC_HINT, &mut a, "COW_IOC_HINT")?;
        Ok(())
    }

    /// Throws away the pages of `[offset, offset + len)` (page-aligned): they read as zero
    /// afterwards, as after `MADV_DONTNEED` on private anonymous memory. The newest snapshot
    /// keeps their contents, so a restore brings them back. Does not allocate.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut a = CowRange {
            offset,
            len,
            ..sized()
        };
        ioctl_ptr(self.fd.as_fd(), COW_IOC_DISCARD, &mut a, "COW_IOC_DISCARD")?;
        Ok(())
    }

    /// Page indices written in the epoch right after snapshot `id` (until the next snapshot).
    pub fn dirty_in_epoch(&self, id: u64) -> Result<Vec<u64>> {
        self.dirty(id, COW_DIRTY_EPOCH)
    }

    fn dirty(&self, id: u64, flags: u32) -> Result<Vec<u64>> {
        fill_growing(1024, |v| {
            let mut a = CowDirty {
                id,
                flags,
                capacity: v.len() as u64,
                pages: v.as_mut_ptr() as u64,
                ..sized()
            };
            ioctl_ptr(self.fd.as_fd(), COW_IOC_DIRTY, &mut a, "COW_IOC_DIRTY")
                .map_err(|e| no_snapshot(e, id))?;
            Ok(a.count as usize)
        })
    }

    /// Restores every region to snapshot `id`; newer snapshots are discarded, `id` and older
    /// ones stay. Pages created after `id` read as zero again.
    pub fn restore(&self, id: u64) -> Result<()> {
        self.restore_with(id, 0)
    }

    /// `COW_IOC_RESTORE` with `flags`.
    fn restore_with(&self, id: u64, flags: u32) -> Result<()> {
        let mut a = CowId {
            id,
            flags,
            ..sized()
        };
        ioctl_ptr(self.fd.as_fd(), COW_IOC_RESTORE, &mut a, "COW_IOC_RESTORE")
            .map_err(|e| no_snapshot(e, id))?;
        Ok(())
    }

    /// Restores to snapshot `id` in place ([`COW_RESTORE_QUIESCED`]): pages are copied back,
    /// their mappings stay, and a restored page written again does not fault. The caller
    /// guarantees that nothing else reads or writes the covered memory meanwhile (no other
    /// thread runs, no other process maps it). Falls back to [`Cow::restore`] on a module
    /// without the feature.
    pub fn restore_in_place(&self, id: u64) -> Result<()> {
        if self.features() & features::RESTORE_IN_PLACE == 0 {
            return self.restore(id);
        }
        self.restore_with(id, COW_RESTORE_QUIESCED)
    }

    /// Restores to snapshot `id` in place if the module finds this process alone with its
    /// memory (one thread, nothing else holding its address space:
    /// [`COW_RESTORE_IN_PLACE_IF_ALONE`]), else as [`Cow::restore`]. Falls back to
    /// [`Cow::restore`] on a module without in-place restores.
    pub fn restore_in_place_if_alone(&self, id: u64) -> Result<()> {
        if self.features() & features::RESTORE_IN_PLACE == 0 {
            return self.restore(id);
        }
        self.restore_with(id, COW_RESTORE_IN_PLACE_IF_ALONE)
    }

    /// Drops snapshot `id` (its pre-images merge into the next older snapshot).
    pub fn drop_snapshot(&self, id: u64) -> Result<()> {
        let mut a = CowId { id, ..sized() };
        ioctl_ptr(self.fd.as_fd(), COW_IOC_DROP, &mut a, "COW_IOC_DROP")
            .map_err(|e| no_snapshot(e, id))?;
        Ok(())
    }

    /// The snapshots held, oldest first.
    pub fn list(&self) -> Result<Vec<CowSnapshotInfo>> {
        fill_growing(64, |v| {
            let mut a = CowList {
                capacity: v.len() as u32,
                entries: v.as_mut_ptr() as u64,
                ..sized()
            };
            ioctl_ptr(self.fd.as_fd(), COW_IOC_LIST, &mut a, "COW_IOC_LIST")?;
            Ok(a.count as usize)
        })
    }

    /// The space's counters.
    pub fn stats(&self) -> Result<CowStats> {
        let mut a = sized::<CowStats>();
        ioctl_ptr(self.fd.as_fd(), COW_IOC_STATS, &mut a, "COW_IOC_STATS")?;
        Ok(a)
    }

    /// Reads `buf.len()` bytes at space offset `offset` as they were at snapshot `id`.
    /// An empty `buf` checks that snapshot `id` exists.
    pub fn read(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        const CHUNK: usize = 64 << 20;
        if buf.is_empty() {
            let mut a = CowRead {
                id,
                offset,
                ..sized()
            };
            return ioctl_ptr(self.fd.as_fd(), COW_IOC_READ, &mut a, "COW_IOC_READ")
                .map(drop)
                .map_err(|e| no_snapshot(e, id));
        }
        for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
            let mut a = CowRead {
                id,
                offset: offset + (i * CHUNK) as u64,
                len: chunk.len() as u64,
                buf: chunk.as_mut_ptr() as u64,
                ..sized()
            };
            ioctl_ptr(self.fd.as_fd(), COW_IOC_READ, &mut a, "COW_IOC_READ")
                .map_err(|e| no_snapshot(e, id))?;
        }
        Ok(())
    }

    /// Page indices (space offset / page size) written since snapshot `id`, sorted.
    pub fn dirty_since(&self, id: u64) -> Result<Vec<u64>> {
        self.dirty(id, 0)
    }

    /// The retention window.
    pub fn limits(&self) -> Result<CowLimits> {
        let mut a = sized::<CowLimits>();
        ioctl_ptr(self.fd.as_fd(), COW_IOC_LIMITS, &mut a, "COW_IOC_LIMITS")?;
        Ok(a)
    }

    /// Sets the retention window: at most `max_snapshots` snapshots and `max_bytes` of
    /// pre-images; `policy` is `COW_POLICY_MERGE_OLDEST` or `COW_POLICY_FAIL`.
    pub fn set_limits(&self, max_snapshots: u32, max_bytes: u64, policy: u32) -> Result<()> {
        let mut a = CowLimits {
            flags: COW_LIMITS_SET,
            max_snapshots,
            max_bytes,
            policy,
            ..sized()
        };
        ioctl_ptr(self.fd.as_fd(), COW_IOC_LIMITS, &mut a, "COW_IOC_LIMITS")?;
        Ok(())
    }
}

/// The module answers `ENOENT` for an id it does not hold: say so.
fn no_snapshot(e: Error, id: u64) -> Error {
    match e {
        Error::Os {
            errno: libc::ENOENT,
            ..
        } => Error::NoSnapshot { id },
        other => other,
    }
}

/// Calls `fill` with a buffer of `initial` entries; `fill` returns how many entries exist in
/// all. While that exceeds the buffer (the set grew, or was larger), retries with room for all.
fn fill_growing<T: Default + Clone>(
    initial: usize,
    mut fill: impl FnMut(&mut Vec<T>) -> Result<usize>,
) -> Result<Vec<T>> {
    let mut cap = initial;
    loop {
        let mut v = vec![T::default(); cap];
        let count = fill(&mut v)?;
        if count <= cap {
            v.truncate(count);
            return Ok(v);
        }
        cap = count;
    }
}

/// A zeroed ABI struct whose leading `size` field holds its size.
fn sized<T: Default>() -> T {
    let mut v = T::default();
    let size = std::mem::size_of::<T>() as u32;
    // SAFETY: every cow-abi argument struct is #[repr(C)] and starts with `size: u32`.
    unsafe { (&mut v as *mut T).cast::<u32>().write(size) };
    v
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
