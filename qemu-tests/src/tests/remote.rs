//! cowctl against a live process: snapshot, mutate, restore by pid from another process.

use super::{child_of, sibling};
use crate::Test;
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "remote::snapshot_mutate_restore_by_pid",
            run: snapshot_mutate_restore_by_pid,
        },
        Test {
            name: "remote::c_program_under_cowctl_run",
            run: c_program_under_cowctl_run,
        },
        Test {
            name: "remote::permission_denied_for_other_user",
            run: permission_denied_for_other_user,
        },
        Test {
            name: "remote::bad_pids_and_ids",
            run: bad_pids_and_ids,
        },
        Test {
            name: "remote::closed_pipes_are_quiet",
            run: closed_pipes_are_quiet,
        },
        Test {
            name: "remote::restore_leaves_a_stopped_process_stopped",
            run: restore_leaves_a_stopped_process_stopped,
        },
        Test {
            name: "remote::run_forwards_signals",
            run: run_forwards_signals,
        },
    ]
}

struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
}

impl Target {
    fn start() -> Result<Self> {
        Self::spawn(Command::new(sibling("cow-target")?))
    }

    /// The C program remote_target.c (heap + globals + 4 threads) under `cowctl run`.
    fn start_c_under_cowctl_run() -> Result<Self> {
        let mut cmd = Command::new(sibling("cowctl")?);
        cmd.args(["run", "--"]).arg(sibling("remote_target")?);
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .context("no ready line")?
            .parse()?;
        Ok(Target {
            child,
            stdin,
            stdout,
            pid,
        })
    }
    fn ask(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn cowctl(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(sibling("cowctl")?).args(args).output()?)
}

fn ok_stdout(args: &[&str]) -> Result<String> {
    let out = cowctl(args)?;
    if !out.status.success() {
        bail!(
            "cowctl {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn snapshot_mutate_restore_by_pid() -> Result<()> {
    let mut t = Target::start()?;
    let pid = t.pid.to_string();
    ensure!(t.ask("fill 1")? == "ok");
    let sum1 = t.ask("sum")?;
    let id1 = ok_stdout(&["snapshot", &pid])?;
    ensure!(
        id1 == "1\n",
        "snapshot printed {id1:?}, expected the id alone"
    );
    ensure!(t.ask("fill 2")? == "ok");
    let sum2 = t.ask("sum")?;
    ensure!(sum1 != sum2, "fill did not change the memory");
    let id2 = ok_stdout(&["snapshot", &pid])?.trim().to_string();
    let diff: serde_json::Value =
        serde_json::from_str(&ok_stdout(&["diff", &pid, "1", &id2, "--json"])?)?;
    let changed: u64 = diff
        .as_array()
        .context("diff")?
        .iter()
        .map(|r| r["len"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        changed > 1 << 19 && changed <= 1 << 20,
        "diff reports {changed} bytes"
    );
    ok_stdout(&["restore", &pid, "1"])?;
    ensure!(
        t.ask("sum")? == sum1,
        "checksum after restore differs from the snapshot's"
    );
    let list: serde_json::Value = serde_json::from_str(&ok_stdout(&["list", &pid, "--json"])?)?;
    ensure!(
        list.as_array().map(|a| a.len()) == Some(1),
        "list after restore: {list}"
    );
    let stats: serde_json::Value = serde_json::from_str(&ok_stdout(&["stats", &pid, "--json"])?)?;
    // Every page written after the snapshot was saved: by its own first-write fault, or ahead
    // of the writer (fault-around).
    let saved_by = |k: &str| stats[k].as_u64().unwrap_or(0);
    ensure!(
        saved_by("first_write_faults") + saved_by("around_pages") >= 256,
        "stats: {stats}"
    );
    ensure!(stats["restores"] == 1, "stats: {stats}");
    // The running program keeps working on its restored memory.
    ensure!(t.ask("fill 3")? == "ok");
    ok_stdout(&["restore", &pid, "1", "--running"])?;
    ensure!(t.ask("sum")? == sum1, "second restore");
    ok_stdout(&["drop", &pid, "1"])?;
    Ok(())
}

fn c_program_under_cowctl_run() -> Result<()> {
    let mut t = Target::start_c_under_cowctl_run()?;
    let pid = t.pid.to_string();
    ensure!(t.ask("fill 1")? == "ok");
    let sum1 = t.ask("sum")?;
    let id = ok_stdout(&["snapshot", &pid])?.trim().to_string();
    // The threads rewrite the globals, free and reallocate heap blocks, and rewrite them.
    ensure!(t.ask("fill 2")? == "ok");
    ensure!(t.ask("fill 3")? == "ok");
    ensure!(t.ask("sum")? != sum1, "fill did not change the memory");
    ok_stdout(&["restore", &pid, &id])?;
    ensure!(
        t.ask("sum")? == sum1,
        "checksum after restore differs from the snapshot's"
    );
    // The restored heap keeps working: allocate, free, write again, and go back once more.
    ensure!(t.ask("fill 4")? == "ok");
    ok_stdout(&["restore", &pid, &id])?;
    ensure!(t.ask("sum")? == sum1, "second restore");
    Ok(())
}

fn permission_denied_for_other_user() -> Result<()> {
    let t = Target::start()?;
    let exe = sibling("cowctl")?;
    // Run cowctl as nobody against the root-owned target.
    let out = unsafe_command_as_nobody(&exe, &["snapshot", &t.pid.to_string()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(4),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    ensure!(stderr.contains("permission denied"), "stderr: {stderr}");
    Ok(())
}

fn unsafe_command_as_nobody(exe: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    // SAFETY: the closure runs in the forked child before exec and only makes syscalls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.output()?)
}

fn bad_pids_and_ids() -> Result<()> {
    let out = cowctl(&["snapshot", "999999"])?;
    ensure!(
        out.status.code() == Some(5),
        "missing pid: {:?}",
        out.status.code()
    );
    let out = cowctl(&["snapshot", "1"])?;
    ensure!(
        out.status.code() == Some(5),
        "pid without /dev/cow: {:?}",
        out.status.code()
    );
    let t = Target::start()?;
    let out = cowctl(&["restore", &t.pid.to_string(), "77"])?;
    ensure!(
        out.status.code() == Some(5),
        "unknown id: {:?}",
        out.status.code()
    );
    let text = String::from_utf8_lossy(&out.stderr);
    ensure!(text.contains("no snapshot 77"), "message: {text}");
    ensure!(!text.contains("COW_IOC"), "message names the ioctl: {text}");
    let pid = t.pid.to_string();
    ok_stdout(&["snapshot", &pid])?;
    let out = cowctl(&["diff", &pid, "1", "99"])?;
    ensure!(
        out.status.code() == Some(5),
        "diff with a missing id: {:?}",
        out.status.code()
    );
    let text = String::from_utf8_lossy(&out.stderr);
    ensure!(text.contains("no snapshot 99"), "message: {text}");
    let out = cowctl(&["restore", &t.pid.to_string(), "banana"])?;
    ensure!(
        out.status.code() == Some(2),
        "usage error: {:?}",
        out.status.code()
    );
    Ok(())
}

/// Output into a closed pipe (`cowctl list PID | head -0`) ends cowctl as it ends `cat`:
/// SIGPIPE, nothing on stderr. Every subcommand that prints, text and JSON.
fn closed_pipes_are_quiet() -> Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let mut t = Target::start()?;
    let pid = t.pid.to_string();
    ok_stdout(&["snapshot", &pid])?;
    ensure!(t.ask("fill 5")? == "ok");
    ok_stdout(&["snapshot", &pid])?;
    for args in [
        &["list", &pid][..],
        &["list", &pid, "--json"],
        &["stats", &pid],
        &["stats", &pid, "--json"],
        &["diff", &pid, "1", "2"],
        &["diff", &pid, "1", "2", "--json"],
        &["snapshot", &pid],
        &["status"],
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        ensure!(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0);
        // SAFETY: both were just created and belong to nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let out = Command::new(sibling("cowctl")?)
            .args(args)
            .stdout(Stdio::from(write))
            .output()?;
        ensure!(
            out.status.signal() == Some(libc::SIGPIPE) && out.stderr.is_empty(),
            "cowctl {args:?} into a closed pipe: {:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The one-letter state of `pid`.
fn state_of(pid: i32) -> Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.chars().next())
        .context("no state")
}

/// A process the user stopped (`kill -STOP`) is still stopped after `cowctl restore`, with its
/// memory restored; one that ran is running again.
fn restore_leaves_a_stopped_process_stopped() -> Result<()> {
    let mut t = Target::start()?;
    let pid = t.pid.to_string();
    ensure!(t.ask("fill 1")? == "ok");
    let sum1 = t.ask("sum")?;
    ok_stdout(&["snapshot", &pid])?;
    ensure!(t.ask("fill 2")? == "ok");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(t.pid, libc::SIGSTOP) };
    for _ in 0..2000 {
        if state_of(t.pid)? == 'T' {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ok_stdout(&["restore", &pid, "1"])?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    let state = state_of(t.pid)?;
    // SAFETY: as above.
    unsafe { libc::kill(t.pid, libc::SIGCONT) };
    ensure!(
        state == 'T',
        "state after restore: {state}, expected T (stopped)"
    );
    ensure!(t.ask("sum")? == sum1, "memory not restored");
    // A running process is stopped around the restore and resumed after it.
    ensure!(t.ask("fill 3")? == "ok");
    ok_stdout(&["restore", &pid, "1"])?;
    ensure!(t.ask("sum")? == sum1, "second restore");
    Ok(())
}

/// SIGTERM, SIGHUP and SIGINT sent to `cowctl run` (by kill, not a terminal) reach the program,
/// and cowctl exits with the program's status; the program starts with none of them blocked.
fn run_forwards_signals() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    for (sig, code) in [(libc::SIGTERM, 42), (libc::SIGHUP, 43), (libc::SIGINT, 44)] {
        let name = match sig {
            libc::SIGTERM => "TERM",
            libc::SIGHUP => "HUP",
            _ => "INT",
        };
        let script = format!("trap 'exit {code}' {name}; echo ready; while :; do sleep 0.05; done");
        let mut child = Command::new(sibling("cowctl")?)
            .args(["run", "--", "/bin/sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "{line:?}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                bail!("SIG{name}: cowctl run still running after 20 s (not forwarded?)");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        ensure!(
            status.code() == Some(code),
            "SIG{name}: cowctl exited {:?} (signal {:?}), expected the program's {code}",
            status.code(),
            status.signal()
        );
    }
    // A program that leaves its signal mask alone (a shell's trap unblocks the signal): it
    // must not inherit cowctl's blocked mask, or SIGTERM would stay pending for ever.
    let mut child = Command::new(sibling("cowctl")?)
        .args(["run", "--", "/bin/sleep", "60"])
        .spawn()?;
    // cowctl forwards signals once it has spawned the program (before that, SIGTERM is its
    // own death, as for any process that has not set up yet): wait for sleep to exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child_of(child.id() as i32).is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("cowctl run started no program in 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("sleep under cowctl run ignored SIGTERM (started with it blocked?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    ensure!(
        status.code() == Some(128 + libc::SIGTERM),
        "sleep: cowctl exited {status:?}"
    );
    Ok(())
}
