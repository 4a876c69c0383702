//! POSIX `fork()` for a covered process: parent and child never see each other's writes.
//!
//! Covered memory is a shared mapping of the parent's space, so a plain fork would share it.
//! Around `fork()` (pthread_atfork):
//! - *prepare* (parent): hold every heap lock and the mapping tables' lock (the allocator and
//!   the covered mappings are quiescent), take a snapshot `S`, open a pipe;
//! - *child*: for each covered range, build a private anonymous copy of its contents at `S`
//!   (read from the space, skipping all-zero pages) and `mremap` it over the shared mapping,
//!   with the mapping's protection;
//!   detach from the space (its descriptor becomes `/dev/null`); close the pipe;
//! - *parent*: release the locks, wait until the child closed the pipe (it no longer needs
//!   `S`), drop `S`.
//!
//! Other parent threads may write covered memory during the fork: their first writes save the
//! pre-images into `S`, so the child still gets the memory as it was at the fork. A child is no
//! longer covered: its memory is ordinary private memory.

use crate::{heap, raw, regions};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

static SNAPSHOT: AtomicU64 = AtomicU64::new(0);
static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// A fork handler, as glibc takes it.
type Handler = Option<unsafe extern "C" fn()>;
/// glibc's `__register_atfork`, what every object's `pthread_atfork` calls.
type RegisterAtfork = unsafe extern "C" fn(Handler, Handler, Handler, *mut libc::c_void) -> i32;

/// Registers the fork handlers (once).
pub(crate) fn install_handlers() {
    register_ours_first();
}

static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static REAL_REGISTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn real_register() -> Option<RegisterAtfork> {
    let f = raw::next(&REAL_REGISTER, c"__register_atfork");
    // SAFETY: glibc's __register_atfork has this signature.
    (f != 0).then(|| unsafe { std::mem::transmute::<usize, RegisterAtfork>(f) })
}

/// Registers libcow_preload's handlers before any other: glibc runs child handlers in the
/// order they were registered and prepare handlers in the reverse order, so the child's
/// memory is private before another library's child handler writes it (jemalloc's re-inits
/// its mutexes, which are covered memory), and the snapshot is taken after every other
/// prepare handler ran.
fn register_ours_first() {
    if REGISTERED.swap(true, Ordering::AcqRel) {
        return;
    }
    if let Some(register) = real_register() {
        // SAFETY: three extern "C" functions that live as long as the process; no DSO handle
        // (never unregistered).
        unsafe {
            register(
                Some(prepare),
                Some(parent),
                Some(child),
                std::ptr::null_mut(),
            )
        };
    }
}

/// `__register_atfork`, interposed: see [`register_ours_first`]. Libraries whose constructors
/// run before ours (a program's own dependencies) register here too.
///
/// # Safety
///
/// As glibc's: the handlers stay callable while registered.
#[no_mangle]
pub unsafe extern "C" fn __register_atfork(
    prepare: Handler,
    parent: Handler,
    child: Handler,
    dso: *mut libc::c_void,
) -> i32 {
    register_ours_first();
    match real_register() {
        // SAFETY: glibc's, with the caller's arguments.
        Some(register) => unsafe { register(prepare, parent, child, dso) },
        None => libc::ENOMEM,
    }
}

/// `fork(2)` (glibc's): the memory glibc writes in the child before any fork handler runs is
/// made private around it (see `regions::swap_out_for_fork`).
#[no_mangle]
pub extern "C" fn fork() -> libc::pid_t {
    static REAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let f = raw::next(&REAL, c"fork");
    if f == 0 {
        // SAFETY: writing the calling thread's errno.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: glibc's fork has this signature.
    let real: extern "C" fn() -> libc::pid_t = unsafe { std::mem::transmute(f) };
    regions::swap_out_for_fork();
    let pid = real();
    if pid != 0 {
        regions::swap_back_after_fork();
    }
    pid
}

extern "C" fn prepare() {
    let Some(cow) = crate::space() else { return };
    crate::hold_all();
    SNAPSHOT.store(cow.snapshot().unwrap_or(0), Ordering::Relaxed);
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        PIPE_READ.store(fds[0], Ordering::Relaxed);
        PIPE_WRITE.store(fds[1], Ordering::Relaxed);
    }
}

