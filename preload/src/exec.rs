//! The exec family, wrapped so that an exec never carries a pending stop signal into the new
//! process image (see `cow::world::block_for_exec`): the stop signal is blocked in the calling
//! thread around the real call and unblocked again if it fails. Not wrapped: the variadic
//! `execl`, `execle` and `execlp` (stable Rust defines no C-variadic functions, and a C
//! definition linked into this library would not be exported), which glibc builds on its
//! internal `execve`. Shells, python's `os.exec*` and perl's `exec` use the wrapped ones; an
//! exec in a forked child is safe whichever it uses (nothing stops a child's thread).

use crate::raw::next;
use std::ffi::{c_char, c_int};
use std::sync::atomic::AtomicUsize;

/// Runs `exec` (libc's exec function named `name`, cached in `slot`) with the stop signal
/// blocked in this thread; if it returns (a failure), the mask is put back and `errno` is the
/// call's.
fn around_exec(
    slot: &AtomicUsize,
    name: &std::ffi::CStr,
    exec: impl FnOnce(usize) -> c_int,
) -> c_int {
    let f = next(slot, name);
    if f == 0 {
        // SAFETY: writing the calling thread's errno.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    let old = cow::world::block_for_exec();
    let rc = exec(f);
    // SAFETY: reading and writing the calling thread's errno around the mask change.
    unsafe {
        let errno = *libc::__errno_location();
        cow::world::restore_mask(&old);
        *libc::__errno_location() = errno;
    }
    rc
}

type Argv = *const *const c_char;

/// `execve(2)`.
///
/// # Safety
///
/// As `execve`.
#[no_mangle]
pub unsafe extern "C" fn execve(path: *const c_char, argv: Argv, envp: Argv) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    around_exec(&REAL, c"execve", |f| {
        // SAFETY: libc's execve has this signature; arguments forwarded.
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(*const c_char, Argv, Argv) -> c_int>(
                f,
            )(path, argv, envp)
        }
    })
}

/// `execv(3)`.
///
/// # Safety
///
/// As `execv`.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: Argv) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    around_exec(&REAL, c"execv", |f| {
        // SAFETY: libc's execv has this signature; arguments forwarded.
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(*const c_char, Argv) -> c_int>(f)(
                path, argv,
            )
        }
    })
}

/// `execvp(3)`.
///
/// # Safety
///
/// As `execvp`.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: Argv) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    around_exec(&REAL, c"execvp", |f| {
        // SAFETY: libc's execvp has this signature; arguments forwarded.
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(*const c_char, Argv) -> c_int>(f)(
                file, argv,
            )
        }
    })
}

/// `execvpe(3)`.
///
/// # Safety
///
/// As `execvpe`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: Argv, envp: Argv) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    around_exec(&REAL, c"execvpe", |f| {
        // SAFETY: libc's execvpe has this signature; arguments forwarded.
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(*const c_char, Argv, Argv) -> c_int>(
                f,
            )(file, argv, envp)
        }
    })
}

/// `fexecve(3)`.
///
/// # Safety
///
/// As `fexecve`.
#[no_mangle]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: Argv, envp: Argv) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    around_exec(&REAL, c"fexecve", |f| {
        // SAFETY: libc's fexecve has this signature; arguments forwarded.
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(c_int, Argv, Argv) -> c_int>(f)(
                fd, argv, envp,
            )
        }
    })
}

/// `execveat(2)` (glibc ≥ 2.34).
///
/// # Safety
///
/// As `execveat`.
#[no_mangle]
pub unsafe extern "C" fn execveat(
    dirfd: c_int,
    path: *const c_char,
    argv: Argv,
    envp: Argv,
    flags: c_int,
) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    around_exec(&REAL, c"execveat", |f| {
        type Execveat = unsafe extern "C" fn(c_int, *const c_char, Argv, Argv, c_int) -> c_int;
        // SAFETY: libc's execveat has this signature; arguments forwarded.
        unsafe { std::mem::transmute::<usize, Execveat>(f)(dirfd, path, argv, envp, flags) }
    })
}
