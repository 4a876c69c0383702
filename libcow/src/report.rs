//! What a run under libcow_preload did, written at exit: `COW_REPORT` (set by
//! `cowctl run --report FILE`) receives one JSON object, and `COW_SPECULATE_RECORD` the write
//! set of every epoch (for a later `oracle` run, which reads them from `COW_SPECULATE_REPLAY`).
//! With `COW_REPORT_PARENT` (set by cowctl), only a child of that process writes them.

use crate::backend::Stats;
use crate::checkpoint::Summary;
use crate::speculate::Totals;

/// The report's JSON object.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The process that wrote it.
    pub pid: i32,
    /// The backend that covered the program.
    pub backend: &'static str,
    /// The speculation policy (`none` without speculation).
    pub policy: String,
    /// The periodic checkpointer's summary (absent without `--every`).
    pub checkpoints: Option<Summary>,
    /// The backend's counters at exit.
    pub stats: Stats,
    /// What speculation did (absent without a policy).
    pub speculation: Option<Totals>,
    /// What error recovery did (absent without `--recover`).
    pub recovery: Option<crate::recovery::Totals>,
}

/// Stops the checkpointer and writes what the environment asks for. Errors go to stderr: the
/// program's own exit status is not ours to change.
pub fn write_at_exit() {
    let checkpoints = crate::checkpoint::stop();
    // Programs the covered process spawns inherit the preload and the environment; only the
    // process `cowctl run` started (whatever it exec'd into) reports, else they would
    // overwrite its files at their own exit.
    if let Some(parent) =
        crate::sys::env_var("COW_REPORT_PARENT").and_then(|p| p.parse::<i32>().ok())
    {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return;
        }
    }
    let Some(backend) = crate::ffi::current_backend() else {
        return;
    };
    if let Some(path) = crate::sys::env_var("COW_SPECULATE_RECORD") {
        let sets = backend.recorded_write_sets().unwrap_or_default();
        let text = serde_json::to_string(&sets).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("libcow: cannot write {}: {e}", path);
        }
    }
    if let Some(path) = crate::sys::env_var("COW_REPORT") {
        let report = Report {
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() },
            backend: backend.name(),
            policy: crate::sys::env_var("COW_SPECULATE").unwrap_or_else(|| "none".into()),
            checkpoints,
            stats: backend.stats(),
            speculation: backend.speculation(),
            recovery: crate::recovery::totals(),
        };
        let text = serde_json::to_string(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("libcow: cannot write {}: {e}", path);
        }
    }
}
