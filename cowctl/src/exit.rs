//! Exit codes that mean something (listed in `cowctl --help`).

/// The operation failed.
pub const FAILURE: u8 = 1;
/// Bad usage (clap exits with the same code for what it checks itself).
pub const USAGE: u8 = 2;
/// cow.ko is not loaded or speaks another ABI.
pub const NO_MODULE: u8 = 3;
/// Permission denied.
pub const PERMISSION: u8 = 4;
/// No such process or snapshot.
pub const NOT_FOUND: u8 = 5;

/// An error that carries its exit code (bad usage found after parsing, a worker's code).
#[derive(Debug)]
pub struct WithCode {
    /// The exit code.
    pub code: u8,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for WithCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WithCode {}

/// A usage error found after parsing (exit code 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    WithCode {
        code: USAGE,
        message: message.into(),
    }
    .into()
}

/// An error whose message says all there is (no "(os error N)" after it), with the exit
/// code `errno` maps to.
pub fn explained(errno: i32, message: impl Into<String>) -> anyhow::Error {
    WithCode {
        code: code_for_errno(errno),
        message: message.into(),
    }
    .into()
}

/// Maps an error chain to an exit code by the first explicit code, libcow error or errno
/// found in it.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<WithCode>() {
            return e.code;
        }
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
