//! Reaching a live process's space: `pidfd_open` + `pidfd_getfd` on its `/dev/cow` descriptor.
//!
//! `pidfd_getfd` performs the kernel's ptrace-access check (`PTRACE_MODE_ATTACH_REALCREDS`), so
//! cowctl can act on a process exactly when the caller could ptrace it, with no help from it.

use anyhow::{anyhow, Context, Result};
use std::os::fd::{FromRawFd, OwnedFd};

/// A failure with an errno, so that `exit::code_for` can map it to an exit code.
/// `msg`, then what `errno` says (for messages that do not explain the cause themselves).
fn os_err(errno: i32, msg: String) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::from_raw_os_error(errno)).context(msg)
}

use crate::exit::explained;

/// The one-letter state of `pid` (`R`, `S`, `T`, `Z`, …) from `/proc/PID/stat`.
fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: the state follows the last ')'.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The thread-group id (process id) of task `pid`.
fn tgid_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Refuses what is not a live process, with a message saying what it is.
pub(crate) fn check_is_live_process(pid: i32) -> Result<()> {
    if state_of(pid) == Some('Z') {
        return Err(explained(
            libc::ESRCH,
            format!(
                "process {pid} is a zombie: it has exited (its parent has not reaped it yet) \
                 and its memory is gone"
            ),
        ));
    }
    match tgid_of(pid) {
        Some(tgid) if tgid != pid => Err(explained(
            libc::ESRCH,
            format!("{pid} is a thread of process {tgid}, not a process: use {tgid}"),
        )),
        _ => Ok(()),
    }
}

/// Opens the space of process `pid`.
pub fn attach(pid: i32) -> Result<cow::Cow> {
    check_is_live_process(pid)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(explained(errno, format!("no such process {pid}")));
    }
    // SAFETY: the kernel just gave us this descriptor.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let target_fd = find_cow_fd(pid)?;
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            target_fd,
            0,
        )
    };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let msg = match errno {
            libc::EPERM | libc::EACCES => format!(
                "permission denied: you need ptrace rights over process {pid} \
                 (same user and ptrace_scope allowing it, or CAP_SYS_PTRACE)"
            ),
            libc::ESRCH => format!("process {pid} exited"),
            _ => format!("pidfd_getfd on process {pid}"),
        };
        return Err(os_err(errno, msg));
    }
    // SAFETY: the kernel just gave us this descriptor (a duplicate of the target's).
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    cow::Cow::from_fd(fd).with_context(|| format!("the /dev/cow of process {pid}"))
}

/// The descriptor number under which `pid` has `/dev/cow` open.
fn find_cow_fd(pid: i32) -> Result<i32> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => explained(
            libc::EACCES,
            format!("permission denied: cannot inspect process {pid}'s descriptors (not yours?)"),
        ),
        Some(errno) => explained(errno, format!("no such process {pid}")),
        None => anyhow!(e),
    })?;
    for entry in entries.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if target.as_os_str() == cow::COW_DEVICE_PATH {
                if let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                    return Ok(n);
                }
            }
        }
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let why = match (
        exe.as_deref().and_then(crate::program::uncoverable),
        in_process_backend(pid),
    ) {
        (Some(u), _) => format!(": {} {u}", exe.unwrap_or_default().display()),
        (None, Some(b)) => format!(
            ": it runs on libcow's {b} backend, whose snapshots live inside the process; \
             acting on them from outside needs the kmod backend (cowctl run --backend kmod)"
        ),
        (None, None) => {
            ": it does not use libcow's kmod backend (start it with `cowctl run`)".into()
        }
    };
    Err(explained(
        libc::ENOENT,
        format!("process {pid} has no /dev/cow open{why}"),
    ))
}

/// Keeps `pid` stopped until dropped. A process that was running is stopped with SIGSTOP and
/// continued with SIGCONT; one the user had stopped already stays stopped.
pub struct Stopped {
    pid: i32,
    /// We stopped it, so we continue it.
    resume: bool,
}

impl Stopped {
    /// Sends SIGSTOP and waits (up to 2 s) for the process to reach the stopped state, unless
    /// it is stopped already (job control or a tracer).
    pub fn new(pid: i32) -> Result<Self> {
        if matches!(state_of(pid), Some('T') | Some('t')) {
            return Ok(Stopped { pid, resume: false });
        }
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(os_err(errno, format!("cannot stop process {pid}")));
        }
        let guard = Stopped { pid, resume: true };
        for _ in 0..2000 {
            if matches!(state_of(pid), Some('T') | Some('t')) {
                return Ok(guard);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(anyhow!("process {pid} did not stop within 2 s"))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.resume {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGCONT) };
        }
    }
}

/// The in-process backend `cowctl run --backend` gave process `pid` (`COW_BACKEND` in its
/// environment, else its control thread's answer), if any.
pub(crate) fn in_process_backend(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    env.split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"COW_BACKEND="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        // A program may have written over its environment (redis sets its process title
        // there): its control thread, if any, says.
        .or_else(|| cow::control::request(pid, "backend").ok())
        .filter(|b| b != "kmod")
}

/// A live process's snapshots: its cow.ko space (taken with `pidfd_getfd`), or libcow's
/// in-process backend (uffd, mprotect), which answers on its control socket (`cow::control`).
pub enum Space {
    /// The process's `/dev/cow` descriptor.
    Kmod(cow::Cow),
    /// Process `pid` runs an in-process backend named `backend`.
    InProcess { pid: i32, backend: String },
}

/// Opens process `pid`'s snapshots, whichever backend keeps them.
pub fn open_space(pid: i32) -> Result<Space> {
    check_is_live_process(pid)?;
    if let Some(backend) = in_process_backend(pid) {
        return Ok(Space::InProcess { pid, backend });
    }
    attach(pid).map(Space::Kmod)
}

impl Space {
    /// Sends `req` to an in-process backend's control thread.
    pub fn ask(pid: i32, backend: &str, req: &str) -> Result<String> {
        cow::control::request(pid, req).map_err(|e| {
            let errno = e.errno();
            let msg = match errno {
                libc::ECONNREFUSED | libc::ENOENT => format!(
                    "process {pid} runs libcow's {backend} backend but its control thread does \
                     not answer (it failed to start: see the program's stderr)"
                ),
                libc::EPERM => format!("permission denied: process {pid} is not yours"),
                _ => format!("process {pid} ({backend} backend): {req}"),
            };
            os_err(errno, msg)
        })
    }
}
