//! `cowctl bench --record`: what recording costs and what reading the past costs.
//!
//! The workload is this binary itself in worker mode: it writes a few pages per round (a
//! counter among them) and sleeps 200 µs, for a fixed number of rounds. Per backend (kmod when
//! the module is loaded, scan) and codec the worker runs recorded at `--record-every` ms, against
//! the same worker without recording as the baseline; then the recording is opened and the
//! reads a debugger does are timed: `goto` (the counter's page at a random checkpoint), a
//! bisection `search` for the first checkpoint where the counter passed half its final value,
//! and `when` over the counter. Then the same for a real program, perl-kv (`perl_rows`).

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
    bytes_per_ckpt: f64,
    dedup_ratio: f64,
    compress_ratio: f64,
    /// Opening the recording (verify + index), ms.
    open_ms: f64,
    /// Median time to read the counter's page at a random checkpoint, ms.
    goto_ms: f64,
    /// Bisection for the first checkpoint where the counter passed half its final value, ms.
    search_ms: f64,
    /// `when` over the counter's 8 bytes, ms.
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The counter's value at checkpoint `n` (0 if not recorded yet).
fn counter_at(rec: &store::Recording, n: u64, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    match rec.read(n, addr, &mut b) {
        Ok(8) => u64::from_le_bytes(b),
        _ => 0,
    }
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
    let (every_ms, json) = (cfg.every_ms, cfg.json);
    let me = std::env::current_exe()?.display().to_string();
    let dir = std::env::temp_dir().join(format!("cowctl-record-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addr");
    let env = vec![
        (WORKER_ENV.to_string(), addr_file.display().to_string()),
        (ROUNDS_ENV.to_string(), cfg.rounds.to_string()),
    ];
    let backends: Vec<&str> = crate::record::Capture::available()
        .into_iter()
        .map(|c| c.name())
        .collect();
    // The baseline: the worker without recording.
    eprintln!("cowctl bench --record: the workload without recording");
    let t = Instant::now();
    let status = std::process::Command::new(&me)
        .args(std::env::args_os().skip(1))
        .env(WORKER_ENV, &addr_file)
        .env(ROUNDS_ENV, cfg.rounds.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "the workload failed: {status}");
    let plain_s = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for &backend in &backends {
        for codec in store::Codec::ALL {
            if !cfg.codecs.is_empty() && !cfg.codecs.iter().any(|c| c == codec.name()) {
                continue;
            }
            eprintln!(
                "cowctl bench --record: {backend}, {}, every {every_ms} ms",
                codec.name()
            );
            let out = dir.join(format!("{backend}-{}", codec.name()));
            let opts = crate::record::Options {
                every: Some(std::time::Duration::from_secs_f64(every_ms / 1000.0)),
                at: Vec::new(),
                out: out.clone(),
                codec,
                capture: crate::record::Capture::from_name(backend).expect("a capture's name"),
                max_size: None,
            };
            let mut env = env.clone();
            if backend == "kmod" {
                let preload = crate::run::preload_path()?;
                env.push(("LD_PRELOAD".into(), preload.display().to_string()));
            }
            let argv: Vec<String> = std::iter::once(me.clone())
                .chain(std::env::args().skip(1))
                .collect();
            let t = Instant::now();
            let outcome = crate::record::record(&opts, &argv, &env)?;
            let rec_s = t.elapsed().as_secs_f64();
            anyhow::ensure!(
                outcome.code == 0,
                "the recorded workload exited {}",
                outcome.code
            );
            let addr: u64 = std::fs::read_to_string(&addr_file)?
                .trim()
                .parse()
                .context("counter address")?;
            let t = Instant::now();
            let rec = store::Recording::open(&out)?;
            let open_ms = ms(t);
            let info = rec.info();
            let (first, last) = rec.range().context("no checkpoint")?;
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut gotos = Vec::new();
            for _ in 0..200 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let n = first + rng % (last - first + 1);
                let t = Instant::now();
                std::hint::black_box(counter_at(&rec, n, addr));
                gotos.push(ms(t));
            }
            let target = counter_at(&rec, last, addr) / 2;
            let t = Instant::now();
            let (mut a, mut b) = (first, last);
            while a < b {
                let mid = (a + b) / 2;
                if counter_at(&rec, mid, addr) >= target {
                    b = mid;
                } else {
                    a = mid + 1;
                }
            }
            std::hint::black_box(b);
            let search_ms = ms(t);
            let t = Instant::now();
            let changes = rec.when(addr, 8)?.len();
            let when_ms = ms(t);
            std::hint::black_box(changes);
            finished(
                &mut rows,
                Row {
                    backend: backend.into(),
                    workload: format!("{DIRTY}-pages"),
                    codec: codec.name().into(),
                    checkpoints: info.checkpoints,
                    ckpt_per_s: info.checkpoints as f64 / rec_s,
                    slowdown: rec_s / plain_s,
                    bytes_per_ckpt: info.bytes_on_disk as f64 / info.checkpoints.max(1) as f64,
                    dedup_ratio: info.dedup_ratio,
                    compress_ratio: info.compress_ratio,
                    open_ms,
                    goto_ms: median(gotos),
                    search_ms,
                    when_ms,
                },
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    perl_rows(cfg, &dir, &backends, &mut rows)?;
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<8} {:<5} {:>7} {:>8} {:>8} {:>9} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "backend",
        "workload",
        "codec",
        "ckpts",
        "ckpt/s",
        "slowdown",
        "B/ckpt",
        "dedup",
        "compress",
        "open ms",
        "goto ms",
        "search ms",
        "when ms"
    );
    for r in &rows {
        println!(
            "{:<6} {:<8} {:<5} {:>7} {:>8.0} {:>8.2} {:>9.0} {:>6.1} {:>8.1} {:>8.1} {:>8.3} {:>9.2} {:>8.2}",
            r.backend, r.workload, r.codec, r.checkpoints, r.ckpt_per_s, r.slowdown, r.bytes_per_ckpt,
            r.dedup_ratio, r.compress_ratio, r.open_ms, r.goto_ms, r.search_ms, r.when_ms
        );
    }
    Ok(())
}

/// The real program of `cowctl bench --speculate` (perl running a key-value cache), recorded
/// per backend and codec. Reads are timed on its busiest page: `goto` at random checkpoints, a
/// bisection's worth of reads for `search`, `when` over the whole page.
fn perl_rows(
    cfg: &Config,
    dir: &std::path::Path,
    backends: &[&str],
    rows: &mut Vec<Row>,
) -> Result<()> {
    // Its checksum line would land in our output: the script's stdout goes nowhere.
    let script = format!(
        "open STDOUT, '>', '/dev/null';\n{}",
        crate::speculate_bench::KV_SCRIPT
    );
    let argv = vec!["perl".to_string(), "-e".to_string(), script];
    let t = Instant::now();
    match std::process::Command::new("perl").args(&argv[1..]).status() {
        Ok(s) if s.success() => {}
        _ => {
            eprintln!("cowctl bench --record: no perl here; the perl-kv workload is skipped");
            return Ok(());
        }
    }
    let plain_s = t.elapsed().as_secs_f64();
    for &backend in backends {
        for codec in store::Codec::ALL {
            if !cfg.codecs.is_empty() && !cfg.codecs.iter().any(|c| c == codec.name()) {
                continue;
            }
            eprintln!(
                "cowctl bench --record: {backend}, perl-kv, {}, every {} ms",
                codec.name(),
                cfg.every_ms
            );
            let out = dir.join(format!("perl-{backend}-{}", codec.name()));
            let opts = crate::record::Options {
                every: Some(std::time::Duration::from_secs_f64(cfg.every_ms / 1000.0)),
                at: Vec::new(),
                out: out.clone(),
                codec,
                capture: crate::record::Capture::from_name(backend).expect("a capture's name"),
                max_size: None,
            };
            let mut env = Vec::new();
            if backend == "kmod" {
                let preload = crate::run::preload_path()?;
                env.push(("LD_PRELOAD".into(), preload.display().to_string()));
            }
            let t = Instant::now();
            let outcome = crate::record::record(&opts, &argv, &env)?;
            let rec_s = t.elapsed().as_secs_f64();
            anyhow::ensure!(outcome.code == 0, "recorded perl exited {}", outcome.code);
            let t = Instant::now();
            let rec = store::Recording::open(&out)?;
            let open_ms = ms(t);
            let info = rec.info();
            let (first, last) = rec.range().context("no checkpoint")?;
            let page = rec.busiest_page().context("no page recorded")?;
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut buf = vec![0u8; store::PAGE];
            let mut gotos = Vec::new();
            for _ in 0..200 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let n = first + rng % (last - first + 1);
                let t = Instant::now();
                std::hint::black_box(rec.read(n, page, &mut buf)?);
                gotos.push(ms(t));
            }
            // A bisection: log2(checkpoints) reads of the page, each compared with the last.
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
            let when_ms = ms(t);
            finished(
                rows,
                Row {
                    backend: backend.into(),
                    workload: "perl-kv".into(),
                    codec: codec.name().into(),
                    checkpoints: info.checkpoints,
                    ckpt_per_s: info.checkpoints as f64 / rec_s,
                    slowdown: rec_s / plain_s,
                    bytes_per_ckpt: info.bytes_on_disk as f64 / info.checkpoints.max(1) as f64,
                    dedup_ratio: info.dedup_ratio,
                    compress_ratio: info.compress_ratio,
                    open_ms,
                    goto_ms: median(gotos),
                    search_ms,
                    when_ms,
                },
            );
            let _ = std::fs::remove_dir_all(&out);
        }
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
