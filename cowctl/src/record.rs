//! `cowctl record -- PROG ARGS…`: run a program with frequent checkpoints into a recording.
//!
//! The program runs traced (see `tracer.rs`). At each checkpoint every thread is stopped for a
//! consistent cut; while stopped the recorder takes their registers, the used part of every
//! stack and the writable private memory outside cow.ko (hashed: only changed pages go to the
//! store), and, with cow.ko, a kernel snapshot of the covered memory. The threads then resume,
//! and a store thread reads the covered pages written since the previous checkpoint *as of the
//! snapshot* (`COW_IOC_READ`), stores them and drops the previous snapshot — so the program
//! never waits for compression. The recorder holds its own descriptor of the program's space,
//! so what the kernel keeps for a pending checkpoint survives the program's crash.

use crate::tracer::{Event, Tracee};
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use store::{Codec, Meta, NewCheckpoint, Reason, Writer, PAGE};

/// How to record.
pub struct Options {
    /// Checkpoint interval (none: only at `at`).
    pub every: Option<std::time::Duration>,
    /// Also checkpoint each time the program enters one of these functions (at most 4).
    pub at: Vec<String>,
    /// The recording directory.
    pub out: PathBuf,
    /// Page codec.
    pub codec: Codec,
    /// How changed pages are found.
    pub capture: Capture,
    /// Bound on the recording's size (oldest checkpoints merged past it).
    pub max_size: Option<u64>,
    /// False: take the same checkpoints but store nothing (the bench's baseline for what the
    /// store costs; with cow.ko each snapshot is still dropped when the next is taken).
    pub store: bool,
}

/// How the recorder learns which pages changed since the previous checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// cow.ko snapshots of the heap and globals (the preload puts them there); the rest of the
    /// writable memory read and hashed.
    Kmod,
    /// userfaultfd write-protection and `PAGEMAP_SCAN` (Linux ≥ 6.7): only written pages read.
    Uffd,
    /// All writable memory read and hashed at each checkpoint (any kernel).
    Scan,
}

impl Capture {
    /// The name recordings and `--backend` use.
    pub fn name(self) -> &'static str {
        match self {
            Capture::Kmod => "kmod",
            Capture::Uffd => "uffd",
            Capture::Scan => "scan",
        }
    }

    /// The capture named `name` (see [`Capture::name`]).
    pub fn from_name(name: &str) -> Option<Capture> {
        [Capture::Kmod, Capture::Uffd, Capture::Scan]
            .into_iter()
            .find(|c| c.name() == name)
    }

    /// The ways this machine offers, best first.
    pub fn available() -> Vec<Capture> {
        let mut out = Vec::new();
        if cow::Cow::open().is_ok() {
            out.push(Capture::Kmod);
        }
        let k = cow::probe::kernel_features();
        if k.uffd_wp_async.available && k.pagemap_scan.available {
            out.push(Capture::Uffd);
        }
        out.push(Capture::Scan);
        out
    }
}

/// What a recording run ended with.
pub struct Outcome {
    /// The program's exit code (128 + signal if killed).
    pub code: i32,
    /// What the writer stored.
    pub stats: store::WriterStats,
    /// Checkpoints taken (stored or, with `Options::store` false, not).
    pub taken: u64,
    /// Periodic checkpoints not taken when due: after each checkpoint the program runs at
    /// least half an interval and as long as recent checkpoints stopped it, and the recorder
    /// waits while the store is behind.
    pub skipped: u64,
    /// How long each checkpoint kept the program stopped (stopping every thread, capturing,
    /// resuming), ns, in the order taken.
    pub stops_ns: Vec<u64>,
    /// How long the recorder waited for the store thread (the program running meanwhile).
    pub store_wait: std::time::Duration,
}

pub(crate) use store::{parse_maps, Mapping};

/// Space offsets inside a file offset of `/dev/cow` (the rest is the space's base).
pub(crate) const SPACE_OFFSET_MASK: u64 = (1 << 44) - 1;

/// Reads `len` bytes at `addr` of process `pid`; returns how many could be read.
pub(crate) fn read_remote(pid: i32, addr: u64, buf: &mut [u8]) -> usize {
    cow::read_process(pid, addr as usize, buf).max(0) as usize
}

