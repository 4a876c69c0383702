//! The module and its device: load, permissions, ABI version, bad ioctls, unload, a clean log.

use super::sibling;
use crate::{kmsg, module, Test};
use anyhow::{bail, ensure, Context, Result};
use cow::abi;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "device::module_loaded",
            run: module_loaded,
        },
        Test {
            name: "device::dev_cow_permissions",
            run: dev_cow_permissions,
        },
        Test {
            name: "device::version_via_libcow",
            run: version_via_libcow,
        },
        Test {
            name: "device::version_via_c_abi",
            run: version_via_c_abi,
        },
        Test {
            name: "device::version_via_cowctl_status",
            run: version_via_cowctl_status,
        },
        Test {
            name: "device::unknown_ioctls_enotty",
            run: unknown_ioctls_enotty,
        },
        Test {
            name: "device::garbage_sizes_einval",
            run: garbage_sizes_einval,
        },
        Test {
            name: "device::grown_struct_accepted",
            run: grown_struct_accepted,
        },
        Test {
            name: "device::rmmod_refused_while_open",
            run: rmmod_refused_while_open,
        },
        Test {
            name: "device::rmmod_and_reload",
            run: rmmod_and_reload,
        },
        Test {
            name: "device::c_program_uses_cow_h",
            run: c_program_uses_cow_h,
        },
        Test {
            name: "device::parameters_in_sysfs",
            run: parameters_in_sysfs,
        },
        Test {
            name: "device::boot_log_clean",
            run: boot_log_clean,
        },
    ]
}

fn module_loaded() -> Result<()> {
    ensure!(module::is_loaded(), "cow is not in /proc/modules");
    ensure!(
        std::path::Path::new("/sys/module/cow").exists(),
        "/sys/module/cow is missing"
    );
    let banner = kmsg::all_records()?
        .into_iter()
        .any(|r| r.text.contains("cow: /dev/cow ready"));
    ensure!(banner, "the module's load line is not in the kernel log");
    Ok(())
}

fn dev_cow_permissions() -> Result<()> {
    let md = std::fs::metadata("/dev/cow").context("/dev/cow")?;
    ensure!(
        md.file_type().is_char_device(),
        "/dev/cow is not a character device"
    );
    let major = libc::major(md.rdev());
    ensure!(
        major == 10,
        "/dev/cow has major {major}, expected the misc major 10"
    );
    // Root-only by default, like /dev/userfaultfd: module pages are kernel memory, so opening it
    // up to everyone is an administrator's choice (a udev rule), not the module's.
    ensure!(md.uid() == 0, "/dev/cow is owned by uid {}", md.uid());
    let mode = md.mode() & 0o777;
    ensure!(mode == 0o600, "/dev/cow has mode {mode:o}, expected 600");
    Ok(())
}

fn version_via_libcow() -> Result<()> {
    let dev = cow::Cow::open()?;
    ensure!(
        dev.abi_version() == abi::COW_ABI_VERSION,
        "ABI {}",
        dev.abi_version()
    );
    ensure!(dev.page_size() == 4096, "page size {}", dev.page_size());
    // The raw query fills every field and leaves the caller's size alone.
    let v = cow::device::query_version(std::os::fd::AsFd::as_fd(&dev))?;
    ensure!(
        v.size == abi::COW_VERSION_SIZE_V1,
        "size rewritten to {}",
        v.size
    );
    ensure!(v.reserved == 0, "reserved = {}", v.reserved);
    Ok(())
}

fn version_via_c_abi() -> Result<()> {
    let v = cow::ffi::cow_version();
    ensure!(v == abi::COW_ABI_VERSION as i32, "cow_version() = {v}");
    Ok(())
}

fn version_via_cowctl_status() -> Result<()> {
    let out = std::process::Command::new(sibling("cowctl")?)
        .args(["status", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "cowctl status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["module"]["loaded"] == true,
        "module.loaded: {}",
        v["module"]
    );
    ensure!(
        v["module"]["abi_version"] == abi::COW_ABI_VERSION,
        "module.abi_version: {}",
        v["module"]
    );
    // The guest kernel is built with userfaultfd and pagemap: the probes must find them.
    ensure!(
        v["kernel"]["uffd_wp_async"]["available"] == true,
        "uffd: {}",
        v["kernel"]
    );
    ensure!(
        v["kernel"]["pagemap_scan"]["available"] == true,
        "pagemap: {}",
        v["kernel"]
    );
    // Soft-dirty exists where the kernel has CONFIG_MEM_SOFT_DIRTY (Debian's, not the project's
    // guest kernels); only then does smaps show the "sd" flag, which new mappings carry.
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let kernel_has_soft_dirty = smaps
        .lines()
        .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "sd"));
    ensure!(
        v["kernel"]["soft_dirty"]["available"] == kernel_has_soft_dirty,
        "soft-dirty (smaps shows sd: {kernel_has_soft_dirty}): {}",
        v["kernel"]
    );
    let text = std::process::Command::new(sibling("cowctl")?)
        .arg("status")
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(
        text.contains("ABI version 1"),
        "human status lacks the ABI: {text}"
    );
    Ok(())
}

