//! The copy-on-write primitive against the real module: restore exactness, randomized
//! sequences, consistent cuts under concurrent writers, limits, errors and cleanup.

use crate::{module, Test};
use anyhow::{bail, ensure, Context, Result};
use cow::abi;
use cow::{Cow, Region};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "snap::basic_restore",
            run: basic_restore,
        },
        Test {
            name: "snap::discard_reads_zero_and_restores",
            run: discard_reads_zero_and_restores,
        },
        Test {
            name: "snap::restore_same_id_repeatedly",
            run: restore_same_id_repeatedly,
        },
        Test {
            name: "snap::restore_in_place_keeps_mappings",
            run: restore_in_place_keeps_mappings,
        },
        Test {
            name: "snap::randomized_byte_exact",
            run: randomized_byte_exact,
        },
        Test {
            name: "snap::consistent_cut_under_writers",
            run: consistent_cut_under_writers,
        },
        Test {
            name: "snap::snapshot_cost_follows_dirty_pages",
            run: snapshot_cost_follows_dirty_pages,
        },
        Test {
            name: "snap::unknown_ids_enoent",
            run: unknown_ids_enoent,
        },
        Test {
            name: "snap::private_mapping_refused",
            run: private_mapping_refused,
        },
        Test {
            name: "snap::retention_window",
            run: retention_window,
        },
        Test {
            name: "snap::memory_cap_merges_oldest_keeps_newest",
            run: memory_cap_merges_oldest_keeps_newest,
        },
        Test {
            name: "snap::garbage_ioctls",
            run: garbage_ioctls,
        },
        Test {
            name: "snap::exit_frees_everything",
            run: exit_frees_everything,
        },
        Test {
            name: "snap::rmmod_refused_while_mapped",
            run: rmmod_refused_while_mapped,
        },
    ]
}

/// A small deterministic PRNG (xorshift64*), so failures replay.
pub struct Rng(u64);
impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// A region is a mapping outside Rust's ownership model (like a raw buffer from mmap): the
// test hands out views of it as it needs them.
#[allow(clippy::mut_from_ref)]
fn bytes(r: &Region) -> &mut [u8] {
    // SAFETY: the region is a live read-write mapping of `len` bytes owned by the test.
    unsafe { std::slice::from_raw_parts_mut(r.addr, r.len) }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn basic_restore() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(64 * 4096)?;
    let m = bytes(&r);
    for (i, b) in m.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let reference = m.to_vec();
    let id = cow.snapshot()?;
    ensure!(id == 1, "first id {id}");
    m[..4096 * 10].fill(0xAA);
    m[4096 * 63 + 17] = 1;
    let s = cow.stats()?;
    // Pages 1..9 continue a sequential run: some are saved ahead of the writer (fault-around)
    // instead of faulting, page 10 too (saved ahead, never written: not dirty below).
    ensure!(
        (11..=12).contains(&(s.first_write_faults + s.around_pages)) && s.first_write_faults < 11,
        "first-write faults {} + pages saved ahead {}",
        s.first_write_faults,
        s.around_pages
    );
    ensure!(
        s.pages_saved == s.first_write_faults + s.around_pages,
        "pages saved {}",
        s.pages_saved
    );
    // Reading the old image does not restore.
    let mut old = vec![0u8; 4096 * 2];
    cow.read(id, r.offset + 4096 * 9, &mut old)?;
    ensure!(
        old[..] == reference[4096 * 9..4096 * 11],
        "read(id) differs"
    );
    ensure!(m[4096 * 9] == 0xAA, "read changed memory");
    let dirty = cow.dirty_since(id)?;
    let first = r.offset / 4096;
    let want: Vec<u64> = (0..10).chain([63]).map(|p| first + p).collect();
    ensure!(dirty == want, "dirty {dirty:?}");
    cow.restore(id)?;
    if let Some(i) = first_diff(m, &reference) {
        bail!("byte {i} differs after restore");
    }
    // A region created after the snapshot is emptied to zero pages by a restore to it.
    let later = cow.map_region(8 * 4096)?;
    bytes(&later).fill(0x55);
    cow.restore(id)?;
    ensure!(
        bytes(&later).iter().all(|&b| b == 0),
        "new region not zero after restore"
    );
    ensure!(
        cow.list()?.len() == 1,
        "snapshot {id} should survive restores to it"
    );
    Ok(())
}

