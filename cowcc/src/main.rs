//! `cowcc`: a drop-in C compiler for Delorean's `lmc` backend (`CC=cowcc make`,
//! `cowcc -O2 -o prog prog.c`).
//!
//! It runs Debian's clang-16 with the project's pass plugin (`libcow_lmc_pass.so`, which
//! instruments every write not into the function's own frame) and, when it links, with libcow
//! (the runtime: `cow_init("lmc")`). Both are found next to `cowctl`/`cowcc` in cargo's target
//! directory; `COWCC_CLANG`, `COWCC_PLUGIN` and `COWCC_LIBDIR` override them.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const HELP: &str = "\
cowcc: clang-16 with Delorean's write instrumentation (the lmc backend)

Usage: cowcc [CLANG ARGUMENTS]...

Every argument goes to clang-16; cowcc adds -fpass-plugin=libcow_lmc_pass.so and, when it
links, wrappers for libc functions that write the program's memory (read, recv*, fread, fgets,
str*cpy/cat, mem*, qsort, *sprintf, the heap functions, sigaction/signal and the signal-mask functions: -Wl,--wrap) and -lcow (with an rpath to it). The program then calls cow_init(\"lmc\") (cow.h) or runs
under `cowctl run --backend lmc`.

Examples:
  cowcc -O2 -o prog prog.c
  CC=cowcc make
  cowcc -c -O2 part.c && cowcc -o prog part.o main.c

Environment: COWCC_CLANG (default clang-16), COWCC_PLUGIN, COWCC_LIBDIR (default: the directory
of cowcc itself, cargo's target/release).";

/// libc functions that write the caller's memory: a program's references to them are wrapped
/// (`-Wl,--wrap`), and the wrappers in `src/wrappers.c` save the bytes first.
/// (The heap functions: the wrappers' allocator saves its own metadata too; `mmap`/`munmap`:
/// shared mappings are not covered; `pthread_create`: a program with threads gathers them at
/// safe points for its own snapshots; `sigaction`/`signal`: safe points fault into libcow's
/// `SIGSEGV` handler, which passes other faults to the program's; the functions that take a
/// signal mask: `SIGSEGV` and lmc's park signal are never really blocked, see libcow's
/// `segv_mask.rs`; `sigwait`, its kin and `signalfd`: they never take the park signal.)
const WRAPPED: [&str; 50] = [
    "read",
    "pread",
    "readv",
    "preadv",
    "recv",
    "recvfrom",
    "recvmsg",
    "fread",
    "fgets",
    "strcpy",
    "stpcpy",
    "strncpy",
    "strcat",
    "strncat",
    "memcpy",
    "memmove",
    "memset",
    "qsort",
    "sprintf",
    "snprintf",
    "vsprintf",
    "vsnprintf",
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "malloc_usable_size",
    "strdup",
    "strndup",
    "mmap",
    "munmap",
    "pthread_create",
    "sigaction",
    "signal",
    "sigprocmask",
    "pthread_sigmask",
    "sigsuspend",
    "ppoll",
    "pselect",
    "epoll_pwait",
    "epoll_pwait2",
    "sigwait",
    "sigwaitinfo",
    "sigtimedwait",
    "signalfd",
    "pthread_attr_setsigmask_np",
];

/// The wrappers' static library, built by build.rs.
const WRAPPERS: &str = concat!(env!("OUT_DIR"), "/libcow_lmc_wrappers.a");

/// Arguments after which clang does not link.
const NO_LINK: [&str; 6] = ["-c", "-S", "-E", "-M", "-MM", "-fsyntax-only"];

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(PathBuf::from)
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--cowcc-help") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let libdir = env_path("COWCC_LIBDIR").unwrap_or_else(|| here.clone());
    let plugin = env_path("COWCC_PLUGIN").unwrap_or_else(|| libdir.join("libcow_lmc_pass.so"));
    if !plugin.exists() {
        eprintln!(
            "cowcc: {} not found: build it with `cargo build --release -p cow-lmc-pass` or set COWCC_PLUGIN",
            plugin.display()
        );
        return ExitCode::from(2);
    }
    let clang = env_path("COWCC_CLANG").unwrap_or_else(|| "clang-16".into());
    let mut cmd = Command::new(&clang);
    let mut plugin_arg = OsString::from("-fpass-plugin=");
    plugin_arg.push(&plugin);
    cmd.arg(plugin_arg);
    // cow.h, from the source tree cargo's target directory sits in (if it is there).
    let include = here.join("../../libcow/include");
    if include.join("cow.h").exists() {
        cmd.arg("-I").arg(include);
    }
    cmd.args(&args);
    let links = !args.iter().any(|a| NO_LINK.iter().any(|n| a == n));
    if links {
        let wrappers = env_path("COWCC_WRAPPERS").unwrap_or_else(|| WRAPPERS.into());
        let mut wrap = String::from("-Wl");
        for name in WRAPPED {
            wrap.push_str(",--wrap=");
            wrap.push_str(name);
        }
        let mut rpath = OsString::from("-Wl,-rpath,");
        rpath.push(&libdir);
        cmd.arg(wrap).arg(wrappers);
        cmd.arg("-L").arg(&libdir).arg("-lcow").arg(rpath);
    }
    let err = cmd.exec();
    eprintln!("cowcc: cannot run {}: {err}", clang.display());
    ExitCode::from(127)
}
