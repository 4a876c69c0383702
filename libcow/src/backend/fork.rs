//! The fork backend: the kernel's fork-time copy-on-write is the snapshot.
//!
//! A snapshot forks a child (a raw `clone` without `SIGCHLD`, so the program's `wait` calls never
//! see it) that blocks every signal and waits on a pipe, touching nothing: its memory *is* the
//! snapshot, kept by the kernel's copy-on-write. Pages the program writes afterwards become
//! exclusively mapped in the parent (pagemap bit 56), which is how the backend finds them: at
//! each snapshot it records the pages written in the epoch that ends, and a restore copies from
//! the snapshot's child (`process_vm_readv`) every page written since — the epochs' records
//! plus the pages exclusive now — then forks a fresh child for the restored state, so the next
//! epoch starts shared again. Reads of an old snapshot read its child directly.
//!
//! Coverage is the shadow backends': every private writable mapping but stacks, thread control
//! blocks and libcow's book. When the process exits (or execs), the pipe closes and the children
//! exit.

use super::shadow::{
    contains, covered_now, current_brk, err, io_err, map_anonymous, now_ns, restore_layout,
    subtract, Range,
};
use super::{Backend, Stats};
use crate::book::{self, BookVec};
use crate::error::{Error, Result};
use crate::sys::{self, RawFile};
use crate::world;
use std::sync::Mutex;

const PAGE: usize = 4096;
/// pagemap: the page is mapped exclusively by this process.
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
/// pagemap: present.
const PM_PRESENT: u64 = 1 << 63;
/// `__WCLONE`: wait for children that exit without SIGCHLD.
const WCLONE: i32 = 0x8000_0000u32 as i32;
/// Most iovecs per process_vm_readv.
const IOV_MAX: usize = 1024;

struct ForkSnap {
    id: u64,
    child: i32,
    brk: usize,
    tids: BookVec<i32>,
    ranges: BookVec<Range>,
    /// Pages written in the epoch after this snapshot (known once the next one is taken).
    dirty: BookVec<usize>,
    /// Ranges unmapped in that epoch.
    vanished: BookVec<Range>,
}

struct State {
    snaps: BookVec<usize>,
    next_id: u64,
    pipe_read: i32,
    pipe_write: i32,
    stats: Stats,
}

/// The fork backend.
pub struct Fork {
    state: &'static Mutex<State>,
}

/// Pages of `r` that map the shared zero page (read but never written since they were zapped
/// or mapped anew), from `PAGEMAP_SCAN`'s `PAGE_IS_PFNZERO`; sorted. Empty where the kernel has
/// no PAGEMAP_SCAN.
fn zero_pages(r: Range, out: &mut BookVec<usize>) {
    use crate::probe::{PageRegion, PmScanArg, PAGEMAP_SCAN};
    const PAGE_IS_PFNZERO: u64 = 1 << 5;
    let Ok(pagemap) = RawFile::open(c"/proc/self/pagemap", libc::O_RDONLY) else {
        return;
    };
    let mut regions = [PageRegion::default(); 256];
    let mut start = r.start as u64;
    while start < r.end as u64 {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end: r.end as u64,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_mask: PAGE_IS_PFNZERO,
            return_mask: PAGE_IS_PFNZERO,
            ..Default::default()
        };
        // SAFETY: a valid pm_scan_arg whose vec points at `regions`.
        let n = unsafe { libc::ioctl(pagemap.fd(), PAGEMAP_SCAN as libc::c_ulong, &mut arg) };
        if n < 0 {
            break;
        }
        for reg in &regions[..n as usize] {
            for p in (reg.start..reg.end).step_by(PAGE) {
                out.push(p as usize);
            }
        }
        if arg.walk_end <= start {
            break;
        }
        start = arg.walk_end;
    }
}

