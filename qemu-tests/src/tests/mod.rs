//! Every in-guest test, in the order the runner executes them.

mod backends;
mod checkpoint;
mod device;
mod preload;
mod remote;
pub mod snapshots;
mod speculate;

use crate::Test;

/// All tests; the runner runs them in this order.
pub fn all() -> Vec<Test> {
    let mut v = Vec::new();
    v.extend(device::tests());
    v.extend(snapshots::tests());
    v.extend(remote::tests());
    v.extend(preload::tests());
    v.extend(backends::tests());
    v.extend(speculate::tests());
    v.extend(checkpoint::tests());
    v
}

/// Path of a sibling binary of the test runner (cowctl, test programs).
pub fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(p.exists(), "{} not found next to the runner", p.display());
    Ok(p)
}
