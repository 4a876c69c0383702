//! `cowctl bench --recover`: what error recovery costs a real server, and what it saves.
//!
//! Debian's `redis-server` with 10 000 keys, measured by `redis-benchmark` (50 clients, SET and
//! GET) plainly and under `cowctl run --recover` with each backend, in one run: both servers
//! run side by side and are measured in turn, [`ROUNDS`] times, medians taken (one plain run
//! then one under recovery differed by up to 30 % on this host from drift alone). Also the
//! latency of a request to an idle server (`PING` on an open connection, 2 ms apart). Recovery
//! time is from sending `DEBUG SEGFAULT` to the next `PING` answered. It is set against the same
//! crash handled by a restart: plain redis crashes (its own crash handler runs: the report and,
//! by default, a memory test), exits, is started again at once (what a supervisor does) and
//! gets the same keys loaded back; and against that restart's start-and-reload alone (its
//! lower bound, as if the crash itself took no time).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Keys loaded before measuring.
const KEYS: usize = 10_000;
/// Requests per redis-benchmark test.
const REQUESTS: &str = "100000";
/// Turns of plain and recovering redis-benchmark runs (medians taken), and of start-and-reload.
const ROUNDS: usize = 3;

/// One row: a backend and a redis-benchmark test.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    /// The backend under `--recover`.
    pub backend: String,
    /// `SET` or `GET`.
    pub test: String,
    /// Requests per second without cowctl.
    pub baseline_rps: f64,
    /// Requests per second under `cowctl run --recover`.
    pub recover_rps: f64,
    /// `recover_rps / baseline_rps`.
    pub ratio: f64,
    /// Median latency under `--recover`, ms.
    pub p50_ms: f64,
    /// 99th percentile latency under `--recover`, ms.
    pub p99_ms: f64,
    /// 99th percentile latency without cowctl, ms.
    pub baseline_p99_ms: f64,
    /// A request to an idle server under `--recover` (`PING` on an open connection, 2 ms
    /// after the last), median, µs.
    pub idle_request_us: f64,
    /// The same without cowctl, µs.
    pub baseline_idle_request_us: f64,
    /// From `DEBUG SEGFAULT` sent to the next `PING` answered, µs (median of 9 crashes).
    pub recovery_us: f64,
    /// From `DEBUG SEGFAULT` sent to plain redis to the next `PING` answered by a restarted
    /// redis with the keys loaded back, µs (median of 3).
    pub restart_us: f64,
    /// Starting redis afresh and loading the keys, µs: the restart without the crash.
    pub start_reload_us: f64,
    /// `restart_us / recovery_us`.
    pub speedup: f64,
    /// `start_reload_us / recovery_us`.
    pub speedup_vs_start_reload: f64,
}

/// Debian's `name` (redis-server, redis-benchmark, …), or why it is missing.
pub(crate) fn find(name: &str) -> Result<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not found (apt-get install redis-server redis-tools)"))
}