/// Work for the store thread: one checkpoint.
struct Job {
    time_ns: u64,
    reason: Reason,
    signal: u32,
    threads: Vec<store::ThreadState>,
    /// Pages captured while the threads were stopped.
    pages: Vec<(u64, Vec<u8>)>,
    maps: Option<String>,
    /// The program's auxiliary vector, in the first job only (read once it runs: after exec).
    auxv: Vec<u8>,
    /// With cow.ko: the space, the snapshot of this checkpoint, and the /dev/cow mappings then.
    space: Option<Arc<cow::Cow>>,
    snapshot: Option<u64>,
    cow_maps: Vec<Mapping>,
}

/// The recorder's state between checkpoints.
struct Recorder {
    pid: i32,
    capture: Capture,
    space: Option<Arc<cow::Cow>>,
    /// With `Capture::Uffd`: the write tracking of the program's current address space
    /// (made at the first checkpoint after each exec).
    uffd: Option<crate::uffd_capture::UffdCapture>,
    /// Hash of each page outside cow.ko as last recorded.
    hashes: std::collections::BTreeMap<u64, u64>,
    /// Whether the program's auxv went out with a checkpoint already.
    auxv_sent: bool,
    last_maps: String,
    jobs: mpsc::SyncSender<Job>,
    /// Checkpoints handed to the store thread.
    taken: u64,
    /// Where pages are read into.
    buf: Vec<u8>,
    /// Where libcow's book is in the program (its bookkeeping under the preload, not the
    /// program's state: left out).
    book: Book,
    /// Time spent waiting for room in the store thread's queue.
    store_wait: std::time::Duration,
}

impl Recorder {
    /// Captures a checkpoint with every thread stopped, for the store thread (see `send`).
    /// `event_thread` (the thread that crashed or hit a breakpoint) goes first in the
    /// checkpoint, so a debugger shows it.
    fn checkpoint(
        &mut self,
        tracee: &mut Tracee,
        reason: Reason,
        signal: u32,
        event_thread: Option<i32>,
    ) -> Result<Job> {
        let time_ns = cow::monotonic_ns();
        // First, as it may step a thread out of a system call it was stopped in.
        if self.capture == Capture::Uffd && self.uffd.is_none() {
            let tracker = crate::uffd_capture::UffdCapture::new(tracee)
                .context("cannot track the program's writes with userfaultfd")?;
            self.uffd = Some(tracker);
        }
        let threads = tracee.registers(event_thread);
        let maps_text = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))?;
        let maps = parse_maps(&maps_text);
        // The space exists once the preload has mapped it (not yet while the loader runs).
        let mapped = || maps.iter().any(|m| m.path == cow::COW_DEVICE_PATH);
        if self.capture == Capture::Kmod && self.space.is_none() && mapped() {
            self.space = crate::remote::attach(self.pid).ok().map(Arc::new);
        }
        let snapshot = match &self.space {
            Some(space) => Some(space.snapshot().context("cow.ko snapshot")?),
            None => None,
        };
        let stack_tops: Vec<u64> = threads
            .iter()
            .map(|t| t.regs[store::reg::RSP].saturating_sub(128) & !(PAGE as u64 - 1))
            .collect();
        let mut pages = Vec::new();
        for m in &maps {
            // Private data: writable mappings, and the pages of read-only ones written before
            // they were protected (RELRO, where the loader wrote relocations and DT_DEBUG).
            let private = m.perms.starts_with('r') && m.perms.ends_with('p');
            let writable = m.perms.as_bytes().get(1) == Some(&b'w');
            let code = m.perms.as_bytes().get(2) == Some(&b'x');
            if !private || code || m.path == "[vvar]" || m.path == "[vsyscall]" {
                continue;
            }
            if !writable {
                // Only its anonymous pages differ from the file (gdb reads the rest from it);
                // few, so hashed at every checkpoint.
                self.scan_hashed(m.start, m.end, true, &mut pages);
                continue;
            }
            // A stack: only its used part (above the stack pointer and its red zone).
            let stack_top = stack_tops
                .iter()
                .filter(|&&top| top >= m.start && top < m.end)
                .min()
                .copied();
            if let (Some(uffd), None) = (&mut self.uffd, stack_top) {
                if let Some(runs) = uffd.changed(m, &self.hashes)? {
                    // Written is not changed: pages rewritten with what they held (reference
                    // counts up and down) are not stored again.
                    for (lo, hi) in runs {
                        read_pages(self.pid, lo, hi, &mut self.buf, |addr, page| {
                            keep_if_changed(&mut self.hashes, &mut pages, addr, page)
                        });
                    }
                    continue;
                }
            }
            let start = stack_top.unwrap_or(m.start);
            let book = match self.book {
                Book::At(range) => Some(range),
                _ => None,
            };
            for (lo, hi) in outside(start, m.end, book) {
                self.scan_hashed(lo, hi, false, &mut pages);
            }
        }
        let maps_changed = maps_text != self.last_maps;
        if maps_changed {
            self.last_maps = maps_text.clone();
        }
        let cow_maps = maps
            .into_iter()
            .filter(|m| m.path == cow::COW_DEVICE_PATH)
            .collect();
        Ok(Job {
            time_ns,
            reason,
            signal,
            threads,
            pages,
            maps: maps_changed.then_some(maps_text),
            // Needed once, by the first checkpoint (the writer's meta record).
            auxv: if self.auxv_sent {
                Vec::new()
            } else {
                self.auxv_sent = true;
                std::fs::read(format!("/proc/{}/auxv", self.pid)).unwrap_or_default()
            },
            space: self.space.clone(),
            snapshot,
            cow_maps,
        })
    }

    /// Hands checkpoints to the store thread — after the program was resumed: when the store
    /// falls behind, the recorder waits here (and takes the next checkpoint later), never the
    /// program.
    fn send(&mut self, jobs: Vec<Job>) -> Result<()> {
        self.taken += jobs.len() as u64;
        for job in jobs {
            let job = match self.jobs.try_send(job) {
                Ok(()) => continue,
                Err(mpsc::TrySendError::Full(job)) => job,
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    anyhow::bail!("the store thread stopped")
                }
            };
            let t = std::time::Instant::now();
            self.jobs.send(job).context("the store thread stopped")?;
            self.store_wait += t.elapsed();
        }
        Ok(())
    }
}