/// `COW_RESTORE_QUIESCED`: pages come back by copy, their mappings stay, so writing them again
/// after the restore costs no first-write fault (the images stay as their pre-images) and a
/// second restore is exact again; a page created after the snapshot still goes. A plain
/// restore, for contrast, drops the mappings: the same writes fault again.
/// `COW_RESTORE_IN_PLACE_IF_ALONE` restores in place only while the process has one thread.
fn restore_in_place_keeps_mappings() -> Result<()> {
    let cow = Cow::open()?;
    ensure!(
        cow.features() & abi::features::RESTORE_IN_PLACE != 0,
        "the module does not offer in-place restores"
    );
    let r = cow.map_region(64 * 4096)?;
    let m = bytes(&r);
    for (i, b) in m.iter_mut().enumerate() {
        *b = (i * 13 + 5) as u8;
    }
    let reference = m.to_vec();
    let id = cow.snapshot()?;
    let later = cow.map_region(4 * 4096)?;
    let rewrite = |m: &mut [u8], v: u8| {
        for p in (0..64).step_by(7) {
            m[p * 4096 + p] = v;
        }
    };
    let faults = |cow: &Cow| -> Result<u64> { Ok(cow.stats()?.first_write_faults) };
    rewrite(m, 0xEE);
    bytes(&later).fill(0x77);
    for round in 0..3 {
        cow.restore_in_place(id)?;
        if let Some(i) = first_diff(m, &reference) {
            bail!("round {round}: byte {i} differs after an in-place restore");
        }
        ensure!(
            bytes(&later).iter().all(|&b| b == 0),
            "round {round}: a region mapped after the snapshot is not zero"
        );
        let before = faults(&cow)?;
        rewrite(m, round as u8);
        let after = faults(&cow)?;
        ensure!(
            after == before,
            "round {round}: {} first-write faults after an in-place restore",
            after - before
        );
    }
    cow.restore(id)?;
    ensure!(first_diff(m, &reference).is_none(), "plain restore inexact");
    let before = faults(&cow)?;
    rewrite(m, 0x11);
    let after = faults(&cow)?;
    ensure!(
        after - before == 10,
        "after a plain restore, 10 pages written again took {} first-write faults",
        after - before
    );
    // COW_RESTORE_IN_PLACE_IF_ALONE: the module decides. Alone (this test's only thread), in
    // place; with a second thread alive, swapped (the pages fault again).
    cow.restore_in_place_if_alone(id)?;
    ensure!(
        first_diff(m, &reference).is_none(),
        "restore if alone inexact"
    );
    let before = faults(&cow)?;
    rewrite(m, 0x22);
    ensure!(
        faults(&cow)? == before,
        "alone, the restore was not in place"
    );
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || rx.recv().ok());
    let swapped = (|| -> Result<u64> {
        cow.restore_in_place_if_alone(id)?;
        ensure!(
            first_diff(m, &reference).is_none(),
            "restore with a thread inexact"
        );
        let before = faults(&cow)?;
        rewrite(m, 0x33);
        Ok(faults(&cow)? - before)
    })();
    drop(tx);
    let _ = other.join();
    ensure!(
        swapped? == 10,
        "with a second thread the restore must not be in place"
    );
    cow.restore_in_place(id)?;
    ensure!(first_diff(m, &reference).is_none(), "final restore inexact");
    Ok(())
}

