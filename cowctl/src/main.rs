//! cowctl — Delorean's command line. A thin binary over libcow: parsing, output and exit codes.

mod bench;
mod coverage;
mod debug;
mod exit;
mod gdbserver;
mod inject;
mod live;
mod lmc_bench;
mod periodic_bench;
mod program;
mod program_bench;
mod record;
mod record_bench;
mod recording;
mod recover_bench;
mod remote;
mod run;
mod snapshots;
mod speculate_bench;
mod status;
mod symbols;
mod timeline;
mod tracer;
mod uffd_capture;

use clap::builder::PossibleValuesParser;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// Speculation policies, by name.
fn policy_names() -> impl Iterator<Item = &'static str> {
    cow::speculate::Policy::ALL.into_iter().map(|p| p.name())
}

/// `--size`, `--dirty-pages`: a count of at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `--rounds`: 1 to `bench::MAX_ROUNDS`.
fn rounds(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=bench::MAX_ROUNDS).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be between 1 and {}", bench::MAX_ROUNDS)),
        Err(e) => Err(e.to_string()),
    }
}

/// Copy-on-write memory snapshots for Linux.
#[derive(Parser)]
#[command(
    name = "cowctl",
    after_help = "\
Examples:
  cowctl status                 what this machine offers: cow.ko, ABI, kernel features
  cowctl status --json          the same as one JSON object
  cowctl run -- ./server        run a program with its memory covered
  id=$(cowctl snapshot 1234)    snapshot process 1234's covered memory
  cowctl restore 1234 $id       put it back (the process is stopped around the restore)
  cowctl diff 1234 1 2 --json   byte ranges that changed between snapshots 1 and 2
  cowctl bench --json           every backend side by side, memcpy as the baseline
  cowctl bench --record --json  recording cost and goto/search/when latency per codec
  cowctl bench --speculate=all  pre-copy policies vs none vs an oracle (mprotect; cow.ko and
                                a checkpointed perl program when the module is loaded)
  cowctl run --every 10 -- PROG checkpoint PROG every 10 ms, keep the newest 8
  cowctl record --out run1 -- PROG   record PROG with a checkpoint every 10 ms
  cowctl debug run1             gdb on the past: delorean search EXPR, delorean when VAR, bt
  cowctl completions bash > ~/.local/share/bash-completion/completions/cowctl
  cowctl man | man -l -         this help as a manual page

