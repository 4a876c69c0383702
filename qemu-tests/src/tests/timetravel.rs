//! Time-travel debugging on cow.ko: `cowctl record --backend kmod` (the heap and globals in
//! the module, their pages read from kernel snapshots off the program's threads), then real gdb
//! finds the planted bug; and recordings of a random memory churn lose nothing, on kmod and
//! uffd. The host runs the same checks on the `uffd` and `scan` backends
//! (`cowctl/tests/timetravel.rs`).

use super::{child_of, sibling};
use crate::Test;
use anyhow::{bail, ensure, Context, Result};
use std::process::Command;

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "timetravel::kmod_search_finds_the_bug",
            run: kmod_search_finds_the_bug,
        },
        Test {
            name: "timetravel::kmod_record_pid_under_run",
            run: kmod_record_pid_under_run,
        },
        Test {
            name: "timetravel::kmod_debug_live_pid",
            run: kmod_debug_live_pid,
        },
        Test {
            name: "timetravel::kmod_recording_loses_nothing",
            run: || recording_loses_nothing("kmod"),
        },
        Test {
            name: "timetravel::uffd_recording_loses_nothing",
            run: || recording_loses_nothing("uffd"),
        },
    ]
}

/// A program churning its memory at random is recorded; at every checkpoint between two of
/// its steps the recorded memory must digest to what the program stored (`churn_check`).
fn recording_loses_nothing(backend: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("delorean-churn-{backend}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rec = dir.join("rec");
    let out = Command::new(sibling("cowctl")?)
        .args(["record", "--every", "2", "--backend", backend, "--out"])
        .arg(&rec)
        .arg("--")
        .arg(sibling("record_churn")?)
        .args(["7", "400", "1000"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "record: {stderr}");
    ensure!(
        stderr.contains(&format!("({backend})")),
        "not recorded on {backend}: {stderr}"
    );
    let compared = crate::churn_check::check(&rec, &stderr).map_err(anyhow::Error::msg)?;
    ensure!(
        compared >= 20,
        "only {compared} checkpoints fell between two steps"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn value(text: &str, key: &str) -> Result<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key}= in:\n{text}"))?
        .trim()
        .parse()
        .context(key.to_string())
}

fn kmod_search_finds_the_bug() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("delorean-tt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rec = dir.join("rec");
    let out = Command::new(sibling("cowctl")?)
        .args(["record", "--every", "5", "--backend", "kmod", "--out"])
        .arg(&rec)
        .arg("--")
        .arg(sibling("buggy_list")?)
        .args(["13", "120"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "record: {stderr}");
    let bug: i64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("bug at "))
        .context("no bug line")?
        .parse()?;
    let info = Command::new(sibling("cowctl")?)
        .args(["recording", "info", "--json"])
        .arg(&rec)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    ensure!(info["backend"] == "kmod", "{info}");
    let mut gdb = Command::new(sibling("cowctl")?);
    gdb.arg("debug").arg(&rec).arg("-batch");
    for c in [
        "delorean search list.head->magic != 0x5eed",
        "printf \"IT=%ld\\n\", iteration",
        "printf \"MAGIC=%ld\\n\", list.head->magic",
        "bt",
        "delorean prev",
        "printf \"PREV_IT=%ld\\n\", iteration",
        "printf \"PREV_MAGIC=%ld\\n\", list.head->magic",
        "delorean when list.head->magic",
    ] {
        gdb.args(["-ex", c]);
    }
    let out = gdb.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "gdb: {text}");
    let found: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint "))
        .and_then(|l| l.split_whitespace().next())
        .context("no checkpoint line")?
        .parse()?;
    ensure!(value(&text, "MAGIC")? == 0xbad, "{text}");
    ensure!(value(&text, "PREV_MAGIC")? == 0x5eed, "{text}");
    ensure!(
        value(&text, "IT")? >= bug && value(&text, "PREV_IT")? <= bug,
        "bug at {bug}:\n{text}"
    );
    ensure!(text.contains("in main"), "{text}");
    // `when` lists the checkpoints where the magic's bytes changed (its allocation and
    // initialisation, then the bug): the last of them is the one search found.
    let when: Vec<u64> = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && l.split_whitespace().all(|w| w.parse::<u64>().is_ok()))
        .context("no when line")?
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    ensure!(
        when.last() == Some(&found),
        "when {when:?}, search {found}:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `cowctl record --pid` on a program under `cowctl run`: its heap is read from the program's
/// own cow.ko space; when the recorder is told to stop, the program goes on undisturbed (its
/// log stays the unbroken sequence it prints unobserved) and none of the recorder's snapshots
/// stay behind.
fn kmod_record_pid_under_run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("delorean-tt-pid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rec = dir.join("rec");
    // Runs far longer than the test; stopped with SIGTERM at the end.
    let run = Command::new(sibling("cowctl")?)
        .args(["run", "--"])
        .arg(sibling("buggy_list")?)
        .args(["9", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The program is cowctl run's child, once its space exists.
    let mut pid = 0;
    for _ in 0..500 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        if let Some(p) = child_of(run.id() as i32) {
            let maps = std::fs::read_to_string(format!("/proc/{p}/maps")).unwrap_or_default();
            if maps.contains("/dev/cow") {
                pid = p;
                break;
            }
        }
    }
    ensure!(pid > 0, "cowctl run started no program");
    let recorder = Command::new(sibling("cowctl")?)
        // Checkpoints at `step` only: with periodic ones too, a slow guest (Debian's kernel on
        // one TCG thread) recorded the 8 waited for below before any at `step`, which the
        // search needs.
        .args(["record", "--at", "step", "--backend", "kmod", "--out"])
        .arg(&rec)
        .args(["--pid", &pid.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Until the recording holds a few checkpoints (at least one at `step`): how long that
    // takes depends on how fast this guest runs, so wait for it rather than for a fixed time.
    let cowctl = sibling("cowctl")?;
    let progress = |rec: &std::path::Path| -> u64 {
        Command::new(&cowctl)
            .args(["recording", "info", "--json"])
            .arg(rec)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["checkpoints"].as_u64())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while progress(&rec) <= 8 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
    let recorded = recorder.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&recorded.stderr);
    // The space's snapshots now: the recorder took them all, and dropped them all.
    let list = Command::new(sibling("cowctl")?)
        .args(["list", "--json", &pid.to_string()])
        .output()?;
    std::thread::sleep(std::time::Duration::from_millis(300)); // the program goes on
                                                               // SAFETY: as above; cowctl run passes SIGTERM on.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let live = run.wait_with_output()?;
    let log = String::from_utf8_lossy(&live.stderr);
    let tail: Vec<&str> = log.lines().rev().take(3).collect();
    ensure!(recorded.status.success(), "record --pid: {stderr}");
    ensure!(
        stderr.contains("goes on"),
        "the program ended first: {stderr}"
    );
    ensure!(
        list.status.success(),
        "cowctl list: {list:?}; the program: {:?}, log ends {tail:?}",
        live.status
    );
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    ensure!(
        listed.as_array().is_some_and(|a| a.is_empty()),
        "snapshots left behind: {listed}"
    );
    // Undisturbed, and still running after the recorder left: killed by our SIGTERM only.
    ensure!(
        live.status.code() == Some(128 + libc::SIGTERM),
        "{:?}",
        live.status
    );
    let iters: Vec<&str> = log.lines().filter(|l| l.starts_with("iter ")).collect();
    ensure!(!iters.is_empty(), "{log}");
    for (i, l) in iters.iter().enumerate() {
        ensure!(*l == format!("iter {i}"), "line {i} is {l:?}");
    }
    let info = Command::new(sibling("cowctl")?)
        .args(["recording", "info", "--json"])
        .arg(&rec)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    ensure!(info["backend"] == "kmod", "{info}");
    ensure!(info["checkpoints"].as_u64().unwrap_or(0) > 5, "{info}");
    // At a breakpoint checkpoint (main entering step): the list (heap, in cow.ko) holds
    // exactly the iterations before it.
    let mut gdb = Command::new(sibling("cowctl")?);
    gdb.arg("debug").arg(&rec).arg("-batch");
    for c in [
        "delorean search $pc == (long)&step --linear",
        "printf \"ARG=%ld LEN=%ld\\n\", $rdi, list.length",
        "bt",
    ] {
        gdb.args(["-ex", c]);
    }
    let out = gdb.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "gdb: {text}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG="))
        .with_context(|| format!("no ARG= in:\n{text}"))?;
    let (arg, len) = line.split_once(" LEN=").context("LEN")?;
    ensure!(
        arg.trim() == len.trim(),
        "step({arg}) with {len} nodes:\n{text}"
    );
    ensure!(text.contains("in main"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The list's state in gdb's output: `IT=… LEN=… TAIL=…` after the label.
fn list_state(text: &str, label: &str) -> Result<(i64, i64, i64)> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{label} ")))
        .with_context(|| format!("no {label} line in:\n{text}"))?;
    let v: Vec<i64> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('=')?.1.parse().ok())
        .collect();
    ensure!(v.len() == 3, "{label} {line}:\n{text}");
    Ok((v[0], v[1], v[2]))
}

/// `cowctl debug --pid` on a program under `cowctl run`, with two snapshots taken 0.8 s
/// apart: gdb reads the heap and globals as of each while the program runs on; each shows one
/// consistent instant (the list's length, its tail node in the heap and the iteration agree),
/// the second later than the first; `when` names the second as where the length changed; the
/// program is not disturbed (its log stays the unbroken sequence it prints unobserved).
fn kmod_debug_live_pid() -> Result<()> {
    // Long enough to outlive gdb's start in a slow guest; stopped with SIGTERM at the end.
    let mut run = Command::new(sibling("cowctl")?)
        .args(["run", "--"])
        .arg(sibling("buggy_list")?)
        .args(["9", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut snaps = Vec::new();
    let mut pid = 0;
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(800));
        // A slow guest may take longer to start the program: wait for it (and if cowctl run
        // ended instead, say how).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        pid = loop {
            if let Some(p) = child_of(run.id() as i32) {
                break p;
            }
            if run.try_wait()?.is_some() || std::time::Instant::now() > deadline {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
                let out = run.wait_with_output()?;
                bail!(
                    "cowctl run started no program: {:?} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out = Command::new(sibling("cowctl")?)
            .args(["snapshot", &pid.to_string()])
            .output()?;
        ensure!(out.status.success(), "cowctl snapshot: {out:?}");
        snaps.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let mut gdb = Command::new(sibling("cowctl")?);
    gdb.args(["debug", "--pid", &pid.to_string(), "-batch"]);
    let show = "printf \"IT=%ld LEN=%ld TAIL=%ld\\n\", iteration, list.length, list.tail->value";
    for c in [
        "delorean list".to_string(),
        format!("delorean goto {}", snaps[0]),
        "echo PAST \\n".to_string(),
        show.to_string(),
        format!("delorean goto {}", snaps[1]),
        "echo LATER \\n".to_string(),
        show.to_string(),
        "delorean when list.length".to_string(),
    ] {
        gdb.args(["-ex", &c]);
    }
    let out = gdb.output()?;
    // SAFETY: kill has no memory-safety preconditions; cowctl run passes SIGTERM on.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let live = run.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "gdb: {text}");
    let text = text
        .replace("PAST \nIT", "PAST IT")
        .replace("LATER \nIT", "LATER IT");
    let mut instants = Vec::new();
    for label in ["PAST", "LATER"] {
        let (it, len, tail) = list_state(&text, label)?;
        // One instant: iteration i is set before its node is appended (length i or i + 1),
        // and the tail node holds 7 * index + 1 whether or not the length counts it yet.
        ensure!(
            len > 0 && (len - it == 0 || len - it == 1),
            "{label}: {text}"
        );
        ensure!(
            tail == 7 * (len - 1) + 1 || tail == 7 * len + 1,
            "{label}: {text}"
        );
        instants.push((it, len));
    }
    ensure!(
        instants[1].0 > instants[0].0 && instants[1].1 > instants[0].1,
        "{text}"
    );
    ensure!(text.lines().any(|l| l.trim() == snaps[1]), "when: {text}");
    // Undisturbed: "iter 0", "iter 1", … with none missing or repeated.
    let log = String::from_utf8_lossy(&live.stderr);
    let iters: Vec<&str> = log.lines().filter(|l| l.starts_with("iter ")).collect();
    ensure!(iters.len() as i64 > instants[1].0, "{log}");
    for (i, l) in iters.iter().enumerate() {
        ensure!(*l == format!("iter {i}"), "line {i} is {l:?}");
    }
    Ok(())
}
