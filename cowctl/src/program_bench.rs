//! `cowctl bench --programs`: what covering a real program's memory costs, per backend.
//!
//! Three measurements, in one run (the first two also without libcow as the baseline):
//! - **jemalloc**: a workload that allocates through Debian's `libjemalloc.so.2` (its own
//!   `mmap`ed extents, purged with `madvise`), so every byte it keeps lives in memory the program
//!   mapped itself. Per epoch it replaces [`OPS_PER_EPOCH`] objects of mixed sizes; it measures
//!   the snapshot after an epoch, the snapshot after one written page (the fixed cost with
//!   everything covered), a restore of an epoch's writes, and the epoch's own run time against
//!   the same epoch without libcow. Every restore is checked: a digest of all live objects must
//!   equal the digest at the snapshot, or the benchmark fails.
//! - **start-up**: `python3 -c pass`, `perl -e 1` and `redis-server` until it answers `PING`,
//!   the preload's whole start-up (moving every loaded object's data into cow.ko, the control
//!   thread, …) against the same program without it.
//! - **at 100 Hz**: perl and python3 workloads under `cowctl run --every 10` against the same
//!   under `cowctl run` (see `periodic_bench`).
//!
//! The workload runs as this very binary in a worker mode (`COW_BENCH_JEMALLOC`), started under
//! `cowctl run` with jemalloc preloaded after libcow_preload (whose `malloc` comes first, so
//! jemalloc is reached through `mallocx`/`dallocx`, as programs that link it do).

use crate::bench::{median, us};
use crate::recover_bench::{find, free_port};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int, c_void, CString};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the workload process: `plain` or the backend it runs under.
const WORKER_ENV: &str = "COW_BENCH_JEMALLOC";
/// Debian's jemalloc.
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
/// Live objects of the workload.
const SLOTS: usize = 10_000;
/// Objects replaced per epoch.
const OPS_PER_EPOCH: usize = 1_000;
/// Epochs per measurement (checkpoint loop and reset loop each).
const EPOCHS: usize = 15;
/// Start-up runs per program and configuration (the median is reported).
const STARTUP_RUNS: usize = 5;

/// One backend (or `none`: no libcow) running the jemalloc workload.
#[derive(Serialize, Deserialize, Debug)]
pub struct JemallocRow {
    /// `none`, `kmod`, `uffd` or `mprotect`.
    pub backend: String,
    /// Bytes held by live objects after the build phase, MiB.
    pub live_mib: f64,
    /// Objects replaced per epoch.
    pub ops_per_epoch: usize,
    /// Median run time of an epoch, µs (the program's own work, first writes included).
    pub epoch_us: f64,
    /// `epoch_us` / the same without libcow.
    pub slowdown: f64,
    /// Median pages an epoch writes (as the backend counts them; 0 for `none`).
    pub pages_per_epoch: f64,
    /// Median snapshot after an epoch, µs.
    pub snapshot_us: f64,
    /// Median snapshot after writing one byte, µs: the fixed cost with everything covered.
    pub snapshot_one_page_us: f64,
    /// Median snapshot taken right after another, µs: libcow's own path, with nothing of the
    /// program's written in between.
    pub snapshot_again_us: f64,
    /// Median restore of an epoch's writes, µs.
    pub restore_us: f64,
    /// Restores checked byte for byte (a digest of every live object) — all of them passed.
    pub restores_verified: usize,
}

/// One program's start-up.
#[derive(Serialize, Deserialize, Debug)]
pub struct StartupRow {
    /// What ran.
    pub program: String,
    /// `none` or the backend of `cowctl run`.
    pub backend: String,
    /// Median start-up, ms.
    pub ms: f64,
    /// `ms` / the same without libcow.
    pub ratio: f64,
}

/// Everything `--programs` measures.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Report {
    /// The jemalloc workload, `none` first.
    pub jemalloc: Vec<JemallocRow>,
    /// Start-up costs, per program `none` first.
    pub startup: Vec<StartupRow>,
    /// Real programs checkpointed every 10 ms against the same without checkpoints.
    pub periodic: Vec<crate::periodic_bench::PeriodicRow>,
}

/// `cowctl run`'s options for `backend` (`none`: not under cowctl run).
pub(crate) fn run_options(backend: &str) -> Option<crate::run::Options> {
    let backend: &'static str = match backend {
        "kmod" => "kmod",
        "uffd" => "uffd",
        "mprotect" => "mprotect",
        _ => return None,
    };
    Some(crate::run::Options {
        backend: Some(backend),
        ..Default::default()
    })
}

