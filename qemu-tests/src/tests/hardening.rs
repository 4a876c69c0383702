//! cow.ko against a hostile caller: mappings the driver never saw, user-sized allocations,
//! privilege, read-only descriptors, allocation failures injected in the middle of an ioctl,
//! a memory cgroup, a structure-aware ioctl fuzzer and a race stress. The debug kernel
//! (KASAN, lockdep, DEBUG_VM) turns any memory or locking error into a failed test.

use crate::Test;
use anyhow::{bail, ensure, Context, Result};
use cow::abi;
use cow::Cow;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "hard::merged_mapping_below_space_sigbus",
            run: merged_mapping_below_space_sigbus,
        },
        Test {
            name: "hard::mapping_past_space_end_sigbus",
            run: mapping_past_space_end_sigbus,
        },
        Test {
            name: "hard::mremap_cannot_grow",
            run: mremap_cannot_grow,
        },
        Test {
            name: "hard::readonly_fd_cannot_change_space",
            run: readonly_fd_cannot_change_space,
        },
        Test {
            name: "hard::raising_limits_needs_cap_sys_resource",
            run: raising_limits_needs_cap_sys_resource,
        },
        Test {
            name: "hard::zero_length_read_of_missing_id",
            run: zero_length_read_of_missing_id,
        },
        Test {
            name: "hard::maximal_hint_and_list",
            run: maximal_hint_and_list,
        },
        Test {
            name: "hard::madvise_dontneed_keeps_contents",
            run: madvise_dontneed_keeps_contents,
        },
        Test {
            name: "hard::failing_allocations_leave_space_exact",
            run: failing_allocations_leave_space_exact,
        },
        Test {
            name: "hard::memcg_limits_a_space",
            run: memcg_limits_a_space,
        },
        Test {
            name: "hard::ioctl_fuzz_threads",
            run: ioctl_fuzz_threads,
        },
        Test {
            name: "hard::race_stress",
            run: race_stress,
        },
    ]
}

/// The kernel report a test of this file provokes on purpose: (first line, last line).
pub fn expected_kmsg_block(test: &str) -> Option<(&'static str, &'static str)> {
    match test {
        // A memory cgroup at its limit kills the space's process and says so, with a stack.
        "hard::memcg_limits_a_space" => Some(("invoked oom-killer", "Killed process")),
        _ => None,
    }
}

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Exited(i32),
    Signaled(i32),
}

/// Runs `body` in a forked child and reports how the child ended (exit 0 = `Ok`, 1 = `Err`,
/// with the error on stderr).
fn in_child(body: impl FnOnce() -> Result<()>) -> Result<Ended> {
    // SAFETY: the child only runs `body` and leaves with _exit; the test runner runs each test
    // in its own process, so no other thread of ours holds a lock the child could need.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match body() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("child: {e:#}");
                1
            }
        };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(if libc::WIFSIGNALED(status) {
        Ended::Signaled(libc::WTERMSIG(status))
    } else {
        Ended::Exited(libc::WEXITSTATUS(status))
    })
}

/// Issues `cmd` with `arg` on `fd`; the errno, 0 on success.
fn ioctl_errno(fd: i32, cmd: u32, arg: usize) -> i32 {
    // SAFETY: the module validates every pointer inside `arg`; callers pass buffers they own,
    // or addresses chosen to be invalid (which must give EFAULT).
    let rc = unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg) };
    if rc < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn open_dev(write: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open("/dev/cow")
        .context("open /dev/cow")
}

/// `mmap(addr, len, RW, MAP_SHARED [| MAP_FIXED], fd, offset)`; the address or the errno.
fn map_shared(fd: i32, addr: usize, len: usize, offset: u64) -> std::result::Result<usize, i32> {
    let fixed = if addr != 0 { libc::MAP_FIXED } else { 0 };
    // SAFETY: a new shared mapping of /dev/cow; with MAP_FIXED the callers pass an address
    // range they reserved themselves (nothing of Rust's lives there).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | fixed,
            fd,
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(p as usize)
    }
}

/// The file offset /proc/self/maps shows for the mapping that starts at `addr`.
fn maps_offset(addr: usize) -> Result<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().context("range")?;
        let start = usize::from_str_radix(range.split('-').next().context("start")?, 16)?;
        if start == addr {
            let _perms = f.next();
            return Ok(u64::from_str_radix(f.next().context("offset")?, 16)?);
        }
    }
    bail!("no mapping at {addr:#x}")
}

/// Reserves `len` bytes of address space (PROT_NONE) and returns its start.
fn reserve(len: usize) -> Result<usize> {
    // SAFETY: a fresh anonymous reservation, unmapped or replaced by the callers.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    ensure!(p != libc::MAP_FAILED, "reserve {len}");
    Ok(p as usize)
}

const PAGE: usize = 4096;

