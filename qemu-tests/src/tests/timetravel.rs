//! Time-travel debugging on cow.ko: `cowctl record --backend kmod` (the heap and globals in
//! the module, their pages read from kernel snapshots off the program's threads), then real gdb
//! finds the planted bug. The host runs the same checks on the `scan` backend
//! (`cowctl/tests/timetravel.rs`).

use super::sibling;
use crate::Test;
use anyhow::{ensure, Context, Result};
use std::process::Command;

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "timetravel::kmod_search_finds_the_bug",
        run: kmod_search_finds_the_bug,
    }]
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
