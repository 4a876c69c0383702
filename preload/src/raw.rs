//! Allocation-free helpers: this library runs inside `malloc`, where nothing may allocate.

/// Writes bytes to stderr with write(2).
pub(crate) fn write_stderr(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to descriptor 2; errors are ignored (nowhere to report).
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// Formats `v` in decimal into `buf`, returning the digits.
pub(crate) fn format_decimal(mut v: u64, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Reads a decimal environment variable without allocating.
pub(crate) fn env_u64(name: &std::ffi::CStr) -> Option<u64> {
    // SAFETY: getenv with a NUL-terminated name; the result is a NUL-terminated string owned by
    // the environment, read immediately.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: as above.
    let s = unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes();
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
