//! `cowctl bench --record`: what recording costs and what reading the past costs.
//!
//! Two workloads: this binary itself in worker mode (it writes a few pages per round, a
//! counter among them, and sleeps 200 µs, for a fixed number of rounds) and a real program,
//! perl-kv. Each runs plainly (the baseline), then per backend: recorded with nothing stored
//! (the same checkpoints: what the store adds is measured against it), under `cowctl run
//! --every` (in-process checkpoints, where the backend has them), and recorded per codec; each
//! recording is opened and the reads a debugger does are timed: `goto` (the watched page at a
//! random checkpoint), a bisection `search`, and `when` over the watched bytes.

use crate::bench::median;
use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Set in the worker: where it writes the counter's address.
const WORKER_ENV: &str = "COW_RECORD_BENCH_ADDR_FILE";
/// Set in the worker: how many rounds it runs.
const ROUNDS_ENV: &str = "COW_RECORD_BENCH_ROUNDS";
/// Pages written per round (the counter's page included).
const DIRTY: usize = 4;

/// The counter a debugger would watch.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// One measured configuration.
#[derive(Serialize, Debug)]
pub struct Row {
    backend: String,
    workload: String,
    codec: String,
    checkpoints: u64,
    ckpt_per_s: f64,
    /// Recorded run time / the same run without recording.
    slowdown: f64,
    /// Recorded run time / the same run taking the same checkpoints with nothing stored (the
    /// store's share: reading the kernel's snapshots, hashing, compressing, writing).
    store_overhead: f64,
    /// Checkpoints of that run without a store.
    checkpoints_no_store: u64,
    /// Median time a checkpoint kept the program stopped (all threads stopped, captured,
    /// resumed), µs.
    stop_us: f64,
    /// Slowdown of `cowctl run --backend B --every MS` (in-process checkpoints, no registers,
    /// stacks or store) on the same workload; none for `scan`, which `run` does not have.
    run_slowdown: Option<f64>,
    bytes_per_ckpt: f64,
    dedup_ratio: f64,
    compress_ratio: f64,
    /// Opening the recording (verify + index), ms.
    open_ms: f64,
    /// Median time to read the watched page at a random checkpoint, ms.
    goto_ms: f64,
    /// A bisection over the whole recording on the watched page, ms.
    search_ms: f64,
    /// `when` over the watched bytes, ms.
    when_ms: f64,
}

/// What `cowctl bench --record` measures.
pub struct Config {
    /// Checkpoint interval, ms.
    pub every_ms: f64,
    /// Rounds of the workload.
    pub rounds: u64,
    /// Codecs to measure (empty: all).
    pub codecs: Vec<String>,
    /// Print JSON rows.
    pub json: bool,
}

