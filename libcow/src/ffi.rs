//! The C ABI, declared in `include/cow.h`. Functions return a negative errno on failure;
//! `cow_strerror` turns it into a sentence.

use crate::backend::{self, Backend};
use crate::device::Cow;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// The backend the C API drives, chosen by `cow_init` (or installed by libcow_preload).
static BACKEND: OnceLock<&'static dyn Backend> = OnceLock::new();
/// Why that backend (for `cow_backend_reason`).
static REASON: OnceLock<CString> = OnceLock::new();
/// Functions that make the covered heap quiescent around a snapshot or restore (installed by
/// libcow_preload, whose allocator they lock).
static QUIESCE: OnceLock<QuiesceHooks> = OnceLock::new();

/// Serialises snapshots, restores and drops between threads (a program's own calls and the
/// checkpointer's). In the book, and created before the first snapshot, so that no restore
/// ever rewinds it.
static OPS: OnceLock<&'static std::sync::Mutex<()>> = OnceLock::new();

fn ops_lock() -> std::sync::MutexGuard<'static, ()> {
    OPS.get_or_init(|| crate::book::leak(std::sync::Mutex::new(())))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `(hold, release)`: make the covered heap quiescent, and let it go again.
pub type QuiesceHooks = (fn(), fn());

/// What libcow_preload gives the C API along with its space.
pub struct PreloadHooks {
    /// Makes the covered heap (and the preload's mapping table) quiescent…
    pub hold: fn(),
    /// … and lets it go again; the two bracket snapshots and restores.
    pub release: fn(),
    /// The program's progress clock (see [`crate::speculate::Progress`]).
    pub progress: fn() -> u64,
    /// Runs right after a restore, the other threads still stopped: puts the process's
    /// mappings back to what the restored memory describes.
    pub restored: fn(),
}

/// Makes `space` (libcow_preload's) the space the C API drives.
pub fn install(space: &'static Cow, hooks: PreloadHooks) {
    let PreloadHooks {
        hold,
        release,
        progress,
        restored,
    } = hooks;
    let kmod: &'static dyn Backend = Box::leak(Box::new(
        backend::kmod::Kmod::with_quiesce(space, hold, release)
            .with_progress(progress)
            .with_restored(restored),
    ));
    speculate_from_env(kmod);
    let _ = BACKEND.set(kmod);
    let _ = REASON
        .set(c"libcow_preload covers every private writable mapping but stacks with cow.ko".into());
    let _ = QUIESCE.set((hold, release));
    drop(ops_lock());
}

/// Applies what `cowctl run --speculate=POLICY` asks for: the policy in `COW_SPECULATE`; an
/// oracle replays the write sets in `COW_SPECULATE_REPLAY` (recorded by a run with
/// `COW_SPECULATE_RECORD`). A backend without pre-copy refuses (`cowctl run` checks first).
pub fn speculate_from_env(backend: &dyn Backend) {
    if let Some(policy) = crate::sys::env_var("COW_SPECULATE")
        .and_then(|p| p.parse::<crate::speculate::Policy>().ok())
    {
        let recorded = crate::sys::env_var("COW_SPECULATE_REPLAY")
            .filter(|_| policy == crate::speculate::Policy::Oracle)
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| serde_json::from_str::<crate::speculate::Recording>(&text).ok());
        let _ = backend.set_speculation(policy, recorded);
    }
    if crate::sys::env_var("COW_SPECULATE_RECORD").is_some() {
        let _ = backend.record_write_sets();
    }
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

/// The backend, or the negative errno the C API returns before `cow_init`.
fn backend() -> Result<&'static dyn Backend, c_int> {
    BACKEND.get().copied().ok_or(-libc::EBADFD)
}

/// Runs `op` on the backend and turns the outcome into the C convention.
fn with_backend(op: impl FnOnce(&dyn Backend) -> crate::Result<()>) -> c_int {
    match backend() {
        Ok(b) => match op(b) {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        },
        Err(neg_errno) => neg_errno,
    }
}

/// Runs `op` on the backend with the C API's operations lock held (no snapshot, restore or
/// drop meanwhile, so what `op` allocates cannot be rewound under it); 0 or a negative errno.
pub(crate) fn with_ops(op: impl FnOnce(&dyn Backend) -> crate::Result<()>) -> c_int {
    let _ops = ops_lock();
    with_backend(op)
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

fn set_errno(e: c_int) {
    // SAFETY: writing the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

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
        libc::EBADFD => c"libcow is not initialised: call cow_init first",
        libc::ENOMEM => {
            c"out of memory, or the snapshot window is full under the fail policy, \
            or libcow could not reserve its bookkeeping (an address-space limit: set COW_BOOK_GIB \
            lower)"
        }
        // SAFETY: strerror returns a pointer to a static (or thread-local) NUL-terminated string.
        _ => return unsafe { libc::strerror(errno) },
    };
    text.as_ptr()
}

/// Initialises libcow with `backend`: NULL or "auto" (lmc in a program compiled with `cowcc`,
/// else kmod if cow.ko is loaded, else uffd if the kernel has WP_ASYNC and PAGEMAP_SCAN, else
/// mprotect), "kmod", "uffd", "mprotect", "fork" or "lmc" (a program compiled with `cowcc`;
/// `-ENOTSUP` otherwise).
/// Idempotent for the same choice. Returns 0 or a negative errno.
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
    if let Some(b) = BACKEND.get() {
        return if name == "auto" || name == b.name() {
            0
        } else {
            -libc::EBUSY
        };
    }
    match backend::open(name) {
        Ok((b, choice)) => {
            drop(ops_lock());
            let _ = BACKEND.set(Box::leak(b));
            let _ = REASON.set(CString::new(choice.reason).unwrap_or_default());
            0
        }
        Err(e) => -e.errno(),
    }
}

