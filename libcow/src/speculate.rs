//! Speculative pre-copy: predicting the pages the next epoch will write.
//!
//! A program that snapshots often rewrites much the same pages every epoch, and each of them
//! then pays a write fault plus a copy. cow.ko can copy hinted pages at the snapshot and leave
//! them writable (`COW_IOC_HINT` + a quiesced `COW_IOC_SNAPSHOT`): a hit saves the fault, a miss
//! costs a copy. The mechanism is in the kernel; the policy — which pages to hint — is here.
//!
//! Policies:
//! - `active`: pages that faulted join an active set; the set's capacity grows while faults
//!   keep coming and shrinks (by random eviction) when they stop.
//! - `stable`: a page stays in the set until it went unwritten for [`STABLE_EPOCHS`] epochs.
//! - `adaptive`: `stable`, switched off while the copies it wastes cost more than the faults it
//!   saves (costs measured on this machine at start-up and from the kernel's counters), with
//!   exponential back-off before it tries again.
//! - `oracle` (evaluation only): replays the write sets recorded in a previous run.

use crate::book::BookVec;
use std::str::FromStr;

/// Epochs a page may go unwritten before `stable` forgets it.
pub const STABLE_EPOCHS: u32 = 3;

/// Pages an `adaptive` probe pre-copies (a sample of the predicted set).
pub const PROBE_PAGES: usize = 64;

/// A speculation policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// No speculation.
    None,
    /// Active set with random eviction.
    Active,
    /// Stability: pages leave after [`STABLE_EPOCHS`] unwritten epochs.
    Stable,
    /// `stable` with the cost-based off-switch.
    Adaptive,
    /// Replays recorded write sets (evaluation only).
    Oracle,
}

impl Policy {
    /// Every policy, `none` first.
    pub const ALL: [Policy; 5] = [
        Policy::None,
        Policy::Active,
        Policy::Stable,
        Policy::Adaptive,
        Policy::Oracle,
    ];

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Active => "active",
            Policy::Stable => "stable",
            Policy::Adaptive => "adaptive",
            Policy::Oracle => "oracle",
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown policy {s:?} (none, active, stable, adaptive, oracle)"))
    }
}

/// Costs the adaptive policy weighs, measured on the running machine.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Costs {
    /// A first-write fault, as the writing thread sees it (trap + pre-image copy), in ns.
    pub fault_ns: f64,
    /// Copying (or comparing) one page, in ns.
    pub copy_ns: f64,
}

impl Costs {
    /// Measures both on this machine: page copies, and a first-write fault of the backend that
    /// will speculate (`fault_probe`: its own trap, as the writing thread sees it; a cow.ko
    /// fault and an mprotect signal differ by an order of magnitude). Without a probe result
    /// the fault is estimated at ten copies.
    pub fn measure(fault_probe: impl FnOnce() -> Option<f64>) -> Costs {
        let copy_ns = measure_copy_ns();
        let fault_ns = fault_probe().unwrap_or(copy_ns * 10.0);
        Costs { fault_ns, copy_ns }
    }
}

/// The lower quartile of `rounds` per-page timings of `round` (which returns nanoseconds per
/// page). Noise only ever adds time, and on a loaded machine or under emulation it adds a
/// lot to whole rounds: the median of a few rounds still came out three times the cost a
/// workload really paid per fault, which made speculation look far more valuable than it is.
pub fn typical_per_page(rounds: usize, mut round: impl FnMut(usize) -> Option<f64>) -> Option<f64> {
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        samples.push(round(i)?);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples.get(rounds / 4).copied()
}

fn measure_copy_ns() -> f64 {
    const PAGES: usize = 1024;
    let src = vec![7u8; PAGES * 4096];
    // Touch the destination first: the measurement is of copies, not of page faults.
    let mut dst = vec![1u8; PAGES * 4096];
    std::hint::black_box(&mut dst);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for p in 0..PAGES {
            dst[p * 4096..(p + 1) * 4096].copy_from_slice(&src[p * 4096..(p + 1) * 4096]);
        }
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_nanos() as f64 / PAGES as f64);
    }
    best
}

/// Rounds of first-write probes (each writes a few dozen pages after a snapshot).
pub const PROBE_ROUNDS: usize = 15;

