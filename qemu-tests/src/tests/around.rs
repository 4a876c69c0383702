//! Fault-around in cow.ko: a first write that continues a sequential run also saves the pages
//! ahead of the writer and maps them writable. The run's later pages cost no fault, unwritten
//! pages saved ahead are dropped at the next snapshot, a window never leaves the faulting VMA,
//! and none of it changes what a snapshot holds.

use crate::{module, Test};
use anyhow::{ensure, Context, Result};
use cow::{Cow, Region};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "around::sequential_writer_faults_less",
            run: sequential_writer_faults_less,
        },
        Test {
            name: "around::unwritten_pages_dropped",
            run: unwritten_pages_dropped,
        },
        Test {
            name: "around::window_stays_in_vma",
            run: window_stays_in_vma,
        },
        Test {
            name: "around::mixed_writers_byte_exact",
            run: mixed_writers_byte_exact,
        },
        Test {
            name: "around::parameter_zero_turns_it_off",
            run: parameter_zero_turns_it_off,
        },
    ]
}

const PAGE: usize = 4096;

/// The value of word `w` of page `p` in generation `gen`: every word differs.
fn word(gen: u64, p: usize, w: usize) -> u64 {
    (gen << 48) ^ ((p as u64) << 16) ^ w as u64 ^ 0x5a5a_0000_0000_0000
}

/// Writes generation `gen` into page `p` of `r`, whole, front to back.
fn fill(r: &Region, p: usize, gen: u64) {
    for w in 0..PAGE / 8 {
        // SAFETY: page `p` lies in the region this test mapped (callers keep p < pages).
        unsafe {
            (r.addr.add(p * PAGE) as *mut u64)
                .add(w)
                .write_volatile(word(gen, p, w))
        };
    }
}

/// Whether page `p` of `bytes` (a copy of the region, or the region itself) holds `gen`.
fn holds(bytes: &[u8], p: usize, gen: u64) -> bool {
    bytes[p * PAGE..(p + 1) * PAGE]
        .chunks_exact(8)
        .enumerate()
        .all(|(w, b)| u64::from_ne_bytes(b.try_into().unwrap()) == word(gen, p, w))
}

fn region_bytes(r: &Region) -> &[u8] {
    // SAFETY: the region is mapped readable for the test's lifetime.
    unsafe { std::slice::from_raw_parts(r.addr, r.len) }
}

/// Every page of `r` holds `gens[p]`, in the mapping and as read through the device at `id`.
fn check(cow: &Cow, r: &Region, id: Option<u64>, gens: &[u64], what: &str) -> Result<()> {
    let bytes = match id {
        Some(id) => {
            let mut buf = vec![0u8; r.len];
            cow.read(id, r.offset, &mut buf)?;
            buf
        }
        None => region_bytes(r).to_vec(),
    };
    for (p, &gen) in gens.iter().enumerate() {
        ensure!(
            holds(&bytes, p, gen),
            "{what}: page {p} does not hold generation {gen}"
        );
    }
    Ok(())
}

/// The `fault_around` parameter set to `value` until dropped (the old value comes back even
/// when the test fails).
struct Parameter(String);

const PARAMETER: &str = "/sys/module/cow/parameters/fault_around";

impl Parameter {
    fn set(value: &str) -> Result<Parameter> {
        let old = std::fs::read_to_string(PARAMETER).context(PARAMETER)?;
        std::fs::write(PARAMETER, value).context(PARAMETER)?;
        Ok(Parameter(old.trim().to_string()))
    }
}

impl Drop for Parameter {
    fn drop(&mut self) {
        let _ = std::fs::write(PARAMETER, &self.0);
    }
}

fn setup(pages: usize) -> Result<(Cow, Region, u64)> {
    module::ensure_loaded()?;
    let cow = Cow::open()?;
    let r = cow.map_region(pages * PAGE)?;
    for p in 0..pages {
        fill(&r, p, 1);
    }
    let s1 = cow.snapshot()?;
    Ok((cow, r, s1))
}

