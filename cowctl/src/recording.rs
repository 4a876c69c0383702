//! `cowctl record` and `cowctl recording info|read|when`: the command-line side of recordings.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// `cowctl record` (of `argv`, or of the running process `pid`): returns the program's exit
/// code (0 when a process attached to is let go).
#[allow(clippy::too_many_arguments)]
pub fn record(
    every_ms: Option<f64>,
    at: &[String],
    out: std::path::PathBuf,
    backend: &str,
    codec: &str,
    max_size: Option<u64>,
    pid: Option<i32>,
    argv: &[String],
) -> Result<u8> {
    use crate::record::Capture;
    let uffd_probe = || {
        let k = cow::probe::kernel_features();
        if k.uffd_wp_async.available {
            k.pagemap_scan
        } else {
            k.uffd_wp_async
        }
    };
    let capture = match (backend, pid) {
        // A running process: its own space, if it runs under `cowctl run`.
        ("kmod", Some(pid)) => {
            drop(crate::remote::attach(pid).with_context(|| {
                format!(
                    "--backend kmod: process {pid} has no cow.ko space (is it under cowctl run?)"
                )
            })?);
            Capture::Kmod
        }
        ("auto", Some(pid)) if crate::remote::attach(pid).is_ok() => Capture::Kmod,
        ("kmod", None) => {
            drop(cow::Cow::open()?);
            Capture::Kmod
        }
        ("auto", None) if cow::Cow::open().is_ok() => Capture::Kmod,
        ("uffd", _) => {
            let probe = uffd_probe();
            anyhow::ensure!(
                probe.available,
                "--backend uffd: {} (use --backend scan)",
                probe.detail
            );
            Capture::Uffd
        }
        ("auto", _) if uffd_probe().available => Capture::Uffd,
        _ => Capture::Scan,
    };
    let kmod = capture == Capture::Kmod;
    let mut env = Vec::new();
    if kmod && pid.is_none() {
        let preload = crate::run::preload_path()?;
        let mut v = preload.into_os_string();
        if let Some(old) = std::env::var_os("LD_PRELOAD") {
            v.push(":");
            v.push(old);
        }
        env.push(("LD_PRELOAD".to_string(), v.to_string_lossy().into_owned()));
    }
    let opts = crate::record::Options {
        // Neither --every nor --at: every 10 ms.
        every: match (every_ms, at.is_empty()) {
            (Some(ms), _) => Some(std::time::Duration::from_secs_f64(ms / 1000.0)),
            (None, true) => Some(std::time::Duration::from_millis(10)),
            (None, false) => None,
        },
        at: at.to_vec(),
        out: out.clone(),
        codec: codec.parse().map_err(anyhow::Error::msg)?,
        capture,
        max_size,
        store: true,
    };
    let outcome = match pid {
        Some(pid) => crate::record::record_pid(&opts, pid)?,
        None => crate::record::record(&opts, argv, &env)?,
    };
    let s = outcome.stats;
    eprintln!(
        "cowctl record: {} checkpoints in {} ({}), {} page images, {} unique, {:.1} MiB on disk",
        s.checkpoints,
        out.display(),
        capture.name(),
        s.pages,
        s.unique_pages,
        s.log_bytes as f64 / 1048576.0
    );
    if !outcome.stops_ns.is_empty() {
        let mut stops = outcome.stops_ns.clone();
        stops.sort_unstable();
        let at = |q: f64| stops[((stops.len() - 1) as f64 * q) as usize] as f64 / 1e3;
        eprintln!(
            "cowctl record: each checkpoint stopped the program {:.0} µs (median), {:.0} µs \
             (p99), {:.0} µs (max)",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    if outcome.skipped > 0 {
        let every = opts.every.unwrap_or_default().as_secs_f64() * 1e3;
        let wait = outcome.store_wait.as_secs_f64();
        let store = if wait > 0.0 {
            format!(
                "; the store was behind for {wait:.2} s, the program running on meanwhile \
                 (--codec lz4 or none, or a longer --every, keeps up)"
            )
        } else {
            String::new()
        };
        eprintln!(
            "cowctl record: {} periodic checkpoints of every {every} ms were not taken (between \
             two checkpoints the program runs at least half an interval, and at least as long \
             as recent ones stopped it{store})",
            outcome.skipped
        );
    }
    if s.merged > 0 {
        eprintln!(
            "cowctl record: --max-size reached: the oldest {} checkpoints were merged away \
             (the recording starts at checkpoint {})",
            s.merged,
            s.merged + 1
        );
    }
    Ok(outcome.code.clamp(0, 255) as u8)
}

fn open(dir: &Path) -> Result<store::Recording> {
    store::Recording::open(dir)
        .with_context(|| format!("cannot open the recording {}", dir.display()))
}

/// `cowctl recording info DIR`.
pub fn info(dir: &Path, json: bool) -> Result<()> {
    let info = open(dir)?.info();
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("program          {} ({})", info.exe, info.argv.join(" "));
    println!("backend, codec   {}, {}", info.backend, info.codec.name());
    println!(
        "checkpoints      {} ({}-{}) over {:.3} s",
        info.checkpoints, info.first, info.last, info.span_s
    );
    if info.first > 1 {
        println!(
            "                 1-{} were merged into {} to stay under --max-size",
            info.first - 1,
            info.first
        );
    }
    if let Some(r) = info.last_reason {
        match info.last_signal {
            Some(sig) => println!("last             {r:?} (signal {sig})"),
            None => println!("last             {r:?}"),
        }
    }
    println!(
        "pages            {} images of {} addresses, {} stored",
        info.page_images, info.addresses, info.unique_pages
    );
    println!(
        "on disk          {:.1} MiB (dedup {:.1}x, compression {:.1}x)",
        info.bytes_on_disk as f64 / 1048576.0,
        info.dedup_ratio,
        info.compress_ratio
    );
    if info.torn_tail_bytes > 0 {
        println!(
            "torn tail        {} bytes after the last complete checkpoint (the recorder was killed); ignored",
            info.torn_tail_bytes
        );
    }
    Ok(())
}

/// `cowctl recording read DIR --at N ADDR LEN`.
pub fn read(dir: &Path, at: u64, addr: u64, len: u64, raw: bool) -> Result<()> {
    let r = open(dir)?;
    let mut buf = vec![0u8; len as usize];
    // Pages no checkpoint wrote read as their mapping holds them (file bytes, or zero).
    let maps = store::parse_maps(r.maps(at)?);
    let got = r.read_as_mapped(at, addr, &mut buf, &maps, &mut store::Files::default())?;
    if got < buf.len() {
        anyhow::bail!(
            "{:#x} is not mapped at checkpoint {at} ({got} of {len} bytes are)",
            addr + got as u64
        );
    }
    let mut out = std::io::stdout().lock();
    if raw {
        out.write_all(&buf)?;
        return Ok(());
    }
    for (i, line) in buf.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        writeln!(
            out,
            "{:016x}  {:<47}  {text}",
            addr + 16 * i as u64,
            hex.join(" ")
        )?;
    }
    Ok(())
}

/// `cowctl recording when DIR ADDR LEN`.
pub fn when(dir: &Path, addr: u64, len: u64, json: bool) -> Result<()> {
    let hits = open(dir)?.when(addr, len)?;
    if json {
        println!("{}", serde_json::to_string(&hits)?);
    } else {
        for n in hits {
            println!("{n}");
        }
    }
    Ok(())
}