/// `COW_IOC_DISCARD`: the range reads as zero, a restore brings it back, a page written again
/// after its discard is restored to its snapshot contents (not removed), and without a
/// snapshot the pages are freed.
fn discard_reads_zero_and_restores() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(16 * 4096)?;
    let m = bytes(&r);
    m.fill(0x5A);
    let present = cow.stats()?.pages_present;
    cow.discard(r.offset + 4 * 4096, 4 * 4096)?;
    let s = cow.stats()?; // before reading them: a read fault maps a fresh zero page
    ensure!(
        m.iter().skip(4 * 4096).take(4 * 4096).all(|&b| b == 0),
        "not zero"
    );
    ensure!(
        s.pages_present + 4 == present && s.bytes_held == 0,
        "without a snapshot the pages are freed: present {} (was {present}), held {}",
        s.pages_present,
        s.bytes_held
    );
    m.fill(0x5A);
    let reference = m.to_vec();
    let id = cow.snapshot()?;
    cow.discard(r.offset, 8 * 4096)?;
    ensure!(
        m[..8 * 4096].iter().all(|&b| b == 0),
        "not zero after discard"
    );
    m[4096 + 1] = 7; // written again after its discard
    ensure!(cow.stats()?.pages_saved == 0, "a discard copies nothing");
    cow.restore(id)?;
    if let Some(i) = first_diff(m, &reference) {
        bail!("byte {i} differs after restore ({:#x})", m[i]);
    }
    // Discarded, then created again in a later epoch: a restore to before the discard drains
    // the later "absent" mark first (removing the page), then puts the image back.
    m.fill(0x33);
    let before = cow.snapshot()?;
    cow.discard(r.offset, 4096)?;
    cow.snapshot()?;
    m[100] = 1;
    cow.restore(before)?;
    ensure!(
        m[..4096].iter().all(|&b| b == 0x33),
        "image lost after discard + re-creation: {:#x}",
        m[0]
    );
    // In place: the discarded pages' images become pages again, a page created anew after
    // its discard is overwritten; then the same snapshot again after a second discard, and
    // once more with nothing discarded (the restore need not look for missing pages).
    m.fill(0x44);
    let reference = m.to_vec();
    let id = cow.snapshot()?;
    cow.discard(r.offset + 2 * 4096, 3 * 4096)?;
    m[2 * 4096 + 5] = 9;
    m[10 * 4096] = 9;
    cow.restore_in_place(id)?;
    ensure!(
        first_diff(m, &reference).is_none(),
        "in-place restore after a discard"
    );
    cow.discard(r.offset, 4096)?;
    m[3 * 4096] = 1;
    cow.restore_in_place(id)?;
    ensure!(
        first_diff(m, &reference).is_none(),
        "second in-place restore after a discard"
    );
    m[4096..6 * 4096].fill(2);
    cow.restore_in_place(id)?;
    ensure!(
        first_diff(m, &reference).is_none(),
        "in-place restore without a discard"
    );
    for (offset, len) in [(1, 4096), (r.offset, 4095), (1 << 60, 4096)] {
        let got = cow.discard(offset, len).map_err(errno_of);
        ensure!(
            got == Err(libc::EINVAL),
            "discard({offset:#x}, {len}): {got:?}, expected EINVAL"
        );
    }
    Ok(())
}

fn restore_same_id_repeatedly() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(256 * 4096)?;
    let m = bytes(&r);
    let mut rng = Rng::new(42);
    for b in m.iter_mut() {
        *b = rng.next() as u8;
    }
    let reference = m.to_vec();
    let id = cow.snapshot()?;
    for round in 0..300 {
        for _ in 0..rng.below(40) {
            let off = rng.below(m.len() as u64) as usize;
            m[off] = m[off].wrapping_add(1 + rng.below(200) as u8);
        }
        cow.restore(id)?;
        if let Some(i) = first_diff(m, &reference) {
            bail!("round {round}: byte {i} differs");
        }
    }
    Ok(())
}

/// One retained snapshot in the randomized model: its id and every region's bytes at it.
struct Model {
    id: u64,
    regions: usize,
    image: Vec<Vec<u8>>,
}

