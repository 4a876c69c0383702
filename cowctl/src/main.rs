//! cowctl — Delorean's command line. A thin binary over libcow: parsing, output and exit codes.

mod bench;
mod exit;
mod remote;
mod run;
mod snapshots;
mod speculate_bench;
mod status;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Copy-on-write memory snapshots for Linux.
#[derive(Parser)]
#[command(
    name = "cowctl",
    version,
    after_help = "\
Examples:
  cowctl status                 what this machine offers: cow.ko, ABI, kernel features
  cowctl status --json          the same as one JSON object
  cowctl run -- ./server        run a program with its heap and globals covered
  id=$(cowctl snapshot 1234)    snapshot process 1234's covered memory
  cowctl restore 1234 $id       put it back (the process is stopped around the restore)
  cowctl diff 1234 1 2 --json   byte ranges that changed between snapshots 1 and 2
  cowctl bench --json           every backend side by side, memcpy as the baseline
  cowctl bench --speculate=all  pre-copy policies vs none vs an oracle (mprotect; cow.ko and
                                a checkpointed perl program when the module is loaded)
  cowctl run --every 10 -- PROG checkpoint PROG every 10 ms, keep the newest 8

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
    /// Run a program with its heap and globals under cow.ko (exit code = the program's).
    #[command(
        after_help = "Examples:\n  cowctl run -- ./server --port 8080\n  cowctl run --heap-mib 512 -- python3 script.py\n  cowctl run --every 10 --speculate=adaptive -- perl bench.pl\n  cowctl run --every 100 --keep 32 --report run.json -- ./server"
    )]
    Run {
        /// Backend to cover the program with.
        #[arg(long, default_value = "kmod")]
        backend: String,
        /// Size of the covered heap in MiB (virtual; pages are allocated at first touch).
        #[arg(long)]
        heap_mib: Option<u64>,
        /// Speculative pre-copy policy for the program's snapshots (none, active, stable,
        /// adaptive).
        #[arg(long)]
        speculate: Option<String>,
        /// Snapshot the program every MS milliseconds (a libcow thread in the program); a
        /// summary of what the checkpoints cost is printed at exit.
        #[arg(long, value_name = "MS")]
        every: Option<u64>,
        /// With --every: snapshots kept (older ones are dropped).
        #[arg(long, value_name = "N", requires = "every")]
        keep: Option<usize>,
        /// Write a JSON report (checkpoints, counters, speculation) to FILE when the program
        /// exits.
        #[arg(long, value_name = "FILE")]
        report: Option<std::path::PathBuf>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Snapshot the covered memory of a live process; prints the new id alone.
    #[command(after_help = "Example:\n  id=$(cowctl snapshot 1234)")]
    Snapshot {
        /// The process.
        pid: i32,
    },
    /// Restore a live process's covered memory to a snapshot; newer snapshots are discarded.
    #[command(after_help = "Example:\n  cowctl restore 1234 3")]
    Restore {
        /// The process.
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
        pid: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the byte ranges that differ between two snapshots of a live process.
    Diff {
        /// The process.
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
        pid: i32,
        /// The snapshot id.
        id: u64,
    },
    /// Measure snapshot, restore and first-write costs per backend against memcpy of a page.
    #[command(
        after_help = "Examples:\n  cowctl bench\n  cowctl bench --size 16 --dirty-pages 64 --json"
    )]
    Bench {
        /// Backends to measure, comma-separated (default: every one available here).
        #[arg(long, value_delimiter = ',')]
        backends: Vec<String>,
        /// Covered memory sizes in MiB, comma-separated.
        #[arg(long = "size", value_delimiter = ',', default_value = "16,256,1024")]
        sizes: Vec<usize>,
        /// Pages written per epoch, comma-separated.
        #[arg(
            long = "dirty-pages",
            value_delimiter = ',',
            default_value = "1,64,4096"
        )]
        dirty: Vec<usize>,
        /// Rounds per configuration (the median is reported).
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        /// Print a JSON array of rows.
        #[arg(long)]
        json: bool,
        /// Instead: benchmark speculative pre-copy with this policy (none, active, stable,
        /// adaptive, oracle) or `all`, on stable, drifting and random workloads (kmod and
        /// mprotect, or those of --backends) and a real program (perl, kmod).
        #[arg(long)]
        speculate: Option<String>,
        /// With --speculate: only these workloads, comma-separated (stable, drifting, random,
        /// perl-kv).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
    },
    /// Show the snapshot counters of a live process.
    Stats {
        /// The process.
        pid: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run {
        backend,
        heap_mib,
        speculate,
        every,
        keep,
        report,
        argv,
    } = &cli.command
    {
        let opts = run::Options {
            heap_mib: *heap_mib,
            speculate: speculate.clone(),
            every_ms: *every,
            keep: *keep,
            report: report.clone(),
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
        Command::Stats { pid, json } => snapshots::stats(pid, json),
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
