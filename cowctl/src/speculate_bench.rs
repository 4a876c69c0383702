//! `cowctl bench --speculate=<policy|all>`: speculative pre-copy on synthetic workloads, each
//! policy against no speculation and against an oracle replaying the real write sets.

use anyhow::{bail, Result};
use cow::speculate::Policy;
use serde::Serialize;
use std::time::Instant;

/// Pages of the covered region.
const PAGES: usize = 16384; // 64 MiB
/// Epochs (snapshots) per run.
const EPOCHS: usize = 300;
/// Pages written per epoch: 2 % of the region.
const WORKING_SET: usize = PAGES / 50;

/// A write pattern.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// The same 2 % of the pages every epoch.
    Stable,
    /// A 2 % window that slides by a quarter of its size each epoch.
    Drifting,
    /// 2 % random pages each epoch: nothing to predict.
    Random,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Stable, Workload::Drifting, Workload::Random];

    /// The page indices written in `epoch`.
    fn pages(self, epoch: usize, rng: &mut u64) -> Vec<usize> {
        let spread = |i: usize| (i * 7919) % PAGES;
        let mut v: Vec<usize> = match self {
            Workload::Stable => (0..WORKING_SET).map(spread).collect(),
            Workload::Drifting => {
                let start = epoch * WORKING_SET / 4;
                (start..start + WORKING_SET).map(spread).collect()
            }
            Workload::Random => (0..WORKING_SET)
                .map(|_| {
                    *rng ^= *rng << 13;
                    *rng ^= *rng >> 7;
                    *rng ^= *rng << 17;
                    (*rng % PAGES as u64) as usize
                })
                .collect(),
        };
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One run: a workload under a policy.
#[derive(Serialize, Debug)]
pub struct Row {
    backend: &'static str,
    workload: Workload,
    policy: &'static str,
    epochs: usize,
    pages_per_epoch: usize,
    /// First-write faults taken over the run.
    faults: u64,
    /// Faults avoided compared with no speculation, in percent.
    faults_avoided_pct: f64,
    /// Useful pre-copies / pre-copies.
    precision: f64,
    /// Useful pre-copies / pages written.
    recall: f64,
    /// Pages pre-copied over the run.
    precopied: u64,
    /// Median snapshot latency.
    snapshot_us: f64,
    /// Writes + snapshots, the whole run.
    total_ms: f64,
    /// Total relative to no speculation (1.0 = same; below is faster).
    vs_none: f64,
}

fn run_one(
    workload: Workload,
    policy: Policy,
    recorded: Option<Vec<Vec<u64>>>,
) -> Result<(Row, Vec<Vec<u64>>)> {
    let (b, _) = cow::backend::open("kmod")?;
    let base = b.map(PAGES * 4096)?;
    for p in 0..PAGES {
        // SAFETY: pages of the region just mapped.
        unsafe { base.add(p * 4096).write_volatile(1) };
    }
    let first_page = {
        // The space offset of the region, in pages: what hints and write sets speak.
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{:x}-", base as usize)))
            .ok_or_else(|| anyhow::anyhow!("region not in maps"))?;
        let off = u64::from_str_radix(line.split_whitespace().nth(2).unwrap_or("0"), 16)?;
        (off & ((1 << 44) - 1)) / 4096
    };
    b.set_speculation(
        policy,
        recorded.map(|r| {
            r.into_iter()
                .map(|e| e.into_iter().map(|p| p + first_page).collect())
                .collect()
        }),
    )?;
    let stats0 = b.stats();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut snaps = Vec::with_capacity(EPOCHS);
    let mut record = Vec::with_capacity(EPOCHS);
    let mut prev = b.snapshot()?;
    let start = Instant::now();
    for epoch in 0..EPOCHS {
        let pages = workload.pages(epoch, &mut rng);
        for &p in &pages {
            // SAFETY: as above.
            unsafe { base.add(p * 4096 + 64).write_volatile(epoch as u8) };
        }
        record.push(pages.iter().map(|&p| p as u64).collect());
        let t = Instant::now();
        let id = b.snapshot()?;
        snaps.push(t.elapsed().as_secs_f64() * 1e6);
        b.drop_snapshot(prev)?;
        prev = id;
    }
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    let st = b.stats();
    let faults = st.write_faults - stats0.write_faults;
    let precopied = st.precopied - stats0.precopied;
    let useful = st.precopy_useful - stats0.precopy_useful;
    snaps.sort_by(|a, b| a.total_cmp(b));
    // SAFETY: unmapping the region; the space closes with the backend.
    unsafe { libc::munmap(base.cast(), PAGES * 4096) };
    Ok((
        Row {
            backend: "kmod",
            workload,
            policy: policy.name(),
            epochs: EPOCHS,
            pages_per_epoch: WORKING_SET,
            faults,
            faults_avoided_pct: 0.0,
            precision: if precopied == 0 {
                0.0
            } else {
                useful as f64 / precopied as f64
            },
            recall: if useful + faults == 0 {
                0.0
            } else {
                useful as f64 / (useful + faults) as f64
            },
            precopied,
            snapshot_us: snaps[snaps.len() / 2],
            total_ms,
            vs_none: 1.0,
        },
        record,
    ))
}

/// Timing-based decisions and results are meaningless on a clock that ticks in milliseconds
/// (a TCG guest whose TSC was refused falls back to jiffies): say so loudly.
fn warn_if_coarse_clock() {
    let mut finest = u128::MAX;
    for _ in 0..200 {
        let t = Instant::now();
        let mut d = t.elapsed().as_nanos();
        while d == 0 {
            d = t.elapsed().as_nanos();
        }
        finest = finest.min(d);
    }
    if finest > 100_000 {
        eprintln!(
            "cowctl bench: WARNING: the clock ticks every {:.1} ms here; timings (and the adaptive \
             policy, which measures) are unreliable in this run",
            finest as f64 / 1e6
        );
    }
}

/// Runs the speculation benchmark for `policies` (`none` and `oracle` always included).
pub fn run(policies: &[Policy], json: bool) -> Result<()> {
    if cow::Cow::open().is_err() {
        bail!("speculation needs cow.ko (run inside scripts/guest)");
    }
    warn_if_coarse_clock();
    let mut rows = Vec::new();
    for w in Workload::ALL {
        eprintln!("cowctl bench --speculate: {w:?}, policy none");
        let (none, recorded) = run_one(w, Policy::None, None)?;
        let base_faults = none.faults.max(1) as f64;
        let base_ms = none.total_ms;
        rows.push(none);
        for &p in policies.iter().filter(|p| **p != Policy::None) {
            eprintln!("cowctl bench --speculate: {w:?}, policy {}", p.name());
            let rec = (p == Policy::Oracle).then(|| recorded.clone());
            let (mut row, _) = run_one(w, p, rec)?;
            row.faults_avoided_pct = 100.0 * (1.0 - row.faults as f64 / base_faults);
            row.vs_none = row.total_ms / base_ms;
            rows.push(row);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<9} {:<9} {:>8} {:>9} {:>9} {:>7} {:>11} {:>9} {:>8}",
        "workload",
        "policy",
        "faults",
        "avoided%",
        "precision",
        "recall",
        "snapshot µs",
        "total ms",
        "vs none"
    );
    for r in &rows {
        println!(
            "{:<9} {:<9} {:>8} {:>9.1} {:>9.2} {:>7.2} {:>11.1} {:>9.1} {:>8.3}",
            format!("{:?}", r.workload).to_lowercase(),
            r.policy,
            r.faults,
            r.faults_avoided_pct,
            r.precision,
            r.recall,
            r.snapshot_us,
            r.total_ms,
            r.vs_none
        );
    }
    Ok(())
}
