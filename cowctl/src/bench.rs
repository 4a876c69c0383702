//! `cowctl bench`: snapshot latency, restore latency, first-write cost per page and snapshots
//! per second of each backend, with the cost of copying one page (the limit for any snapshot)
//! measured in the same run as the baseline.

use anyhow::{bail, Result};
use cow::speculate::Policy;
use serde::Serialize;
use std::time::Instant;

/// One measured configuration.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Row {
    backend: String,
    size_mib: usize,
    dirty_pages: usize,
    rounds: usize,
    /// Median time of one snapshot after `dirty_pages` pages were written.
    snapshot_us: f64,
    /// Median time of one restore of `dirty_pages` written pages.
    restore_us: f64,
    /// `restore_us` per written page.
    restore_us_per_page: f64,
    /// Median cost of the first write to a page after a snapshot (fault + pre-image copy).
    fault_us: f64,
    /// What one written page costs in all, in page copies: its first write plus its share of
    /// the next snapshot, over `memcpy_page_us` (the target: at most 2).
    page_cost_in_memcpy: f64,
    /// Epochs per second when each writes `dirty_pages` pages and ends with a snapshot (the
    /// previous one dropped): writes, faults and snapshot together.
    snapshots_per_s: f64,
    /// The same epochs with the `stable` speculation policy, on backends that have one
    /// (`null` otherwise): the write set repeats, so the pre-copies at each snapshot replace
    /// the next epoch's first-write faults.
    snapshots_per_s_speculative: Option<f64>,
    /// Median cost of copying one 4 KiB page with memcpy, measured in this run.
    memcpy_page_us: f64,
    /// kmod only: median cost of a write fault that saves nothing (a page mapped read-only,
    /// no snapshot): the trap and the PTE upgrade, the floor under any first-write fault
    /// before its copy. `null` on the other backends.
    #[serde(default)]
    write_fault_floor_us: Option<f64>,
    /// Memory the backend holds for one epoch of `dirty_pages` written pages.
    memory_overhead_bytes: u64,
}

/// The median of `v` (0 when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Microseconds since `since`.
pub(crate) fn us(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

/// Median cost of copying one page between two 64 MiB buffers (so caches do not flatter it).
pub fn memcpy_page_us() -> f64 {
    const PAGES: usize = 16384;
    let src = vec![0x5au8; PAGES * 4096];
    let mut dst = vec![0u8; PAGES * 4096];
    let mut samples = Vec::new();
    for round in 0..9 {
        let t = Instant::now();
        for p in 0..PAGES {
            let q = (p * 7919 + round) % PAGES;
            dst[q * 4096..(q + 1) * 4096].copy_from_slice(&src[p * 4096..(p + 1) * 4096]);
        }
        samples.push(us(t) / PAGES as f64);
    }
    std::hint::black_box(&dst);
    median(samples)
}

/// Median cost of a write fault on cow.ko that has nothing to save: pages read first (mapped
/// read-only), no snapshot, then written from the last to the first (no run for fault-around
/// to follow). What remains of a first write once its copy and bookkeeping are taken away.
fn kmod_write_fault_floor_us() -> Result<f64> {
    const PAGES: usize = 1024;
    let cow = cow::Cow::open()?;
    let r = cow.map_region(PAGES * 4096)?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        for p in 0..PAGES {
            // SAFETY: `p` indexes a page of the region just mapped.
            unsafe { std::ptr::read_volatile(r.addr.add(p * 4096)) };
        }
        let t = Instant::now();
        for p in (0..PAGES).rev() {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(r.addr.add(p * 4096), 1) };
        }
        samples.push(us(t) / PAGES as f64);
        // Thrown away, so the next round's reads map fresh pages read-only again.
        cow.discard(r.offset, (PAGES * 4096) as u64)?;
    }
    // SAFETY: unmapping the region this function mapped; nothing refers to it any more.
    unsafe { libc::munmap(r.addr.cast(), r.len) };
    Ok(median(samples))
}

/// Set in a worker process: the backend it measures.
const WORKER_ENV: &str = "COW_BENCH_WORKER";
/// Set in a worker process: the page-copy baseline measured by the parent.
const MEMCPY_ENV: &str = "COW_BENCH_MEMCPY_US";

/// Most rounds per configuration (measurements live in fixed arrays on the stack: a restore
/// rewinds the heap under the in-process backends).
pub const MAX_ROUNDS: usize = 64;

