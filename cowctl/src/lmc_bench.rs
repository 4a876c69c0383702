//! `cowctl bench --lmc`: compiler-instrumented checkpoints against page-granular ones, on a
//! real program.
//!
//! The program is Lua 5.4 built twice from the same sources by `scripts/lua`: `lua-cowcc`
//! (cowcc: every store checked, on the lmc backend) and `lua-plain` (clang-16 alone: what the
//! page-granular backends run under the preload, and the baseline). Each workload runs plainly
//! (the median of [`BASELINE_RUNS`]), then under `cowctl run --backend B --every 1000/HZ --keep 8`
//! for every backend and frequency (0: covered, never checkpointed — for lmc the cost of the
//! instrumentation alone; the median of [`BASELINE_RUNS`] runs, as short and noisy as the plain
//! ones). A row gives the slowdown against the plain run, the checkpoints
//! taken and their median latency, a restore of the newest checkpoint at exit (the program's
//! whole exit path replaced by it, see `cow::report`), and the memory the run needed beyond the
//! plain run: peak RSS above the plain run's, plus what the backend keeps outside the process
//! (cow.ko's saved pages, the fork backend's children). Every run's output must equal the plain
//! run's. A run slower than `--stop-after` (default 25)× the plain one is stopped: its slowdown
//! is then a lower bound (`timed_out`).

use crate::bench::median;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Plain runs per workload (the median is the baseline).
const BASELINE_RUNS: usize = 3;
/// Checkpoints kept by the periodic checkpointer.
const KEEP: usize = 8;

/// A Lua script and its argument (full and `--quick`).
struct Workload {
    name: &'static str,
    script: &'static str,
    arg: &'static str,
    quick_arg: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "binary-trees",
        script: include_str!("workloads/binary_trees.lua"),
        arg: "14",
        quick_arg: "11",
    },
    Workload {
        name: "n-body",
        script: include_str!("workloads/nbody.lua"),
        arg: "300000",
        quick_arg: "50000",
    },
    Workload {
        name: "string-building",
        script: include_str!("workloads/strings.lua"),
        arg: "300000",
        quick_arg: "50000",
    },
];

/// One backend, workload and frequency.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Row {
    /// `none` (the plain build, no libcow), `lmc`, `kmod`, `uffd`, `mprotect` or `fork`.
    pub backend: String,
    /// The Lua script.
    pub workload: String,
    /// Checkpoints per second asked for (0: none).
    pub hz: f64,
    /// Checkpoints per second taken (fewer than asked when a checkpoint takes longer than the
    /// period).
    pub achieved_hz: f64,
    /// Run time / the plain build's.
    pub slowdown: f64,
    /// Run time, s.
    pub seconds: f64,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// Median checkpoint latency as the checkpointer saw it, µs.
    pub snapshot_us: f64,
    /// Restore of the newest checkpoint at exit, µs (none without checkpoints).
    pub restore_us: Option<f64>,
    /// Peak RSS above the plain run's, plus what the backend held outside the process at exit.
    pub memory_overhead_bytes: i64,
    /// Stopped after `--stop-after`× the plain run: `slowdown` is a lower bound.
    pub timed_out: bool,
}

/// What `--lmc` runs.
pub struct Config {
    /// Page-granular backends to compare with (lmc is always measured).
    pub backends: Vec<String>,
    /// Frequencies, Hz (0: covered, no checkpoints).
    pub hz: Vec<f64>,
    /// Small workloads (tests, TCG guests).
    pub quick: bool,
    /// A run is stopped once it has taken this many times the plain run.
    pub stop_after: f64,
    /// Print JSON rows.
    pub json: bool,
}

/// How one run went.
struct Outcome {
    seconds: f64,
    max_rss: i64,
    stdout: String,
    timed_out: bool,
}

/// Runs `cmd` with its output in `dir`, killing it after `limit`; wall time and peak RSS from
/// `wait4`.
fn run_once(mut cmd: std::process::Command, dir: &Path, limit: Duration) -> Result<Outcome> {
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let t0 = Instant::now();
    let child = cmd.spawn().context("cannot start the workload")?;
    let pid = child.id() as libc::pid_t;
    let (mut status, mut usage) = (0, zeroed_rusage());
    let mut timed_out = false;
    loop {
        // SAFETY: our own child; status and usage are ours to fill.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        if !timed_out && t0.elapsed() > limit {
            timed_out = true;
            // SAFETY: signalling our own child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let succeeded = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !timed_out && !succeeded {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!(
            "the workload failed (wait status {status:#x}): {}",
            err.trim()
        );
    }
    Ok(Outcome {
        seconds,
        max_rss: usage.ru_maxrss * 1024,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        timed_out,
    })
}

fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// `lua-plain` and `lua-cowcc`, next to this binary (`scripts/lua` builds them).
fn interpreters() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("cowctl has no directory")?;
    let (plain, cowcc) = (dir.join("lua-plain"), dir.join("lua-cowcc"));
    for p in [&plain, &cowcc] {
        if !p.exists() {
            bail!(
                "{} is missing: build the interpreters with scripts/lua",
                p.display()
            );
        }
    }
    Ok((plain, cowcc))
}