/// Writes generation `gen` into pages `0..pages` of `r`, front to back; returns the first-write
/// faults and the pages saved ahead that it took.
fn rewrite(cow: &Cow, r: &Region, pages: usize, gen: u64) -> Result<(u64, u64)> {
    let before = cow.stats()?;
    for p in 0..pages {
        fill(r, p, gen);
    }
    let after = cow.stats()?;
    Ok((
        after.first_write_faults - before.first_write_faults,
        after.around_pages - before.around_pages,
    ))
}

fn sequential_writer_faults_less() -> Result<()> {
    const PAGES: usize = 512;
    let _default = Parameter::set("16")?;
    let (cow, r, s1) = setup(PAGES)?;
    let before = cow.stats()?;
    let (faults, around) = rewrite(&cow, &r, PAGES, 2)?;
    ensure!(
        faults + around == PAGES as u64,
        "{faults} first-write faults + {around} pages saved ahead != {PAGES} pages written"
    );
    // Windows 1, 2, 4, 8, then 16: about one fault per 17 pages.
    ensure!(
        faults <= 64,
        "{faults} first-write faults for {PAGES} sequential pages"
    );
    let s2 = cow.snapshot()?;
    let after = cow.stats()?;
    ensure!(
        after.around_useful - before.around_useful == around,
        "{} of {around} pages saved ahead counted as written",
        after.around_useful - before.around_useful
    );
    let dirty = cow.dirty_in_epoch(s1)?;
    ensure!(
        dirty.len() == PAGES,
        "epoch after s1 wrote {} pages",
        dirty.len()
    );
    check(&cow, &r, Some(s1), &[1; PAGES], "read at s1")?;
    check(&cow, &r, Some(s2), &[2; PAGES], "read at s2")?;
    cow.restore(s1)?;
    check(&cow, &r, None, &[1; PAGES], "after restore to s1")?;
    // Once more after the restore: the run is detected again and stays exact.
    for p in 0..PAGES {
        fill(&r, p, 3);
    }
    cow.restore(s1)?;
    check(&cow, &r, None, &[1; PAGES], "second restore to s1")
}

fn unwritten_pages_dropped() -> Result<()> {
    const PAGES: usize = 256;
    const WRITTEN: usize = 100;
    let _default = Parameter::set("16")?;
    let (cow, r, s1) = setup(PAGES)?;
    let before = cow.stats()?;
    for p in 0..WRITTEN {
        fill(&r, p, 2);
    }
    let s2 = cow.snapshot()?;
    let after = cow.stats()?;
    let around = after.around_pages - before.around_pages;
    let useful = after.around_useful - before.around_useful;
    ensure!(
        around > useful,
        "the run's last window ({around} saved ahead, {useful} written) overshot nothing"
    );
    let dirty = cow.dirty_in_epoch(s1)?;
    let first = r.offset / PAGE as u64;
    let want: Vec<u64> = (first..first + WRITTEN as u64).collect();
    ensure!(
        dirty == want,
        "epoch after s1: {} pages listed, want pages 0..{WRITTEN}",
        dirty.len()
    );
    // s1 holds the images of the written pages only; s2 (the newest) holds none yet.
    let held = after.bytes_held;
    ensure!(
        held == (WRITTEN * PAGE) as u64,
        "{held} bytes held, want {}",
        WRITTEN * PAGE
    );
    let mut gens = vec![1u64; PAGES];
    gens[..WRITTEN].fill(2);
    check(&cow, &r, Some(s2), &gens, "read at s2")?;
    cow.restore(s1)?;
    check(&cow, &r, None, &[1; PAGES], "after restore to s1")
}

