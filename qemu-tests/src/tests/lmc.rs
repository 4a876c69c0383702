//! Compiler-instrumented checkpoints next to cow.ko: `cowctl bench --lmc` in the guest runs
//! Lua 5.4 built with cowcc on lmc and the plain build on cow.ko, each checkpointed at 1 kHz.

use super::{sibling, stdout_of_success};
use crate::Test;
use anyhow::{ensure, Context, Result};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "lmc::bench_against_kmod",
        run: bench_against_kmod,
    }]
}

/// Quick workloads at 0 and 1000 Hz on lmc and kmod: every run's output equals the plain
/// build's (the bench fails otherwise), the 1 kHz runs took checkpoints and restored the newest
/// one at exit (a failed restore fails the run). No timing is judged here.
fn bench_against_kmod() -> Result<()> {
    let args = [
        "bench",
        "--lmc",
        "--quick",
        "--backends",
        "kmod",
        "--hz",
        "0,1000",
        // The checks below are about function, not speed (a slower guest, e.g. the
        // single-threaded TCG of the Debian kernel, once needed more than the default 25×):
        // only a run that hangs is stopped.
        "--stop-after",
        "400",
        "--json",
    ];
    let out = std::process::Command::new(sibling("cowctl")?)
        .args(args)
        .output()?;
    let text = stdout_of_success(&out, "cowctl bench --lmc")?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    for workload in ["binary-trees", "n-body", "string-building"] {
        for backend in ["lmc", "kmod"] {
            let row = rows
                .iter()
                .find(|r| r["workload"] == workload && r["backend"] == backend && r["hz"] == 1000.0)
                .with_context(|| format!("no {backend} row at 1 kHz for {workload}: {text}"))?;
            println!("{row}");
            ensure!(row["timed_out"] == false, "{row}");
            ensure!(row["checkpoints"].as_u64() > Some(0), "{row}");
            ensure!(row["restore_us"].as_f64() > Some(0.0), "{row}");
        }
    }
    Ok(())
}
