//! `cowctl debug (DIR | --pid PID) [GDB ARGS…]`: Debian's gdb on a recording or on a live
//! process's snapshots, the `delorean` commands loaded.

use anyhow::{Context, Result};
use std::os::unix::process::ExitStatusExt;

/// The gdb extension (`delorean …` commands), shipped inside cowctl.
const EXTENSION: &str = include_str!("gdb/delorean.py");

/// Runs gdb; returns its exit code.
pub fn run(source: &crate::timeline::Source, gdb_args: &[String]) -> Result<u8> {
    // Opened here once so that a bad directory or pid is our error, not gdb's.
    let exe = source.open()?.exe();
    let ext = std::env::temp_dir().join(format!("delorean-gdb-{}.py", std::process::id()));
    std::fs::write(&ext, EXTENSION)?;
    let me = std::env::current_exe()?;
    let args: Vec<String> = source
        .gdbserver_args()?
        .iter()
        .map(|a| shell_quote(a))
        .collect();
    let remote = format!(
        "target remote | {} gdbserver {}",
        shell_quote(&me.to_string_lossy()),
        args.join(" ")
    );
    let status = std::process::Command::new("gdb")
        .args([
            "-q",
            "-nx",
            "-iex",
            "set pagination off",
            "-iex",
            "set confirm off",
        ])
        .args([
            "-iex",
            "set sysroot /",
            "-iex",
            "set debuginfod enabled off",
        ])
        // Opening a large recording verifies every record before the server answers; gdb's
        // default of 2 s is too short for that on a slow machine.
        .args(["-iex", "set remotetimeout 600"])
        .args(["-ex", &format!("source {}", ext.display())])
        .args(["-ex", &format!("file {exe}")])
        .args(["-ex", &remote])
        .args(gdb_args)
        .status()
        .context("cannot run gdb (Debian: apt install gdb)")?;
    let _ = std::fs::remove_file(&ext);
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128 + s as u8,
        _ => 1,
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