/// Pages of `r` that may differ between us and the snapshot process `child`: pages we map
/// exclusively (written since the fork shared them), and pages the child has but we do not
/// (we zapped them: `MADV_DONTNEED`, a shrunk and regrown break, a mapping replaced) or map
/// only the shared zero page for.
fn changed_pages(r: Range, child: i32, out: &mut BookVec<usize>) -> Result<()> {
    let mut zero = BookVec::new();
    zero_pages(r, &mut zero);
    let zero = zero.as_slice();
    let open = |path: &std::ffi::CStr| {
        RawFile::open(path, libc::O_RDONLY).map_err(|_| Error::last_os("open pagemap"))
    };
    let mine = open(c"/proc/self/pagemap")?;
    let mut path = [0u8; 64];
    let theirs = open(sys::path_with_number(
        &mut path,
        b"/proc/",
        child as u64,
        b"/pagemap",
    ))?;
    let (mut a, mut b) = ([0u64; 512], [0u64; 512]);
    let mut page = r.start;
    while page < r.end {
        let n = ((r.end - page) / PAGE).min(a.len());
        let off = (page / PAGE * 8) as libc::off_t;
        // SAFETY: reading n entries of each pagemap into our stack buffers.
        let (ga, gb) = unsafe {
            (
                libc::pread(mine.fd(), a.as_mut_ptr().cast(), n * 8, off),
                libc::pread(theirs.fd(), b.as_mut_ptr().cast(), n * 8, off),
            )
        };
        if ga <= 0 {
            break;
        }
        let got = ga as usize / 8;
        let got_child = if gb > 0 { gb as usize / 8 } else { 0 };
        for i in 0..got {
            let child_present = i < got_child && b[i] & PM_PRESENT != 0;
            let present = a[i] & PM_PRESENT != 0 && zero.binary_search(&(page + i * PAGE)).is_err();
            if (present && a[i] & PM_MMAP_EXCLUSIVE != 0) || (!present && child_present) {
                out.push(page + i * PAGE);
            }
        }
        page += got * PAGE;
    }
    Ok(())
}

/// Copies `pages` (sorted page addresses) from `child`'s memory into ours, a run at a time.
fn copy_from_child(child: i32, pages: &[usize]) -> Result<()> {
    let mut iov: BookVec<libc::iovec> = BookVec::new();
    let flush = |iov: &mut BookVec<libc::iovec>| -> Result<()> {
        if iov.is_empty() {
            return Ok(());
        }
        // Same addresses on both sides: local and remote iovecs are the same list.
        // SAFETY: every iovec names whole pages of a covered (writable) mapping of ours, and the
        // same addresses in the child, which is a fork of us.
        let n = unsafe {
            libc::process_vm_readv(
                child,
                iov.as_slice().as_ptr(),
                iov.len() as u64,
                iov.as_slice().as_ptr(),
                iov.len() as u64,
                0,
            )
        };
        let want: usize = iov.as_slice().iter().map(|v| v.iov_len).sum();
        iov.clear();
        if n < 0 || n as usize != want {
            return Err(err(
                "process_vm_readv from the snapshot's process",
                libc::EIO,
            ));
        }
        Ok(())
    };
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + PAGE {
            j += 1;
        }
        iov.push(libc::iovec {
            iov_base: pages[i] as *mut libc::c_void,
            iov_len: (j - i) * PAGE,
        });
        if iov.len() == IOV_MAX {
            flush(&mut iov)?;
        }
        i = j;
    }
    flush(&mut iov)
}

impl State {
    fn snap(&self, i: usize) -> &ForkSnap {
        // SAFETY: entries point at live ForkSnaps in the book.
        unsafe { &*(self.snaps.as_slice()[i] as *const ForkSnap) }
    }

    fn snap_mut(&mut self, i: usize) -> &mut ForkSnap {
        // SAFETY: as above; exclusive through &mut self.
        unsafe { &mut *(self.snaps.as_slice()[i] as *mut ForkSnap) }
    }

    fn position(&self, id: u64) -> Result<usize> {
        (0..self.snaps.len())
            .find(|&i| self.snap(i).id == id)
            .ok_or(err("no such snapshot", libc::ENOENT))
    }

