//! cow-target — a process with covered memory, driven over stdin, for cowctl's by-pid tests.
//!
//! Maps 1 MiB from /dev/cow, prints `ready PID`, then answers lines on stdin:
//! `fill N` (4 threads each fill a quarter with N and a position-dependent pattern) → `ok`,
//! `sum` → `sum <FNV-1a of the whole region>`, `quit`.

use std::io::{BufRead, Write};

const LEN: usize = 1 << 20;
const THREADS: usize = 4;

fn main() -> anyhow::Result<()> {
    let cow = cow::Cow::open()?;
    let region = cow.map_region(LEN)?;
    let base = region.addr as usize;
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("fill"), Some(n)) => {
                let n: u8 = n.parse()?;
                let workers: Vec<_> = (0..THREADS)
                    .map(|t| {
                        std::thread::spawn(move || {
                            let quarter = LEN / THREADS;
                            // SAFETY: each thread writes its own quarter of the live region.
                            let m = unsafe {
                                std::slice::from_raw_parts_mut(
                                    (base + t * quarter) as *mut u8,
                                    quarter,
                                )
                            };
                            for (i, b) in m.iter_mut().enumerate() {
                                *b = n ^ (i as u8).wrapping_mul(31) ^ t as u8;
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().expect("writer thread");
                }
                println!("ok");
            }
            (Some("sum"), _) => {
                // SAFETY: the region is live and nobody writes it while we read.
                let m = unsafe { std::slice::from_raw_parts(base as *const u8, LEN) };
                let mut h = 0xcbf29ce484222325u64;
                for &b in m {
                    h = (h ^ b as u64).wrapping_mul(0x100000001b3);
                }
                println!("sum {h:x}");
            }
            (Some("quit"), _) => break,
            _ => println!("error unknown command"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}
