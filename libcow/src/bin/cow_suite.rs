//! cow-suite — the backend-generic correctness suite: randomized, byte-exact.
//!
//! Usage: cow-suite BACKEND churn [STEPS] [SEED] | BACKEND threads
//!
//! `churn`: random writes, malloc/calloc/realloc/free (which moves the program break and
//! maps/unmaps large blocks), mmap/munmap/mremap of large regions, snapshots, restores to random
//! retained ids, reads of old snapshots, dirty-set checks and drops. The program's state (a
//! table of blocks and regions in its globals, their bytes) is covered memory; the reference
//! copies, the random generator and the suite's control state are on the stack or in memory no
//! backend covers. After every restore the whole state must equal the reference byte for byte.
//!
//! `threads`: four threads write increasing sequence numbers to two pages each (A then B)
//! while the main thread snapshots; every snapshot must show A == B or A == B + 1, and a
//! restore with the threads running must bring back exactly a snapshot's values.
//!
//! For the kmod backend, run it under `cowctl run` (the heap and globals are then covered).

use cow::backend::{self, Backend};
use std::process::ExitCode;

const SLOTS: usize = 128;
const MAX_REFS: usize = 12;
const PAGE: usize = 4096;

/// What one table slot holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
struct Slot {
    addr: usize,
    len: usize,
    /// 0 free, 1 malloc block, 2 mapped region.
    kind: usize,
}

const FREE: Slot = Slot {
    addr: 0,
    len: 0,
    kind: 0,
};

/// The covered program state: in the executable's globals.
static mut TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static mut GLOBAL_BYTES: [u8; 3 * PAGE + 77] = [0; 3 * PAGE + 77];

fn table() -> &'static mut [Slot; SLOTS] {
    // SAFETY: the suite's main thread is the only one touching the table.
    unsafe { &mut *std::ptr::addr_of_mut!(TABLE) }
}

fn globals() -> &'static mut [u8] {
    // SAFETY: as above.
    unsafe { &mut *std::ptr::addr_of_mut!(GLOBAL_BYTES) }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A snapshot's reference: its id and an uncovered copy of the whole program state.
#[derive(Clone, Copy)]
struct Ref {
    id: u64,
    table: [Slot; SLOTS],
    globals: *mut u8,
    /// Concatenated bytes of every slot, in slot order.
    bytes: *mut u8,
    bytes_len: usize,
}

fn bytes_of(s: &Slot) -> &'static mut [u8] {
    // SAFETY: a live block or region of `len` bytes owned by the table.
    unsafe { std::slice::from_raw_parts_mut(s.addr as *mut u8, s.len) }
}

fn uncovered(len: usize) -> *mut u8 {
    cow::book::alloc_uncovered(len.max(1)).as_mut_ptr()
}

fn save(id: u64) -> Ref {
    let t = *table();
    let total: usize = t.iter().map(|s| s.len).sum();
    let bytes = uncovered(total);
    let mut off = 0;
    for s in t.iter().filter(|s| s.kind != 0) {
        // SAFETY: `bytes` has room for every slot's bytes.
        unsafe { std::ptr::copy_nonoverlapping(s.addr as *const u8, bytes.add(off), s.len) };
        off += s.len;
    }
    let g = uncovered(globals().len());
    // SAFETY: `g` has room for the globals.
    unsafe { std::ptr::copy_nonoverlapping(globals().as_ptr(), g, globals().len()) };
    Ref {
        id,
        table: t,
        globals: g,
        bytes,
        bytes_len: total,
    }
}

fn release(r: &Ref) {
    let book = cow::book::book();
    book.free(r.bytes, r.bytes_len.max(1));
    book.free(r.globals, globals().len());
}

