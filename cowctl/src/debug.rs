//! `cowctl debug DIR [GDB ARGS…]`: Debian's gdb on a recording, the `delorean` commands loaded.

use anyhow::{Context, Result};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

/// The gdb extension (`delorean …` commands), shipped inside cowctl.
const EXTENSION: &str = include_str!("gdb/delorean.py");

/// Runs gdb; returns its exit code.
pub fn run(dir: &Path, gdb_args: &[String]) -> Result<u8> {
    let rec = store::Recording::open(dir)
        .map_err(|e| anyhow::anyhow!("cannot open the recording {}: {e}", dir.display()))?;
    let exe = rec.meta().exe.clone();
    drop(rec);
    let ext = std::env::temp_dir().join(format!("delorean-gdb-{}.py", std::process::id()));
    std::fs::write(&ext, EXTENSION)?;
    let me = std::env::current_exe()?;
    let dir = std::fs::canonicalize(dir)?;
    let remote = format!(
        "target remote | {} gdbserver {}",
        shell_quote(&me.to_string_lossy()),
        shell_quote(&dir.to_string_lossy())
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