fn randomized_byte_exact() -> Result<()> {
    let seed: u64 = std::env::var("COW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC0FFEE);
    let mut rng = Rng::new(seed);
    let cow = Cow::open()?;
    cow.set_limits(16, 1 << 30, abi::COW_POLICY_MERGE_OLDEST)?;
    let mut regions: Vec<Region> = vec![cow.map_region(32 * 4096)?];
    let mut models: Vec<Model> = Vec::new();
    let (mut restores, mut reads, mut discards) = (0, 0, 0);
    for step in 0..4000 {
        match rng.below(100) {
            // Writes: runs of random bytes at random places, sometimes crossing pages.
            0..=59 => {
                let r = &regions[rng.below(regions.len() as u64) as usize];
                let m = bytes(r);
                let off = rng.below(m.len() as u64) as usize;
                let max_len = if rng.below(10) == 0 { 3 * 4096 } else { 64 };
                let len = (1 + rng.below(max_len)) as usize;
                let end = (off + len).min(m.len());
                for b in &mut m[off..end] {
                    *b = rng.next() as u8;
                }
            }
            60..=61 if regions.len() < 8 => {
                let pages = 1 + rng.below(64) as usize;
                regions.push(cow.map_region(pages * 4096)?);
            }
            62..=71 => {
                // Half the snapshots pre-copy random hinted pages (the test is single-threaded,
                // so the quiesced promise holds): pre-copies must never change what a snapshot
                // holds, through later writes, restores, drops and discards.
                let id = if rng.below(2) == 0 {
                    let mut hint: Vec<u64> = (0..1 + rng.below(48))
                        .map(|_| {
                            let r = &regions[rng.below(regions.len() as u64) as usize];
                            r.offset / 4096 + rng.below((r.len / 4096) as u64)
                        })
                        .collect();
                    hint.sort_unstable();
                    hint.dedup();
                    cow.hint(&hint)?;
                    cow.snapshot_quiesced()?
                } else {
                    cow.snapshot()?
                };
                models.push(Model {
                    id,
                    regions: regions.len(),
                    image: regions.iter().map(|r| bytes(r).to_vec()).collect(),
                });
                // The module keeps at most 16: forget what it merged away.
                let held: Vec<u64> = cow.list()?.iter().map(|s| s.id).collect();
                models.retain(|m| held.contains(&m.id));
                ensure!(held.len() == models.len(), "step {step}: list {held:?}");
            }
            72..=79 if !models.is_empty() => {
                let k = rng.below(models.len() as u64) as usize;
                // Single-threaded: both kinds of restore apply.
                if rng.below(2) == 0 {
                    cow.restore(models[k].id)?;
                } else {
                    cow.restore_in_place(models[k].id)?;
                }
                models.truncate(k + 1);
                restores += 1;
                let model = &models[k];
                for (i, r) in regions.iter().enumerate() {
                    let m = bytes(r);
                    let want: &[u8] = if i < model.regions {
                        &model.image[i]
                    } else {
                        &[]
                    };
                    for (j, &b) in m.iter().enumerate() {
                        let w = want.get(j).copied().unwrap_or(0);
                        if b != w {
                            bail!("seed {seed} step {step}: region {i} byte {j} = {b}, expected {w} after restore to {}", model.id);
                        }
                    }
                }
            }
            80..=86 if !models.is_empty() => {
                let k = rng.below(models.len() as u64) as usize;
                let model = &models[k];
                let i = rng.below(model.regions as u64) as usize;
                let mut got = vec![0u8; regions[i].len];
                cow.read(model.id, regions[i].offset, &mut got)?;
                reads += 1;
                if let Some(j) = first_diff(&got, &model.image[i]) {
                    bail!(
                        "seed {seed} step {step}: read({}) region {i} byte {j} differs",
                        model.id
                    );
                }
            }
            87..=89 if models.len() > 1 => {
                let k = rng.below(models.len() as u64) as usize;
                cow.drop_snapshot(models[k].id)?;
                models.remove(k);
            }
            90..=92 if !models.is_empty() => {
                // Every page that differs from a snapshot must be reported dirty since it.
                let model = &models[rng.below(models.len() as u64) as usize];
                let dirty = cow.dirty_since(model.id)?;
                for (i, r) in regions.iter().enumerate().take(model.regions) {
                    for (p, chunk) in bytes(r).chunks(4096).enumerate() {
                        if chunk != &model.image[i][p * 4096..(p + 1) * 4096] {
                            let idx = r.offset / 4096 + p as u64;
                            ensure!(
                                dirty.binary_search(&idx).is_ok(),
                                "step {step}: page {idx} changed but not dirty"
                            );
                        }
                    }
                }
            }
            93..=95 => {
                // MADV_DONTNEED of covered memory: a page-aligned run reads as zero at once.
                let r = &regions[rng.below(regions.len() as u64) as usize];
                let pages = (r.len / 4096) as u64;
                let first = rng.below(pages);
                let count = 1 + rng.below(pages - first);
                cow.discard(r.offset + first * 4096, count * 4096)?;
                let m = &bytes(r)[(first * 4096) as usize..((first + count) * 4096) as usize];
                ensure!(
                    m.iter().all(|&b| b == 0),
                    "seed {seed} step {step}: discarded pages not zero"
                );
                discards += 1;
            }
            _ => {}
        }
    }
    ensure!(discards > 50, "too few discards ({discards})");
    ensure!(
        restores > 100 && reads > 50,
        "too few restores ({restores}) or reads ({reads})"
    );
    let s = cow.stats()?;
    ensure!(
        s.precopied_pages > 100 && s.precopy_useful > 0,
        "too few pre-copies ({} made, {} then written)",
        s.precopied_pages,
        s.precopy_useful
    );
    println!(
        "seed {seed}: {restores} restores, {reads} reads, {discards} discards, {} pre-copies, all byte-exact",
        s.precopied_pages
    );
    Ok(())
}

fn consistent_cut_under_writers() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let cow = Arc::new(Cow::open()?);
    const THREADS: usize = 4;
    let r = cow.map_region(THREADS * 2 * 4096)?;
    let stop = Arc::new(AtomicBool::new(false));
    let base = r.addr as usize;
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let a = (base + t * 2 * 4096) as *mut u64;
                let b = (base + (t * 2 + 1) * 4096) as *mut u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    // SAFETY: each thread owns its two pages of the live region.
                    unsafe {
                        std::ptr::write_volatile(a, n);
                        std::ptr::write_volatile(b, n);
                    }
                }
                n
            })
        })
        .collect();
    // Writer t's count so far (its page A).
    // SAFETY: reading a u64 of the live region that a writer updates with volatile stores.
    let count = |t: usize| unsafe { std::ptr::read_volatile((base + t * 2 * 4096) as *const u64) };
    // Cuts are only tested while every writer runs: wait until each has started, and take
    // snapshots until each has advanced by 100 since (a guest scheduler may start one late).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while (0..THREADS).any(|t| count(t) == 0) {
        ensure!(
            std::time::Instant::now() < deadline,
            "a writer never started"
        );
        std::thread::yield_now();
    }
    let started: Vec<u64> = (0..THREADS).map(count).collect();
    let mut ids = Vec::new();
    let mut rounds = 0;
    while rounds < 200 || (0..THREADS).any(|t| count(t) < started[t] + 100) {
        ensure!(
            std::time::Instant::now() < deadline,
            "writers stalled: {:?} since {started:?}",
            (0..THREADS).map(count).collect::<Vec<_>>()
        );
        rounds += 1;
        ids.push(cow.snapshot()?);
        if ids.len() > 50 {
            cow.drop_snapshot(ids.remove(0))?;
        }
        let id = *ids.last().unwrap();
        for t in 0..THREADS {
            let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
            cow.read(id, r.offset + (t * 2 * 4096) as u64, &mut a)?;
            cow.read(id, r.offset + ((t * 2 + 1) * 4096) as u64, &mut b)?;
            let (a, b) = (u64::from_ne_bytes(a), u64::from_ne_bytes(b));
            // A is written before B: a consistent cut has A == B or A == B + 1.
            ensure!(
                a == b || a == b + 1,
                "snapshot {id} thread {t}: A = {a}, B = {b}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    Ok(())
}

fn snapshot_cost_follows_dirty_pages() -> Result<()> {
    // Not a timing test: the module's own counters show that a snapshot only touches the pages
    // written since the previous one, whatever the size of the space.
    let cow = Cow::open()?;
    let r = cow.map_region(4096 * 4096)?; // 16 MiB
    let m = bytes(&r);
    for p in (0..m.len()).step_by(4096) {
        m[p] = 1;
    }
    cow.snapshot()?;
    let before = cow.stats()?;
    m[0] = 2;
    m[4096 * 100] = 2;
    cow.snapshot()?;
    let after = cow.stats()?;
    ensure!(
        after.first_write_faults - before.first_write_faults == 2,
        "faults"
    );
    ensure!(after.pages_saved - before.pages_saved == 2, "saved");
    // Reads of the other pages fault nothing.
    let faults = after.first_write_faults + after.other_faults;
    let mut sum = 0u64;
    for p in (0..m.len()).step_by(4096) {
        sum += m[p] as u64;
    }
    ensure!(sum > 0);
    let s = cow.stats()?;
    ensure!(
        s.first_write_faults + s.other_faults == faults,
        "reads faulted"
    );
    Ok(())
}

fn errno_of(e: cow::Error) -> i32 {
    e.errno()
}

fn unknown_ids_enoent() -> Result<()> {
    let cow = Cow::open()?;
    let _r = cow.map_region(4096)?;
    for id in [0u64, 1, 7, u64::MAX] {
        ensure!(
            cow.restore(id).map_err(errno_of) == Err(libc::ENOENT),
            "restore {id}"
        );
        ensure!(
            cow.drop_snapshot(id).map_err(errno_of) == Err(libc::ENOENT),
            "drop {id}"
        );
        let mut b = [0u8; 16];
        ensure!(
            cow.read(id, 0, &mut b).map_err(errno_of) == Err(libc::ENOENT),
            "read {id}"
        );
        ensure!(
            cow.dirty_since(id).map_err(errno_of) == Err(libc::ENOENT),
            "dirty {id}"
        );
    }
    let id = cow.snapshot()?;
    cow.drop_snapshot(id)?;
    ensure!(
        cow.restore(id).map_err(errno_of) == Err(libc::ENOENT),
        "restore dropped"
    );
    Ok(())
}

fn private_mapping_refused() -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/cow")?;
    use std::os::fd::AsRawFd;
    // SAFETY: asking for a new mapping; on success it is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    let err = std::io::Error::last_os_error().raw_os_error();
    if p != libc::MAP_FAILED {
        // SAFETY: unmapping what we just mapped.
        unsafe { libc::munmap(p, 4096) };
        bail!("MAP_PRIVATE of /dev/cow succeeded");
    }
    ensure!(err == Some(libc::EINVAL), "MAP_PRIVATE: {err:?}");
    // Offsets beyond the space's range are refused too.
    // SAFETY: as above.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            ((1i64 << 32) - 1) * 4096,
        )
    };
    ensure!(
        p == libc::MAP_FAILED,
        "mapping past the space's range succeeded"
    );
    Ok(())
}

