//! Thin wrappers over the raw system calls libcow needs, each returning `Result`.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd};

/// `ioctl(fd, cmd, arg)` with a pointer to a `#[repr(C)]` argument struct.
pub(crate) fn ioctl_ptr<T>(
    fd: BorrowedFd<'_>,
    cmd: u32,
    arg: &mut T,
    op: &'static str,
) -> Result<i32> {
    // SAFETY: `arg` is a live, exclusively borrowed `T` for the duration of the call, and the
    // commands libcow sends read and write at most `size_of::<T>()` bytes through it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, arg as *mut T) };
    if rc < 0 {
        Err(Error::last_os(op))
    } else {
        Ok(rc)
    }
}

extern "C" {
    static environ: *const *const std::ffi::c_char;
}

/// The environment variable `name`, read from `environ` itself rather than through `getenv`:
/// a program may define its own `getenv` (bash does, answering from its shell variables), and
/// libcow_preload's constructor runs before such a program has set itself up.
pub(crate) fn env_var(name: &str) -> Option<String> {
    // SAFETY: `environ` is the process's NULL-terminated array of NUL-terminated strings; it is
    // read without modification, from the constructor or at exit, when nothing rewrites it
    // concurrently.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return None;
        }
        while !(*p).is_null() {
            let entry = std::ffi::CStr::from_ptr(*p).to_bytes();
            if let Some(value) = entry
                .strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                return Some(String::from_utf8_lossy(value).into_owned());
            }
            p = p.add(1);
        }
    }
    None
}

/// `CLOCK_MONOTONIC` in nanoseconds (no allocation; usable in libcow's critical sections).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes `bytes` to descriptor 2 with the raw system call (no allocation, no interposed
/// `write`: usable in a signal handler).
pub(crate) fn write_stderr(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to descriptor 2; errors are ignored (nowhere to report).
    unsafe { libc::syscall(libc::SYS_write, 2, bytes.as_ptr(), bytes.len()) };
}