/// A new mapping placed just below a cow VMA, at the file offset that continues it downwards:
/// the core used to merge it into that VMA without calling the driver's `mmap`, and the first
/// fault computed an offset below the space's (a Rust overflow panic in the fault path). Now the
/// driver sees it: it is refused (EINVAL), mapped as an ordinary region of the space, or, were
/// it merged, gets SIGBUS. Never an oops (the runner fails a test on any kernel report).
fn merged_mapping_below_space_sigbus() -> Result<()> {
    let f = open_dev(true)?;
    let fd = f.as_raw_fd();
    let len = 4 * PAGE;
    let base = reserve(2 * len)?;
    map_shared(fd, base + len, len, 0).map_err(|e| anyhow::anyhow!("mmap: errno {e}"))?;
    let off = maps_offset(base + len)?;
    ensure!(off >= (len as u64), "space offset {off:#x}");
    let below = off - len as u64;
    let ended = in_child(|| {
        match map_shared(fd, base, len, below) {
            // The driver saw it and refused the offset.
            Err(libc::EINVAL) => Ok(()),
            Err(e) => bail!("mmap below: errno {e}, expected EINVAL"),
            Ok(p) => {
                // Not merged: the driver placed it in the space's own offsets.
                let got = maps_offset(p)?;
                ensure!(
                    got != below,
                    "mapped at {below:#x} without the driver's offset"
                );
                // SAFETY: writing the page we just mapped; SIGBUS ends this child.
                unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
                Ok(())
            }
        }
    })?;
    ensure!(
        ended == Ended::Exited(0) || ended == Ended::Signaled(libc::SIGBUS),
        "child {ended:?}"
    );
    Ok(())
}

/// A mapping that continues the last pages of a space upwards, into the next space's offsets.
fn mapping_past_space_end_sigbus() -> Result<()> {
    let f = open_dev(true)?;
    let fd = f.as_raw_fd();
    let len = 4 * PAGE;
    let last = ((1u64 << abi::COW_SPACE_PAGES_SHIFT) - 4) * PAGE as u64;
    let base = reserve(2 * len)?;
    map_shared(fd, base, len, last).map_err(|e| anyhow::anyhow!("mmap at the end: errno {e}"))?;
    // The region's own pages work.
    // SAFETY: writing the region just mapped.
    unsafe { std::ptr::write_volatile((base + len - 1) as *mut u8, 7) };
    let above = maps_offset(base)? + len as u64;
    let ended = in_child(|| match map_shared(fd, base + len, len, above) {
        Err(libc::EINVAL) => Ok(()),
        Err(e) => bail!("mmap above: errno {e}, expected EINVAL"),
        Ok(p) => {
            // SAFETY: as above; SIGBUS ends this child.
            unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
            bail!("a write past the space's offsets succeeded")
        }
    })?;
    ensure!(
        ended == Ended::Exited(0) || ended == Ended::Signaled(libc::SIGBUS),
        "child {ended:?}"
    );
    Ok(())
}

fn mremap_cannot_grow() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(4 * PAGE)?;
    // SAFETY: writing our own region.
    unsafe { std::ptr::write_bytes(r.addr, 0x5a, r.len) };
    // SAFETY: mremap of our own region; growth must fail and leave it as it was.
    let grown = unsafe { libc::mremap(r.addr.cast(), r.len, 8 * PAGE, libc::MREMAP_MAYMOVE) };
    ensure!(grown == libc::MAP_FAILED, "mremap grew a cow mapping");
    let errno = std::io::Error::last_os_error().raw_os_error();
    ensure!(
        errno == Some(libc::EFAULT),
        "mremap grow: {errno:?}, expected EFAULT"
    );
    // Moving it keeps the contents and the snapshots working.
    let id = cow.snapshot()?;
    let dst = reserve(4 * PAGE)?;
    // SAFETY: moving our region onto our own reservation.
    let moved = unsafe {
        libc::mremap(
            r.addr.cast(),
            r.len,
            r.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst as *mut libc::c_void,
        )
    };
    ensure!(moved as usize == dst, "mremap move failed");
    // SAFETY: the region now lives at `dst`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, r.len) };
    ensure!(
        bytes.iter().all(|&b| b == 0x5a),
        "contents lost by the move"
    );
    bytes.fill(1);
    cow.restore(id)?;
    ensure!(bytes.iter().all(|&b| b == 0x5a), "restore after a move");
    Ok(())
}