extern "C" fn parent() {
    let Some(cow) = crate::space() else { return };
    crate::release_all();
    let (r, w) = (
        PIPE_READ.swap(-1, Ordering::Relaxed),
        PIPE_WRITE.swap(-1, Ordering::Relaxed),
    );
    if w >= 0 {
        // SAFETY: our own pipe ends. read returns 0 once the child closed its write end (after
        // copying, or by exiting or exec'ing).
        unsafe {
            libc::close(w);
            let mut b = 0u8;
            while libc::read(r, (&mut b as *mut u8).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            libc::close(r);
        }
    }
    let id = SNAPSHOT.swap(0, Ordering::Relaxed);
    if id != 0 {
        let _ = cow.drop_snapshot(id);
    }
}

extern "C" fn child() {
    let Some(cow) = crate::space() else { return };
    let id = SNAPSHOT.swap(0, Ordering::Relaxed);
    if id == 0 {
        raw::write_stderr(b"libcow_preload: fork: no snapshot; the child shares covered memory\n");
    } else {
        regions::for_each_covered(|start, end, offset, prot| {
            privatize(
                cow,
                id,
                start,
                end - start,
                |a| offset + (a - start) as u64,
                &[(start, end)],
            );
            if prot != libc::PROT_READ | libc::PROT_WRITE {
                raw::sys_mprotect(start, end - start, prot);
            }
        });
        if let Some((start, end)) = heap::range() {
            let used: [(usize, usize); 8] = {
                let mut v = [(0, 0); 8];
                for (slot, r) in v.iter_mut().zip(heap::used_ranges()) {
                    *slot = r;
                }
                v
            };
            privatize(cow, id, start, end - start, heap::offset_of, &used);
        }
        detach(cow);
    }
    crate::release_all();
    let (r, w) = (
        PIPE_READ.swap(-1, Ordering::Relaxed),
        PIPE_WRITE.swap(-1, Ordering::Relaxed),
    );
    // SAFETY: closing our copies of the pipe; the parent sees EOF.
    unsafe {
        libc::close(r);
        libc::close(w);
    }
}

/// Replaces `[start, start + len)` with private memory holding its contents at snapshot `id`;
/// only the `used` sub-ranges are read (the rest is known to be zero).
fn privatize(
    cow: &cow::Cow,
    id: u64,
    start: usize,
    len: usize,
    offset_of: impl Fn(usize) -> u64,
    used: &[(usize, usize)],
) {
    const CHUNK: usize = 1 << 20;
    // SAFETY: a fresh private mapping; the reads fill it; mremap then moves its pages over the
    // shared mapping at `start` in one step (the old mapping is unmapped by the kernel). Only
    // this thread exists in the child.
    unsafe {
        // The system calls themselves: the interposed `mmap` would cover these.
        let anonymous = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let copy = raw::sys_mmap(0, len, rw, anonymous, -1, 0);
        let buf = raw::sys_mmap(0, CHUNK, rw, anonymous, -1, 0);
        if copy < 0 || buf < 0 {
            raw::write_stderr(b"libcow_preload: fork: no memory for the child's copy\n");
            return;
        }
        let (copy, buf) = (copy as *mut u8, buf as *mut u8);
        let page = raw::page_size();
        for &(a, b) in used.iter().filter(|(a, b)| a < b) {
            let mut pos = a;
            while pos < b {
                let n = CHUNK.min(b - pos);
                let chunk = std::slice::from_raw_parts_mut(buf.cast::<u8>(), n);
                if cow.read(id, offset_of(pos), chunk).is_err() {
                    raw::write_stderr(b"libcow_preload: fork: cannot read the snapshot\n");
                }
                for (i, p) in chunk.chunks(page).enumerate() {
                    if p.iter().any(|&x| x != 0) {
                        let dst = copy.cast::<u8>().add(pos - start + i * page);
                        std::ptr::copy_nonoverlapping(p.as_ptr(), dst, p.len());
                    }
                }
                pos += n;
            }
        }
        raw::sys_munmap(buf as usize, CHUNK);
        let moved = raw::sys_mremap(
            copy as usize,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start,
        );
        if moved < 0 {
            raw::write_stderr(b"libcow_preload: fork: mremap over covered memory failed\n");
        }
    }
}

/// Points the child's space descriptor at /dev/null: the child must not drive the parent's
/// space (ioctls on it now fail with ENOTTY). A fork of the child is then an ordinary fork:
/// its memory is private already (a bash subshell of a subshell).
fn detach(cow: &cow::Cow) {
    crate::mark_detached();
    regions::deactivate();
    // SAFETY: replacing our own descriptor number with /dev/null — with the system call
    // itself: the preload's `dup3` keeps libcow's descriptors from the program (the number
    // stays libcow's, a placeholder no `open` of the child's can take).
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            let fd = cow.as_fd().as_raw_fd();
            libc::syscall(libc::SYS_dup3, null, fd, libc::O_CLOEXEC);
            libc::close(null);
        }
    }
}
