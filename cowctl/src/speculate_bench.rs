//! `cowctl bench --speculate=<policy|all>`: speculative pre-copy on synthetic workloads, each
//! policy against no speculation and against an oracle replaying the real write sets.

use anyhow::{bail, Result};
use cow::speculate::Policy;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Pages of the covered region.
const PAGES: usize = 16384; // 64 MiB
/// Epochs (snapshots) per run.
const EPOCHS: usize = 300;
/// Pages written per epoch: 2 % of the region.
const WORKING_SET: usize = PAGES / 50;

/// A write pattern.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// The same 2 % of the pages every epoch.
    Stable,
    /// A 2 % window that slides by a quarter of its size each epoch.
    Drifting,
    /// 2 % random pages each epoch: nothing to predict.
    Random,
    /// A real program: Debian's perl running a key-value cache script (`workloads/kv.pl`)
    /// under `cowctl run --every`, its heap and globals covered by cow.ko.
    #[serde(rename = "perl-kv")]
    PerlKv,
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
            Workload::PerlKv => Vec::new(),
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
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Row {
    backend: String,
    workload: Workload,
    policy: String,
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
    /// A first-write fault on this backend as measured at start-up (what the adaptive policy
    /// weighs against the time speculation adds), in µs; 0 without speculation.
    fault_us: f64,
}