fn readonly_fd_cannot_change_space() -> Result<()> {
    let rw = open_dev(true)?;
    let ro = open_dev(false)?;
    let mut id = abi::CowId {
        size: 16,
        ..Default::default()
    };
    for (what, cmd) in [
        ("snapshot", abi::COW_IOC_SNAPSHOT),
        ("restore", abi::COW_IOC_RESTORE),
        ("drop", abi::COW_IOC_DROP),
    ] {
        id.id = 1;
        let e = ioctl_errno(ro.as_raw_fd(), cmd, &mut id as *mut _ as usize);
        ensure!(
            e == libc::EBADF,
            "{what} on a read-only fd: errno {e}, expected EBADF"
        );
    }
    let mut hint = abi::CowHint {
        size: 24,
        ..Default::default()
    };
    let e = ioctl_errno(
        ro.as_raw_fd(),
        abi::COW_IOC_HINT,
        &mut hint as *mut _ as usize,
    );
    ensure!(e == libc::EBADF, "hint: errno {e}");
    let mut lim = abi::CowLimits {
        size: 24,
        ..Default::default()
    };
    let e = ioctl_errno(
        ro.as_raw_fd(),
        abi::COW_IOC_LIMITS,
        &mut lim as *mut _ as usize,
    );
    ensure!(e == 0, "reading limits on a read-only fd: errno {e}");
    lim.flags = abi::COW_LIMITS_SET;
    lim.max_snapshots = 1;
    let e = ioctl_errno(
        ro.as_raw_fd(),
        abi::COW_IOC_LIMITS,
        &mut lim as *mut _ as usize,
    );
    ensure!(
        e == libc::EBADF,
        "setting limits on a read-only fd: errno {e}"
    );
    let mut stats = abi::CowStats {
        size: 128,
        ..Default::default()
    };
    let e = ioctl_errno(
        ro.as_raw_fd(),
        abi::COW_IOC_STATS,
        &mut stats as *mut _ as usize,
    );
    ensure!(e == 0, "stats on a read-only fd: errno {e}");
    // The same commands work on a read-write descriptor.
    id.id = 0;
    let e = ioctl_errno(
        rw.as_raw_fd(),
        abi::COW_IOC_SNAPSHOT,
        &mut id as *mut _ as usize,
    );
    ensure!(
        e == 0 && id.id == 1,
        "snapshot on a read-write fd: errno {e}"
    );
    Ok(())
}

fn raising_limits_needs_cap_sys_resource() -> Result<()> {
    let cow = Cow::open()?;
    let lim = cow.limits()?;
    let ended = in_child(|| {
        // Become nobody: a non-root uid has no capabilities.
        // SAFETY: plain system calls in the child.
        ensure!(unsafe { libc::setgid(65534) } == 0 && unsafe { libc::setuid(65534) } == 0);
        // Lowering is anyone's right; raising past the module parameters is not.
        cow.set_limits(lim.max_snapshots / 2, lim.max_bytes / 2, lim.policy)?;
        let e = cow
            .set_limits(lim.max_snapshots + 1, lim.max_bytes, lim.policy)
            .map_err(|e| e.errno());
        ensure!(e == Err(libc::EPERM), "raising max_snapshots: {e:?}");
        let e = cow
            .set_limits(lim.max_snapshots, lim.max_bytes + 1, lim.policy)
            .map_err(|e| e.errno());
        ensure!(e == Err(libc::EPERM), "raising max_bytes: {e:?}");
        // Back up to the caps is allowed.
        cow.set_limits(lim.max_snapshots, lim.max_bytes, lim.policy)?;
        Ok(())
    })?;
    ensure!(ended == Ended::Exited(0), "unprivileged child: {ended:?}");
    // Root (CAP_SYS_RESOURCE) may raise them.
    cow.set_limits(lim.max_snapshots * 2, lim.max_bytes * 2, lim.policy)?;
    Ok(())
}

fn zero_length_read_of_missing_id() -> Result<()> {
    let cow = Cow::open()?;
    let _r = cow.map_region(PAGE)?;
    let mut arg = abi::CowRead {
        size: 40,
        id: 42,
        ..Default::default()
    };
    let fd = cow.as_fd().as_raw_fd();
    let e = ioctl_errno(fd, abi::COW_IOC_READ, &mut arg as *mut _ as usize);
    ensure!(
        e == libc::ENOENT,
        "zero-length read of a missing id: errno {e}"
    );
    arg.id = cow.snapshot()?;
    let e = ioctl_errno(fd, abi::COW_IOC_READ, &mut arg as *mut _ as usize);
    ensure!(e == 0, "zero-length read of a snapshot: errno {e}");
    Ok(())
}

