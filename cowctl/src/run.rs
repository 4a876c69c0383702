//! `cowctl run -- PROG ARGS…`: run a program under libcow: its private writable memory in cow.ko, or
//! all of its private writable memory tracked by an in-process backend (uffd, mprotect).

use anyhow::{bail, Context, Result};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// The smallest covered heap the preload accepts (`--heap-mib`).
pub const MIN_HEAP_MIB: u64 = 64;

/// Signals `cowctl run` passes on to the program, as `timeout` and other wrappers do.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The running program's pid, for the signal handler (0: none yet).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // A terminal's ^C / ^\ (SI_KERNEL) went to the whole foreground process group, the program
    // included: passing it on would deliver it twice.
    if code == libc::SI_KERNEL {
        return;
    }
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Blocks (`block`) or unblocks the forwarded signals in this thread.
fn mask_forwarded(how: libc::c_int) {
    // SAFETY: building a signal set on the stack and applying it to this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Starts `cmd` with the forwarded signals passed on to it from the first instant: they are
/// held (blocked) while it starts and delivered once its pid is known; the child unblocks
/// them before `exec`.
fn spawn_forwarding(cmd: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    // SAFETY: installing an async-signal-safe handler for signals whose default would kill us.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = forward;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        for sig in FORWARDED {
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
    mask_forwarded(libc::SIG_BLOCK);
    // std does not reset the signal mask of the child: without this the program would start
    // with SIGTERM, SIGINT, … blocked, and nothing could stop it.
    // SAFETY: the hook runs in the child between fork and exec and only calls
    // pthread_sigmask (async-signal-safe) on a set built on its stack.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            mask_forwarded(libc::SIG_UNBLOCK);
            Ok(())
        })
    };
    let child = cmd.spawn();
    if let Ok(c) = &child {
        CHILD.store(c.id() as i32, Ordering::Relaxed);
    }
    mask_forwarded(libc::SIG_UNBLOCK);
    child
}

