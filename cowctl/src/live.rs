//! `cowctl gdbserver --pid PID`: the past of a process running under `cowctl run`, read from
//! its cow.ko snapshots (`COW_IOC_READ`) while it keeps running — it is never stopped, traced
//! or written to. Checkpoint N is snapshot N. A process with no snapshot gets one when gdb
//! connects (dropped when it leaves): even "now" is read from a snapshot, because memory
//! read while the program runs is no single instant.
//!
//! What a live snapshot holds is the covered memory (heap, globals) only: memory outside
//! cow.ko, the registers and the stacks are shown as they are now (registers only of threads
//! blocked in a system call, and only their stack and instruction pointers, from
//! `/proc/PID/task/TID/syscall`: frames above the innermost ones may be wrong).

use crate::record::{parse_maps, Mapping, SPACE_OFFSET_MASK};
use crate::timeline::Timeline;
use anyhow::{Context, Result};
use std::sync::Arc;
use store::{reg, ThreadState, PAGE};

/// A live process and its cow.ko space.
pub struct LiveProcess {
    pid: i32,
    space: cow::Cow,
    exe: String,
    auxv: Vec<u8>,
    /// The snapshot this session took (the process had none), dropped when it ends.
    own_snapshot: Option<u64>,
    /// The /dev/cow mappings as of the last `range` or `describe` (gdb reads memory page
    /// by page in between: not re-read per page).
    cow_maps: std::cell::RefCell<Vec<Mapping>>,
}

impl LiveProcess {
    /// Opens the space of `pid` (which must run under `cowctl run`; ptrace rights needed).
    pub fn open(pid: i32) -> Result<Self> {
        let space = crate::remote::attach(pid)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("process {pid}'s program"))?
            .display()
            .to_string();
        let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap_or_default();
        let own_snapshot = if space.list()?.is_empty() {
            let id = space.snapshot().context("cannot snapshot the process")?;
            eprintln!(
                "cowctl gdbserver: process {pid} had no snapshot: took snapshot {id} for this \
                 session"
            );
            Some(id)
        } else {
            None
        };
        let live = LiveProcess {
            pid,
            space,
            exe,
            auxv,
            own_snapshot,
            cow_maps: Default::default(),
        };
        live.refresh();
        Ok(live)
    }

    /// Re-reads the mappings.
    fn refresh(&self) {
        *self.cow_maps.borrow_mut() = self.cow_mappings();
    }

    /// Snapshot ids, oldest first.
    fn ids(&self) -> Result<Vec<u64>> {
        let mut ids: Vec<u64> = self.space.list()?.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn cow_mappings(&self) -> Vec<Mapping> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap_or_default();
        parse_maps(&maps)
            .into_iter()
            .filter(|m| m.path == cow::COW_DEVICE_PATH)
            .collect()
    }

    /// The page as it is now, if readable.
    fn page_now(&self, page_addr: u64) -> Option<Vec<u8>> {
        let mut page = vec![0u8; PAGE];
        (crate::record::read_remote(self.pid, page_addr, &mut page) == PAGE).then_some(page)
    }
}

impl Drop for LiveProcess {
    fn drop(&mut self) {
        if let Some(id) = self.own_snapshot {
            let _ = self.space.drop_snapshot(id);
        }
    }
}

impl Timeline for LiveProcess {
    fn range(&self) -> Option<(u64, u64)> {
        self.refresh();
        let ids = self.ids().ok()?;
        Some((*ids.first()?, *ids.last()?))
    }

    fn describe(&self, n: u64) -> Result<String> {
        self.refresh();
        let snap = self
            .space
            .list()?
            .into_iter()
            .find(|s| s.id == n)
            .with_context(|| format!("no snapshot {n} in process {}", self.pid))?;
        let age = cow::monotonic_ns().saturating_sub(snap.taken_ns) as f64 / 1e9;
        Ok(format!(
            "checkpoint {n} at -{age:.6} s (snapshot, {} pages written since)",
            snap.saved_pages
        ))
    }

    fn threads(&self, _n: u64) -> Result<Vec<ThreadState>> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .with_context(|| format!("process {} exited", self.pid))?;
        let mut threads: Vec<ThreadState> = tasks
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
            .map(|tid| {
                let mut regs = [0u64; 27];
                // "NR ARG1 … ARG6 SP PC" while blocked in a system call ("running" otherwise).
                let sys = std::fs::read_to_string(format!("/proc/{}/task/{tid}/syscall", self.pid))
                    .unwrap_or_default();
                let words: Vec<u64> = sys
                    .split_whitespace()
                    .filter_map(|w| match w.strip_prefix("0x") {
                        Some(h) => u64::from_str_radix(h, 16).ok(),
                        None => w.parse().ok(),
                    })
                    .collect();
                if words.len() == 9 {
                    regs[reg::RSP] = words[7];
                    regs[reg::RIP] = words[8];
                    regs[reg::CS] = 0x33;
                    regs[reg::SS] = 0x2b;
                }
                ThreadState {
                    tid,
                    regs,
                    fpregs: Vec::new(),
                }
            })
            .collect();
        threads.sort_by_key(|t| t.tid != self.pid as u32); // the main thread first
        Ok(threads)
    }

    fn maps(&self, _n: u64) -> Result<String> {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .with_context(|| format!("process {} exited", self.pid))
    }

    fn page(&self, n: u64, page_addr: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let maps = self.cow_maps.borrow();
        if let Some(m) = maps
            .iter()
            .find(|m| page_addr >= m.start && page_addr < m.end)
        {
            let off = (m.offset & SPACE_OFFSET_MASK) + page_addr - m.start;
            let mut page = vec![0u8; PAGE];
            self.space
                .read(n, off, &mut page)
                .with_context(|| format!("snapshot {n}"))?;
            return Ok(Some(Arc::new(page)));
        }
        Ok(self.page_now(page_addr).map(Arc::new))
    }

    fn when(&self, addr: u64, len: u64) -> Result<Vec<u64>> {
        self.refresh();
        let ids = self.ids()?;
        let end = addr.saturating_add(len);
        let mut hits = Vec::new();
        let mut before: Option<Vec<u8>> = None;
        for n in ids {
            let mut bytes = Vec::new();
            let mut page = addr & !(PAGE as u64 - 1);
            while page < end {
                let lo = (addr.max(page) - page) as usize;
                let hi = (end.min(page + PAGE as u64) - page) as usize;
                match self.page(n, page)? {
                    Some(p) => bytes.extend_from_slice(&p[lo..hi]),
                    None => bytes.extend(std::iter::repeat_n(0, hi - lo)),
                }
                page += PAGE as u64;
            }
            if before.as_ref().is_some_and(|b| *b != bytes) {
                hits.push(n);
            }
            before = Some(bytes);
        }
        Ok(hits)
    }

    fn auxv(&self) -> Vec<u8> {
        self.auxv.clone()
    }

    fn exe(&self) -> String {
        self.exe.clone()
    }
}
