//! Every backend in the guest: the randomized byte-exact suite, the threads suite, and the C
//! program that uses only cow.h. kmod runs under `cowctl run`, which covers the heap and globals.

use super::sibling;
use crate::Test;
use anyhow::{ensure, Result};
use std::process::Command;

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "backends::uffd_churn",
            run: || churn("uffd"),
        },
        Test {
            name: "backends::mprotect_churn",
            run: || churn("mprotect"),
        },
        Test {
            name: "backends::fork_churn",
            run: || churn("fork"),
        },
        Test {
            name: "backends::kmod_churn",
            run: || churn("kmod"),
        },
        Test {
            name: "backends::kmod_churn_random_hints",
            run: kmod_churn_random_hints,
        },
        Test {
            name: "backends::uffd_threads",
            run: || threads("uffd"),
        },
        Test {
            name: "backends::mprotect_threads",
            run: || threads("mprotect"),
        },
        Test {
            name: "backends::fork_threads",
            run: || threads("fork"),
        },
        Test {
            name: "backends::kmod_threads",
            run: || threads("kmod"),
        },
        Test {
            name: "backends::c_program_every_backend",
            run: c_program_every_backend,
        },
        Test {
            name: "backends::auto_is_kmod_with_the_module",
            run: auto_is_kmod_with_the_module,
        },
    ]
}

fn run(backend: &str, args: &[&str]) -> Result<String> {
    let suite = sibling("cow-suite")?;
    let mut cmd = if backend == "kmod" {
        let mut c = Command::new(sibling("cowctl")?);
        c.args(["run", "--"]).arg(suite);
        c
    } else {
        Command::new(suite)
    };
    let out = cmd.arg(backend).args(args).output()?;
    super::stdout_of_success(&out, &format!("{backend} {args:?}"))
}

fn churn(backend: &str) -> Result<()> {
    for seed in ["11", "22"] {
        let out = run(backend, &["churn", "3000", seed])?;
        ensure!(out.contains("zero differences"), "{out}");
    }
    Ok(())
}

/// The kmod suite with random pre-copy hints before every snapshot: results must not change.
/// (Under `cowctl run` the process is not alone — libcow's control thread — so the module takes
/// these snapshots the ordinary way; pre-copies at random are `snap::randomized_byte_exact`'s.)
fn kmod_churn_random_hints() -> Result<()> {
    std::env::set_var("COW_SUITE_RANDOM_HINTS", "1");
    for seed in ["33", "44"] {
        let out = run("kmod", &["churn", "3000", seed])?;
        ensure!(out.contains("zero differences"), "{out}");
    }
    Ok(())
}

fn threads(backend: &str) -> Result<()> {
    let out = run(backend, &["threads"])?;
    ensure!(out.contains("consistent cuts"), "{out}");
    Ok(())
}

fn c_program_every_backend() -> Result<()> {
    for backend in ["kmod", "uffd", "mprotect", "fork"] {
        let out = Command::new(sibling("cabi")?).arg(backend).output()?;
        ensure!(
            out.status.success(),
            "cabi {backend}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn auto_is_kmod_with_the_module() -> Result<()> {
    let out = Command::new(sibling("cabi")?).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && text.contains("(kmod:"), "{text}");
    Ok(())
}
