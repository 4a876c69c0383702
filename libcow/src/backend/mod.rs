//! Snapshot backends behind one interface.
//!
//! - [`kmod`]: cow.ko; covers memory mapped from `/dev/cow` (and, under `cowctl run`, the heap
//!   and globals). The kernel captures pre-images at first write.
//! - [`uffd`]: userfaultfd write-protect in `WP_ASYNC` mode + `PAGEMAP_SCAN` (Linux ≥ 6.7).
//! - [`mprotect`]: write-protection with `mprotect` and a `SIGSEGV` handler.
//! - [`lmc`]: compiler instrumentation (`cowcc`): a shadow tag per 128-byte region and undo
//!   logs; covers what instrumented code writes.
//!
//! The mainline backends cover every private writable mapping of the process except stacks
//! and libcow's own bookkeeping ([`crate::book`]), including memory mapped after `cow_init`;
//! they share the shadow engine ([`shadow`]) and differ only in how they learn which pages were
//! written ([`shadow::Tracker`]).

pub mod fork;
pub mod kmod;
pub mod lmc;
pub mod lmc_cut;
pub mod mprotect;
mod pagetable;
pub mod shadow;
pub mod uffd;

use crate::error::Result;
use crate::speculate::{Policy, Recording, Totals};

/// Counters every backend keeps.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    /// Snapshots held now.
    pub snapshots: u64,
    /// Write faults taken on covered pages (first writes after a snapshot), when the backend
    /// sees them (the uffd backend's are resolved in the kernel: it counts written pages).
    pub write_faults: u64,
    /// Page copies made to keep pre-images.
    pub pages_saved: u64,
    /// Memory held for snapshots (pre-images, shadows, bookkeeping), in bytes.
    pub bytes_held: u64,
    /// Time spent taking snapshots, in nanoseconds.
    pub snapshot_ns: u64,
    /// Time spent restoring, in nanoseconds.
    pub restore_ns: u64,
    /// Pages pre-copied speculatively (kmod).
    pub precopied: u64,
    /// Pre-copied pages that were then written (kmod).
    pub precopy_useful: u64,
    /// Pages saved ahead of a sequential writer at its first writes (kmod's fault-around).
    pub around_pages: u64,
    /// Of those, pages that were then written (kmod).
    pub around_useful: u64,
}

/// A way of taking copy-on-write snapshots of this process's memory.
pub trait Backend: Send + Sync {
    /// `"kmod"`, `"uffd"`, `"mprotect"`, `"fork"` or `"lmc"`.
    fn name(&self) -> &'static str;
    /// Maps `len` bytes of new, zeroed memory that this backend covers.
    fn map(&self, len: usize) -> Result<*mut u8>;
    /// Takes a snapshot; returns its id (≥ 1, increasing).
    fn snapshot(&self) -> Result<u64>;
    /// Restores covered memory to snapshot `id`; newer snapshots are discarded, `id` and older
    /// ones stay.
    fn restore(&self, id: u64) -> Result<()>;
    /// Drops snapshot `id`.
    fn drop_snapshot(&self, id: u64) -> Result<()>;
    /// Reads `buf.len()` bytes at `addr` as they were at snapshot `id`.
    fn read(&self, id: u64, addr: usize, buf: &mut [u8]) -> Result<()>;
    /// Page addresses written since snapshot `id`, sorted.
    fn dirty_since(&self, id: u64) -> Result<Vec<usize>>;
    /// Ids of the snapshots held, oldest first.
    fn list(&self) -> Result<Vec<u64>>;
    /// Counters.
    fn stats(&self) -> Stats;
    /// Drives speculative pre-copy with `policy` (`oracle`: replaying `recorded`, the write set
    /// of each epoch of an earlier run). Backends without pre-copy refuse with `ENOTSUP`.
    fn set_speculation(&self, _policy: Policy, _recorded: Option<Recording>) -> Result<()> {
        Err(crate::Error::Os {
            op: "speculation",
            errno: libc::ENOTSUP,
        })
    }
    /// What speculation did so far (None without speculation).
    fn speculation(&self) -> Option<Totals> {
        None
    }
    /// Records the write set of every epoch from now on (for a later `oracle` run), whatever
    /// the policy. Backends that cannot refuse with `ENOTSUP`.
    fn record_write_sets(&self) -> Result<()> {
        Err(crate::Error::Os {
            op: "record write sets",
            errno: libc::ENOTSUP,
        })
    }
    /// The write sets recorded since [`Backend::record_write_sets`] (in the units hints use).
    fn recorded_write_sets(&self) -> Option<Recording> {
        None
    }
    /// Sets the pre-copy hint by address directly (tests: random hints must never change
    /// results). Backends without pre-copy refuse with `ENOTSUP`.
    fn hint_addrs(&self, _addrs: &[usize]) -> Result<()> {
        Err(crate::Error::Os {
            op: "hint",
            errno: libc::ENOTSUP,
        })
    }
}