/// Function `name` of an object already loaded in this process, as a pointer of type `F`.
///
/// # Safety
///
/// `F` is a function pointer type matching the C signature of `name`.
unsafe fn function<F: Copy>(object: &Path, name: &str) -> Result<F> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let path = CString::new(object.as_os_str().as_encoded_bytes())?;
    // SAFETY: RTLD_NOLOAD only looks the object up; the handle stays valid while it is loaded
    // (preloaded objects never unload), so leaking it is fine.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        bail!("{} is not loaded in this process", object.display());
    }
    let cname = CString::new(name)?;
    // SAFETY: a valid handle and a NUL-terminated name.
    let sym = unsafe { libc::dlsym(handle, cname.as_ptr()) };
    if sym.is_null() {
        bail!("{} has no {name}", object.display());
    }
    // SAFETY: `sym` is the address of `name`, of type `F` (caller's guarantee; sizes checked).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&sym) })
}

/// jemalloc's non-standard API, which libcow_preload's `malloc` does not shadow.
struct Jemalloc {
    mallocx: unsafe extern "C" fn(usize, c_int) -> *mut c_void,
    dallocx: unsafe extern "C" fn(*mut c_void, c_int),
}

/// libcow's C ABI as exported by the preload (the program's own view under `cowctl run`).
struct CowApi {
    snapshot: extern "C" fn() -> i64,
    restore: extern "C" fn(i64) -> c_int,
    drop: extern "C" fn(i64) -> c_int,
    dirty: unsafe extern "C" fn(i64, *mut *mut c_void, usize) -> i64,
}

impl CowApi {
    fn load(preload: &Path) -> Result<CowApi> {
        // SAFETY: for every `function` below, the pointer types spell out the C signatures
        // of these functions in cow.h.
        unsafe {
            let init: unsafe extern "C" fn(*const c_char) -> c_int = function(preload, "cow_init")?;
            let rc = init(std::ptr::null());
            if rc != 0 {
                bail!("cow_init: errno {}", -rc);
            }
            Ok(CowApi {
                snapshot: function(preload, "cow_snapshot")?,
                restore: function(preload, "cow_restore")?,
                drop: function(preload, "cow_drop")?,
                dirty: function(preload, "cow_dirty")?,
            })
        }
    }

    fn snapshot(&self) -> Result<i64> {
        let id = (self.snapshot)();
        if id < 0 {
            bail!("cow_snapshot: errno {}", -id);
        }
        Ok(id)
    }

    fn restore(&self, id: i64) -> Result<()> {
        match (self.restore)(id) {
            0 => Ok(()),
            rc => bail!("cow_restore({id}): errno {}", -rc),
        }
    }

    fn drop_snapshot(&self, id: i64) -> Result<()> {
        match (self.drop)(id) {
            0 => Ok(()),
            rc => bail!("cow_drop({id}): errno {}", -rc),
        }
    }

    fn dirty_pages(&self, id: i64) -> Result<u64> {
        // SAFETY: a count only (NULL array, capacity 0).
        let n = unsafe { (self.dirty)(id, std::ptr::null_mut(), 0) };
        if n < 0 {
            bail!("cow_dirty({id}): errno {}", -n);
        }
        Ok(n as u64)
    }
}

/// The workload's live objects and random stream.
struct Objects<'a> {
    je: &'a Jemalloc,
    /// (address, size) of each live object; allocated once, in covered memory (its contents
    /// rewind with a restore, like jemalloc's).
    slots: Vec<(usize, usize)>,
}

/// A size class mix of a typical server heap: mostly small, some pages, a few large.
fn object_size(r: u64) -> usize {
    let pick = (r % 1000) as usize;
    let x = (r >> 10) as usize;
    match pick {
        0..=699 => 16 + x % 240,
        700..=949 => 256 + x % 3840,
        950..=994 => 4096 + x % 61440,
        _ => 65536 + x % 458752,
    }
}

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