fn window_stays_in_vma() -> Result<()> {
    const PAGES: usize = 16;
    let _default = Parameter::set("16")?;
    let (cow, r, s1) = setup(PAGES)?;
    // Unmap the second half: its pages stay in the space, present, but no longer in this VMA.
    // SAFETY: the upper half of the test's own mapping; nothing refers to it afterwards.
    let rc = unsafe { libc::munmap(r.addr.add(PAGES / 2 * PAGE).cast(), PAGES / 2 * PAGE) };
    ensure!(rc == 0, "munmap: {}", std::io::Error::last_os_error());
    let (faults, around) = rewrite(&cow, &r, PAGES / 2, 2)?;
    ensure!(
        faults + around == (PAGES / 2) as u64,
        "{faults} faults + {around} saved ahead for {} pages: a window left the VMA",
        PAGES / 2
    );
    cow.snapshot()?;
    let dirty = cow.dirty_in_epoch(s1)?;
    ensure!(
        dirty.len() == PAGES / 2,
        "epoch after s1 listed {} pages",
        dirty.len()
    );
    cow.restore(s1)?;
    let half = Region {
        addr: r.addr,
        len: PAGES / 2 * PAGE,
        offset: r.offset,
    };
    check(&cow, &half, None, &[1; PAGES / 2], "after restore")?;
    let mut buf = vec![0u8; r.len];
    cow.read(s1, r.offset, &mut buf)?;
    ensure!(
        (0..PAGES).all(|p| holds(&buf, p, 1)),
        "read at s1 of both halves"
    );
    Ok(())
}

/// Random writers, sequential bursts (forward from random pages, some reaching the region's
/// end), snapshots, restores to random retained ids and reads at ids, each compared page by
/// page with a model kept outside covered memory.
fn mixed_writers_byte_exact() -> Result<()> {
    const PAGES: usize = 384;
    let _default = Parameter::set("16")?;
    let (cow, r, s1) = setup(PAGES)?;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut current = vec![1u64; PAGES];
    // (id, generations at that snapshot), oldest first.
    let mut kept: Vec<(u64, Vec<u64>)> = vec![(s1, current.clone())];
    let mut around = 0u64;
    for (step, gen) in (0..60).zip(2u64..) {
        match next(10) {
            0..=3 => {
                // A sequential burst.
                let start = next(PAGES);
                let len = 1 + next(120);
                for (p, page_gen) in current.iter_mut().enumerate().skip(start).take(len) {
                    fill(&r, p, gen);
                    *page_gen = gen;
                }
            }
            4..=6 => {
                for _ in 0..1 + next(40) {
                    let p = next(PAGES);
                    fill(&r, p, gen);
                    current[p] = gen;
                }
            }
            7 | 8 => {
                let id = cow.snapshot()?;
                kept.push((id, current.clone()));
            }
            _ => {
                let (id, gens) = kept[next(kept.len())].clone();
                check(
                    &cow,
                    &r,
                    Some(id),
                    &gens,
                    &format!("step {step}: read at {id}"),
                )?;
                cow.restore(id)?;
                kept.retain(|(k, _)| *k <= id);
                current = gens;
                check(
                    &cow,
                    &r,
                    None,
                    &current,
                    &format!("step {step}: restore to {id}"),
                )?;
            }
        }
        around = cow.stats()?.around_pages;
    }
    ensure!(
        around > 0,
        "no page was ever saved ahead: the test exercised nothing"
    );
    for (id, gens) in kept.iter().rev() {
        cow.restore(*id)?;
        check(&cow, &r, None, gens, &format!("final restore to {id}"))?;
    }
    Ok(())
}

fn parameter_zero_turns_it_off() -> Result<()> {
    const PAGES: usize = 64;
    let _off = Parameter::set("0")?;
    let (cow, r, s1) = setup(PAGES)?;
    let (faults, around) = rewrite(&cow, &r, PAGES, 2)?;
    ensure!(
        faults == PAGES as u64 && around == 0,
        "with fault_around=0: {faults} faults, {around} saved ahead"
    );
    cow.restore(s1)?;
    check(&cow, &r, None, &[1; PAGES], "after restore")
}
