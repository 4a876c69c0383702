//! Write tracking with `mprotect` and a `SIGSEGV` handler.
//!
//! Covered ranges are made read-only at a snapshot. The first write to a page faults; the
//! handler finds the page in the tracked ranges (binary search over a table in the book),
//! marks it in that range's bitmap and makes it writable again, then returns so the write is
//! retried. Faults that are not ours go to the handler the program had installed (or to the
//! default action). The handler is async-signal-safe: no allocation and no locks, only the
//! table (replaced only while the other threads are stopped, and never while a handler runs:
//! libcow's stop signal is blocked during it) and `mprotect`.
//!
//! Known limit of this mechanism: the kernel writing into a protected page on the program's
//! behalf (`read(2)` into a buffer, say) fails with `EFAULT` instead of faulting. libcow_preload
//! makes the buffers of the read calls and the output of the event-loop waits it interposes
//! writable first ([`before_kernel_write`]); reads libc makes internally (`fread`'s buffer)
//! and other system calls that write the program's memory (`stat` into a heap buffer) still
//! fail.

use super::shadow::{Range, Tracker};
use crate::book::{self, BookVec};
use crate::error::{Error, Result};
use crate::sys;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

const PAGE: usize = 4096;
/// `SEGV_ACCERR`: the page is mapped but the access is not allowed.
const SEGV_ACCERR: i32 = 2;

/// A tracked range and its dirty bitmap (one bit per page).
#[derive(Clone, Copy)]
struct Tracked {
    range: Range,
    bits: *mut AtomicU64,
    words: usize,
}

/// The table the handler reads: `count` entries, sorted by address.
struct Table {
    entries: *const Tracked,
    count: usize,
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());
/// The fault counter lives in the book: the handler must never write covered memory (this
/// executable's own `.bss` is covered and may be write-protected while it runs).
static FAULTS: AtomicPtr<AtomicUsize> = AtomicPtr::new(std::ptr::null_mut());
static OLD_ACTION: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// The mprotect tracker.
pub struct Mprotect {
    tracked: BookVec<Tracked>,
    table: *mut Table,
}

// SAFETY: the raw pointers point into the book, which lives as long as the process; the tracker
// is used under the engine's mutex.
unsafe impl Send for Mprotect {}

fn protect(start: usize, end: usize, prot: i32) {
    // The system call itself: libcow_preload's `mprotect` records what the program protects.
    // SAFETY: changing the protection of covered memory we track; a failure leaves the page
    // writable, which is only a missed optimisation for our bookkeeping, never a lost write.
    unsafe { libc::syscall(libc::SYS_mprotect, start, end - start, prot) };
}

fn stop_signal() -> i32 {
    crate::world::signal()
}

/// Makes the tracked, still protected pages of `[addr, addr + len)` writable (marked written,
/// as a first write by the program would) before the kernel writes there on the program's
/// behalf: the kernel's write into a protected page fails with `EFAULT` instead of faulting.
/// libcow_preload calls it in front of `read`, `recv` and the like.
pub fn before_kernel_write(addr: usize, len: usize) {
    if len == 0 || TABLE.load(Ordering::Acquire).is_null() {
        return;
    }
    // The table changes only while every other thread waits in the stop signal's handler:
    // keep that signal out while reading it (raw call: the preload's pthread_sigmask would
    // leave it unblocked).
    let old = sys::sigprocmask_raw(libc::SIG_BLOCK, &sys::sigset_of(&[stop_signal()]));
    let table = TABLE.load(Ordering::Acquire);
    // SAFETY: the table and its entries live in the book and cannot change while the stop
    // signal is blocked in this thread.
    let t = unsafe { &*table };
    // SAFETY: the table holds `count` entries at `entries`, as unchanging as the table.
    let entries = unsafe { std::slice::from_raw_parts(t.entries, t.count) };
    let mut page = addr & !(PAGE - 1);
    let end = addr.saturating_add(len);
    while page < end {
        let i = entries.partition_point(|e| e.range.end <= page);
        let Some(e) = entries.get(i).filter(|e| e.range.start <= page) else {
            page += PAGE;
            continue;
        };
        let n = (page - e.range.start) / PAGE;
        // SAFETY: `n` indexes a page of the range, so its bit is inside the bitmap.
        let written =
            unsafe { &*e.bits.add(n / 64) }.load(Ordering::Acquire) & (1 << (n % 64)) != 0;
        if !written && e.range.prot & libc::PROT_WRITE != 0 {
            // A locked read-modify-write that changes nothing: a write access, so the fault
            // handler makes the page writable, and no concurrent store is lost. In assembly:
            // the compiler turns an atomic `or 0` into a plain load.
            // SAFETY: a mapped page of a tracked writable range; the instruction writes back
            // the byte it read.
            unsafe {
                std::arch::asm!("lock or byte ptr [{p}], 0", p = in(reg) page, options(nostack))
            };
        }
        page += PAGE;
    }
    sys::sigprocmask_raw(libc::SIG_SETMASK, &old);
}