fn check(r: &Ref, step: usize) -> Result<(), String> {
    if *table() != r.table {
        return Err(format!(
            "step {step}: the table differs after restore to {}",
            r.id
        ));
    }
    // SAFETY: the reference's globals copy is `globals().len()` bytes.
    let g = unsafe { std::slice::from_raw_parts(r.globals, globals().len()) };
    if let Some(j) = g.iter().zip(globals().iter()).position(|(a, b)| a != b) {
        let addr = globals().as_ptr() as usize + j;
        return Err(format!(
            "step {step}: globals byte {j} (address {addr:#x}) differs after restore to {}",
            r.id
        ));
    }
    let mut off = 0;
    for (i, s) in table().iter().enumerate().filter(|(_, s)| s.kind != 0) {
        // SAFETY: the reference holds this slot's bytes at `off`.
        let want = unsafe { std::slice::from_raw_parts(r.bytes.add(off), s.len) };
        if let Some(j) = bytes_of(s).iter().zip(want).position(|(a, b)| a != b) {
            return Err(format!(
                "step {step}: slot {i} ({}) byte {j} of {} differs after restore to {}",
                if s.kind == 1 { "malloc" } else { "region" },
                s.len,
                r.id
            ));
        }
        off += s.len;
    }
    Ok(())
}

fn fill(rng: &mut Rng, b: &mut [u8]) {
    for x in b {
        *x = rng.next() as u8;
    }
}

fn map_region(b: &dyn Backend, len: usize) -> Option<usize> {
    b.map(len).ok().map(|p| p as usize)
}

