//! `cowctl bench --programs`, real programs checkpointed at 100 Hz: Debian's perl running the
//! key-value cache (`workloads/kv.pl`) and Debian's python3 churning a dict
//! (`workloads/dict.py`), each under `cowctl run --backend B` without checkpoints and then
//! with `--every 10`, in the same run. Besides the wall times it reports the program's user
//! and system time, so that a slowdown can be placed: the program running slower between
//! faults (user time) or the faults and snapshots themselves (system time).

use crate::recover_bench::find;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The checkpoint period, ms.
const EVERY_MS: f64 = 10.0;
/// The python workload's operations (about 3 s without checkpoints in a TCG guest).
const DICT_OPS: &str = "30000";
const DICT_SCRIPT: &str = include_str!("workloads/dict.py");

/// One program on one backend.
#[derive(Serialize, Deserialize, Debug)]
pub struct PeriodicRow {
    /// `perl-kv` or `python3-dict`.
    pub program: String,
    /// The backend of `cowctl run`.
    pub backend: String,
    /// Wall time under `cowctl run` without checkpoints, s.
    pub covered_s: f64,
    /// Wall time under `cowctl run --every 10`, s.
    pub checkpointed_s: f64,
    /// `checkpointed_s / covered_s` (issue 15's target: ≤ 1.3).
    pub ratio: f64,
    /// User and system time of the program (and libcow's threads in it), s: without
    /// checkpoints, then with.
    pub covered_user_s: f64,
    pub covered_sys_s: f64,
    pub checkpointed_user_s: f64,
    pub checkpointed_sys_s: f64,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// First-write faults per checkpoint.
    pub first_writes_per_checkpoint: f64,
    /// Median snapshot, µs.
    pub snapshot_median_us: f64,
}

/// User and system CPU time of this process's waited-for children so far, s.
fn children_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

/// What one run took: wall, user and system seconds, and libcow's report if it wrote one.
struct Run {
    wall_s: f64,
    user_s: f64,
    sys_s: f64,
    report: Option<serde_json::Value>,
}

/// Runs `argv` under `cowctl run --backend backend` (with `--every 10` if `checkpointed`).
fn run_once(argv: &[String], backend: &str, checkpointed: bool) -> Result<Run> {
    let report = std::env::temp_dir().join(format!("cowctl-periodic-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let opts = crate::run::Options {
        every_ms: checkpointed.then_some(EVERY_MS),
        report: checkpointed.then(|| report.clone()),
        ..crate::program_bench::run_options(backend)
            .with_context(|| format!("cowctl run has no backend {backend}"))?
    };
    let mut cmd = crate::run::command(&opts, argv)?;
    let (user0, sys0) = children_cpu();
    let start = Instant::now();
    let out = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .status()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    let wall_s = start.elapsed().as_secs_f64();
    let (user1, sys1) = children_cpu();
    if !out.success() {
        bail!(
            "{} under cowctl run --backend {backend} failed ({out})",
            argv[0]
        );
    }
    let report = if checkpointed {
        let r = crate::run::read_report(&report)?;
        let _ = std::fs::remove_file(&report);
        Some(r)
    } else {
        None
    };
    Ok(Run {
        wall_s,
        user_s: user1 - user0,
        sys_s: sys1 - sys0,
        report,
    })
}

/// The rows for `backends` (those `cowctl run` offers); a program that is not installed is
/// said and skipped.
pub fn rows(backends: &[String]) -> Result<Vec<PeriodicRow>> {
    let candidates = [
        (
            "perl-kv",
            "perl",
            vec!["-e", crate::speculate_bench::KV_SCRIPT],
        ),
        ("python3-dict", "python3", vec!["-c", DICT_SCRIPT, DICT_OPS]),
    ];
    let mut programs: Vec<(&str, Vec<String>)> = Vec::new();
    for (name, binary, args) in candidates {
        match find(binary) {
            Ok(path) => programs.push((
                name,
                std::iter::once(path.display().to_string())
                    .chain(args.iter().map(|a| a.to_string()))
                    .collect(),
            )),
            Err(e) => eprintln!("cowctl bench --programs: {e}; no {name} row"),
        }
    }
    let mut rows = Vec::new();
    for backend in backends {
        for (name, argv) in &programs {
            eprintln!("cowctl bench --programs: {name} at 100 Hz, backend {backend}");
            let covered = run_once(argv, backend, false)?;
            let checkpointed = run_once(argv, backend, true)?;
            let r = checkpointed.report.unwrap_or_default();
            let checkpoints = r["checkpoints"]["snapshots"].as_u64().unwrap_or(0);
            let faults = r["stats"]["write_faults"].as_u64().unwrap_or(0);
            rows.push(PeriodicRow {
                program: name.to_string(),
                backend: backend.clone(),
                covered_s: covered.wall_s,
                checkpointed_s: checkpointed.wall_s,
                ratio: checkpointed.wall_s / covered.wall_s,
                covered_user_s: covered.user_s,
                covered_sys_s: covered.sys_s,
                checkpointed_user_s: checkpointed.user_s,
                checkpointed_sys_s: checkpointed.sys_s,
                checkpoints,
                first_writes_per_checkpoint: faults as f64 / checkpoints.max(1) as f64,
                snapshot_median_us: r["checkpoints"]["snapshot_us_median"]
                    .as_f64()
                    .unwrap_or(0.0),
            });
        }
    }
    Ok(rows)
}