/// A cow.ko first-write fault: writes to a scratch space's pages after a snapshot.
pub fn measure_kmod_fault_ns() -> Option<f64> {
    const PAGES: usize = 64;
    let cow = crate::Cow::open().ok()?;
    let r = cow.map_region(PAGES * 4096).ok()?;
    // Backwards: an ascending writer would have most pages saved ahead by cow.ko's
    // fault-around, and the probe would not measure a fault.
    let touch = |v: u8| {
        for p in (0..PAGES).rev() {
            // SAFETY: pages of the scratch region just mapped.
            unsafe { r.addr.add(p * 4096).write_volatile(v) };
        }
    };
    touch(1);
    let typical = typical_per_page(PROBE_ROUNDS, |i| {
        cow.snapshot().ok()?;
        let t = std::time::Instant::now();
        touch(i as u8 + 2);
        Some(t.elapsed().as_nanos() as f64 / PAGES as f64)
    });
    // SAFETY: unmapping the scratch region; the space closes with `cow`.
    unsafe { libc::munmap(r.addr.cast(), r.len) };
    typical
}

/// What speculation did, summed over the epochs observed.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Totals {
    /// Epochs observed.
    pub epochs: u64,
    /// Pages pre-copied.
    pub precopied: u64,
    /// Pre-copied pages that were then written.
    pub useful: u64,
    /// First-write faults taken.
    pub faults: u64,
    /// Pages written (faulted or pre-copied and written).
    pub written: u64,
    /// The costs the policy weighed (measured at start-up on this backend).
    pub costs: Costs,
}

impl Totals {
    /// Useful pre-copies / pre-copies.
    pub fn precision(&self) -> f64 {
        if self.precopied == 0 {
            0.0
        } else {
            self.useful as f64 / self.precopied as f64
        }
    }
    /// Useful pre-copies / pages written.
    pub fn recall(&self) -> f64 {
        let total = self.useful + self.faults;
        if total == 0 {
            0.0
        } else {
            self.useful as f64 / total as f64
        }
    }
}

/// A program-progress clock (libcow_preload counts allocator calls): deterministic for a
/// deterministic program, unlike time, so a replay can line epochs up with a recording.
pub type Progress = fn() -> u64;

/// The write sets of a run, for an oracle to replay.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Recording {
    /// The pages each epoch wrote, in the units hints use.
    pub epochs: Vec<Vec<u64>>,
    /// The program's progress when each epoch started (empty without a progress clock: the
    /// replay then goes by epoch index).
    #[serde(default)]
    pub starts: Vec<u64>,
}

impl Recording {
    /// A recording replayed by epoch index.
    pub fn by_index(epochs: Vec<Vec<u64>>) -> Self {
        Recording {
            epochs,
            starts: Vec::new(),
        }
    }

