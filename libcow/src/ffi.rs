//! The C ABI, declared in `include/cow.h`. Functions return a negative errno on failure;
//! `cow_strerror` turns it into a sentence.

use crate::device::Cow;
use std::ffi::{c_char, c_int, CStr};

/// Returns the ABI version of the loaded cow.ko, or a negative errno
/// (`-ENODEV` when the module is not loaded, `-EPROTO` on an ABI mismatch).
#[no_mangle]
pub extern "C" fn cow_version() -> c_int {
    match Cow::open() {
        Ok(cow) => cow.abi_version() as c_int,
        Err(e) => -e.errno(),
    }
}

/// Describes a negative errno returned by a `cow_*` function. The string is static.
#[no_mangle]
pub extern "C" fn cow_strerror(err: c_int) -> *const c_char {
    let errno = err.checked_abs().unwrap_or(libc::EINVAL);
    let text: &'static CStr = match errno {
        0 => c"success",
        libc::ENODEV => c"cow.ko is not loaded (no /dev/cow): run scripts/guest or insmod cow.ko",
        libc::EPROTO => c"cow.ko and libcow speak different ABI versions: rebuild and reload",
        // SAFETY: strerror returns a pointer to a static (or thread-local) NUL-terminated string.
        _ => return unsafe { libc::strerror(errno) },
    };
    text.as_ptr()
}

/// The process's space for the C ABI, set by `cow_init`.
static SPACE: std::sync::OnceLock<&'static Cow> = std::sync::OnceLock::new();

/// Functions that make the covered heap quiescent around a snapshot or restore (installed by
/// libcow_preload, whose allocator they lock).
static QUIESCE: std::sync::OnceLock<QuiesceHooks> = std::sync::OnceLock::new();

/// `(hold, release)`: make the covered heap quiescent, and let it go again.
type QuiesceHooks = (fn(), fn());

/// Space offsets from here on are used by a process that adopted a space from `COW_SPACE_FD`
/// (half of the 16 TiB a space spans), so its regions never overlap the publisher's.
const ADOPTED_OFFSET_BASE: u64 = 1 << 43;

/// Makes `space` the one the C API drives, with `hold`/`release` bracketing snapshots and
/// restores (libcow_preload calls this for the space that covers the heap and globals).
pub fn install(space: &'static Cow, hold: fn(), release: fn()) {
    let _ = SPACE.set(space);
    let _ = QUIESCE.set((hold, release));
}

/// Runs `op` with the covered heap quiescent, if a preload installed the hooks.
fn quiesced<T>(op: impl FnOnce() -> T) -> T {
    match QUIESCE.get() {
        Some((hold, release)) => {
            hold();
            let r = op();
            release();
            r
        }
        None => op(),
    }
}

/// The space published by libcow_preload in `COW_SPACE_FD`, if that descriptor is `/dev/cow`.
fn adopt_published_space() -> Option<Cow> {
    let fd: i32 = std::env::var("COW_SPACE_FD").ok()?.parse().ok()?;
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if target.as_os_str() != crate::COW_DEVICE_PATH {
        return None;
    }
    // SAFETY: duplicating a descriptor we just checked is open; the copy is ours.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    let owned = unsafe { std::os::fd::FromRawFd::from_raw_fd(dup) };
    let cow = Cow::from_fd(owned).ok()?;
    cow.reserve_offsets_from(ADOPTED_OFFSET_BASE);
    Some(cow)
}

/// The space, or the negative errno the C ABI returns before `cow_init`.
fn space() -> Result<&'static Cow, c_int> {
    SPACE.get().copied().ok_or(-libc::EBADFD)
}

/// Runs `op` on the space and turns the outcome into the C convention (0 or a negative errno).
fn with_space(op: impl FnOnce(&Cow) -> crate::Result<()>) -> c_int {
    match space() {
        Ok(s) => match op(s) {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        },
        Err(neg_errno) => neg_errno,
    }
}

/// Initialises libcow with `backend` (NULL, "auto" or "kmod"; the mainline backends come with a
/// later release and are refused with `-ENOTSUP`). Idempotent. Returns 0 or a negative errno.
///
/// # Safety
///
/// `backend` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cow_init(backend: *const c_char) -> c_int {
    let name = if backend.is_null() {
        "auto"
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        match unsafe { CStr::from_ptr(backend) }.to_str() {
            Ok(s) => s,
            Err(_) => return -libc::EINVAL,
        }
    };
    if name != "auto" && name != "kmod" {
        return -libc::ENOTSUP;
    }
    if SPACE.get().is_some() {
        return 0;
    }
    let cow = match adopt_published_space() {
        Some(cow) => cow,
        None => match Cow::open() {
            Ok(cow) => cow,
            Err(e) => return -e.errno(),
        },
    };
    let _ = SPACE.set(Box::leak(Box::new(cow)));
    0
}

/// The backend in use ("kmod"), or "none" before `cow_init`.
#[no_mangle]
pub extern "C" fn cow_backend() -> *const c_char {
    if SPACE.get().is_some() {
        c"kmod".as_ptr()
    } else {
        c"none".as_ptr()
    }
}

/// Maps `len` bytes of new covered memory (zero-filled). NULL on failure, with errno set.
#[no_mangle]
pub extern "C" fn cow_map(len: usize) -> *mut std::ffi::c_void {
    let result = space().and_then(|s| s.map_region(len).map_err(|e| -e.errno()));
    match result {
        Ok(r) => r.addr.cast(),
        Err(neg_errno) => {
            // SAFETY: writing the calling thread's errno.
            unsafe { *libc::__errno_location() = -neg_errno };
            std::ptr::null_mut()
        }
    }
}

/// Takes a snapshot of all covered memory; returns its id (≥ 1) or a negative errno.
#[no_mangle]
pub extern "C" fn cow_snapshot() -> i64 {
    match space() {
        Ok(s) => match quiesced(|| s.snapshot()) {
            Ok(id) => id as i64,
            Err(e) => -(e.errno() as i64),
        },
        Err(e) => e as i64,
    }
}

/// Restores all covered memory to snapshot `id`. 0 or a negative errno (`-ENOENT`: no such id).
#[no_mangle]
pub extern "C" fn cow_restore(id: i64) -> c_int {
    with_space(|s| quiesced(|| s.restore(positive_id(id)?)))
}

/// Drops snapshot `id`. 0 or a negative errno.
#[no_mangle]
pub extern "C" fn cow_drop(id: i64) -> c_int {
    with_space(|s| s.drop_snapshot(positive_id(id)?))
}

/// Ids are ≥ 1; anything else names no snapshot.
fn positive_id(id: i64) -> crate::Result<u64> {
    u64::try_from(id)
        .ok()
        .filter(|&id| id > 0)
        .ok_or(crate::Error::Os {
            op: "snapshot id",
            errno: libc::ENOENT,
        })
}
