//! What `cowctl gdbserver` moves gdb through: a sequence of past states of one program — a
//! recording on disk (`store::Recording`), or the cow.ko snapshots of a live process
//! (`live::LiveProcess`). gdb's view is built from these few questions.

use anyhow::{Context, Result};
use std::sync::Arc;
use store::ThreadState;

/// A program's past, checkpoint by checkpoint.
pub trait Timeline {
    /// The first and last checkpoint numbers (numbers between them may be missing).
    fn range(&self) -> Option<(u64, u64)>;
    /// One line about checkpoint `n`: `checkpoint N at +T s (REASON[ signal S][ thread T])`.
    fn describe(&self, n: u64) -> Result<String>;
    /// Every thread's registers at `n`; the thread a crash or breakpoint is about first.
    fn threads(&self, n: u64) -> Result<Vec<ThreadState>>;
    /// The memory map (`/proc/PID/maps` text) at `n`.
    fn maps(&self, n: u64) -> Result<String>;
    /// The page at `page_addr` as of `n`; `None` when the timeline did not keep it (gdb then
    /// sees the mapped file's bytes: code and read-only data).
    fn page(&self, n: u64, page_addr: u64) -> Result<Option<Arc<Vec<u8>>>>;
    /// The checkpoints at which `len` bytes at `addr` changed, oldest first.
    fn when(&self, addr: u64, len: u64) -> Result<Vec<u64>>;
    /// The program's auxiliary vector (gdb finds the loader and the libraries with it).
    fn auxv(&self) -> Vec<u8>;
    /// The program's executable.
    fn exe(&self) -> String;
}

impl Timeline for store::Recording {
    fn range(&self) -> Option<(u64, u64)> {
        store::Recording::range(self)
    }

    fn describe(&self, n: u64) -> Result<String> {
        let first = store::Recording::range(self).map_or(0, |r| r.0);
        let t0 = self.checkpoint(first).map_or(0, |c| c.0);
        let (t, reason, sig) = self.checkpoint(n)?;
        let mut extra = if sig != 0 {
            format!(" signal {sig}")
        } else {
            String::new()
        };
        // The thread a crash or breakpoint is about is recorded first.
        if matches!(reason, store::Reason::Crash | store::Reason::Breakpoint) {
            if let Some(t) = self.threads(n).ok().and_then(|t| t.first().cloned()) {
                extra.push_str(&format!(" thread {}", t.tid));
            }
        }
        Ok(format!(
            "checkpoint {n} at +{:.6} s ({reason:?}{extra})",
            (t - t0) as f64 / 1e9
        ))
    }

    fn threads(&self, n: u64) -> Result<Vec<ThreadState>> {
        Ok(store::Recording::threads(self, n)?)
    }

    fn maps(&self, n: u64) -> Result<String> {
        Ok(store::Recording::maps(self, n)?.to_string())
    }

    fn page(&self, n: u64, page_addr: u64) -> Result<Option<Arc<Vec<u8>>>> {
        Ok(store::Recording::page(self, n, page_addr)?)
    }

    fn when(&self, addr: u64, len: u64) -> Result<Vec<u64>> {
        Ok(store::Recording::when(self, addr, len)?)
    }

    fn auxv(&self) -> Vec<u8> {
        self.meta().auxv.clone()
    }

    fn exe(&self) -> String {
        self.meta().exe.clone()
    }
}

/// Where a timeline comes from, as the command line names it.
pub enum Source {
    /// A recording directory.
    Recording(std::path::PathBuf),
    /// A live process under `cowctl run`.
    Pid(i32),
}

impl Source {
    /// `--pid` if given, else the directory (clap requires one of them).
    pub fn new(dir: Option<std::path::PathBuf>, pid: Option<i32>) -> Self {
        match pid {
            Some(pid) => Source::Pid(pid),
            None => Source::Recording(dir.unwrap_or_default()),
        }
    }

    /// Opens the timeline.
    pub fn open(&self) -> Result<Box<dyn Timeline>> {
        Ok(match self {
            Source::Recording(dir) => Box::new(
                store::Recording::open(dir)
                    .with_context(|| format!("cannot open the recording {}", dir.display()))?,
            ),
            Source::Pid(pid) => Box::new(crate::live::LiveProcess::open(*pid)?),
        })
    }

    /// The arguments of `cowctl gdbserver` that serve it.
    pub fn gdbserver_args(&self) -> Result<Vec<String>> {
        Ok(match self {
            Source::Recording(dir) => vec![std::fs::canonicalize(dir)?.display().to_string()],
            Source::Pid(pid) => vec!["--pid".into(), pid.to_string()],
        })
    }
}