    /// Forks the frozen child that holds the current memory.
    fn spawn_child(&self) -> Result<i32> {
        // SAFETY: a raw clone without SIGCHLD. The child runs only raw system calls on its
        // stack: it closes its copy of the pipe's write end, blocks every signal, and waits for
        // the parent's end to close; it never writes covered memory, so its memory stays the
        // snapshot.
        let pid = unsafe { libc::syscall(libc::SYS_clone, 0, 0, 0, 0, 0) };
        if pid < 0 {
            return Err(Error::last_os("clone (snapshot process)"));
        }
        if pid == 0 {
            // SAFETY: raw system calls only, in the child.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                sys::sigprocmask_raw(libc::SIG_BLOCK, &all);
                libc::syscall(libc::SYS_close, self.pipe_write);
                // Nothing is ever written: end of file (the parent is gone) or any other
                // answer (the descriptor is not the pipe any more) ends the wait — a loop on
                // bytes read spun forever on a /dev/zero that took the pipe's number.
                let mut b = 0u8;
                while libc::syscall(libc::SYS_read, self.pipe_read, &mut b as *mut u8, 1) == -1
                    && *libc::__errno_location() == libc::EINTR
                {}
                libc::syscall(libc::SYS_exit_group, 0);
            }
            unreachable!("exit_group returned");
        }
        Ok(pid as i32)
    }

    fn kill_child(&self, pid: i32) {
        // SAFETY: killing and reaping our own clone child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(pid, &mut status, WCLONE);
        }
    }

    fn free_snap(&mut self, i: usize) {
        let p = self.snaps.as_slice()[i] as *mut ForkSnap;
        // SAFETY: a live ForkSnap, read out and freed once.
        let snap = unsafe { p.read() };
        self.kill_child(snap.child);
        drop(snap);
        book::book().free(p.cast(), std::mem::size_of::<ForkSnap>());
        let v = self.snaps.as_mut_slice();
        v.copy_within(i + 1.., i);
        let n = v.len() - 1;
        self.snaps.truncate(n);
    }

    fn snapshot(&mut self) -> Result<u64> {
        let start = now_ns();
        let stopped = world::stop_others().map_err(|e| io_err("stop the other threads", e))?;
        let covered = covered_now(&[], &stopped, false)?;
        if let Some(i) = self.snaps.len().checked_sub(1) {
            // Record what the epoch that ends wrote, and what it unmapped.
            let mut written = BookVec::new();
            let mut still = BookVec::new();
            let mut gone = BookVec::new();
            {
                let ranges = self.snap(i).ranges.as_slice();
                subtract(ranges, covered.as_slice(), &mut gone);
                subtract(ranges, gone.as_slice(), &mut still);
            }
            let child = self.snap(i).child;
            for &r in still.as_slice() {
                changed_pages(r, child, &mut written)?;
            }
            let snap = self.snap_mut(i);
            for &p in written.as_slice() {
                snap.dirty.push(p);
            }
            snap.dirty.sort_dedup();
            for &r in gone.as_slice() {
                snap.vanished.push(r);
            }
        }
        let child = self.spawn_child()?;
        let mut tids = BookVec::new();
        for &t in stopped.tids() {
            tids.push(t);
        }
        let id = self.next_id;
        self.next_id += 1;
        let snap = book::leak(ForkSnap {
            id,
            child,
            brk: current_brk(),
            tids,
            ranges: covered,
            dirty: BookVec::new(),
            vanished: BookVec::new(),
        });
        self.snaps.push(snap as *mut ForkSnap as usize);
        drop(stopped);
        self.stats.snapshot_ns += now_ns() - start;
        Ok(id)
    }

    /// Pages that may differ from snapshot `k` now, within `ranges_k` (sorted, unique).
    fn changed_since(&self, k: usize, out: &mut BookVec<usize>) -> Result<()> {
        for i in k..self.snaps.len() {
            for &p in self.snap(i).dirty.as_slice() {
                out.push(p);
            }
            for &r in self.snap(i).vanished.as_slice() {
                for p in (r.start..r.end).step_by(PAGE) {
                    out.push(p);
                }
            }
        }
        // Since the newest snapshot's fork: compare with its process.
        let newest = self.snaps.len() - 1;
        let child = self.snap(newest).child;
        for j in 0..self.snap(k).ranges.len() {
            let r = self.snap(k).ranges.as_slice()[j];
            changed_pages(r, child, out)?;
        }
        out.sort_dedup();
        Ok(())
    }

    fn restore(&mut self, id: u64) -> Result<()> {
        let start = now_ns();
        let k = self.position(id)?;
        let mut stopped = world::stop_others().map_err(|e| io_err("stop the other threads", e))?;
        if stopped.tids() != self.snap(k).tids.as_slice() {
            return Err(err(
                "restore: threads were created or ended since the snapshot",
                libc::EBUSY,
            ));
        }
        let (_, missing) = {
            let snap = self.snap(k);
            restore_layout(snap.ranges.as_slice(), snap.brk, false)?
        };
        // Re-created memory is zero: all of it comes from the snapshot's process.
        let mut pages = BookVec::new();
        for r in missing.as_slice() {
            for page in (r.start..r.end).step_by(PAGE) {
                pages.push(page);
            }
        }
        self.changed_since(k, &mut pages)?;
        let ranges_k = self.snap(k).ranges.as_slice();
        let mut inside = BookVec::new();
        for &p in pages.as_slice() {
            if contains(ranges_k, p).is_some() {
                inside.push(p);
            }
        }
        inside.sort_dedup();
        copy_from_child(self.snap(k).child, inside.as_slice())?;
        stopped.rewound(inside.as_slice());
        self.stats.pages_saved += inside.len() as u64;
        // Newer snapshots go; S_k gets a fresh child holding the restored memory, so the next
        // epoch starts with every page shared again.
        while self.snaps.len() > k + 1 {
            let last = self.snaps.len() - 1;
            self.free_snap(last);
        }
        let fresh = self.spawn_child()?;
        let old = std::mem::replace(&mut self.snap_mut(k).child, fresh);
        self.kill_child(old);
        let snap = self.snap_mut(k);
        snap.dirty.clear();
        snap.vanished.clear();
        drop(stopped);
        self.stats.restore_ns += now_ns() - start;
        Ok(())
    }

    fn drop_snapshot(&mut self, id: u64) -> Result<()> {
        let j = self.position(id)?;
        if j > 0 {
            let (dirty, vanished) = {
                let s = self.snap_mut(j);
                (
                    std::mem::take(&mut s.dirty),
                    std::mem::take(&mut s.vanished),
                )
            };
            let older = self.snap_mut(j - 1);
            for &p in dirty.as_slice() {
                older.dirty.push(p);
            }
            older.dirty.sort_dedup();
            for &r in vanished.as_slice() {
                older.vanished.push(r);
            }
        }
        self.free_snap(j);
        Ok(())
    }
}

