//! The ioctl encoding must match the kernel's `_IOC` bit for bit.

use cow_abi::*;

#[test]
fn ioc_matches_known_kernel_numbers() {
    // UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api /* 24 bytes */) = 0xc018aa3f.
    assert_eq!(ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, 24), 0xc018_aa3f);
    // PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg /* 96 bytes */) = 0xc0606610.
    assert_eq!(ioc(IOC_READ | IOC_WRITE, b'f' as u32, 16, 96), 0xc060_6610);
    // TCGETS-style _IO with no size and no direction.
    assert_eq!(ioc(0, b'T' as u32, 1, 0), 0x5401);
}

#[test]
fn version_command_decodes() {
    assert_eq!(ioc_type(COW_IOC_VERSION), COW_IOC_MAGIC);
    assert_eq!(ioc_nr(COW_IOC_VERSION), nr::VERSION);
    assert_eq!((COW_IOC_VERSION >> 16) & 0x3fff, COW_VERSION_SIZE_V1);
    assert_eq!(COW_IOC_VERSION >> 30, IOC_READ | IOC_WRITE);
}

#[test]
fn command_numbers_avoid_vfs_reserved_ones() {
    // FIBMAP (1) and FIGETBSZ (2) never reach a driver.
    const { assert!(nr::VERSION >= 0x10) };
}