/// Issues `cmd` with `arg` and returns the errno (0 on success).
fn ioctl_errno(fd: &std::fs::File, cmd: u32, arg: usize) -> i32 {
    // SAFETY: the module validates every user pointer; a bad pointer yields EFAULT, never a
    // write into this process outside `arg`'s buffer (the callers pass real buffers or 0).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, arg) };
    if rc < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn open_dev() -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/cow")
        .context("open /dev/cow")
}

fn unknown_ioctls_enotty() -> Result<()> {
    let f = open_dev()?;
    let mut buf = [0u8; 4096];
    let p = buf.as_mut_ptr() as usize;
    // Our magic with numbers no command uses, and foreign magics (TCGETS, random ones).
    let mut rng = 0x9E3779B97F4A7C15u64;
    for i in 0..2000u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let cmd = if i < 256 {
            abi::ioc(abi::IOC_READ | abi::IOC_WRITE, abi::COW_IOC_MAGIC, i, 24)
        } else {
            rng as u32
        };
        let known = abi::ioc_type(cmd) == abi::COW_IOC_MAGIC
            && (abi::nr::VERSION..=abi::nr::DISCARD).contains(&abi::ioc_nr(cmd));
        if known {
            continue;
        }
        let errno = ioctl_errno(&f, cmd, p);
        // The VFS answers a few generic commands itself (FIONBIO, FIOCLEX, ...); those are not
        // ours. Everything that reaches the module must be ENOTTY.
        if abi::ioc_type(cmd) == abi::COW_IOC_MAGIC && errno != libc::ENOTTY {
            bail!("cmd {cmd:#x}: errno {errno}, expected ENOTTY");
        }
    }
    ensure!(
        buf.iter().all(|&b| b == 0),
        "an unknown ioctl wrote to the argument"
    );
    Ok(())
}

fn garbage_sizes_einval() -> Result<()> {
    let f = open_dev()?;
    let mut buf = [0u8; 8192];
    for size in [0u32, 1, 4, 23, 4097, 8192, u32::MAX] {
        buf[..4].copy_from_slice(&size.to_ne_bytes());
        let errno = ioctl_errno(&f, abi::COW_IOC_VERSION, buf.as_mut_ptr() as usize);
        ensure!(
            errno == libc::EINVAL,
            "size {size}: errno {errno}, expected EINVAL"
        );
    }
    // Unreadable argument pointers: EFAULT, not an oops.
    for ptr in [0usize, 8, usize::MAX - 3, 0xffff_8000_0000_0000] {
        let errno = ioctl_errno(&f, abi::COW_IOC_VERSION, ptr);
        ensure!(
            errno == libc::EFAULT,
            "pointer {ptr:#x}: errno {errno}, expected EFAULT"
        );
    }
    // A larger struct whose unknown tail is not zero: we cannot honour it.
    buf.fill(0);
    buf[..4].copy_from_slice(&64u32.to_ne_bytes());
    buf[40] = 1;
    let errno = ioctl_errno(&f, abi::COW_IOC_VERSION, buf.as_mut_ptr() as usize);
    ensure!(
        errno == libc::EINVAL,
        "non-zero tail: errno {errno}, expected EINVAL"
    );
    Ok(())
}

fn grown_struct_accepted() -> Result<()> {
    // A caller from the future with a 64-byte struct and a zero tail gets the fields it shares
    // with us, and the tail stays zero.
    let f = open_dev()?;
    let mut buf = [0u8; 128];
    buf[..4].copy_from_slice(&64u32.to_ne_bytes());
    let errno = ioctl_errno(&f, abi::COW_IOC_VERSION, buf.as_mut_ptr() as usize);
    ensure!(errno == 0, "errno {errno}");
    let abi_version = u32::from_ne_bytes(buf[4..8].try_into()?);
    ensure!(abi_version == abi::COW_ABI_VERSION, "abi {abi_version}");
    ensure!(
        buf[24..].iter().all(|&b| b == 0),
        "the module wrote past its struct"
    );
    Ok(())
}

