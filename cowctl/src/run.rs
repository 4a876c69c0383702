//! `cowctl run -- PROG ARGS…`: run a program with its heap and globals under cow.ko.

use anyhow::{bail, Context, Result};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

/// Where libcow_preload.so is: `COW_PRELOAD`, else next to cowctl (cargo's target directory).
fn preload_path() -> Result<PathBuf> {
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

/// Runs `cowctl run`; returns the program's exit code (128 + signal if it was killed).
pub fn run(
    backend: &str,
    heap_mib: Option<u64>,
    speculate: Option<&str>,
    argv: &[String],
) -> Result<u8> {
    if backend != "kmod" && backend != "auto" {
        bail!("backend {backend:?} is not available yet (available: kmod)");
    }
    // Fail early and clearly rather than letting the program run uncovered.
    drop(cow::Cow::open()?);
    let preload = preload_path()?;
    let mut ld_preload = preload.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        ld_preload.push(":");
        ld_preload.push(old);
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env("LD_PRELOAD", ld_preload);
    if let Some(mib) = heap_mib {
        cmd.env("COW_HEAP_MIB", mib.to_string());
    }
    if let Some(policy) = speculate {
        policy
            .parse::<cow::speculate::Policy>()
            .map_err(anyhow::Error::msg)?;
        cmd.env("COW_SPECULATE", policy);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    })
}