/// The worker: `rounds` rounds of DIRTY page writes and a 200 µs sleep.
fn worker(addr_file: &str, rounds: u64) -> Result<()> {
    let mut pages = vec![0u8; 64 * 4096];
    std::fs::write(
        addr_file,
        format!("{}", &COUNTER as *const AtomicU64 as u64),
    )?;
    for round in 0..rounds {
        for i in 0..DIRTY - 1 {
            let p = (round as usize * 7 + i * 13) % 64;
            pages[p * 4096 + (round as usize % 512) * 8] = round as u8;
        }
        COUNTER.store(round + 1, Ordering::Release);
        std::hint::black_box(&pages);
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The counter's value at checkpoint `n` (0 if not recorded yet).
fn counter_at(rec: &store::Recording, n: u64, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    match rec.read(n, addr, &mut b) {
        Ok(8) => u64::from_le_bytes(b),
        _ => 0,
    }
}

/// A program to record, and what a debugger reads of its recording.
struct Workload {
    name: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// Times the reads a debugger does on a recording.
    reads: Box<ReadTimer>,
}

/// Times `goto`, `search` and `when` on a recording.
type ReadTimer = dyn Fn(&store::Recording) -> Result<Reads>;

/// What reading the past took, ms.
struct Reads {
    /// Median of reading the watched page at a random checkpoint.
    goto_ms: f64,
    search_ms: f64,
    when_ms: f64,
}

/// Checkpoints at random, 200 of them, for `goto`.
fn random_checkpoints(first: u64, last: u64) -> impl Iterator<Item = u64> {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    (0..200).map(move |_| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        first + rng % (last - first + 1)
    })
}

/// The worker's reads: its counter at random checkpoints, a bisection for the first
/// checkpoint where the counter passed half its final value, `when` over the counter.
fn counter_reads(addr_file: std::path::PathBuf) -> impl Fn(&store::Recording) -> Result<Reads> {
    move |rec| {
        let addr: u64 = std::fs::read_to_string(&addr_file)?
            .trim()
            .parse()
            .context("counter address")?;
        let (first, last) = rec.range().context("no checkpoint")?;
        let gotos = random_checkpoints(first, last)
            .map(|n| {
                let t = Instant::now();
                std::hint::black_box(counter_at(rec, n, addr));
                ms(t)
            })
            .collect();
        let target = counter_at(rec, last, addr) / 2;
        let t = Instant::now();
        let (mut a, mut b) = (first, last);
        while a < b {
            let mid = (a + b) / 2;
            if counter_at(rec, mid, addr) >= target {
                b = mid;
            } else {
                a = mid + 1;
            }
        }
        std::hint::black_box(b);
        let search_ms = ms(t);
        let t = Instant::now();
        std::hint::black_box(rec.when(addr, 8)?.len());
        Ok(Reads {
            goto_ms: median(gotos),
            search_ms,
            when_ms: ms(t),
        })
    }
}

/// perl's reads, on its busiest page: at random checkpoints, a bisection's worth of reads each
/// compared with the last, `when` over the whole page.
fn busiest_page_reads(rec: &store::Recording) -> Result<Reads> {
    let (first, last) = rec.range().context("no checkpoint")?;
    let page = rec.busiest_page().context("no page recorded")?;
    let mut buf = vec![0u8; store::PAGE];
    let mut gotos = Vec::new();
    for n in random_checkpoints(first, last) {
        let t = Instant::now();
        std::hint::black_box(rec.read(n, page, &mut buf)?);
        gotos.push(ms(t));
    }
    let mut end = vec![0u8; store::PAGE];
    rec.read(last, page, &mut end)?;
    let t = Instant::now();
    let (mut a, mut b) = (first, last);
    while a < b {
        let mid = (a + b) / 2;
        rec.read(mid, page, &mut buf)?;
        if buf == end {
            b = mid;
        } else {
            a = mid + 1;
        }
    }
    let search_ms = ms(t);
    let t = Instant::now();
    std::hint::black_box(rec.when(page, store::PAGE as u64)?.len());
    Ok(Reads {
        goto_ms: median(gotos),
        search_ms,
        when_ms: ms(t),
    })
}

/// Runs `argv` with `env` added and waits for it: seconds.
fn timed_run(argv: &[String], env: &[(String, String)]) -> Result<f64> {
    let t = Instant::now();
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().cloned())
        .status()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    anyhow::ensure!(status.success(), "{} failed: {status}", argv[0]);
    Ok(t.elapsed().as_secs_f64())
}