/// The backend in use ("kmod", "uffd", "mprotect", "fork", "lmc"), or "none" before
/// `cow_init`.
#[no_mangle]
pub extern "C" fn cow_backend() -> *const c_char {
    match BACKEND.get().map(|b| b.name()) {
        Some("kmod") => c"kmod".as_ptr(),
        Some("uffd") => c"uffd".as_ptr(),
        Some("mprotect") => c"mprotect".as_ptr(),
        Some("fork") => c"fork".as_ptr(),
        Some("lmc") => c"lmc".as_ptr(),
        _ => c"none".as_ptr(),
    }
}

/// Why `cow_init` picked the backend in use ("" before `cow_init`).
#[no_mangle]
pub extern "C" fn cow_backend_reason() -> *const c_char {
    REASON.get().map(|r| r.as_ptr()).unwrap_or(c"".as_ptr())
}

/// Maps `len` bytes of new memory the backend covers, zero-filled (kmod: from /dev/cow; the
/// mainline backends cover any private memory, this is a plain anonymous mapping). NULL on
/// failure, with errno set.
#[no_mangle]
pub extern "C" fn cow_map(len: usize) -> *mut c_void {
    if len == 0 {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    match backend().and_then(|b| b.map(len).map_err(|e| -e.errno())) {
        Ok(p) => p.cast(),
        Err(neg_errno) => {
            set_errno(-neg_errno);
            std::ptr::null_mut()
        }
    }
}

/// `len` zeroed bytes that no backend covers, for a program's own reference data. NULL on
/// failure. Never freed.
#[no_mangle]
pub extern "C" fn cow_alloc_uncovered(len: usize) -> *mut c_void {
    crate::book::alloc_uncovered(len.max(1)).as_mut_ptr().cast()
}

/// Takes a snapshot of all covered memory; returns its id (≥ 1) or a negative errno.
#[no_mangle]
pub extern "C" fn cow_snapshot() -> i64 {
    let b = match backend() {
        Ok(b) => b,
        Err(e) => return e as i64,
    };
    let _ops = ops_lock();
    // The backend holds the heap quiescent around the snapshot itself (it allocates before
    // and after, which it could not do with the allocator's locks held).
    match b.snapshot() {
        Ok(id) => id as i64,
        Err(e) => -(e.errno() as i64),
    }
}

/// Restores all covered memory to snapshot `id`. 0 or a negative errno (`-ENOENT`: no such id).
#[no_mangle]
pub extern "C" fn cow_restore(id: i64) -> c_int {
    with_backend(|b| {
        let _ops = ops_lock();
        quiesced(|| b.restore(positive_id(id)?))
    })
}

/// Drops snapshot `id`. 0 or a negative errno.
#[no_mangle]
pub extern "C" fn cow_drop(id: i64) -> c_int {
    with_backend(|b| {
        let _ops = ops_lock();
        b.drop_snapshot(positive_id(id)?)
    })
}

/// Copies `len` bytes at `addr` as they were at snapshot `id` into `buf`. 0 or a negative errno.
///
/// # Safety
///
/// `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn cow_read(
    id: i64,
    addr: *const c_void,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    if len == 0 {
        return 0;
    }
    if buf.is_null() {
        return -libc::EFAULT;
    }
    // SAFETY: the caller guarantees `buf` is writable for `len` bytes.
    let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
    with_backend(|b| b.read(positive_id(id)?, addr as usize, out))
}

/// Stores up to `cap` addresses of pages written since snapshot `id` into `pages` (sorted) and
/// returns how many there are in all (which may exceed `cap`), or a negative errno. `pages` may
/// be NULL when `cap` is 0 (a count only).
///
/// # Safety
///
/// `pages` is writable for `cap` pointers.
#[no_mangle]
pub unsafe extern "C" fn cow_dirty(id: i64, pages: *mut *mut c_void, cap: usize) -> i64 {
    if pages.is_null() && cap > 0 {
        return -(libc::EFAULT as i64);
    }
    let b = match backend() {
        Ok(b) => b,
        Err(e) => return e as i64,
    };
    let id = match positive_id(id) {
        Ok(id) => id,
        Err(e) => return -(e.errno() as i64),
    };
    match b.dirty_since(id) {
        Ok(v) => {
            for (i, &p) in v.iter().take(cap).enumerate() {
                // SAFETY: `i < cap`, inside the caller's array.
                unsafe { pages.add(i).write(p as *mut c_void) };
            }
            v.len() as i64
        }
        Err(e) => -(e.errno() as i64),
    }
}

/// The backend in use, for Rust code in the same process (None before `cow_init`).
pub fn current_backend() -> Option<&'static dyn Backend> {
    BACKEND.get().copied()
}

/// Turns error recovery on (see `cow::recovery`): crashes after a `cow_recovery_point()` in the
/// same thread are rolled back, up to `limit` in a row at one site. 0, or `-EBADFD` before
/// `cow_init`.
#[no_mangle]
pub extern "C" fn cow_recovery_enable(limit: u32) -> c_int {
    if backend().is_err() {
        return -libc::EBADFD;
    }
    crate::recovery::enable(limit);
    0
}