fn churn(b: &dyn Backend, steps: usize, seed: u64) -> Result<String, String> {
    let mut rng = Rng(seed.max(1));
    let refs_mem = uncovered(std::mem::size_of::<Ref>() * MAX_REFS) as *mut Ref;
    // SAFETY: uncovered memory for MAX_REFS references, used as an array.
    let refs = unsafe { std::slice::from_raw_parts_mut(refs_mem, MAX_REFS) };
    let mut nrefs = 0usize;
    let kmod = b.name() == "kmod";
    let random_hints =
        (kmod || b.name() == "mprotect") && std::env::var_os("COW_SUITE_RANDOM_HINTS").is_some();
    let (mut restores, mut reads, mut unmaps) = (0, 0, 0);
    let e = |op: &str, err: cow::Error| format!("{op}: {err}");
    for step in 0..steps {
        let s = rng.below(SLOTS);
        let slot = table()[s];
        match rng.below(100) {
            0..=29 if slot.kind != 0 => {
                let m = bytes_of(&slot);
                let off = rng.below(m.len());
                let cap = if rng.below(8) == 0 { 3 * PAGE } else { 64 };
                let n = 1 + rng.below((m.len() - off).min(cap));
                fill(&mut rng, &mut m[off..off + n]);
            }
            30..=41 if slot.kind == 0 => {
                let len = 1 + if rng.below(8) == 0 {
                    rng.below(300_000)
                } else {
                    rng.below(2000)
                };
                // SAFETY: plain malloc/calloc; the block is recorded in the table.
                let p = unsafe {
                    if rng.below(2) == 0 {
                        libc::calloc(1, len)
                    } else {
                        libc::malloc(len)
                    }
                } as usize;
                if p == 0 {
                    return Err("malloc failed".into());
                }
                table()[s] = Slot {
                    addr: p,
                    len,
                    kind: 1,
                };
                fill(&mut rng, bytes_of(&table()[s]));
            }
            42..=49 if slot.kind == 1 => {
                // SAFETY: a live malloc block of the table.
                unsafe { libc::free(slot.addr as *mut libc::c_void) };
                table()[s] = FREE;
            }
            50..=54 if slot.kind == 1 => {
                let len = 1 + if rng.below(6) == 0 {
                    rng.below(400_000)
                } else {
                    rng.below(3000)
                };
                // SAFETY: a live malloc block of the table.
                let p = unsafe { libc::realloc(slot.addr as *mut libc::c_void, len) } as usize;
                if p == 0 {
                    return Err("realloc failed".into());
                }
                table()[s] = Slot {
                    addr: p,
                    len,
                    kind: 1,
                };
                if len > slot.len {
                    fill(&mut rng, &mut bytes_of(&table()[s])[slot.len..]);
                }
            }
            55..=60 if slot.kind == 0 => {
                let len = (1 + rng.below(96)) * PAGE;
                let p = map_region(b, len).ok_or("map failed")?;
                table()[s] = Slot {
                    addr: p,
                    len,
                    kind: 2,
                };
                let m = bytes_of(&table()[s]);
                let off = rng.below(len - 100);
                fill(&mut rng, &mut m[off..off + 100]);
            }
            61..=62 if slot.kind == 2 && !kmod => {
                // SAFETY: unmapping a region of the table.
                unsafe { libc::munmap(slot.addr as *mut libc::c_void, slot.len) };
                table()[s] = FREE;
                unmaps += 1;
            }
            63 if slot.kind == 2 && !kmod => {
                let len = (1 + rng.below(128)) * PAGE;
                // SAFETY: moving/resizing a region of the table.
                let p = unsafe {
                    libc::mremap(
                        slot.addr as *mut libc::c_void,
                        slot.len,
                        len,
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if p == libc::MAP_FAILED {
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    // mprotect splits a partly written region into read-only and writable
                    // mappings, which mremap refuses (documented); glibc falls back to copying.
                    if b.name() == "mprotect" && errno == Some(libc::EFAULT) {
                        continue;
                    }
                    return Err(format!("mremap failed: {errno:?}"));
                }
                table()[s] = Slot {
                    addr: p as usize,
                    len,
                    kind: 2,
                };
                if len > slot.len {
                    fill(
                        &mut rng,
                        &mut bytes_of(&table()[s])[slot.len..slot.len + 64],
                    );
                }
            }
            64..=66 if slot.kind == 2 => {
                // Zap some pages: private memory reads as zero afterwards.
                let first = rng.below(slot.len / PAGE);
                let n = 1 + rng.below(slot.len / PAGE - first);
                // SAFETY: advising pages of a region of the table.
                unsafe {
                    libc::madvise(
                        (slot.addr + first * PAGE) as *mut libc::c_void,
                        n * PAGE,
                        libc::MADV_DONTNEED,
                    )
                };
            }
            67 => {
                let g = globals();
                let off = rng.below(g.len());
                let n = 1 + rng.below(g.len() - off);
                fill(&mut rng, &mut g[off..off + n]);
            }
            68..=77 => {
                if nrefs == MAX_REFS {
                    b.drop_snapshot(refs[0].id).map_err(|x| e("drop", x))?;
                    release(&refs[0]);
                    refs.copy_within(1..nrefs, 0);
                    nrefs -= 1;
                }
                if random_hints {
                    // Hint random pages of random slots (and junk): pre-copy must never change
                    // what a snapshot holds, only what it costs.
                    let mut hint = [0usize; 64];
                    for h in hint.iter_mut() {
                        let t = table()[rng.below(SLOTS)];
                        *h = if t.kind != 0 {
                            t.addr + rng.below(t.len)
                        } else {
                            rng.next() as usize
                        };
                    }
                    b.hint_addrs(&hint).map_err(|x| e("hint", x))?;
                }
                let id = b.snapshot().map_err(|x| e("snapshot", x))?;
                refs[nrefs] = save(id);
                nrefs += 1;
            }
            78..=85 if nrefs > 0 => {
                let k = rng.below(nrefs);
                b.restore(refs[k].id).map_err(|x| e("restore", x))?;
                restores += 1;
                check(&refs[k], step)?;
                for r in &refs[k + 1..nrefs] {
                    release(r);
                }
                nrefs = k + 1;
            }
            86..=91 if nrefs > 0 => {
                let k = rng.below(nrefs);
                let r = refs[k];
                let Some(i) = (0..SLOTS).find(|&i| r.table[i].kind != 0) else {
                    continue;
                };
                let mut off = 0;
                for s in r.table[..i].iter() {
                    off += s.len;
                }
                let s = r.table[i];
                let got = cow::book::alloc_uncovered(s.len);
                b.read(r.id, s.addr, got).map_err(|x| e("read", x))?;
                // SAFETY: the reference holds slot i's bytes at `off`.
                let want = unsafe { std::slice::from_raw_parts(r.bytes.add(off), s.len) };
                if got[..] != want[..] {
                    return Err(format!("step {step}: read({}) of slot {i} differs", r.id));
                }
                cow::book::book().free(got.as_mut_ptr(), s.len);
                reads += 1;
            }
            92..=94 if nrefs > 0 => {
                // Every page of a live slot that differs from the snapshot must be dirty.
                let k = rng.below(nrefs);
                let r = refs[k];
                let dirty = b.dirty_since(r.id).map_err(|x| e("dirty", x))?;
                let mut off = 0;
                for (i, s) in r.table.iter().enumerate() {
                    if s.kind != 0 && table()[i] == *s {
                        // SAFETY: the reference holds this slot's bytes at `off`.
                        let want = unsafe { std::slice::from_raw_parts(r.bytes.add(off), s.len) };
                        for (j, (x, y)) in bytes_of(s).iter().zip(want).enumerate() {
                            let page = (s.addr + j) & !(PAGE - 1);
                            if x != y && dirty.binary_search(&page).is_err() {
                                return Err(format!(
                                    "step {step}: page {page:#x} (slot {i}, kind {}, {} bytes) \
                                     changed since {} but is not dirty",
                                    s.kind, s.len, r.id
                                ));
                            }
                        }
                    }
                    off += s.len;
                }
            }
            95..=97 if nrefs > 1 => {
                let k = rng.below(nrefs);
                b.drop_snapshot(refs[k].id).map_err(|x| e("drop", x))?;
                release(&refs[k]);
                refs.copy_within(k + 1..nrefs, k);
                nrefs -= 1;
            }
            _ => {}
        }
    }
    if restores < steps / 40 {
        return Err(format!("only {restores} restores"));
    }
    let st = b.stats();
    Ok(format!(
        "churn: backend {}, seed {seed}: {steps} steps, {restores} restores, {reads} reads, {unmaps} unmaps, \
         {} pages saved, {} KiB held; zero differences",
        b.name(),
        st.pages_saved,
        st.bytes_held / 1024
    ))
}

/// Control flags of the threads mode; they live in uncovered memory so restores leave them be.
struct Control {
    stop: std::sync::atomic::AtomicBool,
    pause: std::sync::atomic::AtomicBool,
    paused: std::sync::atomic::AtomicUsize,
    ready: std::sync::atomic::AtomicUsize,
}

fn threads(b: &'static dyn Backend) -> Result<String, String> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const THREADS: usize = 4;
    let region = b.map(THREADS * 2 * PAGE).map_err(|e| format!("map: {e}"))? as usize;
    let control: &'static Control = cow::book::leak(Control {
        stop: AtomicBool::new(false),
        pause: AtomicBool::new(false),
        paused: AtomicUsize::new(0),
        ready: AtomicUsize::new(0),
    });
    let page = move |t: usize, second: usize| (region + (t * 2 + second) * PAGE) as *mut u64;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                // Thread state that points into the heap (glibc's per-thread cache) must exist
                // before the first snapshot, or a restore leaves it dangling: allocate once.
                drop(std::hint::black_box(vec![0u8; 64]));
                control.ready.fetch_add(1, Ordering::AcqRel);
                let (a, bb) = (page(t, 0), page(t, 1));
                while !control.stop.load(Ordering::Relaxed) {
                    if control.pause.load(Ordering::Acquire) {
                        control.paused.fetch_add(1, Ordering::AcqRel);
                        while control.pause.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        control.paused.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    // The next value comes from memory, so the pair stays a valid state even
                    // after a restore rewrote it: A is written first, then B.
                    // SAFETY: each thread owns its two pages of the region.
                    unsafe {
                        let n = std::ptr::read_volatile(bb) + 1;
                        std::ptr::write_volatile(a, n);
                        std::ptr::write_volatile(bb, n);
                    }
                }
            })
        })
        .collect();
    while control.ready.load(Ordering::Acquire) < THREADS {
        std::thread::yield_now();
    }
    // The ids and expected values live on this stack: a restore rewinds the heap.
    let mut ids = [0u64; 64];
    let mut seen = [[0u64; 2]; 64 * THREADS];
    let mut n = 0usize;
    for round in 0..60 {
        let id = b.snapshot().map_err(|e| format!("snapshot: {e}"))?;
        for t in 0..THREADS {
            let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
            b.read(id, page(t, 0) as usize, &mut x)
                .map_err(|e| format!("read: {e}"))?;
            b.read(id, page(t, 1) as usize, &mut y)
                .map_err(|e| format!("read: {e}"))?;
            let (x, y) = (u64::from_ne_bytes(x), u64::from_ne_bytes(y));
            if !(x == y || x == y + 1) {
                return Err(format!("snapshot {id} thread {t}: A = {x}, B = {y}"));
            }
            seen[n * THREADS + t] = [x, y];
        }
        ids[n] = id;
        n += 1;
        if round % 10 == 9 {
            // Restore while the writers run (they spin: the backend stops them around it),
            // then check every pair is exactly the snapshot's before they resume writing.
            let k = n / 2;
            control.pause.store(true, Ordering::Release);
            while control.paused.load(Ordering::Acquire) < THREADS {
                std::thread::yield_now();
            }
            b.restore(ids[k]).map_err(|e| format!("restore: {e}"))?;
            for t in 0..THREADS {
                // SAFETY: reading the region; the writers are paused.
                let got = unsafe {
                    [
                        std::ptr::read_volatile(page(t, 0)),
                        std::ptr::read_volatile(page(t, 1)),
                    ]
                };
                if got != seen[k * THREADS + t] {
                    return Err(format!(
                        "restore to {} thread {t}: {got:?}, snapshot had {:?}",
                        ids[k],
                        seen[k * THREADS + t]
                    ));
                }
            }
            control.pause.store(false, Ordering::Release);
            n = k + 1;
        }
        if n > 20 {
            b.drop_snapshot(ids[0]).map_err(|e| format!("drop: {e}"))?;
            ids.copy_within(1..n, 0);
            seen.copy_within(THREADS..n * THREADS, 0);
            n -= 1;
        }
    }
    control.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().map_err(|_| "writer panicked")?;
    }
    Ok(format!(
        "threads: backend {}, 60 snapshots under 4 writers, consistent cuts, 6 exact restores",
        b.name()
    ))
}