/// The largest documented hint (2^20 pages: an 8 MiB list) and a list of 100 000 snapshots:
/// user-sized kernel buffers that must not trip the page allocator's warning.
fn maximal_hint_and_list() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(16 * PAGE)?;
    let pages: Vec<u64> = (0..abi::COW_MAX_HINT_PAGES).collect();
    cow.hint(&pages)?;
    // SAFETY: writing our own region.
    unsafe { std::ptr::write_bytes(r.addr, 1, r.len) };
    cow.snapshot_quiesced()?;
    cow.hint(&[])?;
    let mut too_many = abi::CowHint {
        size: 24,
        count: abi::COW_MAX_HINT_PAGES + 1,
        pages: pages.as_ptr() as u64,
        ..Default::default()
    };
    let e = ioctl_errno(
        cow.as_fd().as_raw_fd(),
        abi::COW_IOC_HINT,
        &mut too_many as *mut _ as usize,
    );
    ensure!(e == libc::EINVAL, "hint past the maximum: errno {e}");
    // Root raises the window, then fills it.
    let n = 100_000u32;
    cow.set_limits(n, 1 << 30, abi::COW_POLICY_FAIL)?;
    for _ in 1..n {
        cow.snapshot()?;
    }
    let e = cow.snapshot().map_err(|e| e.errno());
    ensure!(e == Err(libc::ENOMEM), "snapshot past a full window: {e:?}");
    let list = cow.list()?;
    ensure!(list.len() == n as usize, "listed {}", list.len());
    let dirty = cow.dirty_since(list[0].id)?;
    ensure!(dirty.is_empty(), "dirty {}", dirty.len());
    Ok(())
}

/// Covered memory is a shared mapping of the device: MADV_DONTNEED drops PTEs, and the next
/// access maps the same page again, as for any shared file mapping (it does not zero).
fn madvise_dontneed_keeps_contents() -> Result<()> {
    let cow = Cow::open()?;
    let r = cow.map_region(8 * PAGE)?;
    // SAFETY: writing our own region.
    unsafe { std::ptr::write_bytes(r.addr, 3, r.len) };
    let id = cow.snapshot()?;
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(r.addr, 4, r.len) };
    // SAFETY: madvise on our own region.
    let rc = unsafe { libc::madvise(r.addr.cast(), r.len, libc::MADV_DONTNEED) };
    ensure!(rc == 0, "madvise: {}", std::io::Error::last_os_error());
    // SAFETY: reading our own region.
    let bytes = unsafe { std::slice::from_raw_parts(r.addr, r.len) };
    ensure!(
        bytes.iter().all(|&b| b == 4),
        "MADV_DONTNEED changed the contents"
    );
    cow.restore(id)?;
    ensure!(bytes.iter().all(|&b| b == 3), "restore after MADV_DONTNEED");
    Ok(())
}

/// Mounts a pseudo file system (`debugfs`, `cgroup2`) of type and source `fstype` at `target`.
fn mount_fs(fstype: &std::ffi::CStr, target: &std::ffi::CStr) -> Result<()> {
    // SAFETY: mount with NUL-terminated strings that outlive the call and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    ensure!(
        rc == 0,
        "mount {fstype:?} on {target:?}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The debugfs knobs that let `fail-nth` fail sleeping allocations of any order.
fn setup_fault_injection() -> Result<()> {
    let dbg = std::path::Path::new("/sys/kernel/debug");
    if !dbg.join("failslab").exists() {
        mount_fs(c"debugfs", c"/sys/kernel/debug")?;
    }
    for (file, value) in [
        ("failslab/ignore-gfp-wait", "N"),
        ("failslab/verbose", "0"),
        ("fail_page_alloc/ignore-gfp-wait", "N"),
        ("fail_page_alloc/ignore-gfp-highmem", "N"),
        ("fail_page_alloc/min-order", "0"),
        ("fail_page_alloc/verbose", "0"),
    ] {
        std::fs::write(dbg.join(file), value).with_context(|| format!("{file} (debug kernel?)"))?;
    }
    Ok(())
}

/// Fails the n-th allocation of the next system calls of this thread (`fail-nth`).
struct FailNth(std::fs::File);

impl FailNth {
    fn open() -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/thread-self/fail-nth")
            .context("/proc/thread-self/fail-nth (CONFIG_FAULT_INJECTION)")?;
        Ok(FailNth(f))
    }

    fn arm(&self, n: u32) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_at(n.to_string().as_bytes(), 0)?;
        Ok(())
    }

    /// Whether the armed failure happened (and disarms it).
    fn fired(&self) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 16];
        let n = self.0.read_at(&mut b, 0)?;
        let left: u32 = std::str::from_utf8(&b[..n])?.trim().parse()?;
        self.0.write_at(b"0", 0)?;
        Ok(left == 0)
    }
}