fn retention_window() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(4096)?;
    cow.set_limits(3, 1 << 30, abi::COW_POLICY_MERGE_OLDEST)?;
    for i in 0..6u8 {
        bytes(&r)[0] = i;
        cow.snapshot()?;
    }
    let ids: Vec<u64> = cow.list()?.iter().map(|s| s.id).collect();
    ensure!(ids == [4, 5, 6], "held {ids:?}");
    ensure!(cow.stats()?.evicted == 3, "evicted");
    cow.restore(4)?;
    ensure!(bytes(&r)[0] == 3, "restore to 4 gave {}", bytes(&r)[0]);
    cow.set_limits(1, 1 << 30, abi::COW_POLICY_FAIL)?;
    let e = cow.snapshot();
    ensure!(
        matches!(
            e,
            Err(cow::Error::WindowFull {
                held: 1,
                max_snapshots: 1,
                ..
            })
        ),
        "full window with FAIL policy: {e:?}"
    );
    let text = e.unwrap_err().to_string();
    ensure!(text.contains("window is full"), "{text}");
    let l = cow.limits()?;
    ensure!(
        l.max_snapshots == 1 && l.policy == abi::COW_POLICY_FAIL,
        "{l:?}"
    );
    Ok(())
}

fn memory_cap_merges_oldest_keeps_newest() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(64 * 4096)?;
    let m = bytes(&r);
    m.fill(1);
    cow.set_limits(8, 16 * 4096, abi::COW_POLICY_MERGE_OLDEST)?;
    cow.snapshot()?;
    m[..10 * 4096].fill(2);
    cow.snapshot()?;
    m[..10 * 4096].fill(3);
    // 20 pre-images would exceed 16 pages: the oldest snapshot is merged away.
    let s = cow.stats()?;
    ensure!(s.bytes_held <= 16 * 4096, "held {}", s.bytes_held);
    ensure!(s.evicted >= 1, "nothing evicted");
    let ids: Vec<u64> = cow.list()?.iter().map(|s| s.id).collect();
    ensure!(ids == [2], "held {ids:?}");
    cow.restore(2)?;
    ensure!(
        m[..10 * 4096].iter().all(|&b| b == 2) && m[10 * 4096..].iter().all(|&b| b == 1),
        "content"
    );
    // The cap never takes the newest snapshot: 64 pre-images (4x the cap) are all kept for it.
    m.fill(4);
    let s = cow.stats()?;
    let ids: Vec<u64> = cow.list()?.iter().map(|s| s.id).collect();
    ensure!(ids == [2], "the newest snapshot was evicted: held {ids:?}");
    ensure!(s.bytes_held == 64 * 4096, "held {}", s.bytes_held);
    cow.restore(2)?;
    ensure!(
        m[..10 * 4096].iter().all(|&b| b == 2) && m[10 * 4096..].iter().all(|&b| b == 1),
        "content after a write of 4x the cap"
    );
    // The next snapshot merges the over-budget one away and starts afresh.
    m.fill(5);
    cow.snapshot()?;
    let ids: Vec<u64> = cow.list()?.iter().map(|s| s.id).collect();
    ensure!(ids == [3], "held {ids:?}");
    Ok(())
}