/// Which backend `auto` picked, and why.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The backend's name.
    pub name: &'static str,
    /// Why it was picked (and why better ones were not).
    pub reason: String,
}

/// Decides what `auto` means on this machine.
pub fn choose_auto() -> Choice {
    if lmc::instrumented_modules() > 0 {
        return Choice {
            name: "lmc",
            reason: "this program was compiled with cowcc: its writes are instrumented".into(),
        };
    }
    let mut why = String::new();
    if std::path::Path::new(crate::COW_DEVICE_PATH).exists() {
        match crate::Cow::open() {
            Ok(_) => {
                return Choice {
                    name: "kmod",
                    reason:
                        "cow.ko is loaded; it covers memory mapped from /dev/cow (every private \
                             writable mapping but stacks under `cowctl run`)"
                            .into(),
                }
            }
            Err(e) => why.push_str(&format!("kmod: {e}; ")),
        }
    } else {
        why.push_str("kmod: cow.ko is not loaded; ");
    }
    let f = crate::probe::kernel_features();
    if f.uffd_wp_async.available && f.pagemap_scan.available {
        return Choice {
            name: "uffd",
            reason: format!("{why}uffd: userfaultfd WP_ASYNC and PAGEMAP_SCAN work here"),
        };
    }
    Choice {
        name: "mprotect",
        reason: format!(
            "{why}uffd: {} / {}; mprotect works everywhere",
            f.uffd_wp_async.detail, f.pagemap_scan.detail
        ),
    }
}

/// Opens a backend by name (`auto`, `kmod`, `uffd`, `mprotect`, `fork`, `lmc`).
pub fn open(name: &str) -> Result<(Box<dyn Backend>, Choice)> {
    let choice = if name == "auto" {
        choose_auto()
    } else {
        Choice {
            name: match name {
                "kmod" => "kmod",
                "uffd" => "uffd",
                "mprotect" => "mprotect",
                "fork" => "fork",
                "lmc" => "lmc",
                _ => {
                    return Err(crate::Error::Os {
                        op: "unknown backend (kmod, uffd, mprotect, fork, lmc, auto)",
                        errno: libc::EINVAL,
                    })
                }
            },
            reason: "asked for by name".into(),
        }
    };
    // Every backend keeps its state in the book: fail here, with an errno, if it cannot exist.
    crate::book::try_book()?;
    let backend: Box<dyn Backend> = match choice.name {
        "kmod" => Box::new(kmod::Kmod::open()?),
        "uffd" => Box::new(shadow::Shadow::new(uffd::Uffd::open()?)),
        "fork" => Box::new(fork::Fork::new()?),
        "lmc" => Box::new(lmc::Lmc::open()?),
        _ => Box::new(shadow::Shadow::new(mprotect::Mprotect::install()?)),
    };
    Ok((backend, choice))
}