/// Every allocation of snapshot (with pre-copies), restore (both kinds), drop, read and dirty
/// is failed in turn (as syzkaller's fail-nth does): each call either fails and leaves the space exactly as
/// it was, or succeeds with an exact result.
fn failing_allocations_leave_space_exact() -> Result<()> {
    setup_fault_injection()?;
    let fail = FailNth::open()?;
    let mut total = 0;
    for op in [
        "snapshot",
        "restore",
        "restore-in-place",
        "drop",
        "read",
        "dirty",
    ] {
        let mut injected = 0;
        for n in 1..400 {
            // A space with three epochs: A at s1, B at s2 (new pages too), C now.
            let cow = Cow::open()?;
            let r = cow.map_region(64 * PAGE)?;
            // SAFETY: our own region.
            let m = unsafe { std::slice::from_raw_parts_mut(r.addr, r.len) };
            m[..32 * PAGE].fill(0xa1);
            let s1 = cow.snapshot()?;
            m[16 * PAGE..48 * PAGE].fill(0xb2);
            let s2 = cow.snapshot()?;
            m[8 * PAGE..24 * PAGE].fill(0xc3);
            m[60 * PAGE..].fill(0xc4);
            // Pre-copy every page at the next quiesced snapshot: allocations to fail.
            cow.hint(&(0..64).collect::<Vec<u64>>())?;
            let now = m.to_vec();
            let mut at_s1 = vec![0u8; r.len];
            at_s1[..32 * PAGE].fill(0xa1);
            let mut at_s2 = at_s1.clone();
            at_s2[16 * PAGE..48 * PAGE].fill(0xb2);
            // Between arming and reading fail-nth nothing may allocate or fault a page (a
            // user-mode fault that consumed the armed failure would be a VM_FAULT_OOM of our
            // own making): raw ioctls on argument blocks and buffers touched beforehand.
            let mut out = vec![1u8; r.len];
            let mut dirty_pages = vec![1u64; 1024];
            let fd = cow.as_fd().as_raw_fd();
            let (cmd, mut arg): (u32, [u64; 6]) = match op {
                "snapshot" => (
                    abi::COW_IOC_SNAPSHOT,
                    [
                        16 | (u64::from(abi::COW_SNAPSHOT_QUIESCED) << 32),
                        0,
                        0,
                        0,
                        0,
                        0,
                    ],
                ),
                "restore" => (abi::COW_IOC_RESTORE, [16, s1, 0, 0, 0, 0]),
                "restore-in-place" => (
                    abi::COW_IOC_RESTORE,
                    [
                        16 | (u64::from(abi::COW_RESTORE_QUIESCED) << 32),
                        s1,
                        0,
                        0,
                        0,
                        0,
                    ],
                ),
                "drop" => (abi::COW_IOC_DROP, [16, s2, 0, 0, 0, 0]),
                "read" => (
                    abi::COW_IOC_READ,
                    [40, s2, r.offset, r.len as u64, out.as_mut_ptr() as u64, 0],
                ),
                _ => (
                    abi::COW_IOC_DIRTY,
                    [40, s1, 1024, 0, dirty_pages.as_mut_ptr() as u64, 0],
                ),
            };
            let arg_ptr = arg.as_mut_ptr() as usize;
            fail.arm(n)?;
            let e = ioctl_errno(fd, cmd, arg_ptr);
            let fired = fail.fired()?;
            let res: std::result::Result<(), i32> = if e == 0 { Ok(()) } else { Err(e) };
            // ENOMEM from cow.ko; EFAULT when the failed allocation was the kernel's own, for
            // the caller's memory (a page table behind its buffer).
            ensure!(
                matches!(res, Ok(()) | Err(libc::ENOMEM) | Err(libc::EFAULT)),
                "{op} with allocation {n} failed: {res:?}, expected ENOMEM or EFAULT"
            );
            let expect_now: &[u8] = if op.starts_with("restore") && res.is_ok() {
                &at_s1
            } else {
                &now
            };
            ensure!(
                m == expect_now,
                "{op} (allocation {n} failed, {res:?}) changed memory"
            );
            match op {
                "snapshot" if res.is_ok() => {
                    // The new snapshot holds `now`, whichever pre-copies failed.
                    let id = cow.list()?.last().context("no snapshot")?.id;
                    m.fill(0xdd);
                    cow.restore(id)?;
                    ensure!(
                        m == &now[..],
                        "snapshot with allocation {n} failed is not exact"
                    );
                }
                "read" if res.is_ok() => {
                    ensure!(out == at_s2, "read with allocation {n} failed is not exact")
                }
                _ => {}
            }
            // Every snapshot still left restores exactly (a successful restore to s1 or drop
            // of s2 has removed s2).
            let s2_gone = res.is_ok() && (op.starts_with("restore") || op == "drop");
            if !s2_gone {
                cow.restore(s2)?;
                ensure!(m == &at_s2[..], "restore to s2 after {op} (allocation {n})");
            }
            cow.restore(s1)?;
            ensure!(m == &at_s1[..], "restore to s1 after {op} (allocation {n})");
            if !fired {
                break; // the call made fewer than n allocations: each one has been failed
            }
            injected += 1;
        }
        eprintln!("{op}: {injected} allocation points failed in turn");
        total += injected;
    }
    ensure!(
        total > 0,
        "no allocation was ever failed (fail-nth not effective?)"
    );
    Ok(())
}

