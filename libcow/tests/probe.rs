//! Host tests of libcow that need no module.

#[test]
fn open_without_module_says_how_to_load_it() {
    if std::path::Path::new(cow::COW_DEVICE_PATH).exists() {
        return; // a host with the module loaded: nothing to check here
    }
    let err = cow::Cow::open().expect_err("no /dev/cow on the host");
    assert!(matches!(err, cow::Error::ModuleNotLoaded), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("cow.ko is not loaded"), "{msg}");
    assert_eq!(cow::ffi::cow_version(), -libc::ENODEV);
}

#[test]
fn strerror_is_never_null() {
    for e in [
        0,
        -libc::ENODEV,
        -libc::EPROTO,
        -libc::ENOENT,
        -99999,
        i32::MIN,
    ] {
        let p = cow::ffi::cow_strerror(e);
        assert!(!p.is_null());
        // SAFETY: cow_strerror returns a NUL-terminated static string.
        let s = unsafe { std::ffi::CStr::from_ptr(p) };
        assert!(!s.to_bytes().is_empty(), "empty text for {e}");
    }
}

#[test]
fn probes_answer_consistently() {
    // Whatever the host kernel, a probe says yes or no with a reason; twice the same.
    let a = cow::probe::kernel_features();
    let b = cow::probe::kernel_features();
    assert_eq!(a.uffd_wp_async.available, b.uffd_wp_async.available);
    assert_eq!(a.pagemap_scan.available, b.pagemap_scan.available);
    assert!(!a.uffd_wp_async.detail.is_empty());
    assert!(!a.kernel_release.is_empty());
}
