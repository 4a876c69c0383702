//! The backend-generic correctness suite on the host kernel: every mainline backend (uffd,
//! mprotect, fork), randomized
//! and byte-exact (the suite binary runs in its own process, because a restore rewinds the
//! whole process's memory).

use std::process::Command;

fn suite(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_cow-suite"))
        .args(args)
        .output()
        .expect("run cow-suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cow-suite {args:?}: {}\n{stdout}{stderr}",
        out.status
    );
    assert!(
        stdout.contains("zero differences") || stdout.contains("consistent cuts"),
        "{stdout}"
    );
}

fn uffd_supported() -> bool {
    let f = cow::probe::kernel_features();
    f.uffd_wp_async.available && f.pagemap_scan.available
}

#[test]
fn uffd_churn_is_byte_exact() {
    if !uffd_supported() {
        eprintln!("skipped: this kernel lacks userfaultfd WP_ASYNC or PAGEMAP_SCAN");
        return;
    }
    for seed in ["1", "2", "3"] {
        suite(&["uffd", "churn", "3000", seed]);
    }
}

#[test]
fn mprotect_churn_is_byte_exact() {
    for seed in ["1", "2", "3"] {
        suite(&["mprotect", "churn", "3000", seed]);
    }
}

#[test]
fn fork_churn_is_byte_exact() {
    for seed in ["1", "2"] {
        suite(&["fork", "churn", "2000", seed]);
    }
}

#[test]
fn fork_threads_see_consistent_cuts() {
    suite(&["fork", "threads"]);
}

#[test]
fn uffd_threads_see_consistent_cuts() {
    if uffd_supported() {
        suite(&["uffd", "threads"]);
    }
}

#[test]
fn mprotect_threads_see_consistent_cuts() {
    suite(&["mprotect", "threads"]);
}

#[test]
fn auto_picks_a_backend_and_says_why() {
    let c = cow::backend::choose_auto();
    assert!(["kmod", "uffd", "mprotect"].contains(&c.name));
    assert!(!c.reason.is_empty());
}

#[test]
fn mprotect_churn_with_random_speculation_hints_is_byte_exact() {
    // Pages left writable at random must never change what a snapshot holds.
    let out = Command::new(env!("CARGO_BIN_EXE_cow-suite"))
        .args(["mprotect", "churn", "3000", "9"])
        .env("COW_SUITE_RANDOM_HINTS", "1")
        .output()
        .expect("run cow-suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("zero differences"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn memory_merged_into_the_books_mapping_is_covered() {
    if uffd_supported() {
        suite(&["uffd", "book-neighbour"]);
    }
    suite(&["mprotect", "book-neighbour"]);
    suite(&["fork", "book-neighbour"]);
}
