//! cowctl — Delorean's command line. A thin binary over libcow: parsing, output and exit codes.

mod exit;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Status { json } => status::run(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cowctl: {err:#}");
            ExitCode::from(exit::code_for(&err))
        }
    }
}