    /// What the recorded run wrote while its progress went from `from` to `to`: the union of
    /// the epochs overlapping that stretch, sorted.
    fn written_between(&self, from: u64, to: u64) -> Vec<u64> {
        let first = self
            .starts
            .partition_point(|&s| s <= from)
            .saturating_sub(1);
        let mut out: Vec<u64> = Vec::new();
        for (e, &start) in self.starts.iter().enumerate().skip(first) {
            if start >= to.max(from + 1) {
                break;
            }
            out.extend_from_slice(self.epochs.get(e).map_or(&[][..], |v| v));
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// What the pre-copies an epoch is judged on cost, as the backend measured them.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrecopyCost {
    /// Everything speculation added to the snapshot that made them: the hint, stopping the
    /// threads, the copies (or unprotects), the bookkeeping.
    pub extra_ns: u64,
    /// The part of it that grows with the pages: the copies (kmod) or unprotects and
    /// comparisons (mprotect).
    pub per_pages_ns: u64,
    /// Whether the hint that made them was a probe ([`Speculator::hint_is_probe`]).
    pub probe: bool,
}

/// The predicted pages, `(page, epochs unwritten)`, sorted: in the allocator's heap or in
/// libcow's book, wherever the speculator itself lives ([`Speculator::kept_in_book`]).
enum PageSet {
    Heap(Vec<(u64, u32)>),
    Book(BookVec<(u64, u32)>),
}

impl PageSet {
    fn as_slice(&self) -> &[(u64, u32)] {
        match self {
            PageSet::Heap(v) => v,
            PageSet::Book(v) => v.as_slice(),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [(u64, u32)] {
        match self {
            PageSet::Heap(v) => v,
            PageSet::Book(v) => v.as_mut_slice(),
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// An empty set kept where this one is, with room for `capacity`.
    fn empty_like(&self, capacity: usize) -> PageSet {
        match self {
            PageSet::Heap(_) => PageSet::Heap(Vec::with_capacity(capacity)),
            PageSet::Book(_) => {
                let mut v = BookVec::new();
                v.reserve(capacity);
                PageSet::Book(v)
            }
        }
    }

    fn push(&mut self, e: (u64, u32)) {
        match self {
            PageSet::Heap(v) => v.push(e),
            PageSet::Book(v) => v.push(e),
        }
    }

    fn remove(&mut self, i: usize) {
        match self {
            PageSet::Heap(v) => {
                v.remove(i);
            }
            PageSet::Book(v) => {
                let n = v.len();
                v.as_mut_slice().copy_within(i + 1.., i);
                v.truncate(n - 1);
            }
        }
    }

    fn retain_unwritten_for_less_than(&mut self, epochs: u32) {
        match self {
            PageSet::Heap(v) => v.retain(|e| e.1 < epochs),
            PageSet::Book(v) => v.retain(|e| e.1 < epochs),
        }
    }
}

/// A policy's state.
pub struct Speculator {
    policy: Policy,
    costs: Costs,
    /// Predicted pages, sorted, with their unwritten-epoch counts.
    set: PageSet,
    /// `active`: capacity of the set.
    cap: usize,
    rng: u64,
    /// `adaptive`: epochs left switched off, current back-off, and the running balance.
    off_for: u32,
    backoff: u32,
    /// Epochs observed since speculation was last switched on.
    on_epochs: u32,
    /// `adaptive`: the next hinted epoch is a probe (a sample of the set), at start and after
    /// every back-off.
    probing: bool,
    benefit: f64,
    waste: f64,
    /// `oracle`: the write sets of a previous run, and the next epoch's index.
    recorded: Recording,
    epoch: usize,
    /// The progress clock, and its reading when the current epoch started.
    progress: Option<Progress>,
    epoch_start: u64,
    /// Sums over the run.
    pub totals: Totals,
    /// Write sets seen so far (kept when recording for a later oracle run).
    pub record: Option<Recording>,
}

impl Speculator {
    /// A speculator for `policy` weighing `costs`.
    pub fn new(policy: Policy, costs: Costs) -> Self {
        Speculator {
            policy,
            costs,
            set: PageSet::Heap(Vec::new()),
            cap: 64,
            rng: 0x9E37_79B9_7F4A_7C15,
            off_for: 0,
            backoff: 4,
            on_epochs: 0,
            probing: true,
            benefit: 0.0,
            waste: 0.0,
            recorded: Recording::default(),
            epoch: 0,
            progress: None,
            epoch_start: 0,
            totals: Totals {
                costs,
                ..Totals::default()
            },
            record: None,
        }
    }

    /// An oracle replaying `recorded`: by progress if it has epoch starts and this speculator
    /// a progress clock (see [`Speculator::set_progress`]), else by epoch index.
    pub fn oracle(recorded: Recording, costs: Costs) -> Self {
        Speculator {
            recorded,
            ..Self::new(Policy::Oracle, costs)
        }
    }

    /// Reads `clock` at every epoch boundary: recordings then carry each epoch's start, and an
    /// oracle replays what the recorded run wrote over the same stretch of the program.
    pub fn set_progress(&mut self, clock: Progress) {
        self.progress = Some(clock);
        self.epoch_start = clock();
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether the adaptive off-switch has speculation off now.
    pub fn is_off(&self) -> bool {
        self.off_for > 0
    }

    /// Keeps the policy's state in libcow's book instead of the allocator's heap: for an owner
    /// that lives in the book itself (the uffd and mprotect backends' state). What a restore
    /// of the program's memory rewinds must be all or none of the speculator: under uffd and
    /// mprotect glibc's heap is covered, and a `Vec` there under a header in the book was
    /// rewound under the checkpointer (`free(): invalid pointer`); under cow.ko the backend
    /// itself is in covered memory, and a book vector under a rewound header was freed twice.
    pub fn kept_in_book(mut self) -> Self {
        self.set = PageSet::Book(BookVec::new());
        self
    }

    /// The hint for the epoch that the next snapshot starts.
    pub fn hint(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.hint_each(|p| out.push(p));
        out
    }

    /// [`Speculator::hint`] into a book vector (no allocator call while threads are stopped).
    pub fn hint_into(&self, out: &mut BookVec<u64>) {
        out.clear();
        self.hint_each(|p| out.push(p));
    }

    fn hint_each(&self, mut out: impl FnMut(u64)) {
        let set = self.set.as_slice();
        match self.policy {
            Policy::None => {}
            Policy::Oracle => match self.progress {
                Some(clock) if !self.recorded.starts.is_empty() => {
                    // The coming epoch will cover about as much progress as the last one did.
                    let now = clock();
                    let span = now.saturating_sub(self.epoch_start).max(1);
                    self.recorded
                        .written_between(now, now + span)
                        .into_iter()
                        .for_each(out);
                }
                _ => self
                    .recorded
                    .epochs
                    .get(self.epoch)
                    .map_or(&[][..], |v| v)
                    .iter()
                    .for_each(|&p| out(p)),
            },
            Policy::Adaptive if self.off_for > 0 => {}
            Policy::Adaptive if self.probing => {
                // An evenly spread sample of the set: enough to measure precision and cost,
                // cheap when the answer is no.
                let step = set.len().div_ceil(PROBE_PAGES).max(1);
                set.iter().step_by(step).for_each(|e| out(e.0));
            }
            _ => set.iter().for_each(|e| out(e.0)),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Whether the next snapshot should gather the epoch's write set for [`Self::observe`]
    /// (not while the adaptive policy is switched off, except in the last epoch before it
    /// tries again, to relearn the working set).
    pub fn wants_observation(&self) -> bool {
        self.record.is_some() || (self.policy != Policy::None && self.off_for <= 1)
    }

    /// Counts an epoch that was not observed (speculation switched off).
    pub fn skip(&mut self) {
        self.totals.epochs += 1;
        self.epoch += 1;
        if self.off_for > 0 {
            self.off_for -= 1;
        }
    }

    /// Whether [`Speculator::hint`] returns a probe now (a sample of the set, `adaptive`).
    /// Callers remember it with the pre-copies the hint makes, for [`Speculator::observe`].
    pub fn hint_is_probe(&self) -> bool {
        self.policy == Policy::Adaptive && self.off_for == 0 && self.probing
    }

    /// Learns from the epoch that just ended: the pages it wrote (sorted), the kernel's counts
    /// for it (pre-copies made for it, how many were written, faults taken), and what those
    /// pre-copies cost (`cost`).
    pub fn observe(
        &mut self,
        written: &[u64],
        precopied: u64,
        useful: u64,
        faults: u64,
        cost: PrecopyCost,
    ) {
        self.totals.epochs += 1;
        self.totals.precopied += precopied;
        self.totals.useful += useful;
        self.totals.faults += faults;
        self.totals.written += written.len() as u64;
        self.epoch += 1;
        if let Some(r) = self.record.as_mut() {
            r.epochs.push(written.to_vec());
            if self.progress.is_some() {
                r.starts.push(self.epoch_start);
            }
        }
        if let Some(clock) = self.progress {
            self.epoch_start = clock();
        }
        match self.policy {
            Policy::Adaptive if self.off_for > 1 => {
                // Switched off and not relearning yet: nothing to learn or judge.
                self.off_for -= 1;
            }
            Policy::None | Policy::Oracle => {}
            Policy::Active => self.observe_active(written),
            Policy::Stable => self.observe_stable(written),
            Policy::Adaptive => {
                self.observe_stable(written);
                self.switch(precopied, useful, cost);
            }
        }
    }

    /// Adds the pages of `written` (sorted) not in the set yet, in one merge; returns how many.
    fn merge_new(&mut self, written: &[u64]) -> usize {
        let set = self.set.as_slice();
        let mut merged = self.set.empty_like(set.len() + written.len());
        let (mut i, mut added) = (0, 0);
        for &p in written {
            while i < set.len() && set[i].0 < p {
                merged.push(set[i]);
                i += 1;
            }
            if i < set.len() && set[i].0 == p {
                continue;
            }
            if merged
                .as_slice()
                .last()
                .is_some_and(|e: &(u64, u32)| e.0 == p)
            {
                continue;
            }
            merged.push((p, 0));
            added += 1;
        }
        set[i..].iter().for_each(|&e| merged.push(e));
        self.set = merged;
        added
    }

    fn observe_active(&mut self, written: &[u64]) {
        let faulted = self.merge_new(written);
        // Grow while faults keep coming, but never past twice what an epoch writes.
        let bound = 2 * written.len() + 64;
        if faulted > 0 {
            self.cap = (self.cap + faulted).min(bound);
        } else {
            self.cap = (self.cap * 7 / 8).max(16);
        }
        // Shrink by random eviction, preferring pages this epoch did not write.
        while self.set.len() > self.cap {
            let i = (self.random() % self.set.len() as u64) as usize;
            let p = self.set.as_slice()[i].0;
            if written.binary_search(&p).is_err() || self.random().is_multiple_of(4) {
                self.set.remove(i);
            }
        }
    }

    fn observe_stable(&mut self, written: &[u64]) {
        for e in self.set.as_mut_slice() {
            if written.binary_search(&e.0).is_ok() {
                e.1 = 0;
            } else {
                e.1 += 1;
            }
        }
        self.set.retain_unwritten_for_less_than(STABLE_EPOCHS);
        self.merge_new(written);
    }

    /// The off-switch: speculation pays when the faults it saves (each a trap plus a copy in
    /// the fault path) outweigh what it costs, measured rather than modelled: the time it adds
    /// to a snapshot (pre-copies, checks, the hint, stopping the threads, its bookkeeping).
    fn switch(&mut self, precopied: u64, useful: u64, cost: PrecopyCost) {
        if self.off_for > 0 {
            self.off_for -= 1;
            return;
        }
        if precopied == 0 {
            if cost.probe {
                // Not one sampled page was even rewritten before the snapshot: nothing to gain.
                self.switch_off();
            }
            return;
        }
        let saved = useful as f64 * self.costs.fault_ns;
        let wasted = cost.extra_ns as f64;
        self.benefit = 0.7 * self.benefit + 0.3 * saved;
        self.waste = 0.7 * self.waste + 0.3 * wasted;
        self.on_epochs += 1;
        // Judge only after a few epochs of evidence, and with a margin: speculation must not
        // make a workload slower, so it has to pay clearly to stay on.
        // A clear loss in one epoch switches off at once.
        let clear_loss = wasted > 1.5 * saved;
        if cost.probe {
            // A sampled epoch decides whether the whole set is worth pre-copying: the sampled
            // pages must pay for their own copies (the fixed costs, spread over few pages
            // here, are the running balance's business once the whole set is on).
            if cost.per_pages_ns as f64 > saved {
                self.switch_off();
            } else if self.probing {
                self.probing = false;
                self.benefit = 0.0;
                self.waste = 0.0;
                self.on_epochs = 0;
            }
            return;
        }
        if clear_loss || (self.on_epochs >= 2 && self.waste > 0.8 * self.benefit) {
            self.switch_off();
        } else if self.on_epochs >= 16 {
            // Sustained success: the next failure starts its back-off short again.
            self.backoff = 4;
        }
    }

    /// Off for the current back-off, which doubles; the next try starts with a probe.
    fn switch_off(&mut self) {
        self.off_for = self.backoff;
        self.backoff = (self.backoff * 2).min(256);
        self.benefit = 0.0;
        self.waste = 0.0;
        self.on_epochs = 0;
        self.probing = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(extra_ns: u64, probe: bool) -> PrecopyCost {
        PrecopyCost {
            extra_ns,
            per_pages_ns: extra_ns / 2,
            probe,
        }
    }

    fn costs() -> Costs {
        Costs {
            fault_ns: 2000.0,
            copy_ns: 200.0,
        }
    }

    #[test]
    fn stable_keeps_a_stable_set_and_forgets_idle_pages() {
        let mut s = Speculator::new(Policy::Stable, costs());
        let ws: Vec<u64> = (0..50).collect();
        for _ in 0..5 {
            s.observe(&ws, 0, 0, 50, cost(0, false));
        }
        assert_eq!(s.hint(), ws);
        for _ in 0..STABLE_EPOCHS {
            s.observe(&[1000], 0, 0, 1, cost(0, false));
        }
        assert_eq!(s.hint(), vec![1000]);
    }

    #[test]
    fn active_set_is_bounded_and_shrinks() {
        let mut s = Speculator::new(Policy::Active, costs());
        for e in 0..20u64 {
            let ws: Vec<u64> = (e * 100..e * 100 + 100).collect();
            s.observe(&ws, 0, 0, 100, cost(0, false));
        }
        let grown = s.hint().len();
        assert!(grown >= 100);
        for _ in 0..60 {
            s.observe(&[], 0, 0, 0, cost(0, false));
        }
        assert!(s.hint().len() < grown / 4, "{} vs {grown}", s.hint().len());
    }

    #[test]
    fn adaptive_switches_off_when_copies_are_wasted_and_retries() {
        let mut s = Speculator::new(Policy::Adaptive, costs());
        s.observe(&(0..100).collect::<Vec<_>>(), 0, 0, 100, cost(0, false));
        assert!(!s.hint().is_empty());
        // 100 pre-copies, none written, 1 ms added to each snapshot: pure waste.
        for _ in 0..3 {
            s.observe(
                &(500..600).collect::<Vec<_>>(),
                100,
                0,
                100,
                cost(1_000_000, false),
            );
        }
        assert!(s.is_off() && s.hint().is_empty());
        for _ in 0..4 {
            s.observe(&(500..600).collect::<Vec<_>>(), 0, 0, 100, cost(0, false));
        }
        assert!(!s.is_off(), "it tries again after its back-off");
        assert!(s.hint().len() <= PROBE_PAGES, "a probe first");
    }

    #[test]
    fn adaptive_gives_up_on_a_probe_that_precopies_nothing() {
        let mut s = Speculator::new(Policy::Adaptive, costs());
        s.observe(&(0..1000).collect::<Vec<_>>(), 0, 0, 1000, cost(0, false));
        assert!(s.hint_is_probe());
        s.observe(
            &(5000..6000).collect::<Vec<_>>(),
            0,
            0,
            1000,
            cost(30_000, true),
        );
        assert!(s.is_off() && s.hint().is_empty());
    }

    #[test]
    fn adaptive_probes_with_a_sample_then_goes_all_in() {
        let mut s = Speculator::new(Policy::Adaptive, costs());
        let ws: Vec<u64> = (0..1000).collect();
        s.observe(&ws, 0, 0, 1000, cost(0, false));
        let probe = s.hint();
        assert!(
            !probe.is_empty() && probe.len() <= PROBE_PAGES,
            "{}",
            probe.len()
        );
        // The probe paid: 64 faults of 2 µs saved for 20 µs added.
        s.observe(
            &ws,
            probe.len() as u64,
            probe.len() as u64,
            936,
            cost(20_000, true),
        );
        assert_eq!(s.hint().len(), 1000);
    }

    #[test]
    fn adaptive_stays_on_when_it_pays() {
        let mut s = Speculator::new(Policy::Adaptive, costs());
        let ws: Vec<u64> = (0..100).collect();
        s.observe(&ws, 0, 0, 100, cost(0, false));
        // 95 faults of 2 µs saved for 50 µs added: it pays.
        for _ in 0..10 {
            s.observe(&ws, 100, 95, 5, cost(50_000, false));
        }
        assert!(!s.is_off());
        assert!(s.totals.recall() > 0.8);
    }

    #[test]
    fn recording_replays_by_progress() {
        let r = Recording {
            epochs: vec![vec![1, 2], vec![3], vec![4, 1]],
            starts: vec![0, 100, 200],
        };
        assert_eq!(r.written_between(0, 50), vec![1, 2]);
        assert_eq!(r.written_between(150, 250), vec![1, 3, 4]);
        assert_eq!(r.written_between(100, 101), vec![3]);
        assert_eq!(
            r.written_between(900, 950),
            vec![1, 4],
            "past the end: the last epoch"
        );
    }

    #[test]
    fn oracle_replays() {
        let s = Speculator::oracle(Recording::by_index(vec![vec![1, 2], vec![3]]), costs());
        assert_eq!(s.hint(), vec![1, 2]);
    }
}