extern "C" fn on_segv(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSEGV.
    let addr = unsafe { (*info).si_addr() } as usize;
    let table = TABLE.load(Ordering::Acquire);
    if !table.is_null() {
        // SAFETY: the table and its entries live in the book and are replaced only while every
        // other thread is stopped outside this handler.
        let t = unsafe { &*table };
        // SAFETY: the table holds `count` entries at `entries`, as unchanging as the table.
        let entries = unsafe { std::slice::from_raw_parts(t.entries, t.count) };
        let i = entries.partition_point(|e| e.range.end <= addr);
        if let Some(e) = entries.get(i).filter(|e| e.range.start <= addr) {
            let page = addr & !(PAGE - 1);
            let n = (page - e.range.start) / PAGE;
            // SAFETY: `n` indexes a page of the range, so its bit is inside the bitmap.
            let word = unsafe { &*e.bits.add(n / 64) };
            word.fetch_or(1 << (n % 64), Ordering::AcqRel);
            let faults = FAULTS.load(Ordering::Acquire);
            if !faults.is_null() {
                // SAFETY: a counter leaked into the book at install time.
                unsafe { (*faults).fetch_add(1, Ordering::Relaxed) };
            }
            protect(page, page + PAGE, e.range.prot);
            return;
        }
    }
    // Memory we protected that `mremap` moved elsewhere keeps its read-only protection but
    // leaves our table: a write fault on a private anonymous read-only mapping is taken to be
    // that — unless the program itself made that memory read-only (then the fault is its
    // own: redis' DEBUG SEGFAULT writes into a PROT_READ mapping). The mapping becomes
    // writable again (the next snapshot covers it as new memory).
    // SAFETY: reading si_code of the kernel's siginfo.
    if unsafe { (*info).si_code } == SEGV_ACCERR && !program_read_only(addr) {
        if let Some((start, end)) = moved_read_only_anon(addr) {
            protect(start, end, libc::PROT_READ | libc::PROT_WRITE);
            return;
        }
    }
    // Not ours: hand it to whoever had SIGSEGV before us.
    let old = OLD_ACTION.load(Ordering::Acquire);
    // SAFETY: `old` is the sigaction saved at install time (or null); our handler's arguments.
    unsafe {
        if !old.is_null() && sys::run_program_handler(&*old, sig, info, ctx) {
            return;
        }
        // Default action: restore it and return; the faulting instruction runs again and the
        // process dies of SIGSEGV as it would have without us.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        own_sigaction(&dfl, std::ptr::null_mut());
    }
}

/// Most read-only ranges of the program's own remembered ([`program_protection`]).
const PROGRAM_READ_ONLY_MAX: usize = 256;

/// The program's own read-only private anonymous ranges, `(start, end)` (0, 0: a free entry),
/// in the book (a restore must not rewind them; the handler reads them).
static PROGRAM_READ_ONLY: AtomicPtr<[(AtomicUsize, AtomicUsize); PROGRAM_READ_ONLY_MAX]> =
    AtomicPtr::new(std::ptr::null_mut());

/// What the program did to `[start, start + len)`, as libcow_preload's `mmap`, `mprotect` and
/// `munmap` see it: `Some(prot)` for private anonymous memory it mapped or protected,
/// `None` for memory it unmapped. Read-only memory is remembered, so that a write fault there
/// goes to the program, never taken for memory of ours that `mremap` moved (see the handler).
pub fn program_protection(start: usize, len: usize, prot: Option<i32>) {
    let mut table = PROGRAM_READ_ONLY.load(Ordering::Acquire);
    if table.is_null() {
        let fresh = book::leak(
            [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; PROGRAM_READ_ONLY_MAX],
        ) as *mut _;
        table = match PROGRAM_READ_ONLY.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => fresh,
            Err(other) => other,
        };
    }
    // SAFETY: the table lives in the book for the life of the process.
    let table = unsafe { &*table };
    let end = start.saturating_add(len);
    // Whatever was remembered inside the range is replaced.
    for (s, e) in table {
        let (a, b) = (s.load(Ordering::Acquire), e.load(Ordering::Acquire));
        if a < b && a >= start && b <= end {
            e.store(0, Ordering::Release);
            s.store(0, Ordering::Release);
        }
    }
    if prot.is_some_and(|p| p & libc::PROT_WRITE == 0) {
        for (s, e) in table {
            if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                e.store(end, Ordering::Release);
                return;
            }
        }
    }
}

