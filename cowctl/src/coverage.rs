//! `cowctl run --coverage`: what libcow_preload left uncovered, as it wrote at exit.

use serde::Serialize;
use std::path::Path;

/// One private writable mapping of the program at exit.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// In `/dev/cow` memory: snapshotted.
    pub covered: bool,
    /// Why not (empty when covered).
    pub reason: String,
    /// The mapping's name in `/proc/PID/maps` (path, `[stack]`, or empty).
    pub name: String,
}

/// Parses the lines libcow_preload wrote: `START END covered|uncovered REASON NAME`.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(5, '\t');
            let start = u64::from_str_radix(f.next()?, 16).ok()?;
            let end = u64::from_str_radix(f.next()?, 16).ok()?;
            let covered = f.next()? == "covered";
            let reason = f.next()?;
            Some(Entry {
                start,
                end,
                covered,
                reason: if covered {
                    String::new()
                } else {
                    reason.into()
                },
                name: f.next().unwrap_or("").into(),
            })
        })
        .collect()
}

/// Prints the coverage the program wrote to `path` on stderr, and adds it to the JSON report
/// at `report` (the user's `--report FILE`), if any.
pub fn report(path: &Path, report: Option<&Path>) {
    let entries = match std::fs::read_to_string(path) {
        Ok(text) => parse(&text),
        Err(_) => {
            eprintln!(
                "cowctl run: --coverage: the program wrote no coverage (it did not exit normally)"
            );
            return;
        }
    };
    let covered: u64 = entries
        .iter()
        .filter(|e| e.covered)
        .map(|e| e.end - e.start)
        .sum();
    let uncovered: Vec<&Entry> = entries.iter().filter(|e| !e.covered).collect();
    eprintln!(
        "cowctl run: coverage: {} KiB of private writable memory in /dev/cow ({} mappings); {} mappings uncovered{}",
        covered >> 10,
        entries.len() - uncovered.len(),
        uncovered.len(),
        if uncovered.is_empty() { "" } else { ":" }
    );
    for e in &uncovered {
        eprintln!(
            "  {:#x}-{:#x} {:>8} KiB  {}{}",
            e.start,
            e.end,
            (e.end - e.start) >> 10,
            e.reason,
            if e.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.name)
            }
        );
    }
    if let Some(report) = report {
        let merged = std::fs::read_to_string(report)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|mut v| {
                v["coverage"] = serde_json::json!(entries);
                v
            });
        if let Some(v) = merged {
            let _ = std::fs::write(report, v.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_preload_writes() {
        let text = "1000\t3000\tcovered\t-\t/dev/cow\n7ffc0000\t7ffc1000\tuncovered\tstack of the main thread\t[stack]\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert!(e[0].covered && e[0].reason.is_empty());
        assert_eq!(
            (e[1].start, e[1].end, e[1].covered),
            (0x7ffc0000, 0x7ffc1000, false)
        );
        assert_eq!(e[1].name, "[stack]");
    }
}