impl Recorder {
    /// Captures the pages of `[start, end)` (`anon_only`: its anonymous ones) whose contents
    /// changed since the last checkpoint, by reading every present page and comparing hashes.
    /// A page hashed before that is no longer there is read again (zero, or the file's).
    fn scan_hashed(
        &mut self,
        start: u64,
        end: u64,
        anon_only: bool,
        pages: &mut Vec<(u64, Vec<u8>)>,
    ) {
        // Only pages present (or swapped out): a 64 GiB reservation costs nothing.
        let ranges = page_ranges(self.pid, start, end, anon_only);
        let gone: Vec<u64> = self
            .hashes
            .range(start..end)
            .map(|(&a, _)| a)
            .filter(|&a| !ranges.iter().any(|&(s, e)| a >= s && a < e))
            .collect();
        for a in gone {
            self.hashes.remove(&a);
            let mut page = vec![0u8; PAGE];
            read_remote(self.pid, a, &mut page);
            pages.push((a, page));
        }
        for (lo, hi) in ranges {
            read_pages(self.pid, lo, hi, &mut self.buf, |addr, page| {
                keep_if_changed(&mut self.hashes, pages, addr, page)
            });
        }
    }

    /// The program exec'd: a new address space, tracked anew.
    fn on_exec(&mut self) {
        self.uffd = None;
        self.book = Book::Unknown;
    }