/// A space in a 64 MiB memory cgroup that writes 256 MiB: its pages and pre-images are
/// charged there, so the cgroup hits its limit (an OOM kill inside it), never the machine.
fn memcg_limits_a_space() -> Result<()> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        mount_fs(c"cgroup2", c"/sys/fs/cgroup")?;
    }
    std::fs::write(root.join("cgroup.subtree_control"), "+memory")
        .context("enable the memory controller (CONFIG_MEMCG)")?;
    let cg = root.join("delorean-memcg-test");
    let _ = std::fs::create_dir(&cg);
    std::fs::write(cg.join("memory.max"), "64M")?;
    let cgroup_procs = cg.join("cgroup.procs");
    let ended = in_child(|| {
        std::fs::write(&cgroup_procs, std::process::id().to_string())?;
        let cow = Cow::open()?;
        let r = cow.map_region(128 << 20)?;
        // SAFETY: our own region.
        let m = unsafe { std::slice::from_raw_parts_mut(r.addr, r.len) };
        m.fill(1); // 128 MiB of pages: past the cgroup's 64 MiB
        cow.snapshot()?;
        m.fill(2); // and 128 MiB of pre-images
        Ok(())
    })?;
    let events = std::fs::read_to_string(cg.join("memory.events"))?;
    let _ = std::fs::remove_dir(&cg);
    ensure!(
        ended == Ended::Signaled(libc::SIGKILL) || ended == Ended::Exited(1),
        "the child wrote 256 MiB in a 64 MiB cgroup and ended {ended:?}"
    );
    let oom_kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    ensure!(
        ended != Ended::Signaled(libc::SIGKILL) || oom_kills >= 1,
        "killed, but not by the cgroup's OOM killer: {events}"
    );
    // The machine is fine: a new space works.
    let cow = Cow::open()?;
    let r = cow.map_region(16 * PAGE)?;
    // SAFETY: our own region.
    unsafe { std::ptr::write_bytes(r.addr, 9, r.len) };
    cow.snapshot()?;
    Ok(())
}

/// xorshift64*: deterministic randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Where a fuzzed pointer field may point.
#[derive(Clone, Copy)]
struct Targets {
    covered: usize,
    covered_len: usize,
    readonly: usize,
    /// 8 MiB of private memory only this thread writes.
    scratch: usize,
}

/// Most bytes a fuzzed command may write to user memory: the scratch area has twice that.
const FUZZ_MAX_OUT: u64 = 4 << 20;

impl Targets {
    /// An address where the module may write `len` bytes (≤ [`FUZZ_MAX_OUT`]) without touching
    /// anything of ours, or one where it must fail with `EFAULT`.
    fn writable(&self, rng: &mut Rng, len: u64) -> u64 {
        match rng.below(8) {
            0 => 0,
            1 => 0xdead_0000,           // unmapped
            2 => 0xffff_8000_0000_0000, // kernel
            3 => self.readonly as u64,  // read-only
            4 | 5 if len <= self.covered_len as u64 => {
                self.covered as u64 + rng.below(self.covered_len as u64 - len + 1)
            }
            _ => self.scratch as u64 + rng.below(FUZZ_MAX_OUT),
        }
    }
}