/// Records `w` once per backend and codec (plus once per backend with nothing stored, and
/// under `cowctl run --every` where that backend exists) against its plain run.
fn measure(
    cfg: &Config,
    dir: &std::path::Path,
    backends: &[&str],
    w: &Workload,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let say = |what: &str| {
        eprintln!(
            "cowctl bench --record: {}, {what}, every {} ms",
            w.name, cfg.every_ms
        )
    };
    say("without recording");
    let plain_s = timed_run(&w.argv, &w.env)?;
    let me = std::env::current_exe()?.display().to_string();
    for &backend in backends {
        let capture = crate::record::Capture::from_name(backend).expect("a capture's name");
        let mut env = w.env.clone();
        if capture == crate::record::Capture::Kmod {
            let preload = crate::run::preload_path()?;
            env.push(("LD_PRELOAD".into(), preload.display().to_string()));
        }
        let record = |codec: store::Codec,
                      store: bool|
         -> Result<(f64, crate::record::Outcome, std::path::PathBuf)> {
            let out = dir.join(format!("{}-{backend}-{}", w.name, codec.name()));
            let opts = crate::record::Options {
                every: Some(std::time::Duration::from_secs_f64(cfg.every_ms / 1000.0)),
                at: Vec::new(),
                out: out.clone(),
                codec,
                capture,
                max_size: None,
                store,
            };
            let t = Instant::now();
            let outcome = crate::record::record(&opts, &w.argv, &env)?;
            let secs = t.elapsed().as_secs_f64();
            anyhow::ensure!(
                outcome.code == 0,
                "the recorded {} exited {}",
                w.name,
                outcome.code
            );
            Ok((secs, outcome, out))
        };
        say(&format!("{backend}, nothing stored"));
        let (no_store_s, no_store, _) = record(store::Codec::None, false)?;
        let run_s = match capture {
            crate::record::Capture::Scan => None,
            _ => {
                say(&format!("cowctl run --backend {backend}"));
                let mut argv = vec![me.clone(), "run".into(), "--backend".into(), backend.into()];
                argv.extend(["--every".into(), cfg.every_ms.to_string(), "--".into()]);
                argv.extend(w.argv.iter().cloned());
                Some(timed_run(&argv, &w.env)?)
            }
        };
        for codec in store::Codec::ALL {
            if !cfg.codecs.is_empty() && !cfg.codecs.iter().any(|c| c == codec.name()) {
                continue;
            }
            say(&format!("{backend}, {}", codec.name()));
            let (rec_s, outcome, out) = record(codec, true)?;
            let t = Instant::now();
            let rec = store::Recording::open(&out)?;
            let open_ms = ms(t);
            let info = rec.info();
            let reads = (w.reads)(&rec)?;
            finished(
                rows,
                Row {
                    backend: backend.into(),
                    workload: w.name.clone(),
                    codec: codec.name().into(),
                    checkpoints: info.checkpoints,
                    ckpt_per_s: info.checkpoints as f64 / rec_s,
                    slowdown: rec_s / plain_s,
                    store_overhead: rec_s / no_store_s,
                    checkpoints_no_store: no_store.taken,
                    stop_us: median(outcome.stops_ns.iter().map(|&n| n as f64 / 1e3).collect()),
                    run_slowdown: run_s.map(|r| r / plain_s),
                    bytes_per_ckpt: info.bytes_on_disk as f64 / info.checkpoints.max(1) as f64,
                    dedup_ratio: info.dedup_ratio,
                    compress_ratio: info.compress_ratio,
                    open_ms,
                    goto_ms: reads.goto_ms,
                    search_ms: reads.search_ms,
                    when_ms: reads.when_ms,
                },
            );
            drop(rec);
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    Ok(())
}

/// Runs `cowctl bench --record`.
pub fn run(cfg: &Config) -> Result<()> {
    if let Ok(path) = std::env::var(WORKER_ENV) {
        let rounds = std::env::var(ROUNDS_ENV)
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(cfg.rounds);
        return worker(&path, rounds);
    }
    let me = std::env::current_exe()?.display().to_string();
    // Unique even across guests, whose pids repeat from boot to boot and share the host's /tmp
    // (a run killed there leaves its directory behind).
    let dir = std::env::temp_dir().join(format!(
        "cowctl-record-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addr");
    let backends: Vec<&str> = crate::record::Capture::available()
        .into_iter()
        .map(|c| c.name())
        .collect();
    let mut rows = Vec::new();
    let worker = Workload {
        name: format!("{DIRTY}-pages"),
        argv: std::iter::once(me)
            .chain(std::env::args().skip(1))
            .collect(),
        env: vec![
            (WORKER_ENV.to_string(), addr_file.display().to_string()),
            (ROUNDS_ENV.to_string(), cfg.rounds.to_string()),
        ],
        reads: Box::new(counter_reads(addr_file.clone())),
    };
    measure(cfg, &dir, &backends, &worker, &mut rows)?;
    // The real program of `cowctl bench --speculate` (perl running a key-value cache); its
    // checksum line would land in our output: the script's stdout goes nowhere.
    let script = format!(
        "open STDOUT, '>', '/dev/null';\n{}",
        crate::speculate_bench::KV_SCRIPT
    );
    let perl = Workload {
        name: "perl-kv".into(),
        argv: vec!["perl".into(), "-e".into(), script],
        env: Vec::new(),
        reads: Box::new(busiest_page_reads),
    };
    if timed_run(&perl.argv, &[]).is_ok() {
        measure(cfg, &dir, &backends, &perl, &mut rows)?;
    } else {
        eprintln!("cowctl bench --record: no perl here; the perl-kv workload is skipped");
    }
    let _ = std::fs::remove_dir_all(&dir);
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<8} {:<5} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "backend",
        "workload",
        "codec",
        "ckpts",
        "ckpt/s",
        "slowdown",
        "store",
        "run",
        "B/ckpt",
        "dedup",
        "compress",
        "open ms",
        "goto ms",
        "search ms",
        "when ms"
    );
    for r in &rows {
        let run = r
            .run_slowdown
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:<8} {:<5} {:>7} {:>8.0} {:>8.2} {:>8.2} {:>8} {:>9.0} {:>6.1} {:>8.1} {:>8.1} {:>8.3} {:>9.2} {:>8.2}",
            r.backend, r.workload, r.codec, r.checkpoints, r.ckpt_per_s, r.slowdown, r.store_overhead, run,
            r.bytes_per_ckpt, r.dedup_ratio, r.compress_ratio, r.open_ms, r.goto_ms, r.search_ms, r.when_ms
        );
    }
    Ok(())
}

/// Adds `row`, said on stderr at once (one JSON line): a long run that is cut short (a guest's
/// timeout) keeps what it measured.
fn finished(rows: &mut Vec<Row>, row: Row) {
    if let Ok(line) = serde_json::to_string(&row) {
        eprintln!("cowctl bench --record: row {line}");
    }
    rows.push(row);
}