/// The default sizes (MiB) and pages written per epoch.
const DEFAULT_SIZES: [usize; 3] = [16, 256, 1024];
/// The snapshots-per-second reference added to the default run: 1% of 10 MiB written per epoch.
const RATE_REFERENCE: (usize, usize) = (10, 26);
/// Epochs timed for `snapshots_per_s` (fewer if they take more than half a second).
const RATE_EPOCHS: usize = 200;

/// The (size MiB, dirty pages) configurations a run measures: every size with every dirty
/// count, and with the default sizes also [`RATE_REFERENCE`].
fn configurations(sizes: &[usize], dirty: &[usize]) -> Vec<(usize, usize)> {
    let chosen: &[usize] = if sizes.is_empty() {
        &DEFAULT_SIZES
    } else {
        sizes
    };
    let mut v: Vec<_> = chosen
        .iter()
        .flat_map(|&s| dirty.iter().map(move |&d| (s, d)))
        .collect();
    if sizes.is_empty() {
        v.insert(0, RATE_REFERENCE);
    }
    v
}

/// Measures one backend for one size and dirty count.
fn bench_one(
    b: &dyn cow::backend::Backend,
    size_mib: usize,
    dirty: usize,
    rounds: usize,
    memcpy: f64,
) -> Result<Row> {
    let total = size_mib * 256;
    if dirty == 0 || dirty > total || !(1..=MAX_ROUNDS).contains(&rounds) {
        bail!("{dirty} dirty pages in {size_mib} MiB, {rounds} rounds: out of range");
    }
    let base = b.map(size_mib << 20)?;
    for p in 0..total {
        // SAFETY: `p` indexes a page of the region just mapped.
        unsafe { std::ptr::write_volatile(base.add(p * 4096), 1) };
    }
    let stride = total / dirty;
    let touch = |value: u8| {
        for i in 0..dirty {
            let p = i * stride;
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(base.add(p * 4096 + (p % 512) * 8), value) };
        }
    };
    // The first snapshot write-protects (and, for the shadow backends, copies) everything once.
    let first = b.snapshot()?;
    let (mut snap, mut restore, mut write) =
        ([0f64; MAX_ROUNDS], [0f64; MAX_ROUNDS], [0f64; MAX_ROUNDS]);
    let mut overhead = 0u64;
    for round in 0..rounds {
        // Each round's writes are first writes: a snapshot just armed the pages (a restore
        // may leave them writable, as cow.ko's in-place restore does).
        let armed = b.snapshot()?;
        let t = Instant::now();
        touch(round as u8);
        write[round] = us(t) / dirty as f64;
        let t = Instant::now();
        let id = b.snapshot()?;
        snap[round] = us(t);
        overhead = overhead.max(b.stats().bytes_held);
        touch(0xff);
        let t = Instant::now();
        b.restore(id)?;
        restore[round] = us(t);
        b.drop_snapshot(id)?;
        b.drop_snapshot(armed)?;
    }
    // Snapshots per second: epochs of writes ending in a snapshot, each dropping the one before
    // (as a fuzzer or a periodic checkpointer keeping one).
    let rate = || -> Result<f64> {
        let mut previous = b.snapshot()?;
        // A few epochs first: a policy learns the write set from them.
        for warm in 0..3u8 {
            touch(warm);
            let id = b.snapshot()?;
            b.drop_snapshot(previous)?;
            previous = id;
        }
        let t = Instant::now();
        let mut epochs = 0;
        while epochs < RATE_EPOCHS && (epochs < 3 || t.elapsed().as_secs_f64() < 0.5) {
            touch(epochs as u8);
            let id = b.snapshot()?;
            b.drop_snapshot(previous)?;
            previous = id;
            epochs += 1;
        }
        let per_s = epochs as f64 / t.elapsed().as_secs_f64();
        b.drop_snapshot(previous)?;
        Ok(per_s)
    };
    let snapshots_per_s = rate()?;
    let snapshots_per_s_speculative = match b.set_speculation(Policy::Stable, None) {
        Ok(()) => {
            let per_s = rate();
            b.set_speculation(Policy::None, None)?;
            Some(per_s?)
        }
        Err(_) => None,
    };
    b.drop_snapshot(first)?;
    // SAFETY: unmapping the region this function mapped; nothing refers to it any more.
    unsafe { libc::munmap(base.cast(), size_mib << 20) };
    let snapshot_us = median(snap[..rounds].to_vec());
    let restore_us = median(restore[..rounds].to_vec());
    let fault_us = median(write[..rounds].to_vec());
    Ok(Row {
        backend: b.name().into(),
        size_mib,
        dirty_pages: dirty,
        rounds,
        snapshot_us,
        restore_us,
        restore_us_per_page: restore_us / dirty as f64,
        fault_us,
        page_cost_in_memcpy: (fault_us + snapshot_us / dirty as f64) / memcpy,
        snapshots_per_s,
        snapshots_per_s_speculative,
        memcpy_page_us: memcpy,
        write_fault_floor_us: None,
        memory_overhead_bytes: overhead,
    })
}

