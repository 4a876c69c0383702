//! The store at scale, without a program: writes a recording of N checkpoints (default 10⁶)
//! of the few-pages workload (a counter's page and 3 other pages change at each, one thread),
//! then times what a debugger does with it: opening it, reading a page at a random checkpoint
//! (`goto`), a bisection `search` on the counter, and `when` over the counter.
//!
//! `cargo run --release -p delorean-store --example scale -- [N] [DIR]`

use std::time::Instant;
use store::{Codec, Meta, NewCheckpoint, Reason, Recording, ThreadState, Writer, PAGE};

const COUNTER_PAGE: u64 = 0x5555_0000_0000;

fn main() -> store::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("store-scale-{}", std::process::id()))
        });
    let meta = Meta {
        exe: "/bin/true".into(),
        codec: Codec::Lz4,
        ..Meta::default()
    };
    let t = Instant::now();
    let mut w = Writer::create(&dir, &meta)?;
    let thread = ThreadState {
        tid: 1,
        regs: [0; 27],
        fpregs: vec![0; 512],
    };
    let mut pages = vec![vec![0u8; PAGE]; 4];
    for i in 0..n {
        pages[0][..8].copy_from_slice(&(i + 1).to_le_bytes());
        for (k, p) in pages.iter_mut().enumerate().skip(1) {
            // One byte in one of 512 slots, as `cowctl bench --record`'s workload writes.
            p[((i as usize * 7 + k * 13) % 512) * 8] = i as u8;
        }
        let refs: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(k, p)| (COUNTER_PAGE + (k as u64) * PAGE as u64, p.as_slice()))
            .collect();
        w.checkpoint(&NewCheckpoint {
            time_ns: i * 1000,
            reason: Reason::Interval,
            signal: 0,
            threads: std::slice::from_ref(&thread),
            pages: &refs,
            maps: (i == 0).then_some("555500000000-555500004000 rw-p 00000000 00:00 0\n"),
        })?;
    }
    drop(w);
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let rec = Recording::open(&dir)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let (first, last) = rec.range().expect("checkpoints");
    let counter = |c: u64| {
        let mut b = [0u8; 8];
        rec.read(c, COUNTER_PAGE, &mut b).expect("read");
        u64::from_le_bytes(b)
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut gotos: Vec<f64> = (0..1000)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let c = first + rng % (last - first + 1);
            let t = Instant::now();
            std::hint::black_box(counter(c));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    gotos.sort_by(|a, b| a.total_cmp(b));
    let t = Instant::now();
    let target = n / 3;
    let (mut a, mut b) = (first, last);
    while a < b {
        let mid = (a + b) / 2;
        if counter(mid) >= target {
            b = mid;
        } else {
            a = mid + 1;
        }
    }
    let search_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(counter(a), target);
    let t = Instant::now();
    let changes = rec.when(COUNTER_PAGE, 8)?.len();
    let when_ms = t.elapsed().as_secs_f64() * 1e3;
    let info = rec.info();
    println!(
        "{{\"checkpoints\": {n}, \"write_s\": {write_s:.1}, \"bytes_on_disk\": {}, \
         \"open_ms\": {open_ms:.0}, \"goto_ms_median\": {:.4}, \"goto_ms_p99\": {:.4}, \
         \"search_ms\": {search_ms:.3}, \"when_ms\": {when_ms:.0}, \"when_changes\": {changes}}}",
        info.bytes_on_disk,
        gotos[gotos.len() / 2],
        gotos[gotos.len() * 99 / 100]
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