    /// Once the program's cow.ko space is found, asks its libcow where its book is. Its
    /// control thread answers, and it may be new and held at its first ptrace stop, which only
    /// this (the tracing) thread lets go: so another thread asks, and this one picks the answer
    /// up at a later checkpoint.
    fn learn_book(&mut self) {
        match &self.book {
            Book::Asked(rx) => {
                match rx.try_recv() {
                    Ok(range) => self.book = range.map_or(Book::None, Book::At),
                    Err(mpsc::TryRecvError::Disconnected) => self.book = Book::None,
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                return;
            }
            Book::Unknown if self.space.is_some() => {}
            _ => return,
        }
        let (tx, rx) = mpsc::channel();
        self.book = Book::Asked(rx);
        let pid = self.pid;
        std::thread::spawn(move || {
            // The control thread starts at the end of the preload's set-up: until then, no
            // one listens (a second at most is worth waiting).
            for _ in 0..100 {
                match cow::control::request(pid, "book") {
                    Ok(reply) => {
                        let mut w = reply
                            .split_whitespace()
                            .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16));
                        let range = (|| Some((w.next()?.ok()?, w.next()?.ok()?)))();
                        let _ = tx.send(range);
                        return;
                    }
                    Err(e) if matches!(e.errno(), libc::ECONNREFUSED | libc::ENOENT) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// What the recorder knows of libcow's book in the program.
enum Book {
    /// Not asked yet (no cow.ko space found yet).
    Unknown,
    /// Asked; the answer comes on this channel.
    Asked(mpsc::Receiver<Option<(u64, u64)>>),
    /// Its range.
    At((u64, u64)),
    /// The program did not say.
    None,
}

/// The parts of `[start, end)` outside `hole`.
fn outside(start: u64, end: u64, hole: Option<(u64, u64)>) -> Vec<(u64, u64)> {
    match hole {
        Some((a, b)) if a < end && b > start => [(start, a.max(start)), (b.min(end), end)]
            .into_iter()
            .filter(|(lo, hi)| lo < hi)
            .collect(),
        _ => vec![(start, end)],
    }
}

/// Adds `page` (at `addr`) to `pages` unless its hash is the one recorded for `addr`.
fn keep_if_changed(
    hashes: &mut std::collections::BTreeMap<u64, u64>,
    pages: &mut Vec<(u64, Vec<u8>)>,
    addr: u64,
    page: &[u8],
) {
    let h = xxhash_rust::xxh3::xxh3_64(page);
    if hashes.insert(addr, h) != Some(h) {
        pages.push((addr, page.to_vec()));
    }
}

/// Reads the pages of `[lo, hi)` of process `pid`, in chunks of up to 1 MiB through `buf`
/// (kept across calls: zeroing a fresh buffer per run cost as much as reading it), and hands
/// each to `page`; stops at an unreadable hole (`PROT_NONE` inside a mapping).
fn read_pages(pid: i32, lo: u64, hi: u64, buf: &mut Vec<u8>, mut page: impl FnMut(u64, &[u8])) {
    if buf.is_empty() {
        buf.resize(1 << 20, 0);
    }
    let mut at = lo;
    while at < hi {
        let n = ((hi - at) as usize).min(buf.len());
        let got = read_remote(pid, at, &mut buf[..n]);
        for (i, p) in buf[..got].chunks(PAGE).enumerate() {
            page(at + (i * PAGE) as u64, p);
        }
        if got < n {
            break;
        }
        at += n as u64;
    }
}

/// Ranges of `[start, end)` of process `pid` whose pages are present or swapped out
/// (`PAGEMAP_SCAN` on `/proc/PID/pagemap`); the whole range where the kernel lacks it.
pub(crate) fn present_ranges(pid: i32, start: u64, end: u64) -> Vec<(u64, u64)> {
    page_ranges(pid, start, end, false)
}

/// [`present_ranges`], or with `anon_only` only pages that are not the file's own.
fn page_ranges(pid: i32, start: u64, end: u64, anon_only: bool) -> Vec<(u64, u64)> {
    use cow::probe::{PageRegion, PmScanArg, PAGEMAP_SCAN, PAGE_IS_PRESENT};
    use std::os::fd::AsRawFd;
    const PAGE_IS_FILE: u64 = 1 << 2;
    const PAGE_IS_SWAPPED: u64 = 1 << 4;
    let not_file = if anon_only { PAGE_IS_FILE } else { 0 };
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else {
        return vec![(start, end)];
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut regions = [PageRegion::default(); 512];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_inverted: not_file,
            category_mask: not_file,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: a valid pm_scan_arg whose vec points at `regions`, which outlives the call.
        let n = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN as libc::c_ulong, &mut arg) };
        if n < 0 {
            return vec![(start, end)]; // no PAGEMAP_SCAN: read everything
        }
        for r in &regions[..n as usize] {
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    out
}

/// Pages of `m` present in `pid`'s page table, as addresses.
fn present_pages(pid: i32, m: &Mapping) -> Vec<u64> {
    present_ranges(pid, m.start, m.end)
        .into_iter()
        .flat_map(|(s, e)| (s..e).step_by(PAGE))
        .collect()
}

/// The store thread: covered pages of each snapshot, then the checkpoint record.
fn store_loop(
    pid: i32,
    out: PathBuf,
    meta: Meta,
    max_size: Option<u64>,
    jobs: mpsc::Receiver<Job>,
) -> Result<Option<Writer>> {
    let mut writer: Option<Writer> = None;
    let mut prev: Option<u64> = None;
    let mut last_space: Option<Arc<cow::Cow>> = None;
    let mut seen: HashSet<u64> = HashSet::new();
    // Hash of each covered page as last stored.
    let mut covered_hashes = std::collections::BTreeMap::new();
    let mut page = vec![0u8; PAGE];
    for job in jobs {
        let mut pages = job.pages;
        if let (Some(snap), Some(space)) = (job.snapshot, &job.space) {
            // Covered pages that may have changed: written since the previous snapshot, and
            // every present page of a mapping not seen before.
            let mut addrs: Vec<u64> = Vec::new();
            let dirty = prev.map(|p| space.dirty_since(p));
            match dirty {
                Some(Ok(idx)) => {
                    for i in idx {
                        let off = i * PAGE as u64;
                        for m in &job.cow_maps {
                            let base = m.offset & SPACE_OFFSET_MASK;
                            if off >= base && off < base + (m.end - m.start) {
                                addrs.push(m.start + off - base);
                            }
                        }
                    }
                }
                // No previous snapshot (or the program's own restore discarded it): all.
                _ => seen.clear(),
            }
            for m in &job.cow_maps {
                if seen.insert(m.start) {
                    addrs.extend(present_pages(pid, m));
                }
            }
            addrs.sort_unstable();
            addrs.dedup();
            for addr in addrs {
                let Some(m) = job
                    .cow_maps
                    .iter()
                    .find(|m| addr >= m.start && addr < m.end)
                else {
                    continue;
                };
                let off = (m.offset & SPACE_OFFSET_MASK) + addr - m.start;
                if space.read(snap, off, &mut page).is_ok() {
                    // Dirty is not changed: perl rewrites many pages with what they held.
                    keep_if_changed(&mut covered_hashes, &mut pages, addr, &page);
                }
            }
            if let Some(p) = prev {
                let _ = space.drop_snapshot(p);
            }
            prev = Some(snap);
            last_space = Some(space.clone());
        }
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(a, p)| (*a, p.as_slice())).collect();
        if writer.is_none() {
            // Created at the first checkpoint, when the program's auxv is its own.
            let meta = Meta {
                auxv: job.auxv.clone(),
                ..meta.clone()
            };
            let mut w = Writer::create(&out, &meta)?;
            if let Some(max) = max_size {
                w.set_max_size(max);
            }
            writer = Some(w);
        }
        let w = writer.as_mut().expect("created above");
        w.checkpoint(&NewCheckpoint {
            time_ns: job.time_ns,
            reason: job.reason,
            signal: job.signal,
            threads: &job.threads,
            pages: &refs,
            maps: job.maps.as_deref(),
        })?;
    }
    // The last snapshot is ours too: a process we let go must not keep it.
    if let (Some(p), Some(space)) = (prev, last_space) {
        let _ = space.drop_snapshot(p);
    }
    Ok(writer)
}

/// The store thread when nothing is stored: each cow.ko snapshot is dropped once the next
/// one exists, as `store_loop` does after reading it.
fn discard_loop(jobs: mpsc::Receiver<Job>) -> Result<Option<Writer>> {
    let mut prev: Option<(u64, Arc<cow::Cow>)> = None;
    for job in jobs {
        if let (Some(snap), Some(space)) = (job.snapshot, job.space) {
            if let Some((p, old)) = prev.replace((snap, space)) {
                let _ = old.drop_snapshot(p);
            }
        }
    }
    if let Some((p, space)) = prev {
        let _ = space.drop_snapshot(p);
    }
    Ok(None)
}

fn cstring(s: impl AsRef<std::ffi::OsStr>) -> Result<CString> {
    Ok(CString::new(s.as_ref().as_encoded_bytes())?)
}

/// Records `argv` (environment: ours plus `env`) into `opts.out`.
pub fn record(opts: &Options, argv: &[String], env: &[(String, String)]) -> Result<Outcome> {
    let exe = crate::program::resolve(argv[0].as_ref())
        .with_context(|| format!("{}: command not found", argv[0]))?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let mut vars: HashMap<std::ffi::OsString, std::ffi::OsString> = std::env::vars_os().collect();
    for (k, v) in env {
        vars.insert(k.into(), v.into());
    }
    let envp: Vec<CString> = vars
        .iter()
        .map(|(k, v)| {
            let mut s = k.clone();
            s.push("=");
            s.push(v);
            cstring(s)
        })
        .collect::<Result<_>>()?;
    let args: Vec<CString> = argv.iter().map(cstring).collect::<Result<_>>()?;
    let mut writer_meta = Meta {
        exe: exe.display().to_string(),
        argv: argv.to_vec(),
        backend: opts.capture.name().into(),
        codec: opts.codec,
        ..Meta::default()
    };
    let functions = preflight(opts, &exe)?;
    block_signals(&[libc::SIGCHLD]);
    let tracee = Tracee::spawn(&cstring(&exe)?, &args, &envp)?;
    writer_meta.pid = tracee.pid;
    record_tracee(opts, tracee, writer_meta, &exe, &functions, false)
}

/// `cowctl record --pid PID`: records a running process until it exits or we are told to
/// stop (SIGINT, SIGTERM, SIGHUP), then lets it go, unchanged.
pub fn record_pid(opts: &Options, pid: i32) -> Result<Outcome> {
    crate::remote::check_is_live_process(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "cannot see process {pid}'s program (no such process, or not ours to trace)"
        ))
    })?;
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let functions = preflight(opts, &exe)?;
    let meta = Meta {
        exe: exe.display().to_string(),
        argv,
        pid,
        backend: opts.capture.name().into(),
        codec: opts.codec,
        ..Meta::default()
    };
    // Told to stop, we detach instead of dying with the program traced.
    block_signals(&[libc::SIGCHLD, libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let tracee = Tracee::attach(pid)?;
    record_tracee(opts, tracee, meta, &exe, &functions, true)
}

/// What both ways of recording check before touching the program: the output is free, and
/// the `--at` functions exist in `exe` (returned with their addresses).
fn preflight(opts: &Options, exe: &std::path::Path) -> Result<Vec<crate::symbols::Function>> {
    if opts.out.join(store::LOG_FILE).exists() {
        anyhow::bail!("{} holds a recording already", opts.out.display());
    }
    anyhow::ensure!(
        opts.at.len() <= crate::tracer::MAX_BREAKPOINTS,
        "--at: at most {} functions (one per debug register)",
        crate::tracer::MAX_BREAKPOINTS
    );
    crate::symbols::functions(exe, &opts.at)
}

/// Blocks `signals` in this thread and the threads it starts from now on (they are read
/// from a signalfd by `run_loop`; another thread of ours must not take them).
fn block_signals(signals: &[i32]) {
    // SAFETY: building a signal set and blocking it in this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Records `tracee` (spawned, or `attached` to) with a store thread beside.
fn record_tracee(
    opts: &Options,
    mut tracee: Tracee,
    meta: Meta,
    exe: &std::path::Path,
    functions: &[crate::symbols::Function],
    attached: bool,
) -> Result<Outcome> {
    // Checkpoints queue for the store thread; a full queue makes the recorder (not the
    // program) wait, and stays below cow.ko's window of 64 snapshots.
    let (tx, rx) = mpsc::sync_channel::<Job>(16);
    let pid = tracee.pid;
    let out = opts.out.clone();
    let max_size = opts.max_size;
    let keep = opts.store;
    let store = std::thread::spawn(move || match keep {
        true => store_loop(pid, out, meta, max_size, rx),
        false => discard_loop(rx),
    });
    let mut rec = Recorder {
        pid,
        capture: opts.capture,
        space: None,
        uffd: None,
        hashes: Default::default(),
        auxv_sent: false,
        last_maps: String::new(),
        jobs: tx,
        taken: 0,
        store_wait: Default::default(),
        buf: Vec::new(),
        book: Book::Unknown,
    };
    let mut timer = Timer::new(opts.every.unwrap_or_default())?;
    let code = run_loop(&mut tracee, &mut rec, &mut timer, exe, functions, attached);
    if attached {
        tracee.detach()?; // the program goes on (or is gone already)
    }
    let (taken, store_wait) = (rec.taken, rec.store_wait);
    drop(rec);
    let writer = store
        .join()
        .map_err(|_| anyhow::anyhow!("the store thread panicked"))?
        .with_context(|| format!("cannot write the recording {}", opts.out.display()))?;
    Ok(Outcome {
        code: code?,
        stats: writer.map(|w| w.stats()).unwrap_or_default(),
        taken,
        skipped: timer.skipped,
        stops_ns: std::mem::take(&mut timer.stops_ns),
        store_wait,
    })
}

/// Waits for the program's events and the checkpoint timer until the program is gone (or,
/// `attached`, until we are told to stop: then 0).
fn run_loop(
    tracee: &mut Tracee,
    rec: &mut Recorder,
    timer: &mut Timer,
    exe: &std::path::Path,
    functions: &[crate::symbols::Function],
    attached: bool,
) -> Result<i32> {
    // SIGCHLD (a tracee stopped or exited) and, attached, the signals that end the recording
    // are read from a descriptor, next to the timer; they are blocked in all our threads.
    let mut signals = vec![libc::SIGCHLD];
    if attached {
        signals.extend([libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    }
    block_signals(&signals);
    // SAFETY: building a signal set and a signalfd we own.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in &signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    anyhow::ensure!(sfd >= 0, "signalfd: {}", std::io::Error::last_os_error());
    let tfd = timer.fd;
    let mut first = true;
    let mut crashed = false;
    // Once the program is exec'd (before it, the child is a copy of cowctl): its breakpoints
    // are armed, and checkpoints count. A process attached to runs its program already: it
    // is stopped at once for its breakpoints and a first checkpoint.
    let mut execed = attached;
    let mut arm_pending = attached;
    let on_exec = |tracee: &mut Tracee, execed: &mut bool| {
        let ours =
            std::fs::read_link(format!("/proc/{}/exe", tracee.pid)).ok() == Some(exe.to_path_buf());
        if !ours {
            if *execed && !functions.is_empty() {
                eprintln!(
                    "cowctl record: the program exec'd another program: --at is off from now on"
                );
            }
            return;
        }
        *execed = true;
        if functions.is_empty() {
            return;
        }
        match crate::symbols::load_bias(tracee.pid, exe) {
            Ok(bias) => {
                let addrs: Vec<u64> = functions.iter().map(|f| f.link_addr + bias).collect();
                tracee.set_breakpoints(&addrs);
                let named: Vec<String> = functions
                    .iter()
                    .zip(&addrs)
                    .map(|(f, a)| format!("{} ({a:#x})", f.name))
                    .collect();
                eprintln!(
                    "cowctl record: a checkpoint at each entry of {}",
                    named.join(", ")
                );
            }
            Err(e) => eprintln!("cowctl record: --at is off: {e:#}"),
        }
    };
    let result = loop {
        // Events first (non-blocking), then wait for the timer or the next child event.
        let ev = tracee.wait(false)?;
        let mut due = match ev {
            Some(Event::Exited(code)) => break Ok(code),
            Some(Event::Crash { .. }) | Some(Event::Exiting) | Some(Event::Breakpoint { .. }) => {
                true
            }
            Some(Event::Exec) | None => false,
        } || arm_pending;
        if tracee.take_exec() {
            rec.on_exec();
            on_exec(tracee, &mut execed);
            tracee.resume_all();
            continue;
        }
        let mut pfd = [
            libc::pollfd {
                fd: tfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling our own descriptors. A SIGCHLD that arrived before the signalfd
        // existed is caught by the periodic wake-up (at most 100 ms late).
        unsafe { libc::poll(pfd.as_mut_ptr(), 2, if due { 0 } else { 100 }) };
        if pfd[1].revents != 0 {
            let mut info = [0u8; 128];
            let mut stop = false;
            // SAFETY: draining signalfd records into a buffer of their size.
            while unsafe { libc::read(sfd, info.as_mut_ptr().cast(), 128) } > 0 {
                // ssi_signo, the record's first field.
                let signo = u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")) as i32;
                stop |= signo != libc::SIGCHLD;
            }
            if stop {
                eprintln!("cowctl record: stopping; process {} goes on", tracee.pid);
                break Ok(0);
            }
        }
        let timer_fired = pfd[0].revents != 0 && timer.take();
        due |= timer_fired;
        if !due || !execed {
            continue;
        }
        let stopped_at = cow::monotonic_ns();
        if let Some(Event::Exited(code)) = tracee.stop_all()? {
            break Ok(code);
        }
        // Exec'd while the threads were being stopped, or just attached to.
        if tracee.take_exec() | std::mem::take(&mut arm_pending) {
            rec.on_exec();
            on_exec(tracee, &mut execed);
        }
        // What happened up to this cut names the checkpoint (a crash or exit seen while
        // stopping the threads included).
        let mut hits = tracee.take_hits();
        let (reason, sig, event_thread) = match (tracee.take_crash(), tracee.take_exiting()) {
            (Some((tid, sig)), _) => {
                crashed = true;
                (Reason::Crash, sig as u32, Some(tid))
            }
            // Dying of a crash: the crash checkpoint is the last word.
            (None, true) if crashed => {
                tracee.resume_all();
                continue;
            }
            (None, true) => (Reason::Exit, 0, None),
            (None, false) if !hits.is_empty() => (Reason::Breakpoint, 0, hits.pop()),
            (None, false) if first => (Reason::Start, 0, None),
            (None, false) => (Reason::Interval, 0, None),
        };
        // One checkpoint per function entry: threads that entered at the same instant get one
        // each (the same cut, each naming its thread), before the checkpoint of this cut.
        let mut jobs = Vec::new();
        for tid in hits {
            jobs.push(rec.checkpoint(tracee, Reason::Breakpoint, 0, Some(tid))?);
        }
        jobs.push(rec.checkpoint(tracee, reason, sig, event_thread)?);
        first = false;
        tracee.resume_all();
        let stopped = cow::monotonic_ns() - stopped_at;
        timer.stops_ns.push(stopped);
        timer.hold_off();
        rec.send(jobs)?;
        rec.learn_book();
    };
    // SAFETY: closing our descriptor.
    unsafe { libc::close(sfd) };
    result
}

/// How many recent checkpoints' stops decide how long the program runs before the next.
const HOLD_OFF_WINDOW: usize = 9;
/// Checkpoints taken before their stops count.
const HOLD_OFF_MIN_SAMPLES: usize = 5;

/// The checkpoint timer: due every `period`, but between two checkpoints the program always
/// runs at least half a period (the rule of libcow's checkpointer) and at least as long as
/// recent checkpoints stopped it: checkpoints that take longer than the interval must not
/// leave the program stopped nearly all the time.
struct Timer {
    fd: i32,
    period_ns: u64,
    next_ns: u64,
    /// Periods that passed without a checkpoint (see `hold_off`).
    skipped: u64,
    /// How long each checkpoint stopped the program.
    stops_ns: Vec<u64>,
}

impl Timer {
    /// A timer (disarmed if `period` is zero).
    fn new(period: std::time::Duration) -> Result<Self> {
        // SAFETY: creating a timer descriptor we own.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        anyhow::ensure!(
            fd >= 0,
            "timerfd_create: {}",
            std::io::Error::last_os_error()
        );
        let period_ns = period.as_nanos() as u64;
        let mut t = Timer {
            fd,
            period_ns,
            next_ns: cow::monotonic_ns() + period_ns,
            skipped: 0,
            stops_ns: Vec::new(),
        };
        t.arm();
        Ok(t)
    }

    fn arm(&mut self) {
        if self.period_ns == 0 {
            return;
        }
        let at = libc::timespec {
            tv_sec: (self.next_ns / 1_000_000_000) as i64,
            tv_nsec: (self.next_ns % 1_000_000_000) as i64,
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: at,
        };
        // SAFETY: arming our timer at an absolute CLOCK_MONOTONIC time.
        unsafe {
            libc::timerfd_settime(
                self.fd,
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
    }

    /// Whether the timer expired (its descriptor was readable); if so the next checkpoint is
    /// due a period after this one was.
    fn take(&mut self) -> bool {
        let mut ticks = 0u64;
        // SAFETY: reading the 8-byte expiration count of our (blocking) timer, known readable.
        let fired = unsafe { libc::read(self.fd, (&mut ticks as *mut u64).cast(), 8) == 8 };
        if fired {
            self.next_ns += self.period_ns;
            self.arm();
        }
        fired
    }

    /// After a checkpoint, once the program runs again: the next one is not due before the
    /// program ran half a period, nor before it ran as long as recent checkpoints stopped it
    /// (the median of the last few: so stopping it never takes more than about half its time,
    /// however costly checkpoints are — a large heap on `scan`, a slow guest — while one
    /// checkpoint that happened to be slow, the recorder descheduled in the middle of it, does
    /// not leave a hole of its own length in the recording).
    fn hold_off(&mut self) {
        let recent = &self.stops_ns[self.stops_ns.len().saturating_sub(HOLD_OFF_WINDOW)..];
        let mut recent = recent.to_vec();
        recent.sort_unstable();
        // Not from the first few checkpoints, and a median: the first reads the whole address
        // space (and, on cow.ko, so does the first after the space is found), a cost the later
        // ones do not have; one such stop of 0.5 s (Debian's single-threaded TCG) left the
        // recording without a checkpoint for its first half second.
        let typical = if recent.len() < HOLD_OFF_MIN_SAMPLES {
            0
        } else {
            recent[recent.len() / 2]
        };
        let earliest = cow::monotonic_ns() + (self.period_ns / 2).max(typical);
        if self.period_ns != 0 && self.next_ns < earliest {
            self.skipped += (earliest - self.next_ns) / self.period_ns;
            self.next_ns = earliest;
            self.arm();
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: closing our descriptor.
        unsafe { libc::close(self.fd) };
    }
}