Exit codes:
  0  success
  1  the operation failed
  2  bad usage
  3  cow.ko is not loaded or speaks another ABI
  4  permission denied
  5  no such process or snapshot"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show whether cow.ko is loaded, its ABI version, and the kernel features found here.
    #[command(after_help = "Examples:\n  cowctl status\n  cowctl status --json | jq .module")]
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a program under libcow: its private writable memory in cow.ko, or (uffd, mprotect) all of
    /// its private writable memory tracked in-process (exit code = the program's).
    #[command(
        after_help = "Examples:\n  cowctl run -- ./server --port 8080\n  cowctl run --backend uffd --every 10 -- ./server   (no module: stock kernel >= 6.7)\n  cowctl run --heap-mib 512 -- python3 script.py\n  cowctl run --every 10 --speculate=adaptive -- perl bench.pl\n  cowctl run --every 100 --keep 32 --report run.json -- ./server\n  cowctl run --recover --backend auto -- redis-server --save ''\n  cowctl run --coverage -- python3 -c 'import json'\n  cowctl run --backend lmc --every 1 -- ./prog   (prog built with cowcc)"
    )]
    Run {
        /// Backend to cover the program with: kmod (cow.ko: every private writable mapping but stacks), uffd or
        /// mprotect (no module: every private writable mapping but stacks), lmc (a program
        /// compiled with cowcc; --every checkpoints at its safe points), auto (kmod if
        /// loaded, else uffd, else mprotect).
        #[arg(long, default_value = "kmod", value_parser = PossibleValuesParser::new(["kmod", "uffd", "mprotect", "fork", "lmc", "auto"]))]
        backend: String,
        /// Size of the covered heap in MiB (virtual; pages are allocated at first touch), at
        /// least 64.
        #[arg(long, value_parser = clap::value_parser!(u64).range(run::MIN_HEAP_MIB..))]
        heap_mib: Option<u64>,
        /// Speculative pre-copy policy for the program's snapshots.
        #[arg(long, value_parser = PossibleValuesParser::new(policy_names()))]
        speculate: Option<String>,
        /// Snapshot the program every MS milliseconds (fractions allowed, at least 0.05; a
        /// libcow thread in the program); a summary of what the checkpoints cost is printed at
        /// exit.
        #[arg(long, value_name = "MS", value_parser = every_ms)]
        every: Option<f64>,
        /// With --every: snapshots kept (older ones are dropped).
        #[arg(long, value_name = "N", requires = "every", value_parser = at_least_one)]
        keep: Option<usize>,
        /// Write a JSON report (checkpoints, counters, speculation) to FILE when the program
        /// exits.
        #[arg(long, value_name = "FILE")]
        report: Option<std::path::PathBuf>,
        /// Roll a crash (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) inside an event-loop
        /// iteration back to the iteration's start, shut its connections down and go on: a
        /// snapshot at every epoll_wait/poll/select that returns events.
        #[arg(long)]
        recover: bool,
        /// At exit, list the program's private writable memory that cow.ko does not cover and
        /// why (stderr; with --report, also in the report's "coverage"). kmod only: uffd and
        /// mprotect cover every private writable mapping but stacks and libcow's book.
        #[arg(long)]
        coverage: bool,
        /// With --recover: the same instruction crashing N times in a row is a real crash.
        #[arg(long, value_name = "N", requires = "recover", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        recover_limit: u32,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Snapshot the covered memory of a live process; prints the new id alone.
    #[command(after_help = "Example:\n  id=$(cowctl snapshot 1234)")]
    Snapshot {
        /// The process.
        #[arg(value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
    },
    /// Restore a live process's covered memory to a snapshot; newer snapshots are discarded.
    #[command(after_help = "Example:\n  cowctl restore 1234 3")]
    Restore {
        /// The process.
        #[arg(value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
        /// The snapshot id.
        id: u64,
        /// Do not stop the process (SIGSTOP/SIGCONT) around the restore.
        #[arg(long)]
        running: bool,
    },
    /// List a live process's snapshots.
    List {
        /// The process.
        #[arg(value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the byte ranges that differ between two snapshots of a live process.
    Diff {
        /// The process.
        #[arg(value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
        /// One snapshot.
        id1: u64,
        /// The other.
        id2: u64,
        /// Print JSON: an array of {offset, len}.
        #[arg(long)]
        json: bool,
    },
    /// Drop a snapshot of a live process.
    Drop {
        /// The process.
        #[arg(value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
        /// The snapshot id.
        id: u64,
    },
    /// Measure snapshot, restore and first-write costs per backend against memcpy of a page.
    #[command(
        after_help = "Examples:\n  cowctl bench\n  cowctl bench --size 16 --dirty-pages 64 --json\n  cowctl bench --recover --backends uffd,mprotect --json\n  cowctl bench --programs --backends kmod   (jemalloc workload, start-up of python3/perl/redis)\n  cowctl bench --lmc --json   (Lua built with cowcc vs page-granular; scripts/lua builds it)\n  cowctl bench --lmc --hz 0,1000 --backends uffd --quick"
    )]
    Bench {
        /// Backends to measure, comma-separated (default: every one available here).
        #[arg(long, value_delimiter = ',',
              value_parser = PossibleValuesParser::new(["kmod", "uffd", "mprotect", "fork"]))]
        backends: Vec<String>,
        /// Covered memory sizes in MiB, comma-separated [default: 16,256,1024, plus 10 MiB
        /// with 1% of it (26 pages) written per epoch: the snapshots-per-second reference].
        #[arg(long = "size", value_delimiter = ',', value_parser = at_least_one)]
        sizes: Vec<usize>,
        /// Pages written per epoch, comma-separated.
        #[arg(
            long = "dirty-pages",
            value_delimiter = ',',
            default_value = "1,64,4096",
            value_parser = at_least_one
        )]
        dirty: Vec<usize>,
        /// Rounds per configuration, 1 to 64 (the median is reported).
        #[arg(long, default_value_t = 15, value_parser = rounds)]
        rounds: usize,
        /// Print a JSON array of rows.
        #[arg(long)]
        json: bool,
        /// Instead: benchmark speculative pre-copy with this policy or `all`, on stable,
        /// drifting and random workloads (kmod, uffd and mprotect, or those of --backends) and a real
        /// program (perl, kmod).
        #[arg(long, value_parser = PossibleValuesParser::new(policy_names().chain(["all"])))]
        speculate: Option<String>,
        /// Instead: what recording costs (checkpoints/s, slowdown, bytes per checkpoint, dedup
        /// and compression per codec) and what reading the past costs (goto, search, when).
        #[arg(long, conflicts_with = "speculate")]
        record: bool,
        /// With --record: the checkpoint interval in ms.
        #[arg(long, value_name = "MS", default_value = "1", value_parser = every_ms, requires = "record")]
        record_every: f64,
        /// With --record: rounds of the workload (each writes 4 pages and sleeps 200 µs).
        #[arg(long, value_name = "N", default_value_t = 4000, requires = "record")]
        record_rounds: u64,
        /// With --record: only these codecs, comma-separated.
        #[arg(long, value_delimiter = ',', requires = "record",
              value_parser = PossibleValuesParser::new(["zstd", "lz4", "none"]))]
        record_codecs: Vec<String>,
        /// Instead: what error recovery costs redis-server (redis-benchmark SET/GET, 50
        /// clients, plain and under `cowctl run --recover` per backend, in turn, medians of 3;
        /// a request to an idle server) and how long a recovery takes against the same crash
        /// handled by a restart (redis' crash handler, exit, start, the keys reloaded) and
        /// against start + reload alone.
        #[arg(long, conflicts_with_all = ["speculate", "record"])]
        recover: bool,
        /// Instead: what covering a real program's memory costs per backend: a workload
        /// allocating through jemalloc (epoch slowdown, snapshot, one-page snapshot, restore,
        /// every restore checked), the start-up of python3, perl and redis-server under
        /// `cowctl run` against without it, and perl and python3 workloads checkpointed every
        /// 10 ms against the same under `cowctl run` (wall, user and system time).
        #[arg(long, conflicts_with_all = ["speculate", "record", "recover"])]
        programs: bool,
        /// Instead: compiler-instrumented checkpoints (lmc: Lua 5.4 built with cowcc) against
        /// the page-granular backends (the same Lua built plainly) on binary-trees, n-body and
        /// string building, at each --hz: slowdown, checkpoints, snapshot and restore µs,
        /// memory overhead. Needs scripts/lua's interpreters next to cowctl.
        #[arg(long, conflicts_with_all = ["speculate", "record", "recover", "programs"])]
        lmc: bool,
        /// With --lmc: checkpoint frequencies in Hz, comma-separated (0: covered, never
        /// checkpointed; for lmc the instrumentation alone).
        #[arg(long, value_delimiter = ',', default_value = "0,100,1000,10000", requires = "lmc",
              value_parser = hz)]
        hz: Vec<f64>,
        /// With --lmc: small workloads (tests, TCG guests).
        #[arg(long, requires = "lmc")]
        quick: bool,
        /// With --lmc: stop a run once it took this many times the plain run (its slowdown is
        /// then a lower bound, marked timed_out).
        #[arg(long, default_value_t = 25.0, requires = "lmc", value_name = "FACTOR")]
        stop_after: f64,
        /// With --speculate: only these workloads, comma-separated.
        #[arg(long, value_delimiter = ',', requires = "speculate",
              value_parser = PossibleValuesParser::new(["stable", "drifting", "random", "perl-kv"]))]
        workloads: Vec<String>,
    },
    /// Record a program with frequent checkpoints (memory, every thread's registers and stack)
    /// into a deduplicated, compressed recording for time-travel debugging.
    #[command(
        after_help = "Examples:\n  cowctl record --every 5 --out run1 -- ./server --port 8080\n  cowctl record --every 0.5 --backend uffd -- ./a.out\n  cowctl record --at handle_request --at parse -- ./server\n  cowctl record --pid 4242 --every 1 --out live1   (Ctrl-C: stop, the process goes on)\n  cowctl recording info run1"
    )]
    Record {
        /// Checkpoint every MS milliseconds (fractions allowed, at least 0.05; default 10
        /// unless --at is given).
        #[arg(long, value_name = "MS", value_parser = every_ms)]
        every: Option<f64>,
        /// Also checkpoint each time the program enters this function (repeatable, up to 4;
        /// functions the program itself defines; hardware breakpoints, the code is untouched).
        #[arg(long, value_name = "SYMBOL")]
        at: Vec<String>,
        /// The recording directory (must not exist yet).
        #[arg(long, value_name = "DIR", default_value = "recording")]
        out: std::path::PathBuf,
        /// How changed memory is found: kmod (heap and globals in cow.ko, the rest scanned),
        /// uffd (userfaultfd write-protection: only written pages are read; Linux >= 6.7, no
        /// module), scan (all writable memory read and hashed at each checkpoint: any
        /// kernel), auto (kmod, else uffd, else scan).
        #[arg(long, default_value = "auto", value_parser = PossibleValuesParser::new(["kmod", "uffd", "scan", "auto"]))]
        backend: String,
        /// Page compression.
        #[arg(long, default_value = "zstd", value_parser = PossibleValuesParser::new(["zstd", "lz4", "none"]))]
        codec: String,
        /// Bound the recording (e.g. 512M, 2G): past it the oldest half of the checkpoints is
        /// merged into one, and the summary says how many.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Instead of starting a program, record this running process (until it exits or
        /// cowctl gets SIGINT/SIGTERM/SIGHUP; then it is let go, unchanged). Its cow.ko space is
        /// used if it runs under `cowctl run`.
        #[arg(long, conflicts_with = "argv")]
        pid: Option<i32>,
        /// The program and its arguments.
        #[arg(
            required_unless_present = "pid",
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        argv: Vec<String>,
    },
    /// Inspect a recording.
    #[command(subcommand)]
    Recording(RecordingCommand),
    /// Serve a recording to gdb (GDB remote protocol): every thread's registers and memory as
    /// of a checkpoint; `monitor goto N` moves in time. Over stdin/stdout unless --listen.
    #[command(
        after_help = "Examples:\n  gdb -ex 'target remote | cowctl gdbserver run1' ./prog\n  cowctl gdbserver run1 --listen 127.0.0.1:2345\n  cowctl gdbserver --pid 4242 --listen 127.0.0.1:2345"
    )]
    Gdbserver {
        /// The recording directory.
        #[arg(required_unless_present = "pid")]
        dir: Option<std::path::PathBuf>,
        /// Instead: the live process PID (under `cowctl run`): its cow.ko snapshots, read while
        /// it runs (covered memory as of each snapshot; the rest as it is now).
        #[arg(long, conflicts_with = "dir")]
        pid: Option<i32>,
        /// Listen on HOST:PORT for one gdb instead of speaking on stdin/stdout.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Open Debian's gdb on a recording, with the `delorean` commands loaded (goto, next, prev,
    /// present, list, search, when, for). GDB ARGS pass through (`-batch -ex …` scripts it).
    #[command(
        after_help = "Examples:\n  cowctl debug run1\n  cowctl debug run1 -batch -ex 'delorean search list.head->magic != 0x5eed' -ex bt\n  cowctl debug --pid 4242 -batch -ex 'delorean goto 3' -ex 'print table.count'"
    )]
    Debug {
        /// The recording directory (with --pid: the first argument for gdb).
        #[arg(required_unless_present = "pid", allow_hyphen_values = true)]
        dir: Option<std::path::PathBuf>,
        /// Instead: the live process PID (under `cowctl run`), its cow.ko snapshots as
        /// checkpoints; it keeps running, untouched.
        #[arg(long)]
        pid: Option<i32>,
        /// Arguments for gdb.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        gdb_args: Vec<String>,
    },
    /// Print a shell completion script for cowctl.
    #[command(
        after_help = "Examples:\n  cowctl completions bash > ~/.local/share/bash-completion/completions/cowctl\n  cowctl completions zsh > ~/.zfunc/_cowctl"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print cowctl's manual page (roff) on stdout.
    #[command(
        after_help = "Examples:\n  cowctl man | man -l -\n  cowctl man > /usr/local/share/man/man1/cowctl.1"
    )]
    Man,
    /// Show the snapshot counters of a live process.
    Stats {
        /// The process.
        #[arg(value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `cowctl recording …`.
#[derive(Subcommand)]
enum RecordingCommand {
    /// Checkpoints, time span, pages, dedup and compression ratios, a torn tail if any.
    #[command(after_help = "Example:\n  cowctl recording info run1 --json")]
    Info {
        /// The recording directory.
        dir: std::path::PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Memory as of a checkpoint (hexdump, or raw bytes with --raw).
    #[command(after_help = "Example:\n  cowctl recording read run1 --at 42 0x5555555580a0 64")]
    Read {
        /// The recording directory.
        dir: std::path::PathBuf,
        /// The checkpoint.
        #[arg(long, value_name = "N")]
        at: u64,
        /// Address (0x… hex or decimal).
        #[arg(value_parser = parse_u64)]
        addr: u64,
        /// Bytes.
        #[arg(value_parser = parse_u64)]
        len: u64,
        /// Write the bytes themselves to stdout.
        #[arg(long)]
        raw: bool,
    },
    /// The checkpoints at which any of LEN bytes at ADDR changed, from the page index.
    #[command(after_help = "Example:\n  cowctl recording when run1 0x5555555580a0 8")]
    When {
        /// The recording directory.
        dir: std::path::PathBuf,
        /// Address (0x… hex or decimal).
        #[arg(value_parser = parse_u64)]
        addr: u64,
        /// Bytes.
        #[arg(value_parser = parse_u64)]
        len: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// An address or length: `0x…` hex or decimal.
fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|e| e.to_string()),
        None => s
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string()),
    }
}

