//! `cowctl run -- PROG ARGS…`: run a program with its heap and globals under cow.ko.

use anyhow::{bail, Context, Result};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

/// Where libcow_preload.so is: `COW_PRELOAD`, else next to cowctl (cargo's target directory).
pub fn preload_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("COW_PRELOAD") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("libcow_preload.so");
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p cow-preload` or set COW_PRELOAD",
            p.display()
        );
    }
    Ok(p)
}

/// How to run the program.
#[derive(Default, Clone)]
pub struct Options {
    /// Size of the covered heap in MiB.
    pub heap_mib: Option<u64>,
    /// Speculation policy for its snapshots.
    pub speculate: Option<String>,
    /// Periodic snapshots every this many ms.
    pub every_ms: Option<u64>,
    /// Periodic snapshots kept.
    pub keep: Option<usize>,
    /// Where libcow_preload writes its JSON report at exit.
    pub report: Option<PathBuf>,
}

/// The command that runs `argv` under libcow_preload with `opts`.
pub fn command(opts: &Options, argv: &[String]) -> Result<std::process::Command> {
    let preload = preload_path()?;
    let mut ld_preload = preload.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        ld_preload.push(":");
        ld_preload.push(old);
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env("LD_PRELOAD", ld_preload);
    if let Some(mib) = opts.heap_mib {
        cmd.env("COW_HEAP_MIB", mib.to_string());
    }
    if let Some(policy) = &opts.speculate {
        policy
            .parse::<cow::speculate::Policy>()
            .map_err(anyhow::Error::msg)?;
        cmd.env("COW_SPECULATE", policy);
    }
    if let Some(ms) = opts.every_ms {
        if ms == 0 {
            bail!("--every must be at least 1 ms");
        }
        cmd.env("COW_CHECKPOINT_MS", ms.to_string());
    }
    if let Some(keep) = opts.keep {
        cmd.env("COW_CHECKPOINT_KEEP", keep.max(1).to_string());
    }
    if let Some(path) = &opts.report {
        cmd.env("COW_REPORT", path);
    }
    // Only our child reports (not the programs it spawns, which inherit the environment).
    cmd.env("COW_REPORT_PARENT", std::process::id().to_string());
    Ok(cmd)
}

/// The report a run wrote (see `cow::report`), as JSON.
pub fn read_report(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the program wrote no report to {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Runs `cowctl run`; returns the program's exit code (128 + signal if it was killed).
pub fn run(backend: &str, opts: &Options, argv: &[String]) -> Result<u8> {
    if backend != "kmod" && backend != "auto" {
        bail!("backend {backend:?} is not available yet (available: kmod)");
    }
    // Fail early and clearly rather than letting the program run uncovered.
    drop(cow::Cow::open()?);
    let mut opts = opts.clone();
    // With periodic snapshots, say what they cost at the end (through a report of our own if
    // the user did not ask for one).
    let own_report = (opts.every_ms.is_some() && opts.report.is_none())
        .then(|| std::env::temp_dir().join(format!("cowctl-run-{}.json", std::process::id())));
    if let Some(p) = &own_report {
        opts.report = Some(p.clone());
    }
    let status = command(&opts, argv)?
        .status()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    if opts.every_ms.is_some() {
        if let Some(path) = &opts.report {
            match read_report(path) {
                Ok(r) => {
                    let c = &r["checkpoints"];
                    eprintln!(
                        "cowctl run: {} checkpoints ({} failed), snapshot median {:.1} µs, p99 {:.1} µs, max {:.1} µs; {} first-write faults, {} pages pre-copied",
                        c["snapshots"], c["failures"],
                        c["snapshot_us_median"].as_f64().unwrap_or(0.0),
                        c["snapshot_us_p99"].as_f64().unwrap_or(0.0),
                        c["snapshot_us_max"].as_f64().unwrap_or(0.0),
                        r["stats"]["write_faults"], r["stats"]["precopied"]
                    );
                }
                Err(e) => eprintln!("cowctl run: no checkpoint summary: {e:#}"),
            }
        }
    }
    if let Some(p) = own_report {
        let _ = std::fs::remove_file(p);
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    })
}
