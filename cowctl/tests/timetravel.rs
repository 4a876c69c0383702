//! Time-travel debugging on the host (no cow.ko: the `uffd` backend, and `scan` for the live and
//! corrupted-recording checks), with Debian's real gdb:
//! a program with a planted bug is recorded, and `cowctl debug -batch` must find the first
//! checkpoint where its invariant is broken, show the stack and locals there, list exactly the
//! checkpoints where the broken field changed, show every thread, and debug a crash post mortem.
//! The same checks run in the guest on cow.ko (qemu-tests `timetravel::`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cowctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cowctl"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("delorean-tt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles the planted-bug program with debug information.
fn buggy_list(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-tests/c/buggy_list.c");
    let exe = dir.join("buggy_list");
    let out = Command::new("cc")
        .args(["-g", "-O0", "-pthread", "-o"])
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

fn record(dir: &Path, exe: &Path, args: &[&str]) -> (Output, PathBuf) {
    record_with(dir, exe, &[], args)
}

/// [`record`] with more options for `cowctl record`.
fn record_with(dir: &Path, exe: &Path, options: &[&str], args: &[&str]) -> (Output, PathBuf) {
    let rec = dir.join("rec");
    let out = cowctl()
        .args(["record", "--every", "3", "--backend", "uffd"])
        .args(options)
        .arg("--out")
        .arg(&rec)
        .arg("--")
        .arg(exe)
        .args(args)
        .output()
        .unwrap();
    (out, rec)
}

/// Runs gdb in batch mode on the recording; returns its stdout + stderr.
fn debug(rec: &Path, commands: &[&str]) -> String {
    let mut cmd = cowctl();
    cmd.arg("debug").arg(rec).arg("-batch");
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gdb failed: {text}");
    text
}

/// The value printed by `printf "KEY=%ld\n", …`.
fn value(text: &str, key: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The checkpoint a `delorean` command moved to ("checkpoint N at …").
fn checkpoint_of(text: &str, nth: usize) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("checkpoint "))
        .nth(nth)
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no checkpoint line {nth} in:\n{text}"))
        .parse()
        .unwrap()
}

fn bug_at(stderr: &[u8]) -> i64 {
    String::from_utf8_lossy(stderr)
        .lines()
        .find_map(|l| l.strip_prefix("bug at "))
        .expect("the program says where the bug is")
        .parse()
        .unwrap()
}

