//! The exec family, wrapped so that an exec never carries a pending stop signal into the new
//! process image (see `cow::world::block_for_exec`): the stop signal is blocked in the calling
//! thread around the real call and unblocked again if it fails. glibc builds the variadic
//! `execl`, `execle` and `execlp` on its internal `execve`, which no preload can wrap, so they
//! are defined here too (x86-64: a naked trampoline hands the argument list to Rust; stable
//! Rust defines no C-variadic functions, and a C definition would not be exported from this
//! library) on top of the wrapped `execv`, `execve` and `execvp`.

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

/// Most arguments `execl`, `execle` and `execlp` take here (their list is gathered on the
/// stack); more is `E2BIG`.
const MAX_LIST_ARGS: usize = 1024;

/// Which variadic exec a trampoline below stands for.
const EXECL: usize = 0;
const EXECLP: usize = 1;
const EXECLE: usize = 2;

/// The body of `execl`, `execlp` and `execle`: gathers the argument list that the trampoline
/// found in registers (`regs`: the 2nd to 6th integer arguments, from `arg0` on) and on the
/// caller's stack (`stack`: the 7th argument on), then calls the wrapped `execv`, `execvp` or
/// `execve`.
///
/// # Safety
///
/// Called only by the trampolines, with the variadic call's arguments as the x86-64 System V
/// ABI places them: a NULL-terminated list of pointers from `regs[0]` on, continued at
/// `stack[0]`, followed (for `execle`) by the environment pointer.
unsafe extern "C" fn exec_list(
    kind: usize,
    path: *const c_char,
    regs: *const *const c_char,
    stack: *const *const c_char,
) -> c_int {
    let mut argv = [std::ptr::null::<c_char>(); MAX_LIST_ARGS + 1];
    let arg = |i: usize| {
        // SAFETY: the caller passed a NULL-terminated list; `i` never goes past its NULL (the
        // loop below stops there), and `regs` holds five slots.
        unsafe {
            if i < 5 {
                *regs.add(i)
            } else {
                *stack.add(i - 5)
            }
        }
    };
    let mut n = 0;
    loop {
        let a = arg(n);
        if a.is_null() {
            break;
        }
        if n == MAX_LIST_ARGS {
            // SAFETY: writing the calling thread's errno.
            unsafe { *libc::__errno_location() = libc::E2BIG };
            return -1;
        }
        argv[n] = a;
        n += 1;
    }
    let argv = argv.as_ptr();
    // SAFETY: `argv` is NULL-terminated (entry `n`); the wrappers' contracts are exec's. For
    // `execle` the environment follows the list's NULL.
    unsafe {
        match kind {
            EXECLP => execvp(path, argv),
            EXECLE => execve(path, argv, arg(n + 1) as Argv),
            _ => execv(path, argv),
        }
    }
}

/// Defines a variadic exec as a trampoline (stable Rust defines no C-variadic functions): it
/// spills the 2nd to 6th integer argument registers next to each other and calls
/// [`exec_list`] with them and the address of the caller's stack arguments.
macro_rules! variadic_exec {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[unsafe(no_mangle)]
        // SAFETY: the trampoline keeps to the System V ABI: the stack stays 16-byte aligned at
        // the call, it uses only caller-saved registers, and `exec_list` reads only the list
        // the variadic caller passed (see its contract).
        #[unsafe(naked)]
        pub extern "C" fn $name() {
            // At entry rsp ≡ 8 (mod 16): 56 bytes keep the call aligned; the caller's stack
            // arguments start at the entry rsp + 8 = rsp + 64.
            core::arch::naked_asm!(
                "sub rsp, 56",
                "mov [rsp], rsi",
                "mov [rsp + 8], rdx",
                "mov [rsp + 16], rcx",
                "mov [rsp + 24], r8",
                "mov [rsp + 32], r9",
                "mov rsi, rdi",
                "mov rdi, {kind}",
                "mov rdx, rsp",
                "lea rcx, [rsp + 64]",
                "call {body}",
                "add rsp, 56",
                "ret",
                kind = const $kind,
                body = sym exec_list,
            )
        }
    };
}

variadic_exec!(
    /// `execl(3)`: `execl(path, arg0, ..., NULL)`.
    execl,
    EXECL
);
variadic_exec!(
    /// `execlp(3)`: `execlp(file, arg0, ..., NULL)`.
    execlp,
    EXECLP
);
variadic_exec!(
    /// `execle(3)`: `execle(path, arg0, ..., NULL, envp)`.
    execle,
    EXECLE
);