fn garbage_ioctls() -> Result<()> {
    use std::os::fd::AsRawFd;
    let cow = Cow::open()?;
    let r = cow.map_region(16 * 4096)?;
    bytes(&r).fill(9);
    cow.snapshot()?;
    let mut rng = Rng::new(7);
    let mut buf = vec![0u8; 8192];
    let raw_fd = std::os::fd::AsFd::as_fd(&cow).as_raw_fd();
    for _ in 0..20000 {
        let nr = 0x10 + rng.below(11) as u32;
        let cmd = abi::ioc(
            rng.below(4) as u32,
            abi::COW_IOC_MAGIC,
            nr,
            rng.below(200) as usize,
        );
        for b in buf.iter_mut().take(128) {
            *b = if rng.below(3) == 0 {
                rng.next() as u8
            } else {
                0
            };
        }
        let size = match rng.below(4) {
            0 => rng.next() as u32,
            1 => rng.below(128) as u32,
            _ => [16u32, 24, 40, 104][rng.below(4) as usize],
        };
        buf[..4].copy_from_slice(&size.to_ne_bytes());
        // Counts and lengths small, pointers 0 or inside `buf`: whatever struct the module takes
        // the bytes for (CowList.capacity at 4, CowRead.len / CowDirty.capacity at 24,
        // CowList.entries at 16, CowRead.buf / CowDirty.pages at 32), it writes within `buf`.
        buf[4..8].copy_from_slice(&(rng.below(64) as u32).to_ne_bytes());
        buf[24..32].copy_from_slice(&rng.below(64).to_ne_bytes());
        for field in [16, 32] {
            let ptr = match rng.below(3) {
                0 => 0,
                _ => buf.as_ptr() as u64 + rng.below(4096),
            };
            buf[field..field + 8].copy_from_slice(&ptr.to_ne_bytes());
        }
        // SAFETY: the argument and every pointer in it lie inside `buf` (8 KiB), and the counts
        // above bound each write to ≤ 4 KiB (the module's argument cap) plus ≤ 2 KiB of array
        // from an address ≤ 4 KiB into `buf`, so nothing outside `buf` can be written.
        unsafe { libc::ioctl(raw_fd, cmd as libc::c_ulong, buf.as_mut_ptr()) };
    }
    // The space still works (with sane limits and no hint again: garbage may have set both).
    cow.set_limits(64, 1 << 30, abi::COW_POLICY_MERGE_OLDEST)?;
    cow.hint(&[])?;
    let id = cow.snapshot()?;
    bytes(&r).fill(1);
    cow.restore(id)?;
    ensure!(cow.stats().is_ok());
    Ok(())
}
fn mem_available_kib() -> Result<i64> {
    let m = std::fs::read_to_string("/proc/meminfo")?;
    let line = m
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .context("MemAvailable")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

/// Runs a child that covers 32 MiB, snapshots, rewrites it all (32 MiB of pre-images) and
/// exits; returns how many pages the module held for all spaces while the child's was alive.
fn child_with_64_mib() -> Result<u64> {
    let mut pipe = [0; 2];
    // SAFETY: `pipe` is a two-descriptor array.
    ensure!(unsafe { libc::pipe(pipe.as_mut_ptr()) } == 0, "pipe");
    // SAFETY: the test process is single-threaded here; the child only runs this closure and
    // leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let held = (|| -> Result<u64> {
            let cow = Cow::open()?;
            let r = cow.map_region(8192 * 4096)?;
            bytes(&r).fill(1);
            cow.snapshot()?;
            bytes(&r).fill(2);
            cow.snapshot()?;
            Ok(cow.stats()?.module_pages)
        })();
        let ok = match held {
            Ok(n) => {
                // SAFETY: writing 8 bytes from a live u64 into the pipe's write end.
                unsafe { libc::write(pipe[1], (&n as *const u64).cast(), 8) == 8 }
            }
            Err(_) => false,
        };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut held = 0u64;
    // SAFETY: closing our copy of the write end, then reading 8 bytes into a live u64 from the
    // read end (the child writes them before it exits), then closing it.
    let n = unsafe {
        libc::close(pipe[1]);
        let n = libc::read(pipe[0], (&mut held as *mut u64).cast(), 8);
        libc::close(pipe[0]);
        n
    };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        n == 8 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed"
    );
    Ok(held)
}