impl Objects<'_> {
    /// Allocates a fresh object of a random size and writes it (small ones whole, larger ones
    /// a header and a byte per page, as initialisation does).
    fn fresh(&self, rng: &mut u64) -> Result<(usize, usize)> {
        let size = object_size(next(rng));
        // SAFETY: jemalloc's mallocx with no flags.
        let p = unsafe { (self.je.mallocx)(size, 0) }.cast::<u8>();
        if p.is_null() {
            bail!("mallocx({size}) failed");
        }
        let value = *rng as u8;
        // SAFETY: `p` is a fresh block of `size` bytes.
        unsafe {
            if size <= 4096 {
                std::ptr::write_bytes(p, value, size);
            } else {
                std::ptr::write_bytes(p, value, 64);
                for off in (4096..size).step_by(4096) {
                    p.add(off).write(value.wrapping_add(off as u8));
                }
            }
        }
        Ok((p as usize, size))
    }

    fn build(&mut self, rng: &mut u64) -> Result<()> {
        for i in 0..SLOTS {
            self.slots[i] = self.fresh(rng)?;
        }
        Ok(())
    }

    /// One epoch: replaces `OPS_PER_EPOCH` random objects.
    fn epoch(&mut self, rng: &mut u64) -> Result<()> {
        for _ in 0..OPS_PER_EPOCH {
            let i = (next(rng) % SLOTS as u64) as usize;
            // SAFETY: a live block from mallocx.
            unsafe { (self.je.dallocx)(self.slots[i].0 as *mut c_void, 0) };
            self.slots[i] = self.fresh(rng)?;
        }
        Ok(())
    }

    fn live_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.1).sum()
    }

    /// A digest of every live object's address, size, header and one byte per page.
    fn digest(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for &(p, size) in &self.slots {
            h.update(&p.to_le_bytes());
            h.update(&size.to_le_bytes());
            // SAFETY: live blocks of `size` bytes.
            unsafe {
                h.update(std::slice::from_raw_parts(p as *const u8, size.min(64)));
                for off in (4096..size).step_by(4096) {
                    h.update(&[*(p as *const u8).add(off)]);
                }
            }
        }
        h.digest()
    }
}

/// The workload process: builds the objects, then measures (under a backend) or only times the
/// epochs (`plain`). Prints one JSON row.
fn worker(backend: &str) -> Result<()> {
    let jemalloc = Path::new(JEMALLOC);
    // SAFETY: jemalloc's documented signatures.
    let je = unsafe {
        Jemalloc {
            mallocx: function(jemalloc, "mallocx")?,
            dallocx: function(jemalloc, "dallocx")?,
        }
    };
    let api = match backend {
        "none" => None,
        _ => Some(CowApi::load(&crate::run::preload_path()?)?),
    };
    let mut objects = Objects {
        je: &je,
        slots: vec![(0, 0); SLOTS],
    };
    // The random stream and the measurements live on the stack: a restore rewinds the heap.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    objects.build(&mut rng)?;
    let live_mib = objects.live_bytes() as f64 / (1 << 20) as f64;
    let mut epoch = [0f64; EPOCHS];
    let Some(api) = api else {
        for e in &mut epoch {
            let t = Instant::now();
            objects.epoch(&mut rng)?;
            *e = us(t);
        }
        return print_row(JemallocRow {
            backend: "none".into(),
            live_mib,
            ops_per_epoch: OPS_PER_EPOCH,
            epoch_us: median(epoch.to_vec()),
            slowdown: 1.0,
            pages_per_epoch: 0.0,
            snapshot_us: 0.0,
            snapshot_one_page_us: 0.0,
            snapshot_again_us: 0.0,
            restore_us: 0.0,
            restores_verified: 0,
        });
    };
    let (mut snap, mut one, mut clean, mut restore, mut pages) = (
        [0f64; EPOCHS],
        [0f64; EPOCHS],
        [0f64; EPOCHS],
        [0f64; EPOCHS],
        [0f64; EPOCHS],
    );
    // Checkpoint loop: an epoch, then a snapshot of what it wrote; one snapshot kept.
    let mut previous = api.snapshot()?;
    for i in 0..EPOCHS {
        let t = Instant::now();
        objects.epoch(&mut rng)?;
        epoch[i] = us(t);
        pages[i] = api.dirty_pages(previous)? as f64;
        let t = Instant::now();
        let id = api.snapshot()?;
        snap[i] = us(t);
        api.drop_snapshot(previous)?;
        previous = id;
    }
    // The fixed cost: one byte written, then a snapshot; and a snapshot right after another
    // (what libcow's own path costs with nothing of the program's written).
    for (o, c) in one.iter_mut().zip(clean.iter_mut()) {
        let first = objects.slots[0].0 as *mut u8;
        // SAFETY: a live block of at least 16 bytes.
        unsafe { first.write_volatile(first.read_volatile().wrapping_add(1)) };
        let t = Instant::now();
        let id = api.snapshot()?;
        *o = us(t);
        let t = Instant::now();
        let again = api.snapshot()?;
        *c = us(t);
        api.drop_snapshot(previous)?;
        api.drop_snapshot(id)?;
        previous = again;
    }
    // Reset loop (a fuzzer's): an epoch, then back to the same snapshot, checked every time.
    let expected = objects.digest();
    for r in &mut restore {
        objects.epoch(&mut rng)?;
        let t = Instant::now();
        api.restore(previous)?;
        *r = us(t);
        if objects.digest() != expected {
            bail!("{backend}: after a restore the jemalloc objects differ from the snapshot");
        }
    }
    api.drop_snapshot(previous)?;
    print_row(JemallocRow {
        backend: backend.into(),
        live_mib,
        ops_per_epoch: OPS_PER_EPOCH,
        epoch_us: median(epoch.to_vec()),
        slowdown: 0.0,
        pages_per_epoch: median(pages.to_vec()),
        snapshot_us: median(snap.to_vec()),
        snapshot_one_page_us: median(one.to_vec()),
        snapshot_again_us: median(clean.to_vec()),
        restore_us: median(restore.to_vec()),
        restores_verified: EPOCHS,
    })
}

