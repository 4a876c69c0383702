//! What a run under libcow_preload did, written at exit: `COW_REPORT` (set by
//! `cowctl run --report FILE`) receives one JSON object, and `COW_SPECULATE_RECORD` the write
//! set of every epoch (for a later `oracle` run, which reads them from `COW_SPECULATE_REPLAY`).
//! With `COW_REPORT_PARENT` (set by cowctl), only a child of that process writes them.
//!
//! `COW_BENCH_RESTORE_AT_EXIT` (set by `cowctl bench --lmc`) measures a restore under real
//! conditions: at exit, once the checkpointer has stopped, the newest periodic checkpoint is
//! restored and timed (`restore_at_exit_us`), the report written, and the process ends with
//! `_exit(0)` — its memory now belongs to the past, so no more of its exit path may run
//! (stdio is flushed before the restore).

use crate::backend::Stats;
use crate::checkpoint::Summary;
use crate::speculate::Totals;
use std::fmt::Write;

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
    /// With `COW_BENCH_RESTORE_AT_EXIT`: the restore of the newest periodic checkpoint at exit,
    /// in µs (absent if there was none). Written last, after the restore (see
    /// [`restore_then_exit`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_at_exit_us: Option<f64>,
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
            restore_at_exit_us: None,
        };
        let text = serde_json::to_string(&report).unwrap_or_default();
        if crate::sys::env_var("COW_BENCH_RESTORE_AT_EXIT").is_some() {
            if let Some(id) = crate::checkpoint::newest() {
                restore_then_exit(id, &path, &text);
            }
        }
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("libcow: cannot write {}: {e}", path);
        }
    }
}

/// The status the program passed to `exit` (see [`remember_exit_status`]).
static EXIT_STATUS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" {
    /// glibc's `on_exit`: like `atexit`, but the handler receives the exit status.
    fn on_exit(
        handler: extern "C" fn(libc::c_int, *mut libc::c_void),
        arg: *mut libc::c_void,
    ) -> libc::c_int;
}

extern "C" fn note_exit_status(status: libc::c_int, _arg: *mut libc::c_void) {
    EXIT_STATUS.store(status, std::sync::atomic::Ordering::Relaxed);
}

/// With `COW_BENCH_RESTORE_AT_EXIT`, remembers the program's exit status, so the process that
/// ends in [`restore_then_exit`] exits with it. Called by the checkpointer before its first
/// checkpoint, once main runs (so after libc's own exit handlers: this one runs before them,
/// and before the report).
pub fn remember_exit_status() {
    if crate::sys::env_var("COW_BENCH_RESTORE_AT_EXIT").is_some() {
        // SAFETY: registering a handler that only stores an integer.
        unsafe { on_exit(note_exit_status, std::ptr::null_mut()) };
    }
}

/// `COW_BENCH_RESTORE_AT_EXIT`: restores checkpoint `id`, times it, writes the report `text`
/// (a JSON object) with `restore_at_exit_us` added to `path`, and ends the process with the
/// program's exit status (125 if the restore failed). After the
/// restore the process's covered memory — its heap, libc's state, this very `text` — is as it
/// was at the checkpoint, so nothing from before may be trusted: the file is opened and the
/// text copied to uncovered memory first, and afterwards only system calls run.
fn restore_then_exit(id: u64, path: &str, text: &str) -> ! {
    let body = text.strip_suffix('}').unwrap_or(text).as_bytes();
    let copy = crate::book::alloc_uncovered(body.len().max(1));
    copy[..body.len()].copy_from_slice(body);
    let cpath = std::ffi::CString::new(path).unwrap_or_default();
    // SAFETY: a NUL-terminated path; the descriptor is ours.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    // Read before the restore: libcow's own statics are covered memory under uffd and mprotect.
    let status = EXIT_STATUS.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: fflush(NULL) flushes every output stream; none is in use by this thread at exit.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    let t0 = crate::sys::monotonic_ns();
    let rc = crate::ffi::cow_restore(id as i64);
    let us = (crate::sys::monotonic_ns() - t0) as f64 / 1e3;
    // Formatted on the stack (stacks are not covered): no allocator after the restore.
    let mut tail = StackText::default();
    let _ = if rc == 0 {
        writeln!(tail, ",\"restore_at_exit_us\":{us:.3}}}")
    } else {
        let mut why = StackText::default();
        let _ = writeln!(why, "libcow: restore at exit: errno {}", -rc);
        // SAFETY: writing our bytes to stderr.
        unsafe { libc::write(2, why.as_bytes().as_ptr().cast(), why.len) };
        writeln!(tail, "}}")
    };
    for part in [&copy[..body.len()], tail.as_bytes()] {
        // SAFETY: writing bytes we own to our descriptor (a bad one just fails).
        unsafe { libc::write(fd, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: ends the process without running more of its (rewound) exit path.
    unsafe { libc::_exit(if rc == 0 { status } else { 125 }) }
}

/// A few formatted bytes in a stack buffer.
struct StackText {
    buf: [u8; 64],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        StackText {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl StackText {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
