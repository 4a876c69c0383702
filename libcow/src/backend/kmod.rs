//! The kmod backend: cow.ko behind the [`Backend`] interface. It covers memory mapped from
//! `/dev/cow` ([`Backend::map`], and every private writable mapping but stacks under
//! `cowctl run`).

use super::{Backend, Stats};
use crate::device::Cow;
use crate::error::{Error, Result};
use crate::maps::{self, Mapping};
use crate::speculate::{Costs, Policy, PrecopyCost, Progress, Recording, Speculator, Totals};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Speculation state of a kmod backend.
#[derive(Default)]
struct Spec {
    speculator: Option<Speculator>,
    last_id: Option<u64>,
    /// Kernel counters right after the last snapshot.
    after_last: cow_abi::CowStats,
    /// Pages pre-copied at the last snapshot (for the epoch it started).
    precopied_last: u64,
    /// The hint the kernel holds, as this backend last set it (a snapshot resends it only
    /// when the policy changes it: an ioctl less per epoch of a stable write set).
    hint_sent: Vec<u64>,
    /// What the last snapshot's pre-copies cost, to be weighed when the next one judges them
    /// (the cost belongs with them, not with the ones that one makes).
    cost_last: PrecopyCost,
}

/// Space offsets are below 2^44 bytes; the module adds the space's base above that, which is
/// what /proc/self/maps shows in its offset column.
const SPACE_OFFSET_MASK: u64 = (1 << 44) - 1;

/// cow.ko as a backend.
pub struct Kmod {
    cow: &'static Cow,
    /// A hint is set (by a policy or directly): snapshots must be quiesced for it to act.
    /// Apart from `spec` so that a plain snapshot only reads this struct: under `cowctl run`
    /// it lies in covered memory, and taking the lock would write a page there at every
    /// snapshot (a first-write fault plus its re-protection, ≈ 10 µs in TCG).
    hinting: AtomicBool,
    /// A pre-copying snapshot found other threads in the process: stop them from now on rather
    /// than ask the module whether the caller is alone (written once, so it costs a covered
    /// page nothing at later snapshots).
    others_seen: AtomicBool,
    spec: Mutex<Spec>,
    /// `(hold, release)`: make the covered heap quiescent around the snapshot ioctl itself
    /// (libcow_preload's allocator locks; nothing may allocate while they are held).
    quiesce: Option<crate::ffi::QuiesceHooks>,
    /// The program's progress clock (libcow_preload's), for recordings and oracle replays.
    progress: Option<Progress>,
    /// libcow_preload's hook after a restore (it re-creates the mappings the restored memory
    /// describes); with it, restores stop the other threads.
    restored: Option<fn()>,
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

    /// Drives an already open space.
    pub fn with(cow: &'static Cow) -> Self {
        Kmod {
            cow,
            hinting: AtomicBool::new(false),
            others_seen: AtomicBool::new(false),
            spec: Mutex::new(Spec::default()),
            quiesce: None,
            progress: None,
            restored: None,
        }
    }

    /// Drives libcow_preload's space: `hold`/`release` bracket each snapshot ioctl.
    pub fn with_quiesce(cow: &'static Cow, hold: fn(), release: fn()) -> Self {
        Kmod {
            quiesce: Some((hold, release)),
            ..Self::with(cow)
        }
    }

    /// Runs the snapshot ioctl `op` with the heap quiescent (if a preload asked for that).
    fn quiesced(&self, op: impl FnOnce() -> Result<u64>) -> Result<u64> {
        match self.quiesce {
            Some((hold, release)) => {
                hold();
                let r = op();
                release();
                r
            }
            None => op(),
        }
    }

    /// Calls `hook` after each restore, with the other threads stopped.
    pub fn with_restored(self, hook: fn()) -> Self {
        Kmod {
            restored: Some(hook),
            ..self
        }
    }