/// A TCP port of 127.0.0.1 nobody listens on now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// A redis server for the benchmark, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = c.write_all(b"SHUTDOWN NOSAVE\r\n");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts redis (under `cowctl run --recover --backend B` if `backend` is given) and loads
/// the keys; returns it and how long that took.
fn start(redis: &PathBuf, backend: Option<&str>) -> Result<(Server, Duration)> {
    let port = free_port()?;
    let t0 = Instant::now();
    let mut cmd = match backend {
        Some(b) => {
            let mut c = Command::new(std::env::current_exe()?);
            c.args(["run", "--recover", "--backend", b, "--"])
                .arg(redis);
            c
        }
        None => Command::new(redis),
    };
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--enable-debug-command", "yes", "--dir"])
        .arg(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = Server {
        child: cmd.spawn().context("cannot start redis-server")?,
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        if Instant::now() > deadline {
            bail!("redis did not start listening");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    load_keys(stream)?;
    Ok((server, t0.elapsed()))
}

/// Loads the keys in one pipeline and waits for every reply.
fn load_keys(mut stream: TcpStream) -> Result<()> {
    let mut batch = String::new();
    for i in 0..KEYS {
        batch.push_str(&format!("SET key:{i} value-{i}\r\n"));
    }
    stream.write_all(batch.as_bytes())?;
    let mut reader = BufReader::new(stream);
    for _ in 0..KEYS {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim_end() != "+OK" {
            bail!("loading keys: {line:?}");
        }
    }
    Ok(())
}

/// `(rps, p50_ms, p99_ms)` of each test, from redis-benchmark's CSV.
fn benchmark(tool: &PathBuf, port: u16) -> Result<Vec<(String, f64, f64, f64)>> {
    let out = Command::new(tool)
        .args(["-p", &port.to_string(), "-c", "50", "-n", REQUESTS])
        .args(["-t", "set,get", "--csv"])
        .output()
        .context("cannot run redis-benchmark")?;
    if !out.status.success() {
        bail!("redis-benchmark: {}", String::from_utf8_lossy(&out.stderr));
    }
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
    // "p99_latency_ms","max_latency_ms"
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let f: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if f.len() < 7 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        rows.push((f[0].to_string(), num(1), num(4), num(6)));
    }
    Ok(rows)
}

/// The median of each column of `runs` (redis-benchmark results of the same tests).
fn medians(runs: &[Vec<(String, f64, f64, f64)>]) -> Vec<(String, f64, f64, f64)> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(test, ..)| {
            let of = |col: fn(&(String, f64, f64, f64)) -> f64| {
                median(
                    runs.iter()
                        .filter_map(|r| r.iter().find(|x| &x.0 == test).map(col))
                        .collect(),
                )
            };
            (test.clone(), of(|x| x.1), of(|x| x.2), of(|x| x.3))
        })
        .collect()
}

/// Requests to an idle server: the median round trip of a `PING` on an open connection,
/// each sent 2 ms after the last answer.
fn idle_request_time(port: u16) -> Result<Duration> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut times = Vec::new();
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(2));
        let t0 = Instant::now();
        writer.write_all(b"PING\r\n")?;
        let mut pong = String::new();
        reader.read_line(&mut pong)?;
        times.push(t0.elapsed());
        if !pong.starts_with("+PONG") {
            bail!("PING answered {pong:?}");
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The median time of [`ROUNDS`] starts of plain redis with the keys loaded.
fn median_start_reload(redis: &PathBuf) -> Result<Duration> {
    let mut times = (0..ROUNDS)
        .map(|_| start(redis, None).map(|(_, t)| t))
        .collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[ROUNDS / 2])
}

/// Crashes measured for the recovery time; one alone varies by ±30 % here.
const CRASHES: usize = 9;

/// The median of [`CRASHES`] recovery times (each crash is followed by a `PING` reply,
/// socket output, so the same site never reaches `--recover-limit`).
fn median_recovery_time(port: u16) -> Result<Duration> {
    let mut times = (0..CRASHES)
        .map(|_| recovery_time(port))
        .collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[CRASHES / 2])
}

/// From `DEBUG SEGFAULT` sent to the next `PING` answered.
fn recovery_time(port: u16) -> Result<Duration> {
    let mut crash = TcpStream::connect(("127.0.0.1", port))?;
    let t0 = Instant::now();
    crash.write_all(b"DEBUG SEGFAULT\r\n")?;
    let mut reply = String::new();
    let _ = BufReader::new(crash).read_line(&mut reply);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"PING\r\n");
            let mut pong = String::new();
            if BufReader::new(s).read_line(&mut pong).is_ok() && pong.starts_with("+PONG") {
                return Ok(t0.elapsed());
            }
        }
    }
    bail!("redis did not serve again after DEBUG SEGFAULT")
}

/// Restarts measured; each takes redis' crash handler's time (≈ 0.2 s here).
const RESTARTS: usize = 3;

/// The median over [`RESTARTS`] of: `DEBUG SEGFAULT` sent to plain redis → it has exited
/// (what a supervisor waits for) → a new redis started and loaded with the keys → `PING`
/// answered. Consumes `server`; returns the last restarted one.
fn median_restart_time(redis: &PathBuf, mut server: Server) -> Result<(Server, Duration)> {
    let mut times = Vec::with_capacity(RESTARTS);
    for _ in 0..RESTARTS {
        let mut crash = TcpStream::connect(("127.0.0.1", server.port))?;
        let t0 = Instant::now();
        crash.write_all(b"DEBUG SEGFAULT\r\n")?;
        server.child.wait()?;
        let (restarted, _) = start(redis, None)?;
        server = restarted;
        let mut s = TcpStream::connect(("127.0.0.1", server.port))?;
        s.write_all(b"PING\r\n")?;
        let mut pong = String::new();
        BufReader::new(s).read_line(&mut pong)?;
        if !pong.starts_with("+PONG") {
            bail!("restarted redis answered {pong:?} to PING");
        }
        times.push(t0.elapsed());
    }
    times.sort();
    Ok((server, times[RESTARTS / 2]))
}