/// Whether `addr` lies in read-only memory the program made so itself.
fn program_read_only(addr: usize) -> bool {
    let table = PROGRAM_READ_ONLY.load(Ordering::Acquire);
    // SAFETY: as in `program_protection`.
    !table.is_null()
        && unsafe { &*table }
            .iter()
            .any(|(s, e)| (s.load(Ordering::Acquire)..e.load(Ordering::Acquire)).contains(&addr))
}

/// Makes libcow's SIGSEGV handler run on the thread's alternate stack (error recovery, which
/// the handler passes the faults that are not its own to, rewrites the thread's stack). Only
/// where every alternate stack is libcow's (libcow_preload's `sigaltstack` sees to it): on a
/// program's own, in covered memory, the handler could not even be entered once that memory
/// is write-protected.
pub fn handle_on_alt_stack() {
    // SAFETY: reading and re-installing our own action, flags changed.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        if own_sigaction(std::ptr::null(), &mut sa) == 0
            && sa.sa_sigaction == on_segv as *const () as usize
        {
            sa.sa_flags |= libc::SA_ONSTACK;
            own_sigaction(&sa, std::ptr::null_mut());
        }
    }
}

/// Set while libcow itself changes SIGSEGV's action (an interposed `sigaction`, as in
/// libcow_preload, must let that call through).
static OWN_CALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `sigaction(SIGSEGV, act, old)` on libcow's own behalf.
fn own_sigaction(act: *const libc::sigaction, old: *mut libc::sigaction) -> i32 {
    OWN_CALL.store(true, Ordering::SeqCst);
    // SAFETY: the caller passes a valid action (or null) and a writable `old` (or null).
    let rc = unsafe { libc::sigaction(libc::SIGSEGV, act, old) };
    OWN_CALL.store(false, Ordering::SeqCst);
    rc
}

/// A program's `sigaction(SIGSEGV, act, old)` while this backend owns SIGSEGV: `act` becomes
/// the action faults that are not ours go to, `old` gets the one it replaces, and libcow's
/// handler stays. None when the call is not for us to answer (no mprotect backend, or libcow's
/// own call): the caller passes it to libc.
///
/// # Safety
///
/// `act` is null or a valid action; `old` is null or writable.
pub unsafe fn program_sigaction(
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> Option<i32> {
    let current = OLD_ACTION.load(Ordering::Acquire);
    if current.is_null() || OWN_CALL.load(Ordering::SeqCst) {
        return None;
    }
    if !old.is_null() {
        // SAFETY: `current` is a saved action in the book; `old` is writable (caller).
        unsafe { *old = *current };
    }
    if !act.is_null() {
        // A new copy, published whole: a handler running now reads the old one or the new.
        // SAFETY: `act` is a valid action (caller).
        let copy = book::leak(unsafe { *act });
        OLD_ACTION.store(copy, Ordering::Release);
    }
    Some(0)
}

/// The `[start, end)` of the mapping holding `addr` if it is private, anonymous and read-only
/// (`r--p`, no name or an `[anon:…]`/`[heap]` name). Async-signal-safe: raw open/read on a
/// stack buffer.
fn moved_read_only_anon(addr: usize) -> Option<(usize, usize)> {
    // open/read/close are async-signal-safe; the buffers are on this stack.
    let maps = sys::RawFile::open(c"/proc/self/maps", libc::O_RDONLY).ok()?;
    let mut buf = [0u8; 4096];
    let mut line = [0u8; 512];
    let (mut len, mut found) = (0usize, None);
    'read: loop {
        let n = maps.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b != b'\n' {
                if len < line.len() {
                    line[len] = b;
                    len += 1;
                }
                continue;
            }
            if let Some(hit) = match_line(&line[..len], addr) {
                found = hit;
                break 'read;
            }
            len = 0;
        }
    }
    found
}

/// For a maps line: `None` if it does not hold `addr`, else whether it qualifies.
fn match_line(line: &[u8], addr: usize) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let hex = |s: &[u8]| {
        s.iter().try_fold(0usize, |v, &c| {
            Some(v * 16 + (c as char).to_digit(16)? as usize)
        })
    };
    let (start, end) = (hex(&range[..dash])?, hex(&range[dash + 1..])?);
    if !(start..end).contains(&addr) {
        return None;
    }
    let perms = fields.next().unwrap_or(&[]);
    let inode = fields.nth(2).unwrap_or(&[]);
    let name = fields.next().unwrap_or(&[]);
    let anonymous =
        inode == b"0" && (name.is_empty() || name.starts_with(b"[anon") || name == b"[heap]");
    Some((perms == b"r--p" && anonymous).then_some((start, end)))
}