fn print_row(row: JemallocRow) -> Result<()> {
    println!("{}", serde_json::to_string(&row)?);
    Ok(())
}

/// Runs the workload once, plainly (`none`) or under `cowctl run --backend`.
fn jemalloc_row(backend: &str) -> Result<JemallocRow> {
    let exe = std::env::current_exe()?;
    let argv = [
        exe.display().to_string(),
        "bench".into(),
        "--programs".into(),
    ];
    let mut cmd = match run_options(backend) {
        Some(opts) => {
            let mut cmd = crate::run::command(&opts, &argv)?;
            let preload = crate::run::preload_path()?;
            cmd.env("LD_PRELOAD", format!("{}:{JEMALLOC}", preload.display()));
            cmd
        }
        None => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).env("LD_PRELOAD", JEMALLOC);
            cmd
        }
    };
    let out = cmd
        .env(WORKER_ENV, backend)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start the jemalloc workload")?;
    if !out.status.success() {
        bail!(
            "the jemalloc workload under {backend} failed ({})",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("bad worker output {line:?}"))
}

/// Starts `argv` (plainly or under `cowctl run --backend`) and waits until it is ready: exited
/// successfully, or (a server) answered `PING` on a fresh port of 127.0.0.1, then shut down.
fn startup_once(argv: &[String], backend: &str, server: bool) -> Result<Duration> {
    let mut argv = argv.to_vec();
    let port = if server {
        let port = free_port()?;
        argv.extend([
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
        ]);
        Some(port)
    } else {
        None
    };
    let mut cmd = match run_options(backend) {
        Some(opts) => crate::run::command(&opts, &argv)?,
        None => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            cmd
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", argv[0]))?;
    let Some(port) = port else {
        let status = child.wait()?;
        let elapsed = t0.elapsed();
        if !status.success() {
            bail!("{} under {backend} failed ({status})", argv.join(" "));
        }
        return Ok(elapsed);
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let elapsed = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"PING\r\n")?;
            let mut pong = String::new();
            BufReader::new(&s).read_line(&mut pong)?;
            if pong.starts_with("+PONG") {
                let elapsed = t0.elapsed();
                let _ = s.write_all(b"SHUTDOWN NOSAVE\r\n");
                break elapsed;
            }
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} under {backend} did not answer PING", argv[0]);
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let status = child.wait()?;
    if !status.success() {
        bail!("{} under {backend} exited badly ({status})", argv[0]);
    }
    Ok(elapsed)
}

/// The start-up rows of one program: `none` first, then each backend.
fn startup_rows(p: &Program, argv: &[String], backends: &[String]) -> Vec<StartupRow> {
    let mut rows: Vec<StartupRow> = Vec::new();
    for backend in std::iter::once("none").chain(backends.iter().map(String::as_str)) {
        eprintln!(
            "cowctl bench --programs: start-up of {}, backend {backend}",
            p.name
        );
        // One run unmeasured first: the page cache and the loader's caches warm for everyone.
        let mut runs = Vec::new();
        for _ in 0..=STARTUP_RUNS {
            match startup_once(argv, backend, p.server) {
                Ok(d) => runs.push(d.as_secs_f64() * 1e3),
                Err(e) => {
                    eprintln!("cowctl bench --programs: {e:#}; no row");
                    break;
                }
            }
        }
        if runs.len() <= STARTUP_RUNS {
            continue;
        }
        let ms = median(runs.split_off(1));
        let base = rows.first().map_or(ms, |r| r.ms);
        rows.push(StartupRow {
            program: p.name.into(),
            backend: backend.into(),
            ms,
            ratio: ms / base,
        });
    }
    rows
}