/// Memory the program maps right below libcow's book with the book's flags (jemalloc maps with
/// `MAP_NORESERVE`, as the book does; the book is also `MADV_NOHUGEPAGE`, as a program that
/// turns huge pages off has it): the kernel merges it into the book's mapping, and it must
/// still be covered.
fn book_neighbour(b: &dyn Backend) -> Result<String, String> {
    const PAGES: usize = 16;
    let (book_start, _) = cow::book::book().range();
    let want = book_start - PAGES * PAGE;
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let p = unsafe {
        libc::mmap(
            want as *mut libc::c_void,
            PAGES * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as usize != want {
        return Err(format!("cannot map below the book at {want:#x}"));
    }
    // Without THP in the kernel this fails (EINVAL), and the book's advice failed the same way.
    // SAFETY: advice on the pages just mapped.
    unsafe { libc::madvise(p, PAGES * PAGE, libc::MADV_NOHUGEPAGE) };
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let merged = maps.lines().any(|l| {
        let range: Vec<usize> = l
            .split(' ')
            .next()
            .unwrap_or("")
            .split('-')
            .filter_map(|x| usize::from_str_radix(x, 16).ok())
            .collect();
        range.len() == 2 && range[0] <= want && range[1] > book_start
    });
    if !merged {
        return Err("the kernel did not merge the mapping into the book's: nothing tested".into());
    }
    // SAFETY: the pages just mapped.
    let m = unsafe { std::slice::from_raw_parts_mut(want as *mut u8, PAGES * PAGE) };
    m.fill(1);
    let id = b.snapshot().map_err(|e| format!("snapshot: {e}"))?;
    m.fill(2);
    b.restore(id).map_err(|e| format!("restore: {e}"))?;
    if let Some(i) = m.iter().position(|&x| x != 1) {
        return Err(format!(
            "byte {i} of the mapping merged into the book's was not restored"
        ));
    }
    Ok(format!(
        "book-neighbour: backend {}, a mapping merged into libcow's book restored, zero differences",
        b.name()
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(name), Some(mode)) = (args.first(), args.get(1)) else {
        eprintln!("usage: cow-suite BACKEND churn [STEPS] [SEED] | BACKEND threads | BACKEND book-neighbour");
        return ExitCode::from(2);
    };
    // Everything the suite itself needs later is created now, before the first snapshot.
    println!("cow-suite: {name} {mode}");
    let b: &'static dyn Backend = match backend::open(name) {
        Ok((b, _)) => Box::leak(b),
        Err(e) => {
            eprintln!("cow-suite: backend {name}: {e}");
            return ExitCode::from(3);
        }
    };
    let result = match mode.as_str() {
        "churn" => {
            let steps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3000);
            let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0xC0FFEE);
            churn(b, steps, seed)
        }
        "threads" => threads(b),
        "book-neighbour" => book_neighbour(b),
        _ => Err(format!("unknown mode {mode}")),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("cow-suite: {name} {mode}: {why}");
            ExitCode::FAILURE
        }
    }
}