impl Mprotect {
    /// Installs the SIGSEGV handler (keeping the program's for faults that are not ours).
    pub fn install() -> Result<Self> {
        let old = book::leak(
            // SAFETY: an all-zero sigaction is a valid value to be overwritten.
            unsafe { std::mem::zeroed::<libc::sigaction>() },
        );
        // SAFETY: installing our handler; the old action is saved for chaining. Every
        // asynchronous signal is blocked while the handler runs: the stop signal, so that no
        // thread stops inside it, and the program's, whose handlers would run nested in ours
        // with SIGSEGV blocked — their first write to a protected page (the loader's, binding a
        // symbol lazily) would then kill the process.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_segv as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigfillset(&mut sa.sa_mask);
            for sig in crate::world::SYNCHRONOUS {
                libc::sigdelset(&mut sa.sa_mask, sig);
            }
            if own_sigaction(&sa, old) != 0 {
                return Err(Error::last_os("sigaction(SIGSEGV)"));
            }
        }
        OLD_ACTION.store(old, Ordering::Release);
        crate::segv_mask::activate();
        FAULTS.store(book::leak(AtomicUsize::new(0)), Ordering::Release);
        let table = book::leak(Table {
            entries: std::ptr::null(),
            count: 0,
        }) as *mut Table;
        TABLE.store(table, Ordering::Release);
        Ok(Mprotect {
            tracked: BookVec::new(),
            table,
        })
    }

    /// Appends the pages of tracked ranges that are writable although we never saw a write
    /// fault: they lost our protection (mapped anew, or the program changed the protection),
    /// so they may hold anything. (Pages we saw written are writable too; callers dedupe.)
    fn writable_untracked(&self, out: &mut BookVec<usize>) -> Result<()> {
        let maps = crate::maps::read().map_err(|e| Error::Os {
            op: "read /proc/self/maps",
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
        for m in maps.as_slice() {
            if m.prot & libc::PROT_WRITE == 0 || m.shared {
                continue;
            }
            for t in self.tracked.as_slice() {
                let (s, e) = (t.range.start.max(m.start), t.range.end.min(m.end));
                for page in (s..e.max(s)).step_by(PAGE) {
                    out.push(page);
                }
            }
        }
        Ok(())
    }

    fn for_each_dirty(&self, clear: bool, mut f: impl FnMut(usize, Range)) {
        for t in self.tracked.as_slice() {
            for w in 0..t.words {
                // SAFETY: `w` < words, inside the bitmap.
                let word = unsafe { &*t.bits.add(w) };
                let bits = if clear {
                    word.swap(0, Ordering::AcqRel)
                } else {
                    word.load(Ordering::Acquire)
                };
                let mut b = bits;
                while b != 0 {
                    let i = b.trailing_zeros() as usize;
                    b &= b - 1;
                    let page = t.range.start + (w * 64 + i) * PAGE;
                    if page < t.range.end {
                        f(page, t.range);
                    }
                }
            }
        }
    }
}

impl Tracker for Mprotect {
    const NAME: &'static str = "mprotect";
    const REWRITES_PROT: bool = true;
    const SEES_ZAPS: bool = false;

    fn arm(&mut self, r: Range) -> Result<()> {
        protect(r.start, r.end, r.prot & !libc::PROT_WRITE);
        Ok(())
    }

    fn disarm(&mut self, r: Range) {
        protect(r.start, r.end, r.prot);
    }

    fn set_ranges(&mut self, ranges: &[Range]) {
        let mut next: BookVec<Tracked> = BookVec::new();
        for &r in ranges {
            let pages = (r.end - r.start) / PAGE;
            let words = pages.div_ceil(64);
            let bits = book::book().alloc_zeroed(words * 8) as *mut AtomicU64;
            next.push(Tracked {
                range: r,
                bits,
                words,
            });
        }
        // Publish the new table (the world is stopped), then free the old bitmaps.
        // SAFETY: `table` is ours, in the book; no handler runs while the world is stopped.
        unsafe {
            (*self.table).entries = next.as_slice().as_ptr();
            (*self.table).count = next.len();
        }
        for t in self.tracked.as_slice() {
            book::book().free(t.bits.cast(), t.words * 8);
        }
        self.tracked = next;
    }

    fn collect(&mut self, out: &mut BookVec<usize>) -> Result<()> {
        let before = out.len();
        self.for_each_dirty(true, |page, _| out.push(page));
        self.writable_untracked(out)?;
        let v = out.as_mut_slice();
        v[before..].sort_unstable();
        let mut w = before;
        for r in before..v.len() {
            if w == before || v[w - 1] != v[r] {
                v[w] = v[r];
                w += 1;
            }
        }
        out.truncate(w);
        // Re-arm them, a run at a time.
        let pages = &out.as_slice()[before..];
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + PAGE {
                j += 1;
            }
            let prot = self
                .tracked
                .as_slice()
                .iter()
                .find(|t| (t.range.start..t.range.end).contains(&pages[i]))
                .map(|t| t.range.prot)
                .unwrap_or(libc::PROT_READ | libc::PROT_WRITE);
            protect(pages[i], pages[j - 1] + PAGE, prot & !libc::PROT_WRITE);
            i = j;
        }
        Ok(())
    }

    fn peek(&mut self, out: &mut BookVec<usize>) -> Result<()> {
        self.for_each_dirty(false, |page, _| out.push(page));
        self.writable_untracked(out)
    }

    fn open_for_write(&mut self, page: usize, prot: i32) {
        protect(page, page + PAGE, prot | libc::PROT_WRITE);
    }

    const SPECULATES: bool = true;

    fn keep_writable(&mut self, pages: &[usize]) {
        // A signal and two mprotect calls saved per predicted write; the next collect finds
        // these pages writable without a recorded fault and reports them.
        // `pages` is sorted; consecutive pages of one range open with one call.
        let tracked = self.tracked.as_slice();
        let mut i = 0;
        while i < pages.len() {
            let k = tracked.partition_point(|t| t.range.end <= pages[i]);
            let Some(t) = tracked.get(k).filter(|t| t.range.start <= pages[i]) else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + PAGE && pages[j] < t.range.end {
                j += 1;
            }
            protect(pages[i], pages[j - 1] + PAGE, t.range.prot);
            i = j;
        }
    }

    fn measure_fault_ns(&mut self) -> Option<f64> {
        // A scratch range joins the handler's table for the measurement: the fault is then
        // exactly the program's (signal, table lookup, bitmap, mprotect, sigreturn).
        const PAGES: usize = 64;
        let start = super::shadow::map_anonymous(PAGES * PAGE).ok()? as usize;
        let end = start + PAGES * PAGE;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let bits = book::book().alloc_zeroed(8) as *mut AtomicU64;
        let mut entries: BookVec<Tracked> = BookVec::new();
        for t in self.tracked.as_slice() {
            entries.push(*t);
        }
        entries.push(Tracked {
            range: Range {
                start,
                end,
                prot: rw,
            },
            bits,
            words: 1,
        });
        entries
            .as_mut_slice()
            .sort_unstable_by_key(|t| t.range.start);
        let publish = |tracked: &[Tracked]| {
            // SAFETY: `table` is ours, in the book; the other threads are stopped, and this
            // thread is not in the handler.
            unsafe {
                (*self.table).entries = tracked.as_ptr();
                (*self.table).count = tracked.len();
            }
        };
        publish(entries.as_slice());
        // Every other page: each fault then splits a mapping, as scattered writes do (writes
        // in address order would only grow the previous page's mapping, which is cheaper).
        let typical = crate::speculate::typical_per_page(crate::speculate::PROBE_ROUNDS, |round| {
            protect(start, end, libc::PROT_READ);
            let t = std::time::Instant::now();
            for p in (start..end).step_by(2 * PAGE) {
                // SAFETY: a page of the scratch mapping; the write faults into our handler,
                // which makes it writable.
                unsafe { (p as *mut u8).write_volatile(round as u8) };
            }
            Some(t.elapsed().as_nanos() as f64 / (PAGES / 2) as f64)
        });
        publish(self.tracked.as_slice());
        book::book().free(bits.cast(), 8);
        // SAFETY: unmapping the scratch mapping, which nothing else knows.
        unsafe { libc::munmap(start as *mut libc::c_void, end - start) };
        let faults = FAULTS.load(Ordering::Acquire);
        if !faults.is_null() {
            // SAFETY: the counter leaked into the book at install time.
            unsafe {
                (*faults).fetch_sub(
                    crate::speculate::PROBE_ROUNDS * PAGES / 2,
                    Ordering::Relaxed,
                )
            };
        }
        typical
    }

    fn faults(&self) -> u64 {
        let faults = FAULTS.load(Ordering::Acquire);
        if faults.is_null() {
            0
        } else {
            // SAFETY: set at install time to a counter in the book, never freed.
            unsafe { (*faults).load(Ordering::Relaxed) as u64 }
        }
    }
}
