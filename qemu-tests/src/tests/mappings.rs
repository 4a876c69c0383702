//! `cowctl run` on cow.ko covers every private writable mapping, not only malloc: memory a
//! program maps itself, jemalloc's arenas, shared libraries' globals, libc's state — checked
//! byte for byte by a churn program, and on real programs (python3, redis) restored by pid.

use super::{cowctl_run, sibling, stdout_of_success};
use crate::Test;
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "mappings::own_pool_jemalloc_library_fork_byte_exact",
            run: own_pool_jemalloc_library_fork_byte_exact,
        },
        Test {
            name: "mappings::python_dict_restored_by_pid",
            run: python_dict_restored_by_pid,
        },
        Test {
            name: "mappings::redis_restored_by_pid",
            run: redis_restored_by_pid,
        },
        Test {
            name: "mappings::coverage_of_python_redis_perl",
            run: coverage_of_python_redis_perl,
        },
        Test {
            name: "mappings::bench_programs_on_kmod",
            run: bench_programs_on_kmod,
        },
    ]
}

/// The churn program: its own mmap/mremap/madvise/mprotect pool, jemalloc's arenas, a
/// dlopen'ed library's global and stdout's buffer, restored to random ids, with forks.
fn own_pool_jemalloc_library_fork_byte_exact() -> Result<()> {
    let prog = sibling("preload_mappings")?;
    let lib = sibling("libcounter.so")?;
    for seed in ["1", "0x9E3779B97F4A7C15", "424242"] {
        let out = cowctl_run(
            &[],
            &[
                prog.to_str().unwrap_or_default(),
                "2000",
                seed,
                lib.to_str().unwrap_or_default(),
            ],
        )?;
        stdout_of_success(&out, "preload_mappings").with_context(|| format!("seed {seed}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(err.contains("all byte-exact"), "seed {seed}: {err}");
        ensure!(
            !err.contains("NOT"),
            "seed {seed}: something was not covered: {err}"
        );
        println!("seed {seed}: {}", err.trim());
    }
    Ok(())
}

fn cowctl(args: &[&str]) -> Result<String> {
    let out = Command::new(sibling("cowctl")?).args(args).output()?;
    stdout_of_success(&out, &format!("cowctl {}", args.join(" "))).map(|s| s.trim().to_string())
}

/// Builds 100 000 objects in a dict, prints its pid and the dict's digest, then sleeps: on
/// SIGUSR1 it changes or deletes half of the objects and adds 5 000, on SIGUSR2 it only
/// prints the digest again. Idle means asleep in `time.sleep`: a restore rewinds memory, not
/// the C stack, so the program must be where nothing on its C stack points at objects that
/// differ between the snapshot and the restore (a thread blocked in `read()` from `sys.stdin`
/// is not: its C frames hold the memoryview being read into; rewinding the heap under it
/// crashes python on every backend, uffd included).
const PYTHON_DICT: &str = r#"
import hashlib, os, signal, time
class Item:
    def __init__(self, k, v):
        self.k, self.v, self.tags = k, v, [k % 7, str(v)]
d = {i: Item(i, i * 31) for i in range(100000)}
def report():
    h = hashlib.sha256()
    for k in sorted(d):
        it = d[k]
        h.update(f"{k}:{it.v}:{it.tags};".encode())
    print(f"{h.hexdigest()} {len(d)}", flush=True)
def mutate(sig, frame):
    for i in range(0, 100000, 2):
        if i % 4 == 0:
            del d[i]
        else:
            d[i].v = -1
            d[i].tags.append("changed")
    d.update({-i: Item(-i, i) for i in range(1, 5000)})
    report()
signal.signal(signal.SIGUSR1, mutate)
signal.signal(signal.SIGUSR2, lambda sig, frame: report())
print(os.getpid(), end=" ", flush=True)
report()
while True:
    time.sleep(3600)
"#;

/// A program under `cowctl run` whose stdout is read line by line.
struct Lines {
    child: Child,
    reader: BufReader<std::process::ChildStdout>,
    /// The program's own pid, once known (killed with cowctl at the end).
    pid: Option<i32>,
}

impl Lines {
    fn start(argv: &[&str]) -> Result<Lines> {
        let mut child = Command::new(sibling("cowctl")?)
            .arg("run")
            .arg("--")
            .args(argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let reader = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Lines {
            child,
            reader,
            pid: None,
        })
    }

    fn line(&mut self) -> Result<String> {
        use std::os::fd::AsRawFd;
        if self.reader.buffer().is_empty() {
            let mut pfd = libc::pollfd {
                fd: self.reader.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one descriptor we own, for 60 s.
            if unsafe { libc::poll(&mut pfd, 1, 60_000) } == 0 {
                bail!("no answer within 60 s");
            }
        }
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        ensure!(!line.is_empty(), "the program ended");
        Ok(line.trim_end().to_string())
    }

    /// Sends `signal` to `pid` once it sleeps (a handler must not run inside the previous
    /// answer's `print`), and reads the line it answers with.
    fn signal(&mut self, pid: i32, signal: i32) -> Result<String> {
        wait_asleep(pid)?;
        // SAFETY: kill with a pid and a signal number.
        ensure!(unsafe { libc::kill(pid, signal) } == 0, "kill {pid}");
        self.line().with_context(|| threads_of(pid))
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            // SAFETY: kill with a pid and a signal number. The program holds the runner's
            // stderr: it must not outlive the test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What each thread of `pid` is doing, and the process's signal masks (for a failure).
fn threads_of(pid: i32) -> String {
    let mut out = String::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        out.push_str(&format!(
            "thread {:?} {} syscall {} wchan {} {}\n",
            t.file_name(),
            read("comm").trim(),
            read("syscall").trim(),
            read("wchan").trim(),
            read("status")
                .lines()
                .filter(|l| l.starts_with("Sig")
                    || l.starts_with("ShdPnd")
                    || l.starts_with("State"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    out
}

/// Waits until `pid`'s main thread sleeps in `clock_nanosleep` (`time.sleep`): printing a
/// line is not being idle yet.
fn wait_asleep(pid: i32) -> Result<()> {
    for _ in 0..1000 {
        let call = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let nr = call.split_whitespace().next().unwrap_or("");
        if nr == libc::SYS_clock_nanosleep.to_string() || nr == libc::SYS_nanosleep.to_string() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    bail!("process {pid} never went to sleep")
}

fn python_dict_restored_by_pid() -> Result<()> {
    let mut py = Lines::start(&["/usr/bin/python3", "-c", PYTHON_DICT])?;
    let first = py.line()?;
    let (pid, at_snapshot) = first.split_once(' ').context("no pid")?;
    let pid_n: i32 = pid.parse()?;
    py.pid = Some(pid_n);
    wait_asleep(pid_n)?;
    let id = cowctl(&["snapshot", pid])?;
    let changed = py.signal(pid_n, libc::SIGUSR1)?;
    ensure!(changed != at_snapshot, "mutate changed nothing: {changed}");
    ensure!(changed.ends_with(" 79999"), "after mutate: {changed}");
    wait_asleep(pid_n)?;
    cowctl(&["restore", pid, &id])?;
    let restored = py.signal(pid_n, libc::SIGUSR2)?;
    ensure!(
        restored == at_snapshot,
        "after the restore: {restored}, at the snapshot: {at_snapshot}"
    );
    // The interpreter keeps running: it can change the dict again and rewind again.
    ensure!(
        py.signal(pid_n, libc::SIGUSR1)? == changed,
        "a second mutate differs"
    );
    cowctl(&["restore", pid, &id])?;
    ensure!(
        py.signal(pid_n, libc::SIGUSR2)? == at_snapshot,
        "second restore"
    );
    println!("python3: 100 000 objects, digest {at_snapshot} restored twice by pid");
    Ok(())
}

fn redis_cli(port: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("/usr/bin/redis-cli")
        .args(["-p", port])
        .args(args)
        .output()?;
    stdout_of_success(&out, &format!("redis-cli {}", args.join(" "))).map(|s| s.trim().to_string())
}

/// A redis-server under `cowctl run`, shut down when dropped.
struct Redis {
    child: Child,
    port: &'static str,
}

impl Redis {
    fn start(port: &'static str, extra: &[&str]) -> Result<Redis> {
        let child = Command::new(sibling("cowctl")?)
            .arg("run")
            .args(extra)
            .args([
                "--",
                "/usr/bin/redis-server",
                "--port",
                port,
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--enable-debug-command", "yes", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let redis = Redis { child, port };
        for _ in 0..300 {
            if redis_cli(port, &["PING"]).is_ok_and(|r| r == "PONG") {
                return Ok(redis);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!("redis-server did not answer PING within 30 s")
    }

    fn pid(&self) -> Result<i32> {
        super::child_of(self.child.id() as i32).context("no redis-server under cowctl")
    }

    /// Shuts the server down; its stderr (cowctl's report included).
    fn stop(mut self) -> Result<String> {
        let _ = redis_cli(self.port, &["SHUTDOWN", "NOSAVE"]);
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "redis under cowctl: {status}: {err}");
        Ok(err)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_restored_by_pid() -> Result<()> {
    let redis = Redis::start("6391", &[])?;
    let port = redis.port;
    let pid = redis.pid()?.to_string();
    redis_cli(port, &["DEBUG", "POPULATE", "10000", "key", "16"])?;
    let keys: Vec<String> = (0..10_000).map(|i| format!("key:{i}")).collect();
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let state = || -> Result<(String, String, String)> {
        Ok((
            redis_cli(port, &["DBSIZE"])?,
            redis_cli(port, &["DEBUG", "DIGEST"])?,
            redis_cli(port, &mget)?,
        ))
    };
    let at_snapshot = state()?;
    ensure!(at_snapshot.0 == "10000", "DBSIZE {}", at_snapshot.0);
    let id = cowctl(&["snapshot", &pid])?;
    redis_cli(port, &["SET", "key:1", "changed"])?;
    redis_cli(port, &["DEL", "key:2", "key:3"])?;
    redis_cli(port, &["DEBUG", "POPULATE", "30000", "more", "64"])?;
    redis_cli(port, &["APPEND", "key:4", "-appended"])?;
    let changed = state()?;
    ensure!(changed.1 != at_snapshot.1, "the changes changed no digest");
    cowctl(&["restore", &pid, &id])?;
    let restored = state()?;
    ensure!(
        restored.0 == at_snapshot.0,
        "DBSIZE {} after the restore",
        restored.0
    );
    ensure!(
        restored.1 == at_snapshot.1,
        "DEBUG DIGEST differs after the restore"
    );
    ensure!(
        restored.2 == at_snapshot.2,
        "values differ after the restore"
    );
    // It keeps serving.
    redis_cli(port, &["SET", "after", "restore"])?;
    ensure!(redis_cli(port, &["GET", "after"])? == "restore");
    redis.stop()?;
    println!("redis: 10 000 keys, DBSIZE, DEBUG DIGEST and every value restored by pid");
    Ok(())
}

/// What may stay uncovered after start-up: stacks, libcow's book and this library's state.
const ALLOWED: [&str; 4] = [
    "stack of",
    "libcow's own bookkeeping",
    "libcow_preload's own state",
    "stack of a libcow thread",
];

fn check_coverage(what: &str, report: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(report).with_context(|| format!("{what}: no report"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let entries = v["coverage"]
        .as_array()
        .context("no coverage in the report")?;
    let covered = entries.iter().filter(|e| e["covered"] == true).count();
    ensure!(covered >= 5, "{what}: only {covered} covered mappings");
    for e in entries.iter().filter(|e| e["covered"] == false) {
        let reason = e["reason"].as_str().unwrap_or("");
        ensure!(
            ALLOWED.iter().any(|a| reason.starts_with(a)),
            "{what}: uncovered {e} ({reason})"
        );
    }
    println!(
        "{what}: {covered} covered mappings, {} uncovered (stacks, book, libcow_preload)",
        entries.len() - covered
    );
    Ok(())
}

fn coverage_of_python_redis_perl() -> Result<()> {
    let report = std::env::temp_dir().join("mappings-coverage.json");
    let report_arg = report.to_str().unwrap_or_default();
    for (what, argv) in [
        (
            "python3",
            vec![
                "/usr/bin/python3",
                "-c",
                "import json, hashlib; print(len(json.dumps(list(range(1000)))))",
            ],
        ),
        (
            "perl",
            vec![
                "/usr/bin/perl",
                "-e",
                "my %h = map { $_ => 1 } 1..1000; print scalar(keys %h), qq(\\n)",
            ],
        ),
    ] {
        let out = cowctl_run(&["--coverage", "--report", report_arg], &argv)?;
        stdout_of_success(&out, what)?;
        check_coverage(what, &report)?;
    }
    let redis = Redis::start("6392", &["--coverage", "--report", report_arg])?;
    redis_cli(redis.port, &["SET", "a", "b"])?;
    redis.stop()?;
    check_coverage("redis-server", &report)
}

/// `cowctl bench --programs` on cow.ko: the jemalloc workload with everything covered, every
/// restore checked against a digest of every live object (the bench fails otherwise), the
/// start-up of python3, perl and redis under `cowctl run`, and perl and python3 checkpointed
/// at 100 Hz. No timing is judged here.
fn bench_programs_on_kmod() -> Result<()> {
    let text = cowctl(&["bench", "--programs", "--backends", "kmod", "--json"])?;
    println!("{text}");
    let r: serde_json::Value = serde_json::from_str(&text)?;
    let rows = r["jemalloc"].as_array().context("no jemalloc rows")?;
    let kmod = rows
        .iter()
        .find(|x| x["backend"] == "kmod")
        .context("no kmod jemalloc row")?;
    ensure!(kmod["restores_verified"] == 15, "{kmod}");
    ensure!(kmod["pages_per_epoch"].as_f64() > Some(0.0), "{kmod}");
    for program in ["python3 -c pass", "perl -e 1", "redis-server (to PONG)"] {
        ensure!(
            r["startup"].as_array().is_some_and(|v| v
                .iter()
                .any(|x| x["program"] == program && x["backend"] == "kmod")),
            "no kmod start-up row for {program}: {}",
            r["startup"]
        );
    }
    for program in ["perl-kv", "python3-dict"] {
        ensure!(
            r["periodic"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x["program"] == program
                    && x["backend"] == "kmod"
                    && x["checkpoints"].as_u64() > Some(0)
                    && x["first_writes_per_checkpoint"].as_f64() > Some(0.0))),
            "no kmod 100 Hz row for {program}: {}",
            r["periodic"]
        );
    }
    Ok(())
}
