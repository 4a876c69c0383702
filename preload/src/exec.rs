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

/// Defines the exec function `name`, with libc's signature, as libc's run by [`around_exec`].
macro_rules! wrapped_exec {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// As libc's function of the same name.
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> c_int {
            static REAL: AtomicUsize = AtomicUsize::new(0);
            const NAME: &std::ffi::CStr =
                match std::ffi::CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                    Ok(name) => name,
                    Err(_) => panic!("a function name has no NUL"),
                };
            around_exec(&REAL, NAME, |f| {
                // SAFETY: libc's function of this name has this signature; the caller's
                // arguments are forwarded unchanged.
                unsafe {
                    std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) -> c_int>(f)($($arg),*)
                }
            })
        }
    };
}

wrapped_exec!(
    /// `execve(2)`.
    execve(path: *const c_char, argv: Argv, envp: Argv)
);
wrapped_exec!(
    /// `execv(3)`.
    execv(path: *const c_char, argv: Argv)
);
wrapped_exec!(
    /// `execvp(3)`.
    execvp(file: *const c_char, argv: Argv)
);
wrapped_exec!(
    /// `execvpe(3)`.
    execvpe(file: *const c_char, argv: Argv, envp: Argv)
);
wrapped_exec!(
    /// `fexecve(3)`.
    fexecve(fd: c_int, argv: Argv, envp: Argv)
);
wrapped_exec!(
    /// `execveat(2)` (glibc ≥ 2.34).
    execveat(dirfd: c_int, path: *const c_char, argv: Argv, envp: Argv, flags: c_int)
);

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