/// Measures every backend in `backends`; prints a table or JSON rows.
pub fn run(backends: &[String], json: bool) -> Result<()> {
    let redis = find("redis-server")?;
    let tool = find("redis-benchmark")?;
    eprintln!("cowctl bench --recover: plain redis, {KEYS} keys, started {ROUNDS} times");
    let start_reload = median_start_reload(&redis)?;
    eprintln!("cowctl bench --recover: plain redis crashed and restarted {RESTARTS} times");
    let (server, restart) = median_restart_time(&redis, start(&redis, None)?.0)?;
    drop(server);
    let (plain, _) = start(&redis, None)?;
    let baseline_idle = idle_request_time(plain.port)?;
    let mut rows = Vec::new();
    for backend in backends {
        eprintln!(
            "cowctl bench --recover: redis under cowctl run --recover --backend {backend}, \
             measured in turn with plain redis {ROUNDS} times"
        );
        let attempt = start(&redis, Some(backend)).and_then(|(server, _)| {
            let mut plain_runs = Vec::new();
            let mut runs = Vec::new();
            for _ in 0..ROUNDS {
                plain_runs.push(benchmark(&tool, plain.port)?);
                runs.push(benchmark(&tool, server.port)?);
            }
            let idle = idle_request_time(server.port)?;
            let recovery = median_recovery_time(server.port)?;
            Ok((medians(&plain_runs), medians(&runs), idle, recovery))
        });
        let (baseline, measured, idle, recovery) = match attempt {
            Ok(m) => m,
            Err(e) => {
                eprintln!("cowctl bench --recover: {backend}: {e:#}; no row for it");
                continue;
            }
        };
        for (test, rps, p50, p99) in measured {
            let Some(base) = baseline.iter().find(|b| b.0 == test) else {
                continue;
            };
            rows.push(Row {
                backend: backend.clone(),
                test,
                baseline_rps: base.1,
                recover_rps: rps,
                ratio: if base.1 > 0.0 { rps / base.1 } else { 0.0 },
                p50_ms: p50,
                p99_ms: p99,
                baseline_p99_ms: base.3,
                idle_request_us: idle.as_secs_f64() * 1e6,
                baseline_idle_request_us: baseline_idle.as_secs_f64() * 1e6,
                recovery_us: recovery.as_secs_f64() * 1e6,
                restart_us: restart.as_secs_f64() * 1e6,
                start_reload_us: start_reload.as_secs_f64() * 1e6,
                speedup: restart.as_secs_f64() / recovery.as_secs_f64(),
                speedup_vs_start_reload: start_reload.as_secs_f64() / recovery.as_secs_f64(),
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<9} {:<4} {:>12} {:>12} {:>6} {:>8} {:>8} {:>15} {:>12} {:>12} {:>8} {:>14} {:>8}",
        "backend",
        "test",
        "plain req/s",
        "recover req/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "idle req µs",
        "recovery µs",
        "restart µs",
        "speedup",
        "start+load µs",
        "speedup"
    );
    for r in &rows {
        println!(
            "{:<9} {:<4} {:>12.0} {:>12.0} {:>6.2} {:>8.3} {:>8.3} {:>15} {:>12.0} {:>12.0} {:>8.0} {:>14.0} {:>8.1}",
            r.backend,
            r.test,
            r.baseline_rps,
            r.recover_rps,
            r.ratio,
            r.p50_ms,
            r.p99_ms,
            format!("{:.0} ({:.0})", r.idle_request_us, r.baseline_idle_request_us),
            r.recovery_us,
            r.restart_us,
            r.speedup,
            r.start_reload_us,
            r.speedup_vs_start_reload
        );
    }
    Ok(())
}
