//! `cowctl snapshot|restore|list|diff|drop|stats PID`: the snapshot operations on a live process.

use crate::remote::{open_space, Space, Stopped};
use anyhow::{Context, Result};
use serde::Serialize;

/// `cowctl snapshot PID`: prints the new id alone.
pub fn snapshot(pid: i32) -> Result<()> {
    let id = match open_space(pid)? {
        Space::Kmod(space) => match ask_preload(pid, "snapshot") {
            Some(reply) => {
                println!("{}", reply?);
                return Ok(());
            }
            None => space.snapshot(),
        },
        Space::InProcess { pid, backend } => {
            let reply = Space::ask(pid, &backend, "snapshot")?;
            println!("{reply}");
            return Ok(());
        }
    }
    .with_context(|| format!("cannot snapshot process {pid}"))?;
    println!("{id}");
    Ok(())
}

/// `cowctl restore PID ID [--running]`. On cow.ko the process is stopped (SIGSTOP) around the
/// restore unless `running`; an in-process backend stops the program's threads itself.
pub fn restore(pid: i32, id: u64, running: bool) -> Result<()> {
    let space = match open_space(pid)? {
        Space::Kmod(space) => {
            if let Some(reply) = ask_preload(pid, &format!("restore {id}")) {
                reply.with_context(|| format!("cannot restore process {pid} to snapshot {id}"))?;
                eprintln!("process {pid} restored to snapshot {id}");
                return Ok(());
            }
            space
        }
        Space::InProcess { pid, backend } => {
            Space::ask(pid, &backend, &format!("restore {id}"))
                .with_context(|| format!("cannot restore process {pid} to snapshot {id}"))?;
            eprintln!("process {pid} restored to snapshot {id}");
            return Ok(());
        }
    };
    let _stopped = if running {
        None
    } else {
        Some(Stopped::new(pid)?)
    };
    space
        .restore(id)
        .with_context(|| format!("cannot restore process {pid} to snapshot {id}"))?;
    eprintln!("process {pid} restored to snapshot {id}");
    Ok(())
}

/// Asks libcow_preload in process `pid` (under `cowctl run` on cow.ko) to do `req` itself:
/// it holds its allocator and mapping table still around a snapshot, and after a restore it
/// maps back what the restored memory describes, which only the process can do. `None`: no
/// preload answers (a program that drives cow.ko through libcow alone), so the caller uses the
/// descriptor.
fn ask_preload(pid: i32, req: &str) -> Option<Result<String>> {
    match cow::control::request(pid, req) {
        Err(e) if matches!(e.errno(), libc::ECONNREFUSED | libc::ENOENT) => None,
        other => Some(other.map_err(|e| {
            let errno = e.errno();
            anyhow::Error::new(std::io::Error::from_raw_os_error(errno))
                .context(format!("process {pid}: {req}"))
        })),
    }
}

/// `cowctl drop PID ID`.
pub fn drop(pid: i32, id: u64) -> Result<()> {
    match open_space(pid)? {
        Space::Kmod(space) => space.drop_snapshot(id).map_err(anyhow::Error::from),
        Space::InProcess { pid, backend } => {
            Space::ask(pid, &backend, &format!("drop {id}")).map(|_| ())
        }
    }
    .with_context(|| format!("cannot drop snapshot {id} of process {pid}"))?;
    Ok(())
}

#[derive(Serialize)]
struct ListEntry {
    id: u64,
    /// Per-snapshot figures cow.ko keeps (none from an in-process backend).
    saved_pages: Option<u64>,
    bytes_held: Option<u64>,
    age_ms: Option<f64>,
}

