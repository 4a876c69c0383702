//! delorean-qemu-tests — the in-guest test runner.
//!
//! Runs every registered test in its own child process (so a crash or hang in one test cannot
//! take the runner down), watches the kernel log while it runs (any message at warning level or
//! worse fails the test), prints one line per test and closes with `N passed, N failed`.
//!
//! Usage: delorean-qemu-tests [--list] [--skip=PATTERN...] [FILTER...]
//! (inside the guest; see scripts/test). A test runs if its name contains any FILTER (or no
//! FILTER is given) and no `--skip` PATTERN.

mod churn_check;
mod kmsg;
mod module;
mod tests;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// A test: a name and a function that fails with a reason.
pub struct Test {
    /// Unique name, `area::what`.
    pub name: &'static str,
    /// The test body.
    pub run: fn() -> anyhow::Result<()>,
}

const TEST_TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = tests::all();
    if args.first().map(String::as_str) == Some("--run-one") {
        return run_one(&all, args.get(1).map(String::as_str).unwrap_or(""));
    }
    if args.first().map(String::as_str) == Some("--list") {
        for t in &all {
            println!("{}", t.name);
        }
        return ExitCode::SUCCESS;
    }
    let (skips, filters): (Vec<&str>, Vec<&str>) = args
        .iter()
        .map(String::as_str)
        .partition(|a| a.starts_with("--skip="));
    let skips: Vec<&str> = skips.iter().map(|s| &s["--skip=".len()..]).collect();
    let selected: Vec<&Test> = all
        .iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.name.contains(f)))
        .filter(|t| !skips.iter().any(|s| t.name.contains(s)))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for t in selected {
        match run_isolated(t) {
            Ok(elapsed) => {
                passed += 1;
                println!("ok   {} ({:.2}s)", t.name, elapsed.as_secs_f64());
            }
            Err(reason) => {
                failed += 1;
                println!(
                    "FAIL {}: {}",
                    t.name,
                    reason.trim_end().replace('\n', "\n     ")
                );
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Child side: run one test in this process.
fn run_one(all: &[Test], name: &str) -> ExitCode {
    let Some(t) = all.iter().find(|t| t.name == name) else {
        eprintln!("no test named {name}");
        return ExitCode::from(2);
    };
    match (t.run)() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parent side: run a test in a child, with a timeout and a kernel-log watch.
fn run_isolated(t: &Test) -> Result<Duration, String> {
    let mut log = kmsg::Watch::start().map_err(|e| format!("cannot watch /dev/kmsg: {e}"))?;
    let start = Instant::now();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    use std::os::unix::process::CommandExt;
    // Its own process group, so that a timeout kills what the test started too (a grandchild
    // holding the output pipes would otherwise keep the runner waiting for ever).
    let mut child = Command::new(exe)
        .args(["--run-one", t.name])
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    // Read output in threads so a chatty test cannot block on a full pipe.
    let out = child.stdout.take().map(read_in_background);
    let err = child.stderr.take().map(read_in_background);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > TEST_TIMEOUT => {
                // SAFETY: SIGKILL to the process group the child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(format!("timed out after {}s", TEST_TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait: {e}")),
        }
    };
    let elapsed = start.elapsed();
    let stdout = out
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    let stderr = err
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    let warnings = log.bad_lines(tests::expected_kmsg_block(t.name));
    if !status.success() {
        return Err(format!("{status}\n{stderr}{stdout}"));
    }
    if !warnings.is_empty() {
        return Err(format!(
            "kernel log warnings while the test ran:\n{}",
            warnings.join("\n")
        ));
    }
    Ok(elapsed)
}

fn read_in_background<R: std::io::Read + Send + 'static>(
    mut r: R,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}
