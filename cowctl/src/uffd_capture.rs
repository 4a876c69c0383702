//! The `uffd` way of `cowctl record`: which pages of a traced program changed since the last
//! checkpoint, from userfaultfd write-protection (`WP_ASYNC`) and `PAGEMAP_SCAN`, on a
//! mainline kernel (≥ 6.7) with no module.
//!
//! A userfaultfd acts on the address space of the process that created it, whoever holds it.
//! So the program is made to create one (a system call injected into a stopped thread), the
//! recorder takes it (`pidfd_getfd`) and closes the program's copy: the program's descriptor
//! table ends as it was. From then on the recorder registers the program's writable private
//! mappings and write-protects them; a write is resolved by the kernel itself (no fault
//! reaches anyone, and `read(2)` into a protected buffer works) and clears the page's
//! protection; at each checkpoint one `PAGEMAP_SCAN` per mapping reports the pages written
//! since and protects them again, in one walk. Only those pages are read — not the whole
//! memory, as the `scan` way does.

use crate::record::{present_ranges, Mapping};
use crate::tracer::Tracee;
use anyhow::{bail, Context, Result};
use cow::backend::shadow::Range;
use cow::backend::uffd::Uffd;
use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use store::PAGE;

/// `UFFD_USER_MODE_ONLY`: no privilege needed (the program's own faults are all we track).
const UFFD_USER_MODE_ONLY: u64 = 1;

/// Write tracking of one traced process (one address space: after an exec, make a new one).
pub struct UffdCapture {
    pid: i32,
    uffd: Uffd,
}

impl UffdCapture {
    /// Gives the recorder a userfaultfd of `tracee`'s address space (every thread stopped).
    pub fn new(tracee: &mut Tracee) -> Result<Self> {
        let pid = tracee.pid;
        let tid = tracee
            .injectable_thread()?
            .context("no thread of the program can run a system call now")?;
        let insn = crate::inject::find_syscall_insn(pid)?;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY;
        let fd = crate::inject::syscall(pid, tid, insn, libc::SYS_userfaultfd, &[flags])?;
        if fd < 0 {
            let e = std::io::Error::from_raw_os_error(-fd as i32);
            bail!("the program's userfaultfd() failed: {e} (use --backend scan)");
        }
        let taken = take_fd(pid, fd as i32);
        // Whatever happened, the program's descriptor table ends as it was.
        let closed = crate::inject::syscall(pid, tid, insn, libc::SYS_close, &[fd as u64]);
        let uffd = taken?;
        closed?;
        let uffd = Uffd::for_process(uffd, pid).map_err(|e| {
            anyhow::anyhow!("{e} (this kernel lacks uffd WP_ASYNC: use --backend scan)")
        })?;
        Ok(UffdCapture { pid, uffd })
    }

    /// The runs of `m` to capture at this checkpoint: written since the last one, or, in
    /// memory new to us, every page present and every page of `recorded` there (a mapping
    /// that replaced them reads as zero where it has no page). None when the kernel refuses
    /// to track `m` (the caller reads it whole).
    pub fn changed(
        &mut self,
        m: &Mapping,
        recorded: &BTreeMap<u64, u64>,
    ) -> Result<Option<Vec<(u64, u64)>>> {
        let writable = m.perms.as_bytes().get(1) == Some(&b'w');
        let range = Range {
            start: m.start as usize,
            end: m.end as usize,
            prot: if writable {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            },
        };
        let mut runs: Vec<(u64, u64)> = Vec::new();
        if writable {
            let mut fresh = Vec::new();
            self.uffd
                .unregistered(range, |s, e| fresh.push((s as u64, e as u64)))?;
            for (s, e) in fresh {
                let r = Range {
                    start: s as usize,
                    end: e as usize,
                    ..range
                };
                // Before registering: its markers would look like swapped-out pages.
                let present = present_ranges(self.pid, s, e);
                if let Err(err) = self.uffd.register(r) {
                    if matches!(err.errno(), libc::EINVAL | libc::EPERM) {
                        return Ok(None);
                    }
                    return Err(err).context(format!("registering {s:#x}-{e:#x}"));
                }
                for &a in recorded.range(s..e).map(|(a, _)| a) {
                    if !present.iter().any(|&(ps, pe)| a >= ps && a < pe) {
                        runs.push((a, a + PAGE as u64));
                    }
                }
                runs.extend(present);
            }
        }
        // Registered memory only (memory made read-only since keeps its written pages).
        self.uffd
            .take_written(range, |s, e| runs.push((s as u64, e as u64)))?;
        runs.sort_unstable();
        Ok(Some(runs))
    }
}

/// Takes descriptor `fd` of process `pid` (`pidfd_getfd`: we trace it, so we may).
fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: a descriptor the kernel just gave us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd returns a new descriptor (close-on-exec) or -1.
    let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if ours < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_getfd");
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(ours as i32) })
}
