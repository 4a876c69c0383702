//! `cowctl record` loses nothing: a program churning its memory at random (heap blocks,
//! mmaps replaced in place and unmapped, dropped pages, the kernel writing into buffers,
//! memory made read-only after writes) is recorded on every backend this host offers, and at
//! every checkpoint taken between two of its steps the recorded memory must digest to what the
//! program stored there (see `qemu-tests/src/churn_check.rs`; the guest runs it on cow.ko).

#[path = "../../qemu-tests/src/churn_check.rs"]
mod churn_check;

use std::path::{Path, PathBuf};
use std::process::Command;

fn churn_program(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-tests/c/record_churn.c");
    let exe = dir.join("record_churn");
    let out = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("cc runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn record_and_check(backend: &str, seed: u32) {
    let dir = std::env::temp_dir().join(format!(
        "delorean-fidelity-{}-{backend}-{seed}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = churn_program(&dir);
    let rec = dir.join("rec");
    let out = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args(["record", "--every", "1", "--backend", backend, "--out"])
        .arg(&rec)
        .arg("--")
        .arg(&exe)
        .args([&seed.to_string(), "1500", "300"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("({backend})")), "{stderr}");
    let compared = churn_check::check(&rec, &stderr).unwrap_or_else(|e| panic!("{backend}: {e}"));
    // Checkpoints fall between steps most of the time: a run of ≈ 1 s every 1 ms must
    // give dozens to compare.
    assert!(
        compared >= 20,
        "{backend}: only {compared} checkpoints compared"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn host_has_uffd_wp_async() -> bool {
    let k = cow::probe::kernel_features();
    k.uffd_wp_async.available && k.pagemap_scan.available
}

#[test]
fn uffd_recording_matches_the_program_at_every_checkpoint() {
    if !host_has_uffd_wp_async() {
        eprintln!("skipped: this kernel lacks uffd WP_ASYNC (the guest covers kmod and scan)");
        return;
    }
    for seed in [1, 2, 3] {
        record_and_check("uffd", seed);
    }
}

#[test]
fn scan_recording_matches_the_program_at_every_checkpoint() {
    for seed in [1, 2] {
        record_and_check("scan", seed);
    }
}