/// `process_vm_readv` of `buf.len()` bytes at `addr` of process `pid` (this one included) into
/// `buf`, in one iovec: the bytes read, or -1 with errno set. The kernel checks the remote
/// range, so an unmapped address is an error (or a short read), never a fault.
pub fn read_process(pid: i32, addr: usize, buf: &mut [u8]) -> isize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` is `buf`, ours and writable for its length; the remote iovec is only
    // read by the kernel, which checks it against `pid`'s mappings.
    unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) }
}

/// Sets this thread's signal mask with the raw `rt_sigprocmask` system call (`how`:
/// `SIG_BLOCK`, `SIG_UNBLOCK` or `SIG_SETMASK`), returning the previous mask. Raw because
/// libcow_preload interposes `pthread_sigmask` and `sigprocmask` for the program (to keep
/// libcow's stop signal deliverable), and libcow's own masks must not be edited that way.
pub(crate) fn sigprocmask_raw(how: i32, set: &libc::sigset_t) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is an empty set.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are live locals; 8 is the kernel's signal set size on x86-64.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, how, set, &mut old, 8) };
    old
}

/// A signal set holding `signals`.
pub(crate) fn sigset_of(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: building a set in a local: zeroed is empty, then sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// A file descriptor opened with the raw call and closed on drop; no allocation, so usable
/// while other threads are stopped. Kept from the program's `close` while open
/// ([`crate::fds`]).
pub(crate) struct RawFile(i32);

impl RawFile {
    /// `open(path, flags | O_CLOEXEC)`.
    pub(crate) fn open(path: &std::ffi::CStr, flags: i32) -> std::io::Result<Self> {
        // SAFETY: open with a NUL-terminated path; the descriptor is owned by the result.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            crate::fds::reserve(fd);
            Ok(Self(fd))
        }
    }

    /// The descriptor, for calls such as `getdents64`.
    pub(crate) fn fd(&self) -> i32 {
        self.0
    }

    /// One `read` into `buf` (retried on `EINTR`): the bytes read, 0 at the end.
    pub(crate) fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            // SAFETY: reading into a buffer we hold exclusively, of its own length.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for RawFile {
    fn drop(&mut self) {
        crate::fds::release(self.0);
        // SAFETY: closing the descriptor this value owns, once.
        unsafe { libc::close(self.0) };
    }
}

/// A file under `/proc/self` opened once per process and kept: every snapshot lists
/// `/proc/self/task` and queries `/proc/self/maps`, and opening them (a path walk through
/// procfs) cost ≈ 3.5 µs each time, a tenth of a uffd snapshot of redis. The descriptor names
/// the process that opened it, so a forked child opens its own (the pid is checked at each use:
/// one `getpid`); exec closes it (`O_CLOEXEC`). Never closed otherwise; reserved from the
/// program's `close` ([`crate::fds`]).
pub(crate) struct ProcSelfFile {
    path: &'static std::ffi::CStr,
    flags: i32,
    /// Its two words in the book ([`crate::book::Book::word`]): `pid << 32 | fd` of the last
    /// open (0 before the first), and whether someone uses the file position
    /// ([`ProcSelfFile::with_position`]). Not statics: libcow's statics are covered memory,
    /// which a restore rewinds (the descriptor would be forgotten, and leak) and mprotect
    /// write-protects.
    words: usize,
}

impl ProcSelfFile {
    /// `path` under `/proc/self`, opened with `flags` on first use; its state in book words
    /// `words` and `words + 1`.
    pub(crate) const fn new(path: &'static std::ffi::CStr, flags: i32, words: usize) -> Self {
        Self { path, flags, words }
    }

    fn opened(&self) -> &'static std::sync::atomic::AtomicU64 {
        crate::book::book().word(self.words)
    }

    fn busy(&self) -> &'static std::sync::atomic::AtomicU64 {
        crate::book::book().word(self.words + 1)
    }

    /// The descriptor for this process, opened now if this process has none yet.
    pub(crate) fn fd(&self) -> std::io::Result<i32> {
        use std::sync::atomic::Ordering;
        let opened = self.opened();
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        let seen = opened.load(Ordering::Acquire);
        if seen != 0 && (seen >> 32) as u32 == pid {
            return Ok(seen as u32 as i32);
        }
        let file = RawFile::open(self.path, self.flags)?;
        let fd = file.0;
        let mine = (pid as u64) << 32 | fd as u32 as u64;
        match opened.compare_exchange(seen, mine, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                std::mem::forget(file);
                if seen != 0 {
                    // The parent's, inherited across fork: this process's copy is closed.
                    let old = seen as u32 as i32;
                    crate::fds::release(old);
                    // SAFETY: closing our copy of a descriptor nothing else of ours uses.
                    unsafe { libc::close(old) };
                }
                Ok(fd)
            }
            // Another thread opened it meanwhile: use that one (ours closes on drop).
            Err(now) => Ok(now as u32 as i32),
        }
    }

    /// `f` with a descriptor whose file position no one else moves meanwhile: the kept one,
    /// or, should another caller be using it (never expected; it may have been stopped while
    /// at it), one opened for this call — waiting could deadlock.
    pub(crate) fn with_position<R>(
        &self,
        f: impl FnOnce(i32) -> std::io::Result<R>,
    ) -> std::io::Result<R> {
        use std::sync::atomic::Ordering;
        let busy = self.busy();
        if busy.swap(1, Ordering::Acquire) != 0 {
            let own = RawFile::open(self.path, self.flags)?;
            return f(own.0);
        }
        let r = self.fd().and_then(f);
        busy.store(0, Ordering::Release);
        r
    }
}

/// `v` in decimal at the end of `buf`, returning the digits (no allocation: usable inside
/// `malloc` and while other threads are stopped).
pub fn format_decimal(mut v: u64, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// `prefix`, `n` in decimal, `suffix` and a NUL, built in `buf` without allocating
/// (`/proc/self/task/TID/stat` while other threads are stopped).
pub(crate) fn path_with_number<'a>(
    buf: &'a mut [u8; 64],
    prefix: &[u8],
    n: u64,
    suffix: &[u8],
) -> &'a std::ffi::CStr {
    let mut digits = [0u8; 24];
    let digits = format_decimal(n, &mut digits);
    let mut w = 0;
    for &c in prefix.iter().chain(digits).chain(suffix) {
        buf[w] = c;
        w += 1;
    }
    buf[w] = 0;
    std::ffi::CStr::from_bytes_until_nul(&buf[..=w]).expect("a NUL ends the path")
}

/// Runs the program's own handler `action` for a synchronous `sig` that one of libcow's
/// handlers received and is not its own, as the kernel would have: with the mask at the fault
/// plus the action's, plus `sig` unless `SA_NODEFER` (a handler that `longjmp`s out keeps the
/// mask it runs with; returning restores the fault's through `sigreturn`), and with the
/// arguments its `SA_SIGINFO` flag declares (SIGSEGV stays deliverable in it: see
/// [`crate::segv_mask`]). False if the action is the default or ignore, or if the program had
/// SIGSEGV blocked: the caller restores the default, and the faulting instruction runs again.
///
/// # Safety
///
/// `info` and `ctx` are the arguments the kernel passed to the handler for `sig`; `action`'s
/// handler is a function of the kind its flags say.
pub(crate) unsafe fn run_program_handler(
    action: &libc::sigaction,
    sig: i32,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) -> bool {
    let handler = action.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return false;
    }
    // SAFETY: the kernel's ucontext for this signal (caller).
    if sig == libc::SIGSEGV && unsafe { crate::segv_mask::blocked_by_program(ctx) } {
        return false; // the kernel would not have run it: blocked, the fault ends the process
    }
    // SAFETY: the kernel's ucontext for this signal (caller).
    let mut mask = unsafe { (*(ctx as *const libc::ucontext_t)).uc_sigmask };
    for s in 1..=64 {
        // SAFETY: sigismember/sigaddset on sets we own.
        unsafe {
            if libc::sigismember(&action.sa_mask, s) == 1 {
                libc::sigaddset(&mut mask, s);
            }
        }
    }
    if action.sa_flags & libc::SA_NODEFER == 0 {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut mask, sig) };
    }
    crate::segv_mask::to_kernel(&mut mask);
    sigprocmask_raw(libc::SIG_SETMASK, &mask);
    // SAFETY: the program's handler, of the kind its flags declare (caller), called with the
    // kernel's arguments.
    unsafe {
        if action.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(i32) = std::mem::transmute(handler);
            f(sig);
        }
    }
    true
}