/// A program whose start-up is measured.
struct Program {
    name: &'static str,
    /// Its command line, if it is installed.
    argv: Option<Vec<String>>,
    /// A server: ready once it answers `PING` on the port it is given; else once it exits.
    server: bool,
}

/// Runs `cowctl bench --programs` over `backends` (those `cowctl run` offers; `fork` is not one).
pub fn run(backends: &[String], json: bool) -> Result<()> {
    if let Ok(backend) = std::env::var(WORKER_ENV) {
        return worker(&backend);
    }
    let backends: Vec<String> = backends
        .iter()
        .filter(|b| run_options(b).is_some())
        .cloned()
        .collect();
    let mut report = Report::default();
    if Path::new(JEMALLOC).exists() {
        for backend in std::iter::once("none").chain(backends.iter().map(String::as_str)) {
            eprintln!("cowctl bench --programs: jemalloc workload, backend {backend}");
            let mut row = jemalloc_row(backend)?;
            let base = report.jemalloc.first().map_or(row.epoch_us, |r| r.epoch_us);
            row.slowdown = row.epoch_us / base;
            report.jemalloc.push(row);
        }
    } else {
        eprintln!("cowctl bench --programs: {JEMALLOC} missing (apt-get install libjemalloc2); no jemalloc rows");
    }
    let command = |name: &str, args: &[&str]| {
        find(name).ok().map(|p| {
            let mut v = vec![p.display().to_string()];
            v.extend(args.iter().map(|a| a.to_string()));
            v
        })
    };
    let programs = [
        Program {
            name: "python3 -c pass",
            argv: command("python3", &["-c", "pass"]),
            server: false,
        },
        Program {
            name: "perl -e 1",
            argv: command("perl", &["-e", "1"]),
            server: false,
        },
        Program {
            name: "redis-server (to PONG)",
            argv: command("redis-server", &["--save", "", "--appendonly", "no"]),
            server: true,
        },
    ];
    for p in &programs {
        match &p.argv {
            Some(argv) => report.startup.extend(startup_rows(p, argv, &backends)),
            None => eprintln!("cowctl bench --programs: {}: not installed; no row", p.name),
        }
    }
    report.periodic = crate::periodic_bench::rows(&backends)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "jemalloc workload ({SLOTS} objects, {OPS_PER_EPOCH} replaced per epoch):\n{:<9} {:>8} {:>10} {:>9} {:>8} {:>12} {:>14} {:>10} {:>11}",
        "backend", "live MiB", "epoch µs", "slowdown", "pages", "snapshot µs", "1-page snap µs",
        "again µs", "restore µs"
    );
    for r in &report.jemalloc {
        println!(
            "{:<9} {:>8.1} {:>10.0} {:>9.2} {:>8.0} {:>12.1} {:>14.1} {:>10.1} {:>11.1}",
            r.backend,
            r.live_mib,
            r.epoch_us,
            r.slowdown,
            r.pages_per_epoch,
            r.snapshot_us,
            r.snapshot_one_page_us,
            r.snapshot_again_us,
            r.restore_us
        );
    }
    println!(
        "\nstart-up (median of {STARTUP_RUNS}):\n{:<24} {:<9} {:>10} {:>7}",
        "program", "backend", "ms", "ratio"
    );
    for r in &report.startup {
        println!(
            "{:<24} {:<9} {:>10.1} {:>7.2}",
            r.program, r.backend, r.ms, r.ratio
        );
    }
    println!(
        "\nat 100 Hz (cowctl run --every 10 against cowctl run):\n{:<13} {:<9} {:>8} {:>8} {:>6} {:>15} {:>15} {:>11} {:>13} {:>12}",
        "program", "backend", "plain s", "100Hz s", "ratio", "user s", "sys s", "checkpoints",
        "writes/ckpt", "snapshot µs"
    );
    for r in &report.periodic {
        println!(
            "{:<13} {:<9} {:>8.2} {:>8.2} {:>6.2} {:>15} {:>15} {:>11} {:>13.0} {:>12.0}",
            r.program,
            r.backend,
            r.covered_s,
            r.checkpointed_s,
            r.ratio,
            format!("{:.2} → {:.2}", r.covered_user_s, r.checkpointed_user_s),
            format!("{:.2} → {:.2}", r.covered_sys_s, r.checkpointed_sys_s),
            r.checkpoints,
            r.first_writes_per_checkpoint,
            r.snapshot_median_us
        );
    }
    Ok(())
}
