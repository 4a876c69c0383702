//! Error recovery on the host (`cowctl run --recover --backend uffd`, no module): the project's
//! epoll server (`qemu-tests/c/recover_server.c`) keeps a table in its heap; a request that
//! modifies part of the table and then crashes is rolled back — the table equals, byte for
//! byte, what the acknowledged requests made it — while other clients keep being served, and
//! the same process goes on. Beyond the limit, and at start-up, the program's own crash
//! handler runs as it would without libcow.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TABLE: usize = 4096;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("delorean-rec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn server(dir: &Path) -> PathBuf {
    compile(dir, "recover_server")
}

/// `qemu-tests/c/NAME.c` built into `dir`.
fn compile(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../qemu-tests/c/{name}.c"));
    let exe = dir.join(name);
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-Werror", "-pthread", "-o"])
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

/// `cowctl run --recover --backend B [extra…] -- server PORT_FILE [args…]`, once it listens.
// The child is returned: the caller waits for it.
#[allow(clippy::zombie_processes)]
fn start(dir: &Path, backend: &str, extra: &[&str], args: &[&str]) -> (Child, u16) {
    let exe = server(dir);
    let port_file = dir.join("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args(["run", "--recover", "--backend", backend])
        .args(extra)
        .arg("--")
        .arg(&exe)
        .arg(&port_file)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            return (child, port);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client connection; `None` from [`Client::ask`] means the server shut it down unanswered.
struct Client {
    port: u16,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn new(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client {
            port,
            stream,
            reader,
        }
    }

    fn ask(&mut self, line: &str) -> Option<String> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(n) if n > 0 => Some(reply.trim_end().to_string()),
            _ => None,
        }
    }

    /// Asks until answered, on a new connection after each shutdown; the number of retries.
    fn ask_until_answered(&mut self, line: &str) -> (String, u32) {
        for retry in 0..50 {
            if let Some(r) = self.ask(line) {
                return (r, retry);
            }
            *self = Client::new(self.port);
        }
        panic!("{line}: never answered");
    }
}

/// One request on its own connection.
fn once(port: u16, line: &str) -> Option<String> {
    Client::new(port).ask(line)
}

/// Ends the server (SIGTERM, which cowctl forwards); its stderr.
fn stop(mut child: Child) -> String {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    err
}

fn server_pid(cowctl: &Child) -> i32 {
    let kids =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", cowctl.id())).unwrap();
    kids.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_crash_after_a_partial_update_is_rolled_back_while_others_are_served_uffd() {
    partial_update_rolled_back("uffd");
}

/// Under mprotect the server's `read` into its (write-protected) buffers works too: the
/// preload makes the pages writable first.
#[test]
fn a_crash_after_a_partial_update_is_rolled_back_while_others_are_served_mprotect() {
    partial_update_rolled_back("mprotect");
}

fn partial_update_rolled_back(backend: &str) {
    let dir = scratch(&format!("partial-{backend}"));
    let (child, port) = start(&dir, backend, &[], &[]);
    let pid = server_pid(&child);
    // Four clients write their own keys, each write acknowledged (retried on a new connection
    // when the iteration serving it was rolled back and its connection shut down).
    // They go on until the crashes are over.
    let crashing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let crashing = crashing.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                let mut last = Vec::new();
                let mut retries = 0;
                let mut round = 0;
                while round < 100 || crashing.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = 1000 + t * 100 + round % 100;
                    let value = (t * 1_000_000 + round) as i64;
                    let (reply, r) = c.ask_until_answered(&format!("SET {key} {value}"));
                    assert_eq!(reply, "OK");
                    retries += r;
                    last.push((key, value));
                    round += 1;
                }
                (last, retries)
            })
        })
        .collect();
    // Meanwhile: crashes after partial updates, an abort, a division by zero — each request
    // goes unanswered (its iteration rolled back) and the server stays the same process.
    let crashes = ["BAD 10", "ABORT", "BAD 500", "FPE"];
    for bad in crashes {
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(once(port, bad), None, "{bad} was answered");
    }
    crashing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut model: Vec<i64> = (0..TABLE as i64).collect();
    for w in writers {
        let (writes, retries) = w.join().unwrap();
        eprintln!(
            "a writer: {} writes acknowledged, {retries} retried",
            writes.len()
        );
        for (k, v) in writes {
            model[k] = v;
        }
    }
    // The table holds exactly what was acknowledged: nothing of the crashed requests.
    let dump = once(port, "DUMP").expect("DUMP answered");
    let table: Vec<i64> = dump.split(' ').map(|v| v.parse().unwrap()).collect();
    assert_eq!(table.len(), TABLE);
    for (i, (got, want)) in table.iter().zip(&model).enumerate() {
        assert_eq!(got, want, "table[{i}]");
    }
    assert_eq!(server_pid(&child), pid, "the same process serves");
    let stats = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args(["stats", &pid.to_string(), "--json"])
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["recoveries"], 4, "{stats}");
    assert_eq!(stats["not_recovered"], 0, "{stats}");
    let err = stop(child);
    assert_eq!(err.matches("libcow: recovered from").count(), 4, "{err}");
    for sig in ["SIGSEGV", "SIGABRT", "SIGFPE"] {
        assert!(err.contains(&format!("recovered from {sig}")), "{err}");
    }
    assert!(!err.contains("crash handler"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_crash_beyond_the_limit_is_the_programs_crash() {
    let dir = scratch("limit");
    let (mut child, port) = start(&dir, "uffd", &["--recover-limit", "3"], &[]);
    assert_eq!(once(port, "SET 7 70").as_deref(), Some("OK"));
    assert_eq!(once(port, "BAD 100"), None);
    assert_eq!(once(port, "BAD 100"), None);
    // The third in a row: the server's own handler runs (it exits 77).
    assert_eq!(once(port, "BAD 100"), None);
    let status = child.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert_eq!(status.code(), Some(77), "{err}");
    assert_eq!(
        err.matches("libcow: recovered from SIGSEGV").count(),
        2,
        "{err}"
    );
    assert!(err.contains("too often in a row"), "{err}");
    assert!(err.contains("server: crash handler: signal 11"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_crash_at_start_up_is_not_hidden() {
    let dir = scratch("startup");
    let exe = server(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args(["run", "--recover", "--backend", "uffd", "--"])
        .arg(&exe)
        .arg(dir.join("port"))
        .arg("crash-at-start")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("server: crash handler: signal 11"), "{err}");
    assert!(!err.contains("recovered"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_taken_before_the_wait_blocked_is_kept_only_if_no_thread_ran_uffd() {
    checkpoint_before_blocking("uffd", true);
}

#[test]
fn a_checkpoint_taken_before_the_wait_blocked_is_kept_only_if_no_thread_ran_mprotect() {
    // mprotect takes every checkpoint as the wait returns: the same rollbacks, none kept.
    checkpoint_before_blocking("mprotect", false);
}

/// `recover_idle.c`: every round crashes; quiet rounds (a timer wakes the loop) may keep the
/// checkpoint taken before the wait blocked, busy ones (a thread of the program wrote memory
/// meanwhile) must not — the rollback would undo that write, which the program checks.
fn checkpoint_before_blocking(backend: &str, kept: bool) {
    const ROUNDS: u32 = 30;
    let dir = scratch(&format!("idle-{backend}"));
    let exe = compile(&dir, "recover_idle");
    let out = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args([
            "run",
            "--recover",
            "--recover-limit",
            "1000",
            "--backend",
            backend,
            "--",
        ])
        .arg(&exe)
        .arg(ROUNDS.to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{err}");
    assert!(stdout.contains("recover idle: ok"), "{stdout}{err}");
    assert!(
        err.contains(&format!("{ROUNDS} crashes recovered")),
        "{err}"
    );
    // "…; K iterations began with one taken before their wait blocked)"
    let taken_early: u32 = err
        .rsplit("; ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("no count of early checkpoints: {err}"));
    if kept {
        // Busy rounds never keep theirs; quiet ones do unless the loop was slow to block.
        assert!(taken_early > 0 && taken_early <= ROUNDS / 2, "{err}");
    } else {
        assert_eq!(taken_early, 0, "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A redis client speaking the inline protocol; `None`: the connection was shut down.
struct Redis {
    port: u16,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Redis {
    fn new(port: u16) -> Redis {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Redis {
            port,
            stream,
            reader,
        }
    }

    /// One reply: a status, error or integer line, or a bulk string's contents.
    fn reply(&mut self) -> Option<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if let Some(len) = line.strip_prefix('$') {
            if len == "-1" {
                return Some("(nil)".into());
            }
            let mut value = String::new();
            self.reader.read_line(&mut value).ok()?;
            return Some(value.trim_end().to_string());
        }
        Some(line)
    }

    fn ask(&mut self, command: &str) -> Option<String> {
        self.stream
            .write_all(format!("{command}\r\n").as_bytes())
            .ok()?;
        self.reply()
    }

    /// Asks until answered, on a new connection after each shutdown.
    fn ask_until_answered(&mut self, command: &str) -> String {
        for _ in 0..50 {
            if let Some(r) = self.ask(command) {
                return r;
            }
            *self = Redis::new(self.port);
        }
        panic!("{command}: never answered");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A request the crashing iteration had not read yet is never executed: its connection is
/// severed, so it does not run after the recovery while its client, seeing the connection end,
/// sends it again (it would be applied twice). The server is kept busy (SLEEP) while a crashing
/// request and then an `ADD` queue up, so one iteration gets both, the crash first.
#[test]
fn a_request_left_unread_by_the_crashing_iteration_is_not_executed() {
    let dir = scratch("unread");
    let (child, port) = start(&dir, "uffd", &[], &[]);
    let mut busy = Client::new(port);
    let mut bad = Client::new(port);
    let mut adder = Client::new(port);
    let before: i64 = busy.ask("GET 7").unwrap().parse().unwrap();
    assert!(bad.ask("GET 7").is_some() && adder.ask("GET 7").is_some());
    busy.stream.write_all(b"SLEEP 500\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    bad.stream.write_all(b"BAD 100\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (sum, retries) = adder.ask_until_answered("ADD 7 1");
    assert_eq!(
        retries, 1,
        "the ADD's connection was not severed with the crash"
    );
    let once_more = (before + 1).to_string();
    assert_eq!(
        sum, once_more,
        "the unread ADD ran after the recovery as well as its retry"
    );
    assert_eq!(once(port, "GET 7"), Some(once_more));
    let err = stop(child);
    assert!(err.contains("recovered from SIGSEGV"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's redis-server under `cowctl run --recover` on uffd: 10 000 keys loaded, four
/// clients writing (SET, INCR, LPUSH) while another sends `DEBUG SEGFAULT` 20 times. The same
/// process serves throughout; every key keeps its value; every acknowledged INCR and LPUSH is
/// there exactly once (a request whose iteration was rolled back was not acknowledged, and is
/// retried); 20 recoveries are counted.
#[test]
fn redis_survives_debug_segfault_with_nothing_acknowledged_lost_uffd() {
    redis_survives_debug_segfault("uffd");
}

/// The same on mprotect: redis' `epoll_wait` fills an event array in covered, write-protected
/// memory (the preload makes it writable first; it failed with `EFAULT` and redis stopped),
/// and `DEBUG SEGFAULT` writes into a read-only mapping of redis' own (a fault the backend
/// once took for memory of its own that `mremap` moved, and swallowed).
#[test]
fn redis_survives_debug_segfault_with_nothing_acknowledged_lost_mprotect() {
    redis_survives_debug_segfault("mprotect");
}

fn redis_survives_debug_segfault(backend: &str) {
    let redis = Path::new("/usr/sbin/redis-server");
    let redis = if redis.exists() {
        redis.to_path_buf()
    } else {
        PathBuf::from("/usr/bin/redis-server")
    };
    assert!(
        redis.exists(),
        "redis-server is needed (apt-get install redis-server; scripts/test installs it)"
    );
    let dir = scratch(&format!("redis-{backend}"));
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args(["run", "--recover", "--backend", backend, "--"])
        .arg(&redis)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--enable-debug-command", "yes", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut load = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let reader = BufReader::new(s.try_clone().unwrap());
            break Redis {
                port,
                stream: s,
                reader,
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let pid = server_pid(&child);
    // 10 000 keys, pipelined.
    let mut batch = String::new();
    for i in 0..10_000 {
        batch.push_str(&format!("SET key:{i} value-{i}\r\n"));
    }
    load.stream.write_all(batch.as_bytes()).unwrap();
    for _ in 0..10_000 {
        assert_eq!(load.reply().as_deref(), Some("+OK"));
    }
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let running = running.clone();
            std::thread::spawn(move || {
                let mut c = Redis::new(port);
                let (mut incrs, mut pushes) = (0u64, 0u64);
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = c.ask_until_answered(&format!("INCR counter:{t}"));
                    assert!(r.starts_with(':'), "{r}");
                    incrs += 1;
                    let r = c.ask_until_answered(&format!("LPUSH list:{t} {pushes}"));
                    assert!(r.starts_with(':'), "{r}");
                    pushes += 1;
                    let r = c.ask_until_answered(&format!("SET last:{t} {incrs}"));
                    assert_eq!(r, "+OK");
                }
                (incrs, pushes)
            })
        })
        .collect();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(Redis::new(port).ask("DEBUG SEGFAULT"), None);
    }
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut check = Redis::new(port);
    for (t, w) in writers.into_iter().enumerate() {
        let (incrs, pushes) = w.join().unwrap();
        assert!(incrs > 0);
        assert_eq!(
            check.ask(&format!("GET counter:{t}")),
            Some(incrs.to_string())
        );
        assert_eq!(
            check.ask(&format!("LLEN list:{t}")),
            Some(format!(":{pushes}"))
        );
        assert_eq!(check.ask(&format!("GET last:{t}")), Some(incrs.to_string()));
    }
    for i in 0..10_000 {
        assert_eq!(
            check.ask(&format!("GET key:{i}")),
            Some(format!("value-{i}")),
            "key:{i}"
        );
    }
    assert_eq!(server_pid(&child), pid, "the same process serves");
    let stats = Command::new(env!("CARGO_BIN_EXE_cowctl"))
        .args(["stats", &pid.to_string(), "--json"])
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["recoveries"], 20, "{stats}");
    let _ = check.ask("SHUTDOWN NOSAVE");
    let status = child.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "{err}");
    assert_eq!(err.matches("recovered from SIGSEGV").count(), 20, "{err}");
    assert!(err.contains("20 crashes recovered"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