    /// Reads `clock` at epoch boundaries (see [`crate::speculate::Progress`]).
    pub fn with_progress(self, clock: Progress) -> Self {
        Kmod {
            progress: Some(clock),
            ..self
        }
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
        // The lock is never held across the snapshot: under `cowctl run` this struct is in
        // covered memory, and a restore must never bring back a lock held at a snapshot.
        if !self.hinting.load(Ordering::Relaxed) {
            return self.quiesced(|| self.cow.snapshot());
        }
        let (hint, hint_empty, probe, observe, counters_before, own_hint) = {
            let spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
            let s = spec.speculator.as_ref();
            // Without a speculator the hint is the caller's own (`hint_addrs`): left alone.
            let hint = s.map(|s| s.hint()).filter(|h| *h != spec.hint_sent);
            // What the kernel will hold once the hint (if any) is sent.
            let hint_empty = hint
                .as_ref()
                .map_or(spec.hint_sent.is_empty(), |h| h.is_empty());
            (
                hint,
                hint_empty,
                s.is_some_and(|s| s.hint_is_probe()),
                s.is_some_and(|s| s.wants_observation()),
                // Counters only move in snapshots, faults and restores: those right after the
                // last observed snapshot are those right before this one, save for the
                // faults of the epoch (counted apart). Read them only when there is no such
                // snapshot.
                spec.last_id.is_some().then_some(spec.after_last),
                s.is_none(),
            )
        };
        let t0 = std::time::Instant::now();
        if let Some(hint) = &hint {
            self.cow.hint(hint)?;
        }
        let before = match (observe, counters_before) {
            (false, _) => None,
            (true, Some(last)) => Some(last),
            (true, None) => Some(self.cow.stats()?),
        };
        let id = if hint_empty {
            // Nothing to pre-copy: an ordinary snapshot.
            self.quiesced(|| self.cow.snapshot())
        } else {
            // Pre-copied pages stay writable: the snapshot must not race with writers, so the
            // other threads are stopped around it. The heap is held first: a thread stopped
            // inside malloc would otherwise keep its shard locked for good. (Stopping
            // allocates nothing: its state is in the book.)
            self.quiesced(|| {
                if own_hint {
                    // The caller's own hint acts where the module finds the caller alone;
                    // libcow stops other threads only for its own policies (a program that
                    // links libcow under `cowctl run` has two, and the other's threads are
                    // not this one's to stop).
                    return match self.cow.snapshot_quiesced_if_alone() {
                        Some(taken) => taken.map(|(id, _)| id),
                        None => self.cow.snapshot(),
                    };
                }
                // Alone (a fuzzer's loop, a single-threaded program), nothing else can write:
                // the module checks that itself, which costs far less than listing threads.
                if !self.others_seen.load(Ordering::Relaxed) {
                    if let Some(taken) = self.cow.snapshot_quiesced_if_alone() {
                        let (id, quiesced) = taken?;
                        if !quiesced {
                            // Taken as an ordinary snapshot (the hint unused this time).
                            self.others_seen.store(true, Ordering::Relaxed);
                        }
                        return Ok(id);
                    }
                }
                let stopped = crate::world::stop_others().map_err(|e| Error::Os {
                    op: "stop the other threads",
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                })?;
                let id = self.cow.snapshot_quiesced();
                drop(stopped);
                id
            })
        };
        let id = id?;
        let mut spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        // Recorded once the snapshot succeeded (after a failure the next one resends it).
        if let Some(hint) = hint {
            spec.hint_sent = hint;
        }
        match before {
            Some(before) => {
                let after = self.cow.stats()?;
                let cost_last = spec.cost_last;
                if let Some(last) = spec.last_id {
                    // The epoch after `last` just ended: what it wrote, and what speculation
                    // did for it.
                    let written = self.cow.dirty_in_epoch(last).unwrap_or_default();
                    let useful = after.precopy_useful - before.precopy_useful;
                    let faults = after.first_write_faults - spec.after_last.first_write_faults;
                    let precopied = spec.precopied_last;
                    if let Some(s) = spec.speculator.as_mut() {
                        s.observe(&written, precopied, useful, faults, cost_last);
                    }
                }
                // What speculation added to this snapshot (everything but the kernel's ordinary
                // snapshot work), to be weighed against the pre-copies it just made.
                let wall = t0.elapsed().as_nanos() as u64;
                let precopy_ns = after.precopy_ns - before.precopy_ns;
                let ordinary = (after.snapshot_ns - before.snapshot_ns).saturating_sub(precopy_ns);
                spec.cost_last = PrecopyCost {
                    extra_ns: wall.saturating_sub(ordinary),
                    per_pages_ns: precopy_ns,
                    probe,
                };
                spec.precopied_last = after.precopied_pages - before.precopied_pages;
                spec.after_last = after;
                spec.last_id = Some(id);
            }
            None => {
                if let Some(s) = spec.speculator.as_mut() {
                    s.skip();
                }
                spec.precopied_last = 0;
                spec.cost_last = PrecopyCost::default();
                spec.last_id = None;
            }
        }
        Ok(id)
    }

