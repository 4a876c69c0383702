//! Every in-guest test, in the order the runner executes them.

mod around;
mod backends;
mod checkpoint;
mod device;
mod hardening;
mod lmc;
mod mappings;
mod preload;
mod recover;
mod remote;
pub mod snapshots;
mod speculate;
mod timetravel;

use crate::Test;

/// All tests; the runner runs them in this order.
pub fn all() -> Vec<Test> {
    let mut v = Vec::new();
    v.extend(device::tests());
    v.extend(snapshots::tests());
    v.extend(hardening::tests());
    v.extend(remote::tests());
    v.extend(preload::tests());
    v.extend(mappings::tests());
    v.extend(backends::tests());
    v.extend(speculate::tests());
    v.extend(around::tests());
    v.extend(checkpoint::tests());
    v.extend(timetravel::tests());
    v.extend(recover::tests());
    v.extend(lmc::tests());
    v
}

/// Kernel log lines a test expects: every record from one containing the first marker up to
/// one containing the second (inclusive), for tests that provoke a report on purpose.
pub fn expected_kmsg_block(test: &str) -> Option<(&'static str, &'static str)> {
    hardening::expected_kmsg_block(test)
}

/// `cowctl run OPTS -- ARGV`, its output collected.
pub fn cowctl_run(opts: &[&str], argv: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(std::process::Command::new(sibling("cowctl")?)
        .arg("run")
        .args(opts)
        .arg("--")
        .args(argv)
        .output()?)
}

/// The stdout of a command that must have succeeded; else an error naming `what`, with its
/// status, stdout and stderr.
pub fn stdout_of_success(out: &std::process::Output, what: &str) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// A child of `parent`, found in `/proc/*/stat` (the guest kernel has no
/// `/proc/PID/task/TID/children`).
pub fn child_of(parent: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state, ppid, …
        let ppid: i32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// Path of a sibling binary of the test runner (cowctl, test programs).
pub fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(p.exists(), "{} not found next to the runner", p.display());
    Ok(p)
}