fn run_one(
    backend: &'static str,
    workload: Workload,
    policy: Policy,
    recorded: Option<Vec<Vec<u64>>>,
) -> Result<(Row, Vec<Vec<u64>>)> {
    let (b, _) = cow::backend::open(backend)?;
    let base = b.map(PAGES * 4096)?;
    for p in 0..PAGES {
        // SAFETY: pages of the region just mapped.
        unsafe { base.add(p * 4096).write_volatile(1) };
    }
    // What hints and write sets speak: kmod, page indices of the space; the in-process
    // backends, page addresses.
    let first_page = if backend != "kmod" {
        0
    } else {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{:x}-", base as usize)))
            .ok_or_else(|| anyhow::anyhow!("region not in maps"))?;
        let off = u64::from_str_radix(line.split_whitespace().nth(2).unwrap_or("0"), 16)?;
        (off & ((1 << 44) - 1)) / 4096
    };
    let page_id = |p: u64| -> u64 {
        if backend == "kmod" {
            p + first_page
        } else {
            base as u64 + p * 4096
        }
    };
    b.set_speculation(
        policy,
        recorded.map(|r| {
            cow::speculate::Recording::by_index(
                r.into_iter()
                    .map(|e| e.into_iter().map(page_id).collect())
                    .collect(),
            )
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
    let fault_us = b.speculation().map_or(0.0, |t| t.costs.fault_ns / 1e3);
    let st = b.stats();
    let faults = st.write_faults - stats0.write_faults;
    let precopied = st.precopied - stats0.precopied;
    let useful = st.precopy_useful - stats0.precopy_useful;
    snaps.sort_by(|a, b| a.total_cmp(b));
    // SAFETY: unmapping the region; the space closes with the backend.
    unsafe { libc::munmap(base.cast(), PAGES * 4096) };
    Ok((
        Row {
            backend: backend.to_string(),
            workload,
            policy: policy.name().to_string(),
            epochs: EPOCHS,
            pages_per_epoch: WORKING_SET,
            faults,
            faults_avoided_pct: 0.0,
            precision: ratios(precopied, useful, faults).precision(),
            recall: ratios(precopied, useful, faults).recall(),
            precopied,
            snapshot_us: snaps[snaps.len() / 2],
            total_ms,
            vs_none: 1.0,
            fault_us,
        },
        record,
    ))
}

/// The kernel's counts over a run, for their precision and recall.
fn ratios(precopied: u64, useful: u64, faults: u64) -> cow::speculate::Totals {
    cow::speculate::Totals {
        precopied,
        useful,
        faults,
        ..Default::default()
    }
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

/// Set in a worker process: `backend,workload,policy` to run.
const WORKER_ENV: &str = "COW_SPECULATE_WORKER";
/// Set in a worker process: where the `none` run writes (and the oracle reads) write sets.
const RECORD_ENV: &str = "COW_SPECULATE_RECORD";

fn worker(spec: &str) -> Result<()> {
    let mut it = spec.split(',');
    let backend: &'static str = match it.next() {
        Some("kmod") => "kmod",
        Some("uffd") => "uffd",
        Some("mprotect") => "mprotect",
        other => bail!("bad worker backend {other:?}"),
    };
    let workload: Workload = serde_json::from_str(&format!("\"{}\"", it.next().unwrap_or("")))?;
    let policy: Policy = it
        .next()
        .unwrap_or("")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let record_path = std::env::var(RECORD_ENV)?;
    let recorded = if policy == Policy::Oracle {
        Some(serde_json::from_str(&std::fs::read_to_string(
            &record_path,
        )?)?)
    } else {
        None
    };
    let (row, record) = run_one(backend, workload, policy, recorded)?;
    if policy == Policy::None {
        std::fs::write(&record_path, serde_json::to_string(&record)?)?;
    }
    println!("{}", serde_json::to_string(&row)?);
    Ok(())
}

/// The real program's script, and how often it is checkpointed.
pub(crate) const KV_SCRIPT: &str = include_str!("workloads/kv.pl");
const KV_EVERY_MS: f64 = 10.0;

/// Runs the perl workload once under `cowctl run --every` with `policy` (`record`: also write
/// the epochs' write sets there; an oracle replays `replay`). Returns the row and the
/// program's wall time.
fn run_program(
    policy: Option<Policy>,
    record: Option<&Path>,
    replay: Option<&Path>,
) -> Result<Row> {
    let report = std::env::temp_dir().join(format!("cowctl-kv-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let opts = crate::run::Options {
        every_ms: policy.map(|_| KV_EVERY_MS),
        speculate: policy.map(|p| p.name().to_string()),
        report: Some(report.clone()),
        ..Default::default()
    };
    let argv = ["perl".to_string(), "-e".to_string(), KV_SCRIPT.to_string()];
    let mut cmd = crate::run::command(&opts, &argv)?;
    if let Some(r) = record {
        cmd.env("COW_SPECULATE_RECORD", r);
    }
    if let Some(r) = replay {
        cmd.env("COW_SPECULATE_REPLAY", r);
    }
    let start = Instant::now();
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run perl: {e}"))?;
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("perl under cowctl run failed ({})", out.status);
    }
    let r = crate::run::read_report(&report)?;
    let _ = std::fs::remove_file(&report);
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let faults = n(&r["stats"]["write_faults"]);
    let precopied = n(&r["stats"]["precopied"]);
    let useful = n(&r["stats"]["precopy_useful"]);
    let epochs = n(&r["checkpoints"]["snapshots"]) as usize;
    Ok(Row {
        backend: "kmod".into(),
        workload: Workload::PerlKv,
        policy: policy.map_or("no-checkpoints", |p| p.name()).to_string(),
        epochs,
        pages_per_epoch: ((faults + useful) as usize)
            .checked_div(epochs)
            .unwrap_or(0),
        faults,
        faults_avoided_pct: 0.0,
        precision: ratios(precopied, useful, faults).precision(),
        recall: ratios(precopied, useful, faults).recall(),
        precopied,
        snapshot_us: r["checkpoints"]["snapshot_us_median"]
            .as_f64()
            .unwrap_or(0.0),
        total_ms,
        vs_none: 1.0,
        fault_us: r["speculation"]["costs"]["fault_ns"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e3,
    })
}

/// The real-program rows: the script under each policy, checkpointed every
/// [`KV_EVERY_MS`] ms. The oracle replays the write sets of a recording run by epoch index;
/// epochs are timer-driven, so it is near-perfect only where the program's phases repeat.
fn program_rows(policies: &[Policy]) -> Result<Vec<Row>> {
    if std::process::Command::new("perl")
        .arg("-e1")
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("cowctl bench --speculate: no perl here; the real-program workload is skipped");
        return Ok(Vec::new());
    }
    let record = std::env::temp_dir().join(format!("cowctl-kv-record-{}.json", std::process::id()));
    eprintln!("cowctl bench --speculate: kmod perl-kv, without checkpoints (for reference)");
    let alone = run_program(None, None, None)?;
    eprintln!("cowctl bench --speculate: kmod perl-kv, recording write sets for the oracle");
    run_program(Some(Policy::None), Some(&record), None)?;
    let mut rows = vec![alone];
    let order = std::iter::once(Policy::None)
        .chain(policies.iter().copied().filter(|p| *p != Policy::None));
    for p in order {
        eprintln!(
            "cowctl bench --speculate: kmod perl-kv, policy {}",
            p.name()
        );
        let replay = (p == Policy::Oracle).then_some(record.as_path());
        rows.push(run_program(Some(p), None, replay)?);
    }
    let _ = std::fs::remove_file(&record);
    Ok(rows)
}

/// Fills in each row's comparison with the group's `none` row.
fn relate_to_none(group: &mut [Row]) {
    let Some(none) = group.iter().find(|r| r.policy == "none") else {
        return;
    };
    let (faults, ms) = (none.faults.max(1) as f64, none.total_ms);
    for row in group.iter_mut() {
        if row.policy != "no-checkpoints" {
            row.faults_avoided_pct = 100.0 * (1.0 - row.faults as f64 / faults);
        }
        row.vs_none = row.total_ms / ms;
    }
}

/// Runs the speculation benchmark for `policies` (`none` and `oracle` always included), each
/// run in its own process (an in-process backend covers the whole process it lives in).
pub fn run(policies: &[Policy], only: &[String], workloads: &[String], json: bool) -> Result<()> {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        return worker(&spec);
    }
    let mut chosen: Vec<Workload> = Vec::new();
    for w in workloads {
        chosen.push(serde_json::from_str(&format!("\"{w}\"")).map_err(|_| {
            anyhow::anyhow!("unknown workload {w:?} (stable, drifting, random, perl-kv)")
        })?);
    }
    let runs = |w: Workload| chosen.is_empty() || chosen.contains(&w);
    let wanted = |b: &str| only.is_empty() || only.iter().any(|o| o == b);
    if let Some(other) = only
        .iter()
        .find(|o| !["kmod", "uffd", "mprotect"].contains(&o.as_str()))
    {
        bail!("speculation runs on kmod, uffd and mprotect, not {other:?}");
    }
    let mut backends = vec![];
    if wanted("kmod") {
        if cow::Cow::open().is_ok() {
            backends.push("kmod");
        } else if !only.is_empty() {
            cow::Cow::open()?;
        }
    }
    if wanted("uffd") {
        let k = cow::probe::kernel_features();
        if k.uffd_wp_async.available && k.pagemap_scan.available {
            backends.push("uffd");
        } else if !only.is_empty() {
            bail!("--backends uffd: {}", k.uffd_wp_async.detail);
        }
    }
    if wanted("mprotect") {
        backends.push("mprotect");
    }
    warn_if_coarse_clock();
    let record = std::env::temp_dir().join(format!("cowctl-speculate-{}.json", std::process::id()));
    let mut rows: Vec<Row> = Vec::new();
    for backend in backends {
        for w in Workload::ALL.into_iter().filter(|&w| runs(w)) {
            let mut group = Vec::new();
            let order = std::iter::once(Policy::None)
                .chain(policies.iter().copied().filter(|p| *p != Policy::None));
            for p in order {
                eprintln!(
                    "cowctl bench --speculate: {backend} {w:?}, policy {}",
                    p.name()
                );
                let name = serde_json::to_string(&w)?.trim_matches('"').to_string();
                let out = std::process::Command::new(std::env::current_exe()?)
                    .args(std::env::args_os().skip(1))
                    .env(WORKER_ENV, format!("{backend},{name},{}", p.name()))
                    .env(RECORD_ENV, &record)
                    .stderr(std::process::Stdio::inherit())
                    .output()?;
                if !out.status.success() {
                    bail!("{backend} {w:?} {} failed ({})", p.name(), out.status);
                }
                let text = String::from_utf8_lossy(&out.stdout);
                group.push(serde_json::from_str(text.lines().last().unwrap_or("{}"))?);
            }
            relate_to_none(&mut group);
            rows.append(&mut group);
        }
        if backend == "kmod" && runs(Workload::PerlKv) {
            let mut group = program_rows(policies)?;
            relate_to_none(&mut group);
            rows.append(&mut group);
        }
    }
    let _ = std::fs::remove_file(&record);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<9} {:<9} {:<14} {:>8} {:>9} {:>9} {:>7} {:>11} {:>9} {:>8}",
        "backend",
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
        let workload = serde_json::to_string(&r.workload)?;
        println!(
            "{:<9} {:<9} {:<14} {:>8} {:>9.1} {:>9.2} {:>7.2} {:>11.1} {:>9.1} {:>8.3}",
            r.backend,
            workload.trim_matches('"'),
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
