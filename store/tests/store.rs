//! The store against a model: random page histories written, then every read, `when` and
//! thread compared byte for byte; torn tails, flipped bytes.

use std::collections::HashMap;
use std::path::PathBuf;
use store::{Codec, Error, Meta, NewCheckpoint, Reason, Recording, ThreadState, Writer, PAGE};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("delorean-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn meta(codec: Codec) -> Meta {
    Meta {
        exe: "/bin/test".into(),
        argv: vec!["test".into()],
        pid: 1,
        backend: "scan".into(),
        codec,
        ..Meta::default()
    }
}

fn thread(tid: u32, seed: u64) -> ThreadState {
    let mut regs = [0u64; 27];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = seed.wrapping_mul(31).wrapping_add(i as u64);
    }
    ThreadState {
        tid,
        regs,
        fpregs: (0..512).map(|i| (i as u64 ^ seed) as u8).collect(),
    }
}

/// Writes `n` checkpoints of random writes over 32 pages; returns the model: memory after
/// each checkpoint (page → contents).
fn write_random(
    dir: &std::path::Path,
    codec: Codec,
    n: usize,
    seed: u64,
) -> Vec<HashMap<u64, Vec<u8>>> {
    write_bounded(dir, codec, n, seed, None)
}

fn write_bounded(
    dir: &std::path::Path,
    codec: Codec,
    n: usize,
    seed: u64,
    max_size: Option<u64>,
) -> Vec<HashMap<u64, Vec<u8>>> {
    let mut rng = Rng(seed);
    let mut w = Writer::create(dir, &meta(codec)).unwrap();
    if let Some(max) = max_size {
        w.set_max_size(max);
    }
    let mut mem: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut history = Vec::new();
    for c in 0..n {
        let mut changed: Vec<(u64, Vec<u8>)> = Vec::new();
        let count = if c == 0 { 32 } else { rng.below(6) };
        for i in 0..count {
            let addr = 0x10000 + if c == 0 { i } else { rng.below(32) } * PAGE as u64;
            let mut page = mem.get(&addr).cloned().unwrap_or_else(|| vec![0; PAGE]);
            match rng.below(4) {
                0 => page.fill(0),                        // a zero page
                1 => page.fill((rng.below(3)) as u8 + 1), // repeated contents: deduplicated
                _ => {
                    let at = rng.below(PAGE as u64 - 8) as usize;
                    page[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            mem.insert(addr, page.clone());
            changed.retain(|(a, _)| *a != addr);
            changed.push((addr, page));
        }
        let pages: Vec<(u64, &[u8])> = changed.iter().map(|(a, p)| (*a, p.as_slice())).collect();
        let threads = [thread(100, c as u64), thread(101, c as u64 + 7)];
        let maps = format!("map {}", c / 10);
        w.checkpoint(&NewCheckpoint {
            time_ns: 1_000_000 * c as u64,
            reason: if c == 0 {
                Reason::Start
            } else {
                Reason::Interval
            },
            signal: 0,
            threads: &threads,
            pages: &pages,
            maps: (c % 10 == 0).then_some(maps.as_str()),
        })
        .unwrap();
        history.push(mem.clone());
    }
    history
}

#[test]
fn every_page_at_every_checkpoint_matches_the_model() {
    for codec in Codec::ALL {
        let dir = scratch(&format!("model-{}", codec.name()));
        let history = write_random(&dir, codec, 200, 0x1234_5678);
        let r = Recording::open(&dir).unwrap();
        assert_eq!(r.len(), 200);
        for (c, mem) in history.iter().enumerate() {
            let number = c as u64 + 1;
            for (addr, want) in mem {
                let got = r.page(number, *addr).unwrap().expect("recorded");
                assert!(
                    got.as_slice() == want.as_slice(),
                    "page {addr:#x} at {number}"
                );
            }
            let mut buf = vec![0u8; 3 * PAGE];
            assert_eq!(r.read(number, 0x10000 + 100, &mut buf).unwrap(), buf.len());
            let threads = r.threads(number).unwrap();
            assert_eq!(
                threads,
                vec![thread(100, c as u64), thread(101, c as u64 + 7)]
            );
            assert_eq!(r.maps(number).unwrap(), format!("map {}", c / 10));
        }
        // Unrecorded memory is not invented.
        assert!(r.page(1, 0x1000).unwrap().is_none());
        let info = r.info();
        assert_eq!(info.checkpoints, 200);
        assert!(info.dedup_ratio > 1.0, "{info:?}");
        assert!(info.unique_pages < info.page_images, "{info:?}");
        if codec != Codec::None {
            assert!(info.compress_ratio > 2.0, "{info:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn when_lists_exactly_the_checkpoints_that_changed_the_bytes() {
    let dir = scratch("when");
    let history = write_random(&dir, Codec::Lz4, 300, 99);
    let r = Recording::open(&dir).unwrap();
    let mut rng = Rng(5);
    for _ in 0..50 {
        let addr = 0x10000 + rng.below(32 * PAGE as u64 - 64);
        let len = 1 + rng.below(5000).min(0x10000 + 32 * PAGE as u64 - addr - 1);
        let bytes_at = |mem: &HashMap<u64, Vec<u8>>| -> Vec<u8> {
            (addr..addr + len)
                .map(|a| {
                    let page = a & !(PAGE as u64 - 1);
                    mem.get(&page).map_or(0, |p| p[(a - page) as usize])
                })
                .collect()
        };
        let want: Vec<u64> = (1..history.len())
            .filter(|&c| bytes_at(&history[c]) != bytes_at(&history[c - 1]))
            .map(|c| c as u64 + 1)
            .collect();
        assert_eq!(r.when(addr, len).unwrap(), want, "{addr:#x}+{len}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_torn_tail_is_ignored_reported_and_repaired() {
    let dir = scratch("torn");
    write_random(&dir, Codec::Zstd, 20, 3);
    let log = dir.join(store::LOG_FILE);
    let full = std::fs::read(&log).unwrap();
    // Cut the last checkpoint record in half (a recorder killed mid-write).
    let cut = full.len() - 40;
    std::fs::write(&log, &full[..cut]).unwrap();
    let r = Recording::open(&dir).unwrap();
    assert_eq!(r.len(), 19);
    assert!(r.info().torn_tail_bytes > 0);
    drop(r);
    assert_eq!(Recording::repair(&dir).unwrap(), 19);
    let r = Recording::open(&dir).unwrap();
    assert_eq!(r.info().torn_tail_bytes, 0);
    assert_eq!(r.len(), 19);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_flipped_byte_is_an_error_naming_the_checkpoint() {
    let dir = scratch("flip");
    write_random(&dir, Codec::Zstd, 50, 4);
    let log = dir.join(store::LOG_FILE);
    let full = std::fs::read(&log).unwrap();
    let mut rng = Rng(77);
    for _ in 0..40 {
        let mut bad = full.clone();
        // Anywhere but the last 2 KiB (there a flip looks like a torn tail).
        let at = 1 + rng.below(full.len() as u64 - 2048) as usize;
        bad[at] ^= 1 << rng.below(8);
        std::fs::write(&log, &bad).unwrap();
        match Recording::open(&dir) {
            Err(Error::Corrupt { .. }) | Err(Error::NotARecording(_)) => {}
            Err(e) => panic!("flip at {at}: {e}"),
            Ok(r) => panic!("flip at {at} opened with {} checkpoints", r.len()),
        }
        if let Err(e) = Recording::open(&dir) {
            let text = e.to_string();
            assert!(
                text.contains("checkpoint") || text.contains("not a Delorean"),
                "{text}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_checkpoints_and_directories_are_errors() {
    let dir = scratch("errors");
    assert!(matches!(
        Recording::open(&dir),
        Err(Error::NotARecording(_))
    ));
    write_random(&dir, Codec::None, 3, 1);
    let r = Recording::open(&dir).unwrap();
    assert!(matches!(r.page(4, 0x10000), Err(Error::NoCheckpoint(4))));
    assert!(matches!(r.threads(0), Err(Error::NoCheckpoint(0))));
    assert!(
        Writer::create(&dir, &meta(Codec::None)).is_err(),
        "overwrote a recording"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn max_size_merges_the_oldest_checkpoints_and_keeps_the_rest_exact() {
    let dir = scratch("bounded");
    let max = 512 * 1024; // the whole state (32 raw pages) is 128 KiB
    let history = write_bounded(&dir, Codec::None, 400, 21, Some(max));
    let r = Recording::open(&dir).unwrap();
    let info = r.info();
    assert!(info.first > 1, "nothing merged: {info:?}");
    assert_eq!(info.last, 400);
    assert!(info.bytes_on_disk <= max + 64 * 1024, "{info:?}");
    // Every kept checkpoint still reads exactly as the model, including the merged base.
    for n in info.first..=400 {
        for (addr, want) in &history[n as usize - 1] {
            let got = r.page(n, *addr).unwrap().expect("recorded");
            assert!(got.as_slice() == want.as_slice(), "page {addr:#x} at {n}");
        }
        assert_eq!(r.threads(n).unwrap()[0], thread(100, n - 1));
        assert_eq!(r.maps(n).unwrap(), format!("map {}", (n - 1) / 10));
    }
    assert!(matches!(
        r.page(info.first - 1, 0x10000),
        Err(Error::NoCheckpoint(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