/// One fuzzed command: its number and a 256-byte argument block (fields per the ABI, random
/// values, pointers from `t`).
fn fuzz_args(rng: &mut Rng, t: &Targets, buf: &mut [u64; 32]) -> u32 {
    let nr = abi::nr::VERSION + rng.below((abi::nr::DISCARD - abi::nr::VERSION + 1) as u64) as u32;
    for b in buf.iter_mut() {
        *b = match rng.below(4) {
            0 => rng.next(),
            1 => rng.below(8),
            _ => u64::MAX >> rng.below(64),
        };
    }
    let mut size: u64 = match nr {
        abi::nr::SNAPSHOT | abi::nr::RESTORE | abi::nr::DROP => 16,
        abi::nr::STATS => 128,
        abi::nr::READ | abi::nr::DIRTY => 40,
        _ => 24,
    };
    if rng.below(16) == 0 {
        size = rng.below(160); // garbage sizes, up to more than any struct
    }
    let flags = if rng.below(4) == 0 {
        rng.next() >> 32
    } else {
        0
    };
    buf[0] = size | flags << 32;
    match nr {
        abi::nr::SNAPSHOT | abi::nr::RESTORE | abi::nr::DROP => buf[1] = rng.below(40),
        abi::nr::READ => {
            buf[1] = rng.below(40);
            buf[2] = if rng.below(2) == 0 {
                rng.next()
            } else {
                rng.below(1 << 20)
            };
            buf[3] = rng.below(2 << 20); // len
            buf[4] = t.writable(rng, buf[3]);
        }
        abi::nr::DIRTY => {
            buf[1] = rng.below(40);
            buf[2] = rng.below(FUZZ_MAX_OUT / 8); // capacity
            buf[4] = t.writable(rng, buf[2] * 8);
        }
        abi::nr::LIST => {
            let cap = rng.below(FUZZ_MAX_OUT / 32);
            buf[0] = size | cap << 32;
            buf[1] &= if rng.below(4) == 0 {
                u64::MAX
            } else {
                0xffff_ffff
            };
            buf[2] = t.writable(rng, cap * 32);
        }
        abi::nr::HINT => {
            buf[1] = match rng.below(4) {
                0 => abi::COW_MAX_HINT_PAGES,
                1 => abi::COW_MAX_HINT_PAGES + 1,
                _ => rng.below(4096),
            };
            // Read only: any address will do.
            buf[2] = match rng.below(3) {
                0 => rng.next(),
                1 => t.covered as u64,
                _ => t.scratch as u64,
            };
        }
        abi::nr::DISCARD => {
            // Offsets and lengths around the covered region, aligned or not, and wild ones.
            buf[1] = match rng.below(3) {
                0 => rng.next(),
                _ => {
                    rng.below(128) * 4096
                        + if rng.below(4) == 0 {
                            rng.below(4096)
                        } else {
                            0
                        }
                }
            };
            buf[2] = match rng.below(3) {
                0 => rng.next(),
                _ => rng.below(64) * 4096,
            };
        }
        abi::nr::LIMITS => {
            buf[0] = size | (flags & !1 | rng.below(2)) << 32;
            buf[1] = (1 + rng.below(64)) | (rng.below(3) << 32); // max_snapshots, policy
            buf[2] = 1u64 << (12 + rng.below(20)); // max_bytes
        }
        _ => {}
    }
    nr
}

/// Structure-aware fuzzing of every command from several threads at once: valid sizes with
/// random fields, maximal counts, pointers into unmapped, read-only and covered memory.
fn ioctl_fuzz_threads() -> Result<()> {
    let cow = std::sync::Arc::new(Cow::open()?);
    let covered = cow.map_region(64 * PAGE)?;
    let readonly = reserve(PAGE)?;
    // SAFETY: making our own reservation readable.
    unsafe { libc::mprotect(readonly as *mut libc::c_void, PAGE, libc::PROT_READ) };
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let cow = cow.clone();
        let scratch = reserve(2 * FUZZ_MAX_OUT as usize)?;
        // SAFETY: making our own reservation writable.
        unsafe {
            libc::mprotect(
                scratch as *mut libc::c_void,
                2 * FUZZ_MAX_OUT as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let targets = Targets {
            covered: covered.addr as usize,
            covered_len: covered.len,
            readonly,
            scratch,
        };
        handles.push(std::thread::spawn(move || -> Result<u64> {
            let fd = cow.as_fd().as_raw_fd();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t + 1) * 0x1234_5678));
            let mut calls = 0u64;
            let mut buf = [0u64; 32];
            while Instant::now() < deadline {
                // Writes keep the space busy between commands.
                let w = targets.covered + rng.below(targets.covered_len as u64) as usize;
                // SAFETY: a byte inside our covered region.
                unsafe { std::ptr::write_volatile(w as *mut u8, rng.next() as u8) };
                let nr = fuzz_args(&mut rng, &targets, &mut buf);
                let cmd = abi::ioc(abi::IOC_READ | abi::IOC_WRITE, abi::COW_IOC_MAGIC, nr, 24);
                // The argument block itself: ours, or an address where writing back 160 bytes
                // harms nothing (or must fail).
                let arg = match rng.below(10) {
                    0 => targets.writable(&mut rng, 160) as usize,
                    _ => buf.as_mut_ptr() as usize,
                };
                let e = ioctl_errno(fd, cmd, arg);
                let allowed = [0, libc::EINVAL, libc::EFAULT, libc::ENOENT, libc::ENOMEM];
                ensure!(allowed.contains(&e), "cmd nr {nr:#x}: unexpected errno {e}");
                calls += 1;
            }
            Ok(calls)
        }));
    }
    let mut calls = 0;
    for h in handles {
        calls += h
            .join()
            .map_err(|_| anyhow::anyhow!("fuzzer thread panicked"))??;
    }
    eprintln!("{calls} fuzzed ioctls");
    // The space still snapshots and restores exactly.
    let cow = Cow::open()?;
    let r = cow.map_region(8 * PAGE)?;
    // SAFETY: our own region.
    let m = unsafe { std::slice::from_raw_parts_mut(r.addr, r.len) };
    m.fill(5);
    let id = cow.snapshot()?;
    m.fill(6);
    cow.restore(id)?;
    ensure!(m.iter().all(|&b| b == 5), "space broken after fuzzing");
    Ok(())
}