fn rmmod_refused_while_open() -> Result<()> {
    module::ensure_loaded()?;
    let f = open_dev()?;
    // An open /dev/cow pins the module: the kernel refuses with EWOULDBLOCK ("in use").
    match module::unload() {
        Ok(()) => bail!("rmmod succeeded while /dev/cow was open"),
        Err(e) if e == libc::EWOULDBLOCK || e == libc::EBUSY => {}
        Err(e) => bail!("rmmod while open: errno {e}, expected EWOULDBLOCK/EBUSY"),
    }
    drop(f);
    Ok(())
}

fn rmmod_and_reload() -> Result<()> {
    module::ensure_loaded()?;
    module::unload().map_err(|e| anyhow::anyhow!("rmmod cow: errno {e}"))?;
    ensure!(!module::is_loaded(), "still in /proc/modules after rmmod");
    ensure!(
        !std::path::Path::new("/dev/cow").exists(),
        "/dev/cow survived rmmod"
    );
    match cow::Cow::open() {
        Err(cow::Error::ModuleNotLoaded) => {}
        other => bail!("open without the module: {other:?}, expected ModuleNotLoaded"),
    }
    ensure!(
        cow::ffi::cow_version() == -libc::ENODEV,
        "cow_version without module"
    );
    module::load()?;
    ensure!(cow::Cow::open()?.abi_version() == abi::COW_ABI_VERSION);
    Ok(())
}

/// The module parameters are visible (and root-writable) under /sys/module/cow/parameters, and
/// a changed value is what the next space starts with.
fn parameters_in_sysfs() -> Result<()> {
    module::ensure_loaded()?;
    let dir = std::path::Path::new("/sys/module/cow/parameters");
    let read = |name: &str| -> Result<u64> {
        let text = std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("{}/{name}", dir.display()))?;
        Ok(text.trim().parse()?)
    };
    for name in ["max_snapshots", "max_held_mib"] {
        let mode = std::fs::metadata(dir.join(name))?.mode() & 0o777;
        ensure!(mode == 0o644, "{name}: mode {mode:o}");
    }
    let (snaps, mib) = (read("max_snapshots")?, read("max_held_mib")?);
    let lim = cow::Cow::open()?.limits()?;
    ensure!(
        lim.max_snapshots as u64 == snaps && lim.max_bytes == mib << 20,
        "a new space's limits {lim:?} differ from the parameters ({snaps}, {mib} MiB)"
    );
    std::fs::write(dir.join("max_snapshots"), "7")?;
    std::fs::write(dir.join("max_held_mib"), "3")?;
    let changed = cow::Cow::open()?.limits();
    std::fs::write(dir.join("max_snapshots"), snaps.to_string())?;
    std::fs::write(dir.join("max_held_mib"), mib.to_string())?;
    let changed = changed?;
    ensure!(
        changed.max_snapshots == 7 && changed.max_bytes == 3 << 20,
        "after writing the parameters a new space has {changed:?}"
    );
    ensure!(read("max_snapshots")? == snaps, "not restored");
    Ok(())
}

fn boot_log_clean() -> Result<()> {
    // From the module's first load on: before it, a distribution kernel warns about the
    // emulated machine (QEMU's MTRRs, MMCONFIG), which is not the module's doing.
    let records = kmsg::all_records()?;
    let loaded = records
        .iter()
        .position(|r| r.text.starts_with("cow: "))
        .context("no cow: line in the kernel log")?;
    let bad: Vec<String> = records[loaded..]
        .iter()
        .filter(|r| kmsg::is_bad(r))
        .map(|r| format!("<{}> {}", r.level, r.text))
        .collect();
    ensure!(
        bad.is_empty(),
        "kernel log since cow.ko was loaded has warnings:\n{}",
        bad.join("\n")
    );
    Ok(())
}

/// The C program qemu-tests/c/cabi.c, built by scripts/test with `cc` against include/cow.h and
/// libcow.a.
pub fn c_program_uses_cow_h() -> Result<()> {
    let exe = sibling("cabi")?;
    let out = std::process::Command::new(exe).arg("kmod").output()?;
    ensure!(
        out.status.success(),
        "cabi: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