/// One configuration of one workload under `cowctl run`.
fn measure(
    backend: &str,
    hz: f64,
    argv: &[String],
    dir: &Path,
    base: &Outcome,
    stop_after: f64,
) -> Result<Row> {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let opts = crate::run::Options {
        backend: Some(crate::run::choose_backend(backend)?),
        every_ms: (hz > 0.0).then(|| 1000.0 / hz),
        keep: (hz > 0.0).then_some(KEEP),
        report: Some(report.clone()),
        ..Default::default()
    };
    let mut cmd = crate::run::command(&opts, argv)?;
    if hz > 0.0 {
        cmd.env("COW_BENCH_RESTORE_AT_EXIT", "1");
    }
    let limit = Duration::from_secs_f64((base.seconds * stop_after).max(5.0));
    let out = run_once(cmd, dir, limit)?;
    if !out.timed_out && out.stdout != base.stdout {
        bail!(
            "{backend} at {hz} Hz changed the output: {:?} instead of {:?}",
            out.stdout.trim(),
            base.stdout.trim()
        );
    }
    // A run stopped early wrote no report.
    let r = crate::run::read_report(&report).ok();
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(r.as_ref()?, |v, k| v.get(k))
            .and_then(|v| v.as_f64())
    };
    let checkpoints = field(&["checkpoints", "snapshots"]).unwrap_or(0.0) as u64;
    // Held outside the process: cow.ko's pages are in the kernel, the fork backend's in its
    // children; the other backends' are part of the RSS already.
    let outside = match backend {
        "kmod" | "fork" => field(&["stats", "bytes_held"]).unwrap_or(0.0) as i64,
        _ => 0,
    };
    Ok(Row {
        backend: backend.into(),
        workload: String::new(),
        hz,
        achieved_hz: checkpoints as f64 / out.seconds,
        slowdown: out.seconds / base.seconds,
        seconds: out.seconds,
        checkpoints,
        snapshot_us: field(&["checkpoints", "snapshot_us_median"]).unwrap_or(0.0),
        restore_us: field(&["restore_at_exit_us"]),
        memory_overhead_bytes: out.max_rss - base.max_rss + outside,
        timed_out: out.timed_out,
    })
}

/// Runs `cowctl bench --lmc`.
pub fn run(cfg: &Config) -> Result<()> {
    let (plain, cowcc) = interpreters()?;
    let dir = std::env::temp_dir().join(format!("cowctl-bench-lmc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(cfg, &plain, &cowcc, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:>7} {:>9} {:>9} {:>8} {:>11} {:>11} {:>10}",
        "workload",
        "backend",
        "hz",
        "got hz",
        "slowdown",
        "ckpts",
        "snapshot µs",
        "restore µs",
        "mem MiB"
    );
    for r in &rows {
        println!(
            "{:<16} {:<9} {:>7} {:>9.0} {:>8.2}{} {:>8} {:>11.1} {:>11} {:>10.1}",
            r.workload,
            r.backend,
            r.hz,
            r.achieved_hz,
            r.slowdown,
            if r.timed_out { "+" } else { " " },
            r.checkpoints,
            r.snapshot_us,
            r.restore_us.map_or("-".into(), |v| format!("{v:.1}")),
            r.memory_overhead_bytes as f64 / (1 << 20) as f64
        );
    }
    println!(
        "(+: stopped after {}× the plain run; the slowdown is a lower bound)",
        cfg.stop_after
    );
    Ok(())
}

fn run_in(cfg: &Config, plain: &Path, cowcc: &Path, dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for w in &WORKLOADS {
        let script = dir.join(format!("{}.lua", w.name));
        std::fs::write(&script, w.script)?;
        let arg = if cfg.quick { w.quick_arg } else { w.arg };
        let argv = |lua: &Path| {
            vec![
                lua.display().to_string(),
                script.display().to_string(),
                arg.to_string(),
            ]
        };
        eprintln!("cowctl bench --lmc: {} {arg}, plain", w.name);
        let mut runs = Vec::new();
        for _ in 0..BASELINE_RUNS {
            let argv = argv(plain);
            let mut cmd = std::process::Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            runs.push(run_once(cmd, dir, Duration::from_secs(600))?);
        }
        let secs = median(runs.iter().map(|o| o.seconds).collect());
        let base = runs
            .into_iter()
            .find(|o| o.seconds == secs)
            .context("no plain run")?;
        rows.push(Row {
            backend: "none".into(),
            workload: w.name.into(),
            hz: 0.0,
            achieved_hz: 0.0,
            slowdown: 1.0,
            seconds: base.seconds,
            checkpoints: 0,
            snapshot_us: 0.0,
            restore_us: None,
            memory_overhead_bytes: 0,
            timed_out: false,
        });
        let backends = std::iter::once("lmc").chain(cfg.backends.iter().map(String::as_str));
        for backend in backends {
            let lua = if backend == "lmc" { cowcc } else { plain };
            for &hz in &cfg.hz {
                eprintln!("cowctl bench --lmc: {} {arg}, {backend} at {hz} Hz", w.name);
                // Without checkpoints a run is as short as the plain one, and as noisy: the
                // median of as many runs (for lmc this row is the instrumentation's cost).
                let runs = if hz == 0.0 { BASELINE_RUNS } else { 1 };
                let mut measured = (0..runs)
                    .map(|_| measure(backend, hz, &argv(lua), dir, &base, cfg.stop_after))
                    .collect::<Result<Vec<Row>>>()
                    .with_context(|| format!("{}, {backend} at {hz} Hz", w.name))?;
                measured.sort_by(|a, b| a.slowdown.total_cmp(&b.slowdown));
                let mut row = measured.swap_remove(runs / 2);
                row.workload = w.name.into();
                rows.push(row);
            }
        }
    }
    Ok(rows)
}
