//! The C allocation functions, exported to override libc's when preloaded.
//!
//! Before the covered heap exists (or when cow.ko is unusable) requests go to glibc's own
//! allocator (`__libc_malloc` and friends); pointers outside the covered heap are always handed
//! back to it, so blocks allocated on either side are freed on the right one.

use crate::heap;
use libc::{c_int, c_void, size_t};

extern "C" {
    fn __libc_malloc(size: size_t) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_calloc(n: size_t, size: size_t) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: size_t) -> *mut c_void;
    fn __libc_memalign(align: size_t, size: size_t) -> *mut c_void;
}

fn set_errno(e: c_int) {
    // SAFETY: writing the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

fn covered_alloc(size: size_t, align: size_t) -> *mut c_void {
    let p = heap::alloc(size, align);
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

/// `malloc(3)`.
#[no_mangle]
pub extern "C" fn malloc(size: size_t) -> *mut c_void {
    if !crate::ensure_init() {
        // SAFETY: glibc's allocator, with the caller's arguments.
        return unsafe { __libc_malloc(size) };
    }
    covered_alloc(size, 16)
}

/// `free(3)`.
///
/// # Safety
///
/// `p` is null or a live allocation.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    if heap::owns(p.cast()) {
        // SAFETY: a live block of the covered heap (caller's guarantee).
        unsafe { heap::free(p.cast()) }
    } else {
        // SAFETY: not ours, so glibc's (caller's guarantee that it is live).
        unsafe { __libc_free(p) }
    }
}

/// `cfree(3)`, an old alias of free.
///
/// # Safety
///
/// As [`free`].
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: as free.
    unsafe { free(p) }
}

/// `calloc(3)`.
#[no_mangle]
pub extern "C" fn calloc(n: size_t, size: size_t) -> *mut c_void {
    if !crate::ensure_init() {
        // SAFETY: glibc's allocator, with the caller's arguments.
        return unsafe { __libc_calloc(n, size) };
    }
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    let p = covered_alloc(total, 16);
    if !p.is_null() {
        // SAFETY: a fresh block of at least `total` bytes (freed blocks are reused, so clear).
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, total) };
    }
    p
}

/// `realloc(3)`.
///
/// # Safety
///
/// `p` is null or a live allocation.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: size_t) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    if !heap::owns(p.cast()) {
        // SAFETY: glibc's block (caller's guarantee that it is live).
        return unsafe { __libc_realloc(p, size) };
    }
    if size == 0 {
        // SAFETY: our live block.
        unsafe { heap::free(p.cast()) };
        return std::ptr::null_mut();
    }
    // SAFETY: our live block.
    let old = unsafe { heap::usable_size(p.cast()) };
    let q = covered_alloc(size, 16);
    if !q.is_null() {
        // SAFETY: both blocks are live, distinct, and at least min(old, size) bytes long.
        unsafe {
            std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size));
            heap::free(p.cast());
        }
    }
    q
}

/// `reallocarray(3)`.
///
/// # Safety
///
/// As [`realloc`].
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: size_t, size: size_t) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as realloc.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

fn aligned(align: size_t, size: size_t) -> *mut c_void {
    if !crate::ensure_init() {
        // SAFETY: glibc's allocator, with the caller's arguments.
        return unsafe { __libc_memalign(align, size) };
    }
    covered_alloc(size, align)
}

/// `posix_memalign(3)`.
///
/// # Safety
///
/// `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let p = aligned(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a writable pointer.
    unsafe { out.write(p) };
    0
}

/// `aligned_alloc(3)`.
#[no_mangle]
pub extern "C" fn aligned_alloc(align: size_t, size: size_t) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

/// `memalign(3)`.
#[no_mangle]
pub extern "C" fn memalign(align: size_t, size: size_t) -> *mut c_void {
    aligned_alloc(align.max(1).next_power_of_two(), size)
}

/// `valloc(3)`.
#[no_mangle]
pub extern "C" fn valloc(size: size_t) -> *mut c_void {
    aligned(crate::raw::page_size(), size)
}

/// `pvalloc(3)`.
#[no_mangle]
pub extern "C" fn pvalloc(size: size_t) -> *mut c_void {
    let page = crate::raw::page_size();
    aligned(page, size.div_ceil(page).max(1) * page)
}

/// `malloc_usable_size(3)`: for covered blocks exactly the size asked for (no slack is
/// promised); glibc's blocks are answered by glibc's own function, looked up in libc.so.6
/// itself: the next definition after ours may be another allocator's (redis links jemalloc),
/// which knows nothing of the blocks `__libc_malloc` gave.
///
/// # Safety
///
/// `p` is null or a live allocation.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> size_t {
    if p.is_null() {
        return 0;
    }
    if heap::owns(p.cast()) {
        // SAFETY: our live block.
        return unsafe { heap::usable_size(p.cast()) };
    }
    static GLIBC: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut f = GLIBC.load(std::sync::atomic::Ordering::Acquire);
    if f == 0 {
        // SAFETY: libc.so.6 is loaded (RTLD_NOLOAD only takes a handle on it); a static name.
        f = unsafe {
            let libc_so = libc::dlopen(c"libc.so.6".as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if libc_so.is_null() {
                return 0;
            }
            libc::dlsym(libc_so, c"malloc_usable_size".as_ptr()) as usize
        };
        if f == 0 {
            return 0;
        }
        GLIBC.store(f, std::sync::atomic::Ordering::Release);
    }
    // SAFETY: glibc's malloc_usable_size has this signature; `p` is one of its blocks.
    unsafe {
        let f: extern "C" fn(*mut c_void) -> size_t = std::mem::transmute(f);
        f(p)
    }
}
