//! Exit codes that mean something (listed in `cowctl --help`).

/// The operation failed.
pub const FAILURE: u8 = 1;
/// cow.ko is not loaded or speaks another ABI.
pub const NO_MODULE: u8 = 3;
/// Permission denied.
pub const PERMISSION: u8 = 4;
/// No such process or snapshot.
pub const NOT_FOUND: u8 = 5;

/// Maps an error chain to an exit code by the first libcow error or errno found in it.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<cow::Error>() {
            return match e {
                cow::Error::ModuleNotLoaded | cow::Error::AbiMismatch { .. } => NO_MODULE,
                other => code_for_errno(other.errno()),
            };
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            if let Some(errno) = e.raw_os_error() {
                return code_for_errno(errno);
            }
        }
    }
    FAILURE
}

fn code_for_errno(errno: i32) -> u8 {
    match errno {
        libc::EPERM | libc::EACCES => PERMISSION,
        libc::ESRCH | libc::ENOENT => NOT_FOUND,
        _ => FAILURE,
    }
}
