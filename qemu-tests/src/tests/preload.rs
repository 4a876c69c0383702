//! `cowctl run`: unmodified programs with their heap and globals under cow.ko (libcow_preload).

use super::sibling;
use crate::Test;
use anyhow::{ensure, Result};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "preload::heap_and_globals_are_covered",
            run: heap_and_globals_are_covered,
        },
        Test {
            name: "preload::randomized_churn_byte_exact",
            run: randomized_churn_byte_exact,
        },
        Test {
            name: "preload::snapshots_under_thread_churn",
            run: snapshots_under_thread_churn,
        },
        Test {
            name: "preload::threads_start_and_take_signals_amid_snapshots",
            run: threads_start_and_take_signals_amid_snapshots,
        },
        Test {
            name: "preload::fork_keeps_posix_semantics",
            run: fork_keeps_posix_semantics,
        },
        Test {
            name: "preload::exit_code_is_the_programs",
            run: exit_code_is_the_programs,
        },
        Test {
            name: "preload::subshells_fork_without_false_warnings",
            run: subshells_fork_without_false_warnings,
        },
    ]
}

/// bash forks subshells of subshells: the first fork privatises the child's memory, so a fork
/// in that child shares nothing and must not warn that it does (it did, once per fork).
fn subshells_fork_without_false_warnings() -> Result<()> {
    let out = cowctl_run(&[
        "/bin/bash",
        "-c",
        "x=1; ( ( y=$((x + 1)); echo $y ) ); ( (echo b) ); echo $x",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bash failed: {stderr}");
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "2\nb\n1\n",
        "output {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(!stderr.contains("libcow_preload"), "warnings: {stderr}");
    Ok(())
}

fn cowctl_run(argv: &[&str]) -> Result<std::process::Output> {
    super::cowctl_run(&[], argv)
}

fn run_ok(prog: &str, args: &[&str]) -> Result<String> {
    let exe = sibling(prog)?;
    let exe = exe.to_str().unwrap_or_default();
    let mut all = vec![exe];
    all.extend_from_slice(args);
    super::stdout_of_success(&cowctl_run(&all)?, prog)
}

fn heap_and_globals_are_covered() -> Result<()> {
    // An ordinary Debian binary: its maps show the covered heap and globals.
    let out = cowctl_run(&["/bin/cat", "/proc/self/maps"])?;
    ensure!(
        out.status.success(),
        "cat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let maps = String::from_utf8_lossy(&out.stdout);
    let cow: Vec<&str> = maps.lines().filter(|l| l.ends_with("/dev/cow")).collect();
    ensure!(
        cow.len() >= 2,
        "expected heap and globals mappings of /dev/cow:\n{maps}"
    );
    let cat_globals = maps
        .lines()
        .any(|l| l.ends_with("/dev/cow") && l.split_whitespace().nth(1) == Some("rw-s"));
    ensure!(cat_globals, "no writable shared /dev/cow mapping:\n{maps}");
    ensure!(
        out.stderr.is_empty(),
        "warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn randomized_churn_byte_exact() -> Result<()> {
    for seed in ["0x243F6A8885A308D3", "12345", "987654321"] {
        let out = run_ok("preload_churn", &["4000", seed])?;
        ensure!(out.contains("zero differences"), "{out}");
    }
    Ok(())
}

fn snapshots_under_thread_churn() -> Result<()> {
    let out = run_ok("preload_threads", &[])?;
    ensure!(out.contains("restores coherent"), "{out}");
    Ok(())
}

/// Threads started on glibc's cached stacks after a snapshot, and a signal handler writing
/// covered memory while its thread takes first-write faults (both once fatal on mprotect).
fn threads_start_and_take_signals_amid_snapshots() -> Result<()> {
    let out = run_ok("thread_starts", &["100"])?;
    ensure!(out.contains("thread starts: ok"), "{out}");
    Ok(())
}

fn fork_keeps_posix_semantics() -> Result<()> {
    let out = run_ok("preload_fork", &[])?;
    ensure!(out.contains("no writes crossed"), "{out}");
    Ok(())
}

fn exit_code_is_the_programs() -> Result<()> {
    let out = cowctl_run(&["/bin/sh", "-c", "exit 7"])?;
    ensure!(
        out.status.code() == Some(7),
        "exit 7 -> {:?}",
        out.status.code()
    );
    let out = cowctl_run(&["/bin/sh", "-c", "kill -9 $$"])?;
    ensure!(
        out.status.code() == Some(137),
        "SIGKILL -> {:?}",
        out.status.code()
    );
    let out = cowctl_run(&["/nonexistent/program"])?;
    ensure!(
        out.status.code() == Some(5),
        "missing program -> {:?}",
        out.status.code()
    );
    Ok(())
}