/// The backends to measure: those asked for, else every one that works here.
pub fn default_backends(asked: Vec<String>) -> Vec<String> {
    if !asked.is_empty() {
        return asked;
    }
    let mut v = Vec::new();
    if cow::Cow::open().is_ok() {
        v.push("kmod".to_string());
    }
    let f = cow::probe::kernel_features();
    if f.uffd_wp_async.available && f.pagemap_scan.available {
        v.push("uffd".to_string());
    }
    v.push("mprotect".to_string());
    v.push("fork".to_string());
    v
}

/// Runs `cowctl bench`.
pub fn run(
    backends: &[String],
    sizes: &[usize],
    dirty: &[usize],
    rounds: usize,
    json: bool,
) -> Result<()> {
    // Worker mode: one backend, in its own process (so that one backend's state — the shadow
    // backends' copies, a fork child's page tables — never weighs on another's numbers).
    if let Ok(backend) = std::env::var(WORKER_ENV) {
        let memcpy: f64 = std::env::var(MEMCPY_ENV)?.parse()?;
        let (b, _) = cow::backend::open(&backend)?;
        let floor = if backend == "kmod" {
            Some(kmod_write_fault_floor_us()?)
        } else {
            None
        };
        let mut rows = Vec::new();
        for (size, d) in configurations(sizes, dirty) {
            eprintln!("cowctl bench: {backend} {size} MiB, {d} dirty pages, {rounds} rounds");
            let mut row = bench_one(b.as_ref(), size, d, rounds, memcpy)?;
            row.write_fault_floor_us = floor;
            rows.push(row);
        }
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    // Refuse what cannot be measured before any work (the parser checked the rest).
    if let Some((size, d)) = configurations(sizes, dirty)
        .into_iter()
        .find(|&(s, d)| d > s * 256)
    {
        return Err(crate::exit::usage(format!(
            "--dirty-pages {d} does not fit in --size {size} (at most {} pages)",
            size * 256
        )));
    }
    if backends.iter().any(|b| b == "kmod") {
        drop(anyhow::Context::context(
            cow::Cow::open(),
            "cannot benchmark kmod",
        )?);
    }
    eprintln!("cowctl bench: measuring the page-copy baseline");
    let memcpy = memcpy_page_us();
    let mut rows: Vec<Row> = Vec::new();
    for backend in backends {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(WORKER_ENV, backend)
            .env(MEMCPY_ENV, memcpy.to_string())
            .stderr(std::process::Stdio::inherit())
            .output()?;
        if !out.status.success() {
            // The worker said why on stderr; keep its exit code (3: no module, …).
            return Err(crate::exit::WithCode {
                code: out.status.code().map_or(crate::exit::FAILURE, |c| c as u8),
                message: format!("benchmarking {backend} failed ({})", out.status),
            }
            .into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("[]");
        rows.extend(serde_json::from_str::<Vec<Row>>(line)?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:>8} {:>6} {:>12} {:>12} {:>15} {:>10} {:>12} {:>14} {:>12} {:>10}",
        "backend",
        "size MiB",
        "dirty",
        "snapshot µs",
        "restore µs",
        "1st write µs/p",
        "page/memcpy",
        "snapshots/s",
        "spec. snaps/s",
        "memcpy µs/p",
        "held MiB"
    );
    for r in &rows {
        println!(
            "{:<8} {:>8} {:>6} {:>12.1} {:>12.1} {:>15.2} {:>10.2} {:>12.0} {:>14} {:>12.3} {:>10.1}",
            r.backend,
            r.size_mib,
            r.dirty_pages,
            r.snapshot_us,
            r.restore_us,
            r.fault_us,
            r.page_cost_in_memcpy,
            r.snapshots_per_s,
            r.snapshots_per_s_speculative
                .map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
            r.memcpy_page_us,
            r.memory_overhead_bytes as f64 / (1 << 20) as f64
        );
    }
    if let Some((r, floor)) = rows
        .iter()
        .find_map(|r| r.write_fault_floor_us.map(|f| (r, f)))
    {
        println!(
            "kmod: a write fault with nothing to save costs {floor:.2} µs ({:.2} memcpy): the trap and the PTE upgrade under every first write",
            floor / r.memcpy_page_us
        );
    }
    Ok(())
}
