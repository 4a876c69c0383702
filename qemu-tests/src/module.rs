//! Loading and unloading cow.ko from a test, with the kernel's own errno.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::fd::AsRawFd;

/// Host path of cow.ko, exported by scripts/guest as `COW_KO`.
pub fn ko_path() -> Result<String> {
    std::env::var("COW_KO").context("COW_KO is not set: run under scripts/guest")
}

/// Whether `cow` is listed in /proc/modules.
pub fn is_loaded() -> bool {
    std::fs::read_to_string("/proc/modules")
        .map(|m| m.lines().any(|l| l.starts_with("cow ")))
        .unwrap_or(false)
}

/// `finit_module` of cow.ko.
pub fn load() -> Result<()> {
    let path = ko_path()?;
    let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    // SAFETY: finit_module reads the module from a valid descriptor and a NUL-terminated,
    // empty parameter string that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if rc != 0 {
        bail!("finit_module({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `delete_module("cow", O_NONBLOCK)`; returns the errno on failure.
pub fn unload() -> std::result::Result<(), i32> {
    let name = CString::new("cow").expect("no NUL");
    // SAFETY: delete_module takes a NUL-terminated name that outlives the call and flags.
    let rc = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(())
}

/// Makes sure cow.ko is loaded (tests that unload it put it back with this).
pub fn ensure_loaded() -> Result<()> {
    if !is_loaded() {
        load()?;
    }
    Ok(())
}
