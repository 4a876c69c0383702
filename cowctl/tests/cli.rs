//! cowctl's contract on a machine without cow.ko: usage errors, exit codes, messages that name
//! the problem, quiet exits into closed pipes. (What needs the module runs in the guest:
//! `qemu-tests/src/tests/remote.rs`.)

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};

fn cowctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cowctl"))
}

fn run(args: &[&str]) -> Output {
    cowctl().args(args).output().expect("cowctl runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn module_loaded() -> bool {
    std::path::Path::new("/dev/cow").exists()
}

#[test]
fn bad_usage_exits_2_before_any_work() {
    for args in [
        &["bench", "--backends", "nope"][..],
        &[
            "bench",
            "--backends",
            "mprotect",
            "--size",
            "1",
            "--dirty-pages",
            "0",
        ],
        &["bench", "--size", "0"],
        &["bench", "--rounds", "0"],
        &["bench", "--rounds", "100"],
        &["bench", "--speculate", "bogus"],
        &[
            "bench",
            "--backends",
            "mprotect",
            "--size",
            "1",
            "--dirty-pages",
            "300",
        ],
        &["run", "--every", "0", "--", "true"],
        &["run", "--heap-mib", "1", "--", "true"],
        &["run", "--speculate", "bogus", "--", "true"],
        &["run", "--backend", "nope", "--", "true"],
        &["snapshot", "0"],
        &["snapshot", "--", "-1"],
        &["restore", "abc", "1"],
        &["list"],
        &["completions", "tcsh-9000"],
    ] {
        let t = std::time::Instant::now();
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        // No baseline measured, no program run: usage errors come first.
        assert!(t.elapsed().as_secs() < 5, "{args:?} took {:?}", t.elapsed());
        assert!(
            !stderr(&o).contains("measuring"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

/// Runs cowctl with stdout a pipe whose read end is already closed: every write fails (EPIPE).
fn into_closed_pipe(args: &[&str]) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    cowctl()
        .args(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["--help"],
        &["completions", "bash"],
        &["man"],
    ] {
        let o = into_closed_pipe(args);
        // As `cat` does: killed by SIGPIPE, nothing on stderr (no panic, no backtrace).
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            o.status
        );
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

#[test]
fn version_names_the_abi() {
    let o = run(&["--version"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ABI version"), "{out}");
}

#[test]
fn completions_and_manual_page_come_from_the_cli_definition() {
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success());
    let text = String::from_utf8_lossy(&bash.stdout);
    assert!(
        text.contains("cowctl") && text.contains("--speculate"),
        "{text}"
    );
    let man = run(&["man"]);
    assert!(man.status.success());
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
    assert!(text.contains("snapshot"), "{text}");
}

#[test]
fn bench_records_the_rounds_it_ran() {
    let o = run(&[
        "bench",
        "--backends",
        "mprotect",
        "--size",
        "1",
        "--dirty-pages",
        "1,256",
        "--rounds",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["rounds"], 3, "{r}");
    }
}

#[test]
fn bench_without_the_module_exits_3() {
    if module_loaded() {
        return;
    }
    let o = run(&[
        "bench",
        "--backends",
        "kmod",
        "--size",
        "1",
        "--dirty-pages",
        "1",
        "--rounds",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cow.ko is not loaded"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn no_such_process_exits_5() {
    // pid_max is at most 2^22: this pid cannot exist.
    let o = run(&["list", "2147483647"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("no such process"), "{}", stderr(&o));
}

#[test]
fn a_thread_id_is_named_as_a_thread() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap();
    let o = run(&["snapshot", &tid.to_string()]);
    done_tx.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let me = std::process::id();
    assert!(
        stderr(&o).contains(&format!("{tid} is a thread of process {me}")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_zombie_is_named_as_a_zombie() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    // Not reaped yet: wait until it is a zombie.
    for _ in 0..500 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        if stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z')
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let o = run(&["stats", &pid.to_string()]);
    child.wait().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a zombie"), "{}", stderr(&o));
}

#[test]
fn a_process_without_libcow_is_explained() {
    let mut dynamic = Command::new("sleep").arg("30").spawn().unwrap();
    let o = run(&["list", &dynamic.id().to_string()]);
    dynamic.kill().unwrap();
    dynamic.wait().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("start it with `cowctl run`"),
        "{}",
        stderr(&o)
    );
    // A static program could never have been covered: say that instead.
    let Ok(mut stat) = Command::new("busybox").args(["sleep", "30"]).spawn() else {
        return;
    };
    let o = run(&["list", &stat.id().to_string()]);
    stat.kill().unwrap();
    stat.wait().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("statically linked"), "{}", stderr(&o));
}

#[test]
fn run_refuses_to_checkpoint_a_static_program() {
    if Command::new("busybox").arg("true").status().is_err() {
        return;
    }
    let o = run(&["run", "--every", "10", "--", "busybox", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("statically linked"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--every is refused"), "{}", stderr(&o));
    // Without --every: a warning, then (here, without the module) exit 3.
    let o = run(&["run", "--", "busybox", "true"]);
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
    if !module_loaded() {
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    }
}

#[test]
fn run_of_a_missing_program_says_so() {
    let o = run(&["run", "--", "no-such-program-delorean"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("command not found"), "{}", stderr(&o));
}

#[test]
fn bench_record_reports_every_field_per_codec() {
    let o = run(&["bench", "--record", "--record-every", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let codecs: Vec<&str> = rows.iter().filter_map(|r| r["codec"].as_str()).collect();
    for c in ["zstd", "lz4", "none"] {
        assert!(codecs.contains(&c), "{codecs:?}");
    }
    for r in rows {
        for field in [
            "backend",
            "workload",
            "codec",
            "checkpoints",
            "ckpt_per_s",
            "slowdown",
            "store_overhead",
            "checkpoints_no_store",
            "stop_us",
            "bytes_per_ckpt",
            "dedup_ratio",
            "compress_ratio",
            "goto_ms",
            "search_ms",
            "when_ms",
        ] {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
        // How many depends on the machine's speed (a store that falls behind thins them out;
        // the program does not wait for it): at least the start, one interval and the exit.
        assert!(r["checkpoints"].as_u64().unwrap() >= 3, "{r}");
        assert!(r["checkpoints_no_store"].as_u64().unwrap() >= 3, "{r}");
        assert!(r["slowdown"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["store_overhead"].as_f64().unwrap() > 0.0, "{r}");
        // `cowctl run` has every backend but scan.
        assert_eq!(r["run_slowdown"].is_null(), r["backend"] == "scan", "{r}");
    }
}