/// Where libcow_preload.so is: `COW_PRELOAD`, else next to cowctl (cargo's target directory).
pub fn preload_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("COW_PRELOAD") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("libcow_preload.so");
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p cow-preload` or set COW_PRELOAD",
            p.display()
        );
    }
    Ok(p)
}

/// How to run the program.
#[derive(Default, Clone)]
pub struct Options {
    /// Size of the covered heap in MiB.
    pub heap_mib: Option<u64>,
    /// Speculation policy for its snapshots.
    pub speculate: Option<String>,
    /// Periodic snapshots every this many ms.
    pub every_ms: Option<f64>,
    /// Periodic snapshots kept.
    pub keep: Option<usize>,
    /// Where libcow_preload writes its JSON report at exit.
    pub report: Option<PathBuf>,
    /// The backend (`kmod`, `uffd`, `mprotect`; none: kmod).
    pub backend: Option<&'static str>,
    /// `--recover`: the limit of crashes in a row at one site.
    pub recover: Option<u32>,
    /// `--coverage`: list what cow.ko does not cover at exit.
    pub coverage: bool,
}

/// The command that runs `argv` under libcow_preload with `opts`.
pub fn command(opts: &Options, argv: &[String]) -> Result<std::process::Command> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // lmc lives in the program itself (cowcc linked libcow into it): no preload.
    if opts.backend != Some("lmc") {
        let preload = preload_path()?;
        let mut ld_preload = preload.into_os_string();
        if let Some(old) = std::env::var_os("LD_PRELOAD") {
            ld_preload.push(":");
            ld_preload.push(old);
        }
        cmd.env("LD_PRELOAD", ld_preload);
    }
    if let Some(mib) = opts.heap_mib {
        if mib < MIN_HEAP_MIB {
            bail!("--heap-mib {mib}: the covered heap is at least {MIN_HEAP_MIB} MiB");
        }
        cmd.env("COW_HEAP_MIB", mib.to_string());
    }
    if let Some(policy) = &opts.speculate {
        policy
            .parse::<cow::speculate::Policy>()
            .map_err(anyhow::Error::msg)?;
        cmd.env("COW_SPECULATE", policy);
    }
    if let Some(ms) = opts.every_ms {
        cmd.env("COW_CHECKPOINT_MS", ms.to_string());
    }
    if let Some(keep) = opts.keep {
        cmd.env("COW_CHECKPOINT_KEEP", keep.to_string());
    }
    if let Some(path) = &opts.report {
        cmd.env("COW_REPORT", path);
    }
    if let Some(limit) = opts.recover {
        cmd.env("COW_RECOVER", limit.to_string());
    }
    if let Some(b) = opts.backend {
        cmd.env("COW_BACKEND", b);
    }
    // Only our child reports (not the programs it spawns, which inherit the environment).
    cmd.env("COW_REPORT_PARENT", std::process::id().to_string());
    Ok(cmd)
}

/// What `--backend` means here, checked before the program starts (fail early and clearly
/// rather than let it run uncovered): `auto` is cow_init's choice (kmod if loaded, else uffd,
/// else mprotect).
pub fn choose_backend(name: &str) -> Result<&'static str> {
    let name = match name {
        "auto" => cow::backend::choose_auto().name,
        "kmod" => "kmod",
        "uffd" => "uffd",
        "mprotect" => "mprotect",
        "fork" => "fork",
        "lmc" => "lmc",
        other => bail!("unknown backend {other:?} (kmod, uffd, mprotect, fork, lmc, auto)"),
    };
    match name {
        "kmod" => drop(cow::Cow::open()?),
        "uffd" => {
            let k = cow::probe::kernel_features();
            for probe in [k.uffd_wp_async, k.pagemap_scan] {
                if !probe.available {
                    bail!("--backend uffd: {} (try --backend mprotect)", probe.detail);
                }
            }
        }
        _ => {}
    }
    Ok(name)
}

/// The report a run wrote (see `cow::report`), as JSON.
pub fn read_report(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the program wrote no report to {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Runs `cowctl run`; returns the program's exit code (128 + signal if it was killed).
/// SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to cowctl go to the program.
pub fn run(backend: &str, opts: &Options, argv: &[String]) -> Result<u8> {
    let exe = crate::program::resolve(argv[0].as_ref())
        .with_context(|| format!("{}: command not found", argv[0]))?;
    if let Some(why) = crate::program::uncoverable(&exe) {
        if opts.every_ms.is_some() {
            return Err(crate::exit::WithCode {
                code: crate::exit::FAILURE,
                message: format!(
                    "{} {why}; none of its memory could be checkpointed, so --every is refused",
                    exe.display()
                ),
            }
            .into());
        }
        eprintln!(
            "cowctl run: warning: {} {why}; none of its memory is covered",
            exe.display()
        );
    }
    let mut opts = opts.clone();
    let backend = choose_backend(backend)?;
    if opts.speculate.is_some() && backend == "fork" {
        bail!(
            "--speculate: the fork backend takes no first-write faults to save (a snapshot is a \
             forked process); use kmod, uffd or mprotect"
        );
    }
    if backend == "lmc" {
        if !crate::program::compiled_with_cowcc(&exe) {
            bail!(
                "--backend lmc: {} was not compiled with cowcc (its writes are not instrumented)",
                exe.display()
            );
        }
        if opts.speculate.is_some() || opts.recover.is_some() || opts.heap_mib.is_some() {
            bail!("--backend lmc: --speculate, --recover and --heap-mib need the preload (kmod, uffd, mprotect)");
        }
    }
    opts.backend = Some(backend);
    // With periodic snapshots, say what they cost at the end (through a report of our own if
    // the user did not ask for one).
    let own_report = ((opts.every_ms.is_some() || opts.recover.is_some()) && opts.report.is_none())
        .then(|| std::env::temp_dir().join(format!("cowctl-run-{}.json", std::process::id())));
    if let Some(p) = &own_report {
        opts.report = Some(p.clone());
    }
    if opts.coverage && backend != "kmod" {
        bail!(
            "--coverage describes the kmod backend; {backend} covers every private writable \
             mapping but stacks and libcow's own book"
        );
    }
    let coverage_file = opts
        .coverage
        .then(|| std::env::temp_dir().join(format!("cowctl-coverage-{}.tsv", std::process::id())));
    let mut cmd = command(&opts, argv)?;
    if let Some(p) = &coverage_file {
        cmd.env("COW_COVERAGE", p);
    }
    let status = spawn_forwarding(&mut cmd)
        .and_then(|mut child| child.wait())
        .with_context(|| format!("cannot run {}", argv[0]))?;
    if opts.every_ms.is_some() {
        if let Some(path) = &opts.report {
            match read_report(path) {
                Ok(r) => {
                    let c = &r["checkpoints"];
                    eprintln!(
                        "cowctl run: {} checkpoints ({} failed), snapshot median {:.1} µs, p99 {:.1} µs, max {:.1} µs; {} first-write faults, {} pages pre-copied",
                        c["snapshots"], c["failures"],
                        c["snapshot_us_median"].as_f64().unwrap_or(0.0),
                        c["snapshot_us_p99"].as_f64().unwrap_or(0.0),
                        c["snapshot_us_max"].as_f64().unwrap_or(0.0),
                        r["stats"]["write_faults"], r["stats"]["precopied"]
                    );
                }
                Err(e) => eprintln!("cowctl run: no checkpoint summary: {e:#}"),
            }
        }
    }
    if opts.recover.is_some() {
        // A process killed by its crash writes no report: nothing to say then.
        if let Some(r) = opts.report.as_ref().and_then(|p| read_report(p).ok()) {
            let t = &r["recovery"];
            let iterations = t["iterations"].as_u64().unwrap_or(0);
            let checkpoints = t["checkpoints"].as_u64().unwrap_or(0);
            let snapshot_us =
                t["snapshot_ns"].as_u64().unwrap_or(0) as f64 / checkpoints.max(1) as f64 / 1e3;
            eprintln!(
                "cowctl run: {} crashes recovered, {} not recovered, in {iterations} iterations \
                 ({checkpoints} checkpoints of {snapshot_us:.1} µs on average; {} iterations \
                 began with one taken before their wait blocked)",
                t["recoveries"], t["not_recovered"], t["taken_while_idle"]
            );
        }
    }
    if let Some(p) = &coverage_file {
        crate::coverage::report(p, opts.report.as_deref().filter(|_| own_report.is_none()));
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = own_report {
        let _ = std::fs::remove_file(p);
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    })
}
