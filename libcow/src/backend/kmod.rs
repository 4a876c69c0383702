//! The kmod backend: cow.ko behind the [`Backend`] interface. It covers memory mapped from
//! `/dev/cow` ([`Backend::map`], and the heap and globals under `cowctl run`).

use super::{Backend, Stats};
use crate::device::Cow;
use crate::error::{Error, Result};
use crate::maps::{self, Mapping};

/// Space offsets are below 2^44 bytes; the module adds the space's base above that, which is
/// what /proc/self/maps shows in its offset column.
const SPACE_OFFSET_MASK: u64 = (1 << 44) - 1;

/// cow.ko as a backend.
pub struct Kmod {
    cow: &'static Cow,
}

/// The `/dev/cow` mappings of this process (every region of the space, whoever mapped it).
fn cow_mappings() -> Result<Vec<Mapping>> {
    let maps = maps::read().map_err(|e| Error::Os {
        op: "read /proc/self/maps",
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })?;
    Ok(maps
        .as_slice()
        .iter()
        .filter(|m| m.dev_cow)
        .copied()
        .collect())
}

impl Kmod {
    /// Opens the process's space: libcow_preload's under `cowctl run`, else a new one.
    pub fn open() -> Result<Self> {
        Ok(Self::with(Box::leak(Box::new(
            Cow::open_published_or_new()?
        ))))
    }

    /// Drives an already open space (libcow_preload's).
    pub fn with(cow: &'static Cow) -> Self {
        Kmod { cow }
    }

    fn offset_of(&self, addr: usize) -> Result<u64> {
        cow_mappings()?
            .iter()
            .find(|m| (m.start..m.end).contains(&addr))
            .map(|m| (m.offset & SPACE_OFFSET_MASK) + (addr - m.start) as u64)
            .ok_or(Error::Os {
                op: "address outside the space's regions",
                errno: libc::EFAULT,
            })
    }
}

impl Backend for Kmod {
    fn name(&self) -> &'static str {
        "kmod"
    }

    fn map(&self, len: usize) -> Result<*mut u8> {
        Ok(self.cow.map_region(len)?.addr)
    }

    fn snapshot(&self) -> Result<u64> {
        self.cow.snapshot()
    }

    fn restore(&self, id: u64) -> Result<()> {
        self.cow.restore(id)
    }

    fn drop_snapshot(&self, id: u64) -> Result<()> {
        self.cow.drop_snapshot(id)
    }

    fn read(&self, id: u64, addr: usize, buf: &mut [u8]) -> Result<()> {
        self.cow.read(id, self.offset_of(addr)?, buf)
    }

    fn dirty_since(&self, id: u64) -> Result<Vec<usize>> {
        let page = self.cow.page_size() as u64;
        let mappings = cow_mappings()?;
        let mut out: Vec<usize> = self
            .cow
            .dirty_since(id)?
            .into_iter()
            .flat_map(|idx| {
                let off = idx * page;
                mappings.iter().filter_map(move |m| {
                    let base = m.offset & SPACE_OFFSET_MASK;
                    let len = (m.end - m.start) as u64;
                    (base..base + len)
                        .contains(&off)
                        .then(|| m.start + (off - base) as usize)
                })
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn list(&self) -> Result<Vec<u64>> {
        Ok(self.cow.list()?.iter().map(|s| s.id).collect())
    }

    fn stats(&self) -> Stats {
        let s = self.cow.stats().unwrap_or_default();
        Stats {
            snapshots: s.snapshots as u64,
            write_faults: s.first_write_faults,
            pages_saved: s.pages_saved,
            bytes_held: s.bytes_held,
            snapshot_ns: s.snapshot_ns,
            restore_ns: s.restore_ns,
        }
    }
}