#[test]
fn search_finds_the_first_broken_checkpoint_and_when_lists_its_changes() {
    let dir = scratch("search");
    let exe = buggy_list(&dir);
    let (out, rec) = record(&dir, &exe, &["11", "150"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bug = bug_at(&out.stderr);
    let text = debug(
        &rec,
        &[
            "delorean search list.head->magic != 0x5eed",
            "printf \"IT=%ld\\n\", iteration",
            "printf \"MAGIC=%ld\\n\", list.head->magic",
            "bt",
            "delorean prev",
            "printf \"PREV_IT=%ld\\n\", iteration",
            "printf \"PREV_MAGIC=%ld\\n\", list.head->magic",
            "delorean when list.head->magic",
            "delorean search list.head->magic != 0x5eed --linear",
        ],
    );
    let found = checkpoint_of(&text, 0);
    assert_eq!(value(&text, "MAGIC"), 0xbad, "{text}");
    assert_eq!(value(&text, "PREV_MAGIC"), 0x5eed, "{text}");
    // The bug happened between the two checkpoints: iteration `bug` was running at one of them.
    assert!(value(&text, "IT") >= bug, "{text}");
    assert!(value(&text, "PREV_IT") <= bug, "{text}");
    assert!(
        text.contains(" main ") || text.contains("in main"),
        "{text}"
    );
    // `when` lists the checkpoints where the magic's bytes changed (its initialisation, then
    // the bug): the last is the one search found. Linear search agrees.
    let when: Vec<u64> = text
        .lines()
        .find(|l| !l.trim().is_empty() && l.split_whitespace().all(|w| w.parse::<u64>().is_ok()))
        .expect("a when line")
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(when.last(), Some(&found), "{text}");
    assert_eq!(checkpoint_of(&text, 2), found, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn frames_and_locals_of_the_past() {
    let dir = scratch("frames");
    let exe = buggy_list(&dir);
    // A checkpoint at each entry of insert() as well: the first checkpoint that sees
    // iteration 60 is then inside step(60), whenever the interval ones land.
    let (out, rec) = record_with(&dir, &exe, &["--at", "insert"], &["3", "120"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first checkpoint of iteration 60: inside step(60), in the middle of the run.
    let text = debug(
        &rec,
        &[
            "delorean search iteration >= 60",
            "bt",
            "frame function step",
            "info locals",
            "printf \"I=%ld VALUE=%ld\\n\", i, value",
        ],
    );
    assert!(text.contains("step (i="), "{text}");
    assert!(text.contains("main (argc="), "{text}");
    let line = text.lines().find(|l| l.starts_with("I=")).expect(&text);
    let i: i64 = line[2..line.find(' ').unwrap()].parse().unwrap();
    assert_eq!(i, 60, "{text}");
    assert!(line.ends_with(&format!("VALUE={}", i * 7 + 1)), "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_thread_has_its_stack_at_a_past_checkpoint() {
    let dir = scratch("threads");
    let exe = buggy_list(&dir);
    let (out, rec) = record(&dir, &exe, &["5", "120", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = debug(
        &rec,
        &[
            "delorean search iteration >= 50",
            "info threads",
            "thread apply all bt",
        ],
    );
    let threads = text.lines().filter(|l| l.contains("Thread 1.")).count();
    assert!(threads >= 3, "{text}");
    assert_eq!(text.matches("in worker (").count(), 2, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_crash_is_debugged_post_mortem() {
    let dir = scratch("crash");
    let exe = buggy_list(&dir);
    let (out, rec) = record(&dir, &exe, &["2", "40", "1", "crash"]);
    assert_eq!(
        out.status.code(),
        Some(128 + 11),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = cowctl()
        .args(["recording", "info", "--json"])
        .arg(&rec)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["last_reason"], "crash", "{info}");
    assert_eq!(info["last_signal"], 11, "{info}");
    let text = debug(
        &rec,
        &["delorean present", "bt", "printf \"LEN=%ld\\n\", l->length"],
    );
    assert!(text.contains("crash_now (l="), "{text}");
    assert_eq!(value(&text, "LEN"), 40, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_program_leaves_a_readable_recording() {
    let dir = scratch("kill");
    let exe = buggy_list(&dir);
    let rec = dir.join("rec");
    let mut child = cowctl()
        .args(["record", "--every", "3", "--backend", "scan", "--out"])
        .arg(&rec)
        .arg("--")
        .arg(&exe)
        .args(["1", "5000"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    // The recorder's child is the program.
    let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
    let pid: i32 = kids
        .split_whitespace()
        .next()
        .expect("the program runs")
        .parse()
        .unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 9));
    let info = cowctl()
        .args(["recording", "info", "--json"])
        .arg(&rec)
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["checkpoints"].as_u64().unwrap() > 10, "{info}");
    let text = debug(
        &rec,
        &["delorean present", "printf \"LEN=%ld\\n\", list.length"],
    );
    assert!(value(&text, "LEN") > 10, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn at_checkpoints_every_entry_of_a_function_in_every_thread() {
    let dir = scratch("at");
    let exe = buggy_list(&dir);
    let rec = dir.join("rec");
    // Two workers and main call insert() 25 times each; only main calls step().
    let out = cowctl()
        .args([
            "record",
            "--at",
            "step",
            "--at",
            "insert",
            "--backend",
            "uffd",
        ])
        .arg("--out")
        .arg(&rec)
        .arg("--")
        .arg(&exe)
        .args(["4", "25", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("a checkpoint at each entry of step"),
        "{stderr}"
    );
    // At every checkpoint: which function the thread it is about was entering (1: insert,
    // 2: step, 0: neither) and step's argument.
    let text = debug(
        &rec,
        &["delorean for 1-1000 do printf \"AT=%d RDI=%ld\\n\", ($pc == (long)&insert) + 2 * ($pc == (long)&step), $rdi"],
    );
    let reasons: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("checkpoint "))
        .map(|l| l.rsplit('(').next().unwrap())
        .collect();
    let at: Vec<(i64, i64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("AT="))
        .map(|l| {
            let (a, r) = l.split_once(" RDI=").unwrap();
            (a.parse().unwrap(), r.trim().parse().unwrap())
        })
        .collect();
    assert_eq!(reasons.len(), at.len(), "{text}");
    let breakpoints = reasons
        .iter()
        .filter(|r| r.starts_with("Breakpoint"))
        .count();
    assert_eq!(breakpoints, 25 + 75, "{text}");
    // Every breakpoint checkpoint shows its thread at the function's first instruction.
    for (reason, (a, _)) in reasons.iter().zip(&at) {
        if reason.starts_with("Breakpoint") {
            assert!(*a == 1 || *a == 2, "{reason} {a}\n{text}");
        }
    }
    assert_eq!(at.iter().filter(|(a, _)| *a == 1).count(), 75, "{text}");
    // step(i) was entered with i = 0, 1, 2, … in order.
    let steps: Vec<i64> = at
        .iter()
        .filter(|(a, _)| *a == 2)
        .map(|(_, r)| *r)
        .collect();
    assert_eq!(steps, (0..25).collect::<Vec<_>>(), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn at_names_an_unknown_function_before_running_anything() {
    let dir = scratch("at-unknown");
    let exe = buggy_list(&dir);
    let out = cowctl()
        .args([
            "record",
            "--at",
            "no_such_function",
            "--backend",
            "scan",
            "--out",
        ])
        .arg(dir.join("rec"))
        .arg("--")
        .arg(&exe)
        .args(["1", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no function no_such_function"), "{stderr}");
    assert!(!stderr.contains("iter 0"), "the program ran: {stderr}");
    assert!(!dir.join("rec").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn recording_a_live_pid_leaves_the_program_unchanged_scan() {
    live_pid_unchanged("scan");
}

/// On uffd the recorder also made the program create a userfaultfd (and closed the program's
/// copy): its descriptor table must end as it was.
#[test]
fn recording_a_live_pid_leaves_the_program_unchanged_uffd() {
    live_pid_unchanged("uffd");
}

fn fds_of(pid: u32) -> Vec<(String, std::path::PathBuf)> {
    let mut fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_link(e.path()).unwrap_or_default())
        })
        .collect();
    fds.sort();
    fds
}

fn live_pid_unchanged(backend: &str) {
    let dir = scratch(&format!("pid-{backend}"));
    let exe = buggy_list(&dir);
    // The program waits on its stdin before it exits, so it is still there to be looked at
    // however long the recorder takes to let go and finish.
    let args = ["5", "800", "1", "wait"];
    let plain = Command::new(&exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(plain.status.success());
    let mut program = Command::new(&exe)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fds_before = fds_of(program.id());
    let rec = dir.join("rec");
    // Interval checkpoints and breakpoints (which must be gone from the debug registers when
    // the recorder lets go: a leftover one would kill the program with SIGTRAP).
    let recorder = cowctl()
        .args([
            "record",
            "--every",
            "2",
            "--at",
            "step",
            "--backend",
            backend,
            "--out",
        ])
        .arg(&rec)
        .arg("--pid")
        .arg(program.id().to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
    let recorded = recorder.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&recorded.stderr);
    assert!(recorded.status.success(), "{stderr}");
    assert!(
        stderr.contains("goes on"),
        "the program ended before SIGINT: {stderr}"
    );
    assert_eq!(fds_of(program.id()), fds_before);
    drop(program.stdin.take()); // end of its input: it exits
    let live = program.wait_with_output().unwrap();
    assert!(live.status.success(), "{live:?}");
    assert_eq!(live.stdout, plain.stdout);
    assert_eq!(live.stderr, plain.stderr);
    // The recording holds the stretch recorded: the program mid-run, its stack included.
    let text = debug(
        &rec,
        &["delorean present", "bt", "printf \"IT=%ld\\n\", iteration"],
    );
    assert!(text.contains("main (argc="), "{text}");
    let it = value(&text, "IT");
    assert!(it > 0 && it < 799, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn recording_a_missing_pid_is_a_clear_error() {
    let out = cowctl()
        .args([
            "record",
            "--backend",
            "scan",
            "--out",
            "/nonexistent/rec",
            "--pid",
            "999999999",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("999999999"), "{stderr}");
}