fn module_pages() -> Result<u64> {
    Ok(Cow::open()?.stats()?.module_pages)
}

fn exit_frees_everything() -> Result<()> {
    // Exact: the module counts the pages it holds for all spaces. Each child holds 8192 current
    // pages and 8192 pre-images; once it exited, the count is back where it was. (MemAvailable
    // proved too noisy a witness: it moves with slab, per-CPU lists and the 9p page cache by
    // tens of MiB on a long run.)
    let before = module_pages()?;
    for i in 0..4 {
        let during = child_with_64_mib()?;
        ensure!(
            during >= before + 16384,
            "child {i}: the module counted {during} pages with 16384 of the child's and {before} before"
        );
        let after = module_pages()?;
        ensure!(
            after == before,
            "the module holds {after} pages after child {i} exited, {before} before it ran"
        );
    }
    // Coarse, for what the count does not see (a reference to a page kept after the module
    // freed it, the nodes indexing the pages): six more children must not take half their 384
    // MiB with them. (The drift without a leak measured up to 80 MiB.)
    let baseline = mem_available_kib()?;
    for _ in 0..6 {
        child_with_64_mib()?;
    }
    let after = mem_available_kib()?;
    ensure!(
        after > baseline - 192 * 1024,
        "MemAvailable {baseline} kB before six children, {after} kB after"
    );
    Ok(())
}

fn rmmod_refused_while_mapped() -> Result<()> {
    module::ensure_loaded()?;
    let r = {
        let cow = Cow::open()?;
        let r = cow.map_region(4 * 4096)?;
        bytes(&r).fill(3);
        cow.snapshot()?;
        r
    }; // the descriptor is closed here; the mapping still holds the file
    match module::unload() {
        Ok(()) => bail!("rmmod succeeded with a live mapping"),
        Err(e) => ensure!(e == libc::EWOULDBLOCK || e == libc::EBUSY, "errno {e}"),
    }
    ensure!(bytes(&r).iter().all(|&b| b == 3), "mapping content");
    // SAFETY: unmapping the region this test mapped; nothing refers to it any more.
    unsafe { libc::munmap(r.addr.cast(), r.len) };
    module::unload().map_err(|e| anyhow::anyhow!("rmmod after munmap: errno {e}"))?;
    module::load()?;
    Ok(())
}
