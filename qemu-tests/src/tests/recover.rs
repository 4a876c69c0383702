//! Error recovery on cow.ko (`cowctl run --recover`, the kmod backend: the heap and globals in
//! the module): the project's epoll server and Debian's redis-server crash on requests and go
//! on serving, with nothing acknowledged lost and nothing of the crashed requests kept. The
//! host runs the same on uffd (`cowctl/tests/recover.rs`).

use super::sibling;
use crate::Test;
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "recover::kmod_server_rolls_back_partial_updates",
            run: kmod_server_rolls_back_partial_updates,
        },
        Test {
            name: "recover::redis_survives_debug_segfault",
            run: redis_survives_debug_segfault,
        },
    ]
}

/// A line-protocol connection; `None` from `ask`: shut down unanswered.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn { stream, reader })
    }

    /// One reply line (a redis bulk string: its contents).
    fn ask(&mut self, line: &str) -> Option<String> {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .ok()?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply).ok()? == 0 {
            return None;
        }
        if reply.starts_with('$') && !reply.starts_with("$-1") {
            reply.clear();
            self.reader.read_line(&mut reply).ok()?;
        }
        Some(reply.trim_end().to_string())
    }
}

/// Waits until `port` accepts; kills `child` if it never does.
fn wait_listening(child: &mut Child, port: u16) -> Result<Conn> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = Conn::open(port) {
            return Ok(c);
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the server did not start listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(child: Child) -> Result<(std::process::ExitStatus, String)> {
    let out = child.wait_with_output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn kmod_server_rolls_back_partial_updates() -> Result<()> {
    let port_file = std::env::temp_dir().join(format!("recover-{}.port", std::process::id()));
    let _ = std::fs::remove_file(&port_file);
    let mut child = Command::new(sibling("cowctl")?)
        .args(["run", "--recover", "--"])
        .arg(sibling("recover_server")?)
        .arg(&port_file)
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break p;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("recover_server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut model: Vec<i64> = (0..4096).collect();
    let mut ok = || -> Result<()> {
        for (k, v) in [(5, 55), (600, 6)] {
            ensure!(Conn::open(port)?.ask(&format!("SET {k} {v}")).as_deref() == Some("OK"));
            model[k] = v;
        }
        for bad in ["BAD 10", "ABORT", "BAD 600", "FPE"] {
            ensure!(Conn::open(port)?.ask(bad).is_none(), "{bad} was answered");
        }
        let dump = Conn::open(port)?.ask("DUMP").context("DUMP unanswered")?;
        let table: Vec<i64> = dump.split(' ').map(|v| v.parse().unwrap_or(-7)).collect();
        ensure!(
            table == model,
            "the table differs from what was acknowledged"
        );
        Ok(())
    };
    let checked = ok();
    let _ = Conn::open(port).map(|mut c| c.ask("QUIT"));
    let (status, err) = stderr_of(child)?;
    checked.with_context(|| err.clone())?;
    ensure!(status.success(), "{status}: {err}");
    ensure!(err.matches("libcow: recovered from").count() == 4, "{err}");
    ensure!(
        err.contains("4 crashes recovered, 0 not recovered"),
        "{err}"
    );
    Ok(())
}

fn redis_survives_debug_segfault() -> Result<()> {
    let port = 7379;
    let mut child = Command::new(sibling("cowctl")?)
        .args(["run", "--recover", "--", "/usr/bin/redis-server"])
        .args([
            "--port",
            "7379",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--daemonize",
            "no",
            "--enable-debug-command",
            "yes",
            "--dir",
            "/tmp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut conn = wait_listening(&mut child, port)?;
    let mut run = || -> Result<()> {
        let mut batch = String::new();
        for i in 0..10_000 {
            batch.push_str(&format!("SET key:{i} value-{i}\r\n"));
        }
        conn.stream.write_all(batch.as_bytes())?;
        for _ in 0..10_000 {
            let mut line = String::new();
            conn.reader.read_line(&mut line)?;
            ensure!(line.trim_end() == "+OK", "{line}");
        }
        let mut incrs = 0u64;
        let mut writer = Conn::open(port)?;
        for round in 0..5 {
            for _ in 0..20 {
                // Retried on a new connection if its iteration was rolled back.
                let mut answered = false;
                for _ in 0..20 {
                    if let Some(r) = writer.ask("INCR counter") {
                        ensure!(r.starts_with(':'), "{r}");
                        answered = true;
                        break;
                    }
                    writer = Conn::open(port)?;
                }
                ensure!(answered, "INCR never answered");
                incrs += 1;
            }
            ensure!(
                Conn::open(port)?.ask("DEBUG SEGFAULT").is_none(),
                "DEBUG SEGFAULT {round} was answered"
            );
        }
        let mut check = Conn::open(port)?;
        ensure!(check.ask("GET counter") == Some(incrs.to_string()));
        for i in 0..10_000 {
            ensure!(
                check.ask(&format!("GET key:{i}")) == Some(format!("value-{i}")),
                "key:{i}"
            );
        }
        Ok(())
    };
    let checked = run();
    let _ = Conn::open(port).map(|mut c| c.ask("SHUTDOWN NOSAVE"));
    let (status, err) = stderr_of(child)?;
    checked.with_context(|| err.clone())?;
    ensure!(status.success(), "{status}: {err}");
    ensure!(err.matches("recovered from SIGSEGV").count() == 5, "{err}");
    ensure!(err.contains("5 crashes recovered"), "{err}");
    Ok(())
}