    fn restore(&self, id: u64) -> Result<()> {
        let Some(restored) = self.restored else {
            // Alone in the process, nothing else can touch the memory during the restore: the
            // module copies the pages back in place (no refaults after it). Else it swaps them
            // back, atomically against the other threads' writes.
            return self.cow.restore_in_place_if_alone(id);
        };
        // The restored memory may describe other mappings than the process has now: the other
        // threads must not run until they are back (the caller holds the heap already). They
        // are stopped, so the pages go back in place.
        let _stopped = crate::world::stop_others_for_restore().map_err(|e| Error::Os {
            op: "stop the other threads",
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
        self.cow.restore_in_place(id)?;
        restored();
        Ok(())
    }

    fn drop_snapshot(&self, id: u64) -> Result<()> {
        self.cow.drop_snapshot(id)
    }

    fn read(&self, id: u64, addr: usize, buf: &mut [u8]) -> Result<()> {
        // An unknown id is ENOENT whatever the address (as on the other backends): a
        // zero-length read checks the id alone.
        self.cow.read(id, 0, &mut [])?;
        // Piece by piece: adjacent mappings need not be adjacent in the space, and a range
        // that leaves the space's mappings is EFAULT rather than another region's bytes.
        let mappings = cow_mappings()?;
        let mut done = 0;
        while done < buf.len() {
            let a = addr.checked_add(done).ok_or(Error::Os {
                op: "address outside the space's regions",
                errno: libc::EFAULT,
            })?;
            let m = mappings
                .iter()
                .find(|m| (m.start..m.end).contains(&a))
                .ok_or(Error::Os {
                    op: "address outside the space's regions",
                    errno: libc::EFAULT,
                })?;
            let n = (m.end - a).min(buf.len() - done);
            let offset = (m.offset & SPACE_OFFSET_MASK) + (a - m.start) as u64;
            self.cow.read(id, offset, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
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

    fn set_speculation(&self, policy: Policy, recorded: Option<Recording>) -> Result<()> {
        let mut spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        let costs = Costs::measure(crate::speculate::measure_kmod_fault_ns);
        let mut speculator = match (policy, recorded) {
            (Policy::Oracle, Some(r)) => Speculator::oracle(r, costs),
            (p, _) => Speculator::new(p, costs),
        };
        if let Some(clock) = self.progress {
            speculator.set_progress(clock);
        }
        self.hinting
            .store(policy != Policy::None, Ordering::Relaxed);
        spec.speculator = Some(speculator);
        spec.last_id = None;
        spec.hint_sent.clear();
        self.cow.hint(&[])
    }

    fn record_write_sets(&self) -> Result<()> {
        let mut spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        let s = spec
            .speculator
            .get_or_insert_with(|| Speculator::new(Policy::None, Costs::default()));
        s.record = Some(Recording::default());
        if let Some(clock) = self.progress {
            s.set_progress(clock);
        }
        // Observation needs the quiesced path's bookkeeping (an empty hint copies nothing).
        self.hinting.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn recorded_write_sets(&self) -> Option<Recording> {
        let spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        spec.speculator.as_ref().and_then(|s| s.record.clone())
    }

    fn speculation(&self) -> Option<Totals> {
        let spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        spec.speculator.as_ref().map(|s| s.totals)
    }

    fn hint_addrs(&self, addrs: &[usize]) -> Result<()> {
        let mappings = cow_mappings()?;
        let page = self.cow.page_size() as u64;
        let pages: Vec<u64> = addrs
            .iter()
            .filter_map(|&a| {
                mappings
                    .iter()
                    .find(|m| (m.start..m.end).contains(&a))
                    .map(|m| ((m.offset & SPACE_OFFSET_MASK) + (a - m.start) as u64) / page)
            })
            .collect();
        self.cow.hint(&pages)?;
        self.hinting.store(!pages.is_empty(), Ordering::Relaxed);
        self.spec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hint_sent = pages;
        Ok(())
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
            precopied: s.precopied_pages,
            precopy_useful: s.precopy_useful,
            around_pages: s.around_pages,
            around_useful: s.around_useful,
        }
    }
}
