//! `cowctl bench`: snapshot latency, restore latency and first-write cost per page of each
//! backend, with the cost of copying one page (the limit for any snapshot) measured in the same
//! run as the baseline.

use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

/// One measured configuration.
#[derive(Serialize, Debug)]
pub struct Row {
    backend: String,
    size_mib: usize,
    dirty_pages: usize,
    rounds: usize,
    /// Median time of one snapshot after `dirty_pages` pages were written.
    snapshot_us: f64,
    /// Median time of one restore of `dirty_pages` written pages.
    restore_us: f64,
    /// Median cost of the first write to a page after a snapshot (fault + pre-image copy).
    first_write_us: f64,
    /// Median cost of copying one 4 KiB page with memcpy, measured in this run.
    memcpy_page_us: f64,
    /// Memory the backend holds for one epoch of `dirty_pages` written pages.
    memory_overhead_bytes: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn us(since: Instant) -> f64 {
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

fn touch(base: *mut u8, pages: &[usize], value: u8) {
    for &p in pages {
        // SAFETY: `p` indexes a page of the live region the caller mapped.
        unsafe { std::ptr::write_volatile(base.add(p * 4096 + (p % 512) * 8), value) };
    }
}

/// Runs the kmod backend for one size and dirty count.
fn bench_kmod(size_mib: usize, dirty: usize, rounds: usize, memcpy: f64) -> Result<Row> {
    let cow = cow::Cow::open()?;
    cow.set_limits(4, u64::MAX, cow::abi::COW_POLICY_MERGE_OLDEST)?;
    let total = size_mib * 256;
    if dirty > total {
        bail!("{dirty} dirty pages do not fit in {size_mib} MiB");
    }
    let region = cow.map_region(size_mib << 20)?;
    let all: Vec<usize> = (0..total).collect();
    touch(region.addr, &all, 1);
    // Dirty pages spread over the whole region.
    let pages: Vec<usize> = (0..dirty).map(|i| i * (total / dirty)).collect();
    cow.snapshot()?; // the first snapshot write-protects every present page, once
    let (mut snap, mut restore, mut write) = (Vec::new(), Vec::new(), Vec::new());
    let mut overhead = 0;
    for round in 0..rounds {
        let held_before = cow.stats()?.bytes_held;
        let t = Instant::now();
        touch(region.addr, &pages, round as u8);
        write.push(us(t) / dirty as f64);
        overhead = overhead.max(cow.stats()?.bytes_held.saturating_sub(held_before));
        let t = Instant::now();
        let id = cow.snapshot()?;
        snap.push(us(t));
        touch(region.addr, &pages, 0xff);
        let t = Instant::now();
        cow.restore(id)?;
        restore.push(us(t));
    }
    Ok(Row {
        backend: "kmod".into(),
        size_mib,
        dirty_pages: dirty,
        rounds,
        snapshot_us: median(snap),
        restore_us: median(restore),
        first_write_us: median(write),
        memcpy_page_us: memcpy,
        memory_overhead_bytes: overhead,
    })
}

/// Runs `cowctl bench`.
pub fn run(
    backends: &[String],
    sizes: &[usize],
    dirty: &[usize],
    rounds: usize,
    json: bool,
) -> Result<()> {
    eprintln!("cowctl bench: measuring the page-copy baseline");
    let memcpy = memcpy_page_us();
    let mut rows = Vec::new();
    for backend in backends {
        for &size in sizes {
            for &d in dirty {
                eprintln!("cowctl bench: {backend} {size} MiB, {d} dirty pages, {rounds} rounds");
                let row = match backend.as_str() {
                    "kmod" => bench_kmod(size, d, rounds, memcpy)?,
                    other => bail!("unknown backend {other:?} (available: kmod)"),
                };
                rows.push(row);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:>8} {:>6} {:>12} {:>12} {:>15} {:>12}",
        "backend",
        "size MiB",
        "dirty",
        "snapshot µs",
        "restore µs",
        "1st write µs/p",
        "memcpy µs/p"
    );
    for r in &rows {
        println!(
            "{:<8} {:>8} {:>6} {:>12.1} {:>12.1} {:>15.2} {:>12.3}",
            r.backend,
            r.size_mib,
            r.dirty_pages,
            r.snapshot_us,
            r.restore_us,
            r.first_write_us,
            r.memcpy_page_us
        );
    }
    Ok(())
}