impl Fork {
    /// Sets up the backend (the pipe its snapshot processes wait on).
    pub fn new() -> Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::last_os("pipe2"));
        }
        // Open for the process's life: a program's close of every descriptor must not end
        // the snapshot processes.
        fds.iter().for_each(|&fd| crate::fds::reserve(fd));
        let state = book::leak(Mutex::new(State {
            snaps: BookVec::new(),
            next_id: 1,
            pipe_read: fds[0],
            pipe_write: fds[1],
            stats: Stats::default(),
        }));
        Ok(Fork { state })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for Fork {
    fn name(&self) -> &'static str {
        "fork"
    }

    fn map(&self, len: usize) -> Result<*mut u8> {
        map_anonymous(len)
    }

    fn snapshot(&self) -> Result<u64> {
        self.lock().snapshot()
    }

    fn restore(&self, id: u64) -> Result<()> {
        self.lock().restore(id)
    }

    fn drop_snapshot(&self, id: u64) -> Result<()> {
        self.lock().drop_snapshot(id)
    }

    fn read(&self, id: u64, addr: usize, buf: &mut [u8]) -> Result<()> {
        let st = self.lock();
        let k = st.position(id)?;
        let n = crate::sys::read_process(st.snap(k).child, addr, buf);
        if n < 0 {
            return Err(Error::last_os(
                "process_vm_readv from the snapshot's process",
            ));
        }
        if n as usize != buf.len() {
            // A short read: the range runs past the snapshot's memory (errno is not set).
            return Err(Error::Os {
                op: "address outside covered memory",
                errno: libc::EFAULT,
            });
        }
        Ok(())
    }

    fn dirty_since(&self, id: u64) -> Result<Vec<usize>> {
        let st = self.lock();
        let k = st.position(id)?;
        let mut pages = BookVec::new();
        st.changed_since(k, &mut pages)?;
        Ok(pages.as_slice().to_vec())
    }

    fn list(&self) -> Result<Vec<u64>> {
        let st = self.lock();
        Ok((0..st.snaps.len()).map(|i| st.snap(i).id).collect())
    }

    fn stats(&self) -> Stats {
        let st = self.lock();
        let mut s = st.stats;
        s.snapshots = st.snaps.len() as u64;
        // The children hold a private copy of each page written since their fork.
        let mut pages = 0;
        for i in 0..st.snaps.len() {
            pages += st.snap(i).dirty.len() as u64;
        }
        s.bytes_held = pages * PAGE as u64;
        s
    }
}