/// Threads and processes doing random mmap / munmap / mremap / fork / snapshot / restore /
/// drop / read / dirty / hint / exit on shared spaces for a bounded time; then an exact check.
fn race_stress() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rounds = 0;
    while Instant::now() < deadline {
        rounds += 1;
        // Each round in a child process, so exit with live snapshots and mappings is raced too.
        let ended = in_child(|| stress_round(rounds))?;
        ensure!(
            ended == Ended::Exited(0),
            "stress round {rounds}: {ended:?}"
        );
    }
    eprintln!("{rounds} stress rounds");
    Ok(())
}

fn stress_round(seed: u64) -> Result<()> {
    let cow = std::sync::Arc::new(Cow::open()?);
    let main = cow.map_region(256 * PAGE)?;
    let main_addr = main.addr as usize;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let until = Instant::now() + Duration::from_millis(700);
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let cow = cow.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || -> Result<()> {
            let mut rng = Rng(seed * 0x9E37_79B9 + t * 77 + 1);
            let mut mine: Vec<(usize, usize)> = Vec::new();
            while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let w = main_addr + rng.below(256 * PAGE as u64) as usize;
                // SAFETY: a byte of the shared region, which no thread unmaps.
                unsafe { std::ptr::write_volatile(w as *mut u8, rng.next() as u8) };
                match (t, rng.below(12)) {
                    (0, 0..=3) => {
                        let _ = cow.snapshot();
                    }
                    (0, 4) | (1, 0) => {
                        if let Ok(list) = cow.list() {
                            if let Some(s) = list.get(rng.below(list.len() as u64 + 1) as usize) {
                                let _ = cow.restore(s.id);
                            }
                        }
                    }
                    (0, 5) | (2, 0) => {
                        if let Some(s) = cow.list()?.first() {
                            let _ = cow.drop_snapshot(s.id);
                        }
                    }
                    (1, 1..=3) => {
                        let mut b = vec![0u8; rng.below(3 * PAGE as u64) as usize];
                        let id = rng.below(8);
                        let _ = cow.read(id, rng.below(256 * PAGE as u64), &mut b);
                        let _ = cow.dirty_since(id);
                    }
                    (1, 4) => {
                        let pages: Vec<u64> = (0..rng.below(64)).map(|_| rng.below(300)).collect();
                        let _ = cow.hint(&pages);
                        let _ = cow.snapshot_quiesced();
                    }
                    (2 | 3, 1..=3) => {
                        let len = (1 + rng.below(8) as usize) * PAGE;
                        if let Ok(r) = cow.map_region(len) {
                            // SAFETY: our own fresh region.
                            unsafe { std::ptr::write_bytes(r.addr, t as u8, r.len) };
                            mine.push((r.addr as usize, r.len));
                        }
                    }
                    (2 | 3, 4) => {
                        if let Some((a, l)) = mine.pop() {
                            // SAFETY: a region this thread mapped and nobody else uses.
                            unsafe { libc::munmap(a as *mut libc::c_void, l) };
                        }
                    }
                    (2 | 3, 5) => {
                        if let Some((a, l)) = mine.pop() {
                            // SAFETY: shrinking or moving a region only this thread uses.
                            let p = unsafe {
                                libc::mremap(a as *mut libc::c_void, l, PAGE, libc::MREMAP_MAYMOVE)
                            };
                            if p != libc::MAP_FAILED {
                                mine.push((p as usize, PAGE));
                            }
                        }
                    }
                    (3, 6) => {
                        // A child that writes covered memory (shared with us) and exits.
                        // SAFETY: the child only writes a byte and leaves with _exit.
                        let pid = unsafe { libc::fork() };
                        if pid == 0 {
                            // SAFETY: as above.
                            unsafe {
                                std::ptr::write_volatile(w as *mut u8, 1);
                                libc::_exit(0);
                            }
                        }
                        let mut st = 0;
                        // SAFETY: our own child.
                        unsafe { libc::waitpid(pid, &mut st, 0) };
                    }
                    _ => {}
                }
            }
            for (a, l) in mine {
                // SAFETY: regions this thread mapped.
                unsafe { libc::munmap(a as *mut libc::c_void, l) };
            }
            Ok(())
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("stress thread panicked"))??;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Quiet now: the space is exact.
    // SAFETY: our own region; the other threads have ended.
    let m = unsafe { std::slice::from_raw_parts_mut(main.addr, main.len) };
    let before = m.to_vec();
    let id = cow.snapshot()?;
    m.fill(0xee);
    cow.restore(id)?;
    ensure!(m == &before[..], "restore after the stress is not exact");
    // Exit with snapshots, hints and mappings alive (the other half of the race).
    Ok(())
}