/// A size: bytes, or with a K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|e: std::num::ParseIntError| e.to_string())?;
    match n.checked_mul(1 << shift) {
        Some(v) if v >= 1 << 16 => Ok(v),
        Some(_) => Err("must be at least 64K".into()),
        None => Err("too large".into()),
    }
}

/// `--hz` of `cowctl bench --lmc`: 0 (no checkpoints) up to 20 000 (every 0.05 ms).
fn hz(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(hz) if (0.0..=20_000.0).contains(&hz) => Ok(hz),
        Ok(_) => Err("must be between 0 and 20000".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `--every` of `cowctl record` and `cowctl run`: milliseconds, at least 0.05.
fn every_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ms) if ms >= 0.05 && ms.is_finite() => Ok(ms),
        Ok(_) => Err("must be at least 0.05 ms".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `--speculate=all` or one policy (none and oracle are always measured for comparison).
fn speculate_bench_policies(which: &str) -> anyhow::Result<Vec<cow::speculate::Policy>> {
    use cow::speculate::Policy;
    let mut v = if which == "all" {
        Policy::ALL.to_vec()
    } else {
        vec![which.parse::<Policy>().map_err(anyhow::Error::msg)?]
    };
    if !v.contains(&Policy::Oracle) {
        v.push(Policy::Oracle);
    }
    Ok(v)
}

/// cowctl's clap definition, with a version that names the ABI it speaks.
fn cli_command() -> clap::Command {
    let version = format!(
        "{} (cow.ko ABI version {})",
        env!("CARGO_PKG_VERSION"),
        cow::abi::COW_ABI_VERSION
    );
    Cli::command().version(version)
}

fn main() -> ExitCode {
    // Output into a closed pipe (`cowctl list PID | head -1`) ends cowctl quietly, as it ends
    // `cat`, instead of a panic: Rust ignores SIGPIPE unless told otherwise.
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    if let Command::Run {
        backend,
        heap_mib,
        speculate,
        every,
        keep,
        report,
        coverage,
        recover,
        recover_limit,
        argv,
    } = &cli.command
    {
        let opts = run::Options {
            heap_mib: *heap_mib,
            speculate: speculate.clone(),
            every_ms: *every,
            keep: *keep,
            report: report.clone(),
            backend: None,
            recover: recover.then_some(*recover_limit),
            coverage: *coverage,
        };
        return match run::run(backend, &opts, argv) {
            Ok(code) => ExitCode::from(code),
            Err(err) => {
                eprintln!("cowctl: {err:#}");
                ExitCode::from(exit::code_for(&err))
            }
        };
    }
    let result = match cli.command {
        Command::Run { .. } => unreachable!("handled above"),
        Command::Status { json } => status::run(json),
        Command::Snapshot { pid } => snapshots::snapshot(pid),
        Command::Restore { pid, id, running } => snapshots::restore(pid, id, running),
        Command::List { pid, json } => snapshots::list(pid, json),
        Command::Diff {
            pid,
            id1,
            id2,
            json,
        } => snapshots::diff(pid, id1, id2, json),
        Command::Drop { pid, id } => snapshots::drop(pid, id),
        Command::Record {
            every,
            at,
            pid,
            out,
            backend,
            codec,
            max_size,
            argv,
        } => {
            return match recording::record(every, &at, out, &backend, &codec, max_size, pid, &argv)
            {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("cowctl: {err:#}");
                    ExitCode::from(exit::code_for(&err))
                }
            }
        }
        Command::Recording(RecordingCommand::Info { dir, json }) => recording::info(&dir, json),
        Command::Gdbserver { dir, pid, listen } => {
            gdbserver::serve(&timeline::Source::new(dir, pid), listen.as_deref())
        }
        Command::Debug { dir, pid, gdb_args } => {
            let (source, gdb_args) = match pid {
                // `dir` is gdb's first argument then.
                Some(pid) => (
                    timeline::Source::Pid(pid),
                    dir.map(|d| d.display().to_string())
                        .into_iter()
                        .chain(gdb_args)
                        .collect(),
                ),
                None => (timeline::Source::new(dir, None), gdb_args),
            };
            return match debug::run(&source, &gdb_args) {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("cowctl: {err:#}");
                    ExitCode::from(exit::code_for(&err))
                }
            };
        }
        Command::Recording(RecordingCommand::Read {
            dir,
            at,
            addr,
            len,
            raw,
        }) => recording::read(&dir, at, addr, len, raw),
        Command::Recording(RecordingCommand::When {
            dir,
            addr,
            len,
            json,
        }) => recording::when(&dir, addr, len, json),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut cli_command(), "cowctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(cli_command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
        Command::Stats { pid, json } => snapshots::stats(pid, json),
        Command::Bench {
            recover: true,
            backends,
            json,
            ..
        } => {
            // By default the backends a server would run on (fork has no --recover).
            let backends: Vec<String> = if backends.is_empty() {
                bench::default_backends(backends)
                    .into_iter()
                    .filter(|b| b != "fork")
                    .collect()
            } else {
                backends
            };
            recover_bench::run(&backends, json)
        }
        Command::Bench {
            lmc: true,
            backends,
            hz,
            quick,
            stop_after,
            json,
            ..
        } => lmc_bench::run(&lmc_bench::Config {
            backends: bench::default_backends(backends),
            hz,
            quick,
            stop_after,
            json,
        }),
        Command::Bench {
            programs: true,
            backends,
            json,
            ..
        } => program_bench::run(&bench::default_backends(backends), json),
        Command::Bench {
            record: true,
            record_every,
            record_rounds,
            record_codecs,
            json,
            ..
        } => record_bench::run(&record_bench::Config {
            every_ms: record_every,
            rounds: record_rounds,
            codecs: record_codecs,
            json,
        }),
        Command::Bench {
            speculate: Some(which),
            backends,
            workloads,
            json,
            ..
        } => speculate_bench_policies(&which)
            .and_then(|p| speculate_bench::run(&p, &backends, &workloads, json)),
        Command::Bench {
            backends,
            sizes,
            dirty,
            rounds,
            json,
            speculate: None,
            ..
        } => bench::run(
            &bench::default_backends(backends),
            &sizes,
            &dirty,
            rounds,
            json,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cowctl: {err:#}");
            ExitCode::from(exit::code_for(&err))
        }
    }
}
