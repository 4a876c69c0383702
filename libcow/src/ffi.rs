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