/// `cowctl list PID [--json]`.
pub fn list(pid: i32, json: bool) -> Result<()> {
    let now = cow::monotonic_ns();
    let entries: Vec<ListEntry> = match open_space(pid)? {
        Space::Kmod(space) => space
            .list()?
            .into_iter()
            .map(|s| ListEntry {
                id: s.id,
                saved_pages: Some(s.saved_pages),
                bytes_held: Some(s.bytes_held),
                age_ms: Some(now.saturating_sub(s.taken_ns) as f64 / 1e6),
            })
            .collect(),
        Space::InProcess { pid, backend } => Space::ask(pid, &backend, "list")?
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .map(|id| ListEntry {
                id,
                saved_pages: None,
                bytes_held: None,
                age_ms: None,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:>8} {:>12} {:>14} {:>12}",
        "id", "saved pages", "bytes held", "age (ms)"
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for e in &entries {
        println!(
            "{:>8} {:>12} {:>14} {:>12}",
            e.id,
            or_dash(e.saved_pages.map(|v| v.to_string())),
            or_dash(e.bytes_held.map(|v| v.to_string())),
            or_dash(e.age_ms.map(|v| format!("{v:.1}"))),
        );
    }
    Ok(())
}

#[derive(Serialize, Debug, PartialEq, Eq)]
struct Range {
    /// Byte offset in the process's space (what `COW_IOC_READ` takes).
    offset: u64,
    len: u64,
    /// Where the process sees it, if a mapping of `/dev/cow` shows that part of the space.
    address: Option<u64>,
}

/// The address at which `pid` maps space offset `offset`: a `/dev/cow` mapping's file offset is
/// the space's base on the device plus the region's offset in the space.
fn address_of(cow_maps: &[cow::maps::Mapping], page: u64, offset: u64) -> Option<u64> {
    let space_bytes = page << cow::abi::COW_SPACE_PAGES_SHIFT;
    cow_maps.iter().find_map(|m| {
        let start = m.offset % space_bytes;
        let len = (m.end - m.start) as u64;
        (start..start + len)
            .contains(&offset)
            .then(|| m.start as u64 + offset - start)
    })
}

/// `cowctl diff PID ID1 ID2 [--json]`: byte ranges that differ between two snapshots, at the
/// addresses the process sees them (and their space offsets in JSON).
pub fn diff(pid: i32, id1: u64, id2: u64, json: bool) -> Result<()> {
    let space = match open_space(pid)? {
        Space::Kmod(space) => space,
        Space::InProcess { backend, .. } => anyhow::bail!(
            "process {pid} keeps its snapshots in-process ({backend} backend): diff reads \
             snapshot memory from outside, which needs cow.ko"
        ),
    };
    let (old, new) = (id1.min(id2), id1.max(id2));
    let held = space.list()?;
    for id in [old, new] {
        if !held.iter().any(|s| s.id == id) {
            return Err(
                anyhow::Error::new(cow::Error::NoSnapshot { id }).context(format!(
                    "cannot diff process {pid}'s snapshots {id1} and {id2}"
                )),
            );
        }
    }
    // Only pages written since the older snapshot can differ.
    let page = space.page_size() as u64;
    let mut ranges: Vec<Range> = Vec::new();
    let (mut a, mut b) = (vec![0u8; page as usize], vec![0u8; page as usize]);
    for idx in space.dirty_since(old)? {
        space.read(old, idx * page, &mut a)?;
        space.read(new, idx * page, &mut b)?;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if x == y {
                continue;
            }
            let off = idx * page + i as u64;
            match ranges.last_mut() {
                Some(r) if r.offset + r.len == off => r.len += 1,
                _ => ranges.push(Range {
                    offset: off,
                    len: 1,
                    address: None,
                }),
            }
        }
    }
    let cow_maps: Vec<cow::maps::Mapping> = cow::maps::read_of(pid)
        .map(|maps| {
            maps.as_slice()
                .iter()
                .filter(|m| m.dev_cow)
                .copied()
                .collect()
        })
        .unwrap_or_default();
    for r in &mut ranges {
        r.address = address_of(&cow_maps, page, r.offset);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&ranges)?);
    } else {
        let total: u64 = ranges.iter().map(|r| r.len).sum();
        println!(
            "{} bytes differ in {} ranges between {old} and {new}",
            total,
            ranges.len()
        );
        for r in &ranges {
            match r.address {
                Some(a) => println!("  {a:#014x} +{}", r.len),
                None => println!("  space offset {:#x} +{} (not mapped)", r.offset, r.len),
            }
        }
    }
    Ok(())
}

/// `cowctl stats PID [--json]`.
pub fn stats(pid: i32, json: bool) -> Result<()> {
    let s = match open_space(pid)? {
        Space::Kmod(space) => space.stats()?,
        Space::InProcess { pid, backend } => {
            // `key=value` pairs: the in-process backend's counters.
            let mut v = serde_json::Map::new();
            v.insert("backend".into(), backend.clone().into());
            for pair in Space::ask(pid, &backend, "stats")?.split_whitespace() {
                if let Some((k, n)) = pair.split_once('=') {
                    v.insert(k.into(), n.parse::<u64>().unwrap_or(0).into());
                }
            }
            return print_stats(&serde_json::Value::Object(v), json);
        }
    };
    let v = serde_json::json!({
        "snapshots": s.snapshots,
        "pages_present": s.pages_present,
        "first_write_faults": s.first_write_faults,
        "other_faults": s.other_faults,
        "pages_saved": s.pages_saved,
        "bytes_held": s.bytes_held,
        "snapshots_taken": s.snapshots_taken,
        "restores": s.restores,
        "pages_restored": s.pages_restored,
        "evicted": s.evicted,
        "fault_ns": s.fault_ns,
        "snapshot_ns": s.snapshot_ns,
        "restore_ns": s.restore_ns,
        "precopied_pages": s.precopied_pages,
        "precopy_useful": s.precopy_useful,
        "precision": if s.precopied_pages == 0 { 0.0 } else { s.precopy_useful as f64 / s.precopied_pages as f64 },
        "recall": if s.precopy_useful + s.first_write_faults == 0 { 0.0 } else {
            s.precopy_useful as f64 / (s.precopy_useful + s.first_write_faults) as f64
        },
        "faults_avoided": s.precopy_useful,
        "around_pages": s.around_pages,
        "around_useful": s.around_useful,
        "module_pages": s.module_pages,
    });
    print_stats(&v, json)
}

fn print_stats(v: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(map) = v.as_object() {
        for (k, val) in map {
            println!("{k:<20} {val}");
        }
    }
    Ok(())
}
