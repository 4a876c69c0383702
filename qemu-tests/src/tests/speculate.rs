//! Speculative pre-copy in cow.ko: hinted pages are copied at a quiesced snapshot and left
//! writable; unwritten pre-copies are dropped; hints never change what a snapshot holds.

use crate::Test;
use anyhow::{ensure, Result};
use cow::Cow;

/// This file's tests.
pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "speculate::precopy_avoids_faults",
            run: precopy_avoids_faults,
        },
        Test {
            name: "speculate::unwritten_precopies_dropped",
            run: unwritten_precopies_dropped,
        },
        Test {
            name: "speculate::hints_need_quiesced_snapshots",
            run: hints_need_quiesced_snapshots,
        },
        Test {
            name: "speculate::cowctl_run_speculate_and_stats",
            run: cowctl_run_speculate_and_stats,
        },
        Test {
            name: "speculate::bad_hints_rejected",
            run: bad_hints_rejected,
        },
        Test {
            name: "speculate::quiesced_if_alone",
            run: quiesced_if_alone,
        },
    ]
}

const PAGES: usize = 64;

fn write_pages(r: &cow::Region, n: usize, value: u8) {
    for p in 0..n {
        // SAFETY: pages of a region this test mapped.
        unsafe { r.addr.add(p * 4096 + 7).write_volatile(value) };
    }
}

fn read_page(r: &cow::Region, p: usize) -> u8 {
    // SAFETY: as above.
    unsafe { r.addr.add(p * 4096 + 7).read_volatile() }
}

fn setup() -> Result<(Cow, cow::Region, Vec<u64>)> {
    let cow = Cow::open()?;
    let r = cow.map_region(PAGES * 4096)?;
    let first = r.offset / 4096;
    let hint: Vec<u64> = (first..first + PAGES as u64).collect();
    write_pages(&r, PAGES, 1);
    Ok((cow, r, hint))
}

fn precopy_avoids_faults() -> Result<()> {
    let (cow, r, hint) = setup()?;
    cow.hint(&hint)?;
    let s1 = cow.snapshot_quiesced()?; // first snapshot: every page written so far is pre-copied
    let before = cow.stats()?;
    ensure!(
        before.precopied_pages == PAGES as u64,
        "precopied {}",
        before.precopied_pages
    );
    write_pages(&r, PAGES, 2);
    let after = cow.stats()?;
    ensure!(
        after.first_write_faults == before.first_write_faults,
        "{} write faults on pre-copied pages",
        after.first_write_faults - before.first_write_faults
    );
    let s2 = cow.snapshot_quiesced()?;
    let st = cow.stats()?;
    ensure!(
        st.precopy_useful == PAGES as u64,
        "useful {}",
        st.precopy_useful
    );
    write_pages(&r, PAGES, 3);
    // Both snapshots hold exactly what the pages held then.
    cow.restore(s2)?;
    ensure!((0..PAGES).all(|p| read_page(&r, p) == 2), "restore to s2");
    cow.restore(s1)?;
    ensure!((0..PAGES).all(|p| read_page(&r, p) == 1), "restore to s1");
    Ok(())
}

fn unwritten_precopies_dropped() -> Result<()> {
    let (cow, r, hint) = setup()?;
    cow.hint(&hint)?;
    let s1 = cow.snapshot_quiesced()?;
    write_pages(&r, PAGES / 2, 9); // half the pre-copied pages are written
    cow.snapshot_quiesced()?;
    let st = cow.stats()?;
    ensure!(
        st.precopy_useful == (PAGES / 2) as u64,
        "useful {}",
        st.precopy_useful
    );
    let written = cow.dirty_in_epoch(s1)?;
    ensure!(
        written.len() == PAGES / 2,
        "epoch wrote {} pages",
        written.len()
    );
    // Held: the 32 written pre-copies of s1 (the 32 unwritten ones were freed) plus the 64
    // pre-copies made for the next epoch (every hinted page is still writable).
    let want = (PAGES / 2 + PAGES) as u64 * 4096;
    ensure!(
        st.bytes_held == want,
        "bytes held {} (want {want})",
        st.bytes_held
    );
    cow.restore(s1)?;
    ensure!((0..PAGES).all(|p| read_page(&r, p) == 1), "restore to s1");
    Ok(())
}

fn hints_need_quiesced_snapshots() -> Result<()> {
    let (cow, r, hint) = setup()?;
    cow.hint(&hint)?;
    cow.snapshot()?; // no promise of quiescence: hints are ignored
    ensure!(
        cow.stats()?.precopied_pages == 0,
        "pre-copied without the quiesced flag"
    );
    write_pages(&r, PAGES, 5);
    let st = cow.stats()?;
    ensure!(
        st.first_write_faults + st.around_pages >= PAGES as u64,
        "writes did not fault"
    );
    cow.hint(&[])?;
    cow.snapshot_quiesced()?;
    ensure!(
        cow.stats()?.precopied_pages == 0,
        "an empty hint pre-copied"
    );
    Ok(())
}

fn bad_hints_rejected() -> Result<()> {
    let cow = Cow::open()?;
    let errno = |r: cow::Result<()>| r.err().map(|e| e.errno());
    ensure!(
        errno(cow.hint(&[1u64 << 40])) == Some(libc::EINVAL),
        "index past the space"
    );
    // A count beyond the limit is refused before anything is read.
    let mut a = cow::abi::CowHint {
        size: 24,
        flags: 0,
        count: cow::abi::COW_MAX_HINT_PAGES + 1,
        pages: 0,
    };
    use std::os::fd::{AsFd, AsRawFd};
    // SAFETY: a valid CowHint; the module rejects the count before reading `pages`.
    let rc = unsafe {
        libc::ioctl(
            cow.as_fd().as_raw_fd(),
            cow::abi::COW_IOC_HINT as libc::c_ulong,
            &mut a,
        )
    };
    ensure!(
        rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL),
        "huge count"
    );
    a.count = 4;
    a.pages = 8; // unreadable pointer
                 // SAFETY: as above; the module copies from the bad pointer with uaccess and fails.
    let rc = unsafe {
        libc::ioctl(
            cow.as_fd().as_raw_fd(),
            cow::abi::COW_IOC_HINT as libc::c_ulong,
            &mut a,
        )
    };
    ensure!(
        rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT),
        "bad pointer"
    );
    Ok(())
}

/// `cowctl run --speculate=stable` on a program that rewrites the same pages every epoch:
/// `cowctl stats PID` shows that speculation avoided most of the faults.
fn cowctl_run_speculate_and_stats() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let cowctl = super::sibling("cowctl")?;
    let mut child = Command::new(&cowctl)
        .args(["run", "--speculate=stable", "--"])
        .arg(super::sibling("speculate_loop")?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let pid = line.trim().strip_prefix("ready ").unwrap_or("").to_string();
    let stats = Command::new(&cowctl)
        .args(["stats", &pid, "--json"])
        .output()?;
    let _ = writeln!(child.stdin.take().expect("stdin"), "quit");
    let status = child.wait()?;
    ensure!(status.success(), "speculate_loop: {status}");
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout)?;
    let useful = v["precopy_useful"].as_u64().unwrap_or(0);
    let faults = v["first_write_faults"].as_u64().unwrap_or(0);
    ensure!(v["precision"].as_f64() > Some(0.9), "stats: {v}");
    ensure!(
        useful > 5 * faults,
        "useful pre-copies {useful} vs faults {faults}: {v}"
    );
    Ok(())
}

/// `COW_SNAPSHOT_QUIESCED_IF_ALONE`: this test's process has one thread, so the module takes the
/// snapshot quiesced and pre-copies the hint; with a second thread alive it takes an ordinary
/// one (the hint unused) and says so. Both snapshots restore exactly.
fn quiesced_if_alone() -> Result<()> {
    let (cow, r, hint) = setup()?;
    cow.hint(&hint)?;
    let Some(taken) = cow.snapshot_quiesced_if_alone() else {
        anyhow::bail!("the module does not offer COW_SNAPSHOT_QUIESCED_IF_ALONE");
    };
    let (s1, quiesced) = taken?;
    let st = cow.stats()?;
    ensure!(quiesced, "a single-threaded caller was not found alone");
    ensure!(
        st.precopied_pages == PAGES as u64,
        "alone: precopied {}",
        st.precopied_pages
    );
    write_pages(&r, PAGES, 2);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    let taken = cow.snapshot_quiesced_if_alone().expect("offered above");
    let _ = tx.send(());
    other
        .join()
        .map_err(|_| anyhow::anyhow!("the second thread panicked"))?;
    let (s2, quiesced) = taken?;
    let after = cow.stats()?;
    ensure!(!quiesced, "a caller with a second thread was found alone");
    ensure!(
        after.precopied_pages == st.precopied_pages,
        "with a second thread, {} pages pre-copied",
        after.precopied_pages - st.precopied_pages
    );
    write_pages(&r, PAGES, 3);
    cow.restore(s2)?;
    ensure!((0..PAGES).all(|p| read_page(&r, p) == 2), "restore to s2");
    cow.restore(s1)?;
    ensure!((0..PAGES).all(|p| read_page(&r, p) == 1), "restore to s1");
    // Unknown snapshot flags are refused.
    let mut a = cow::abi::CowId {
        size: std::mem::size_of::<cow::abi::CowId>() as u32,
        flags: 4,
        id: 0,
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&cow));
    // SAFETY: a valid, sized argument struct for the ioctl on the space's descriptor.
    let rc = unsafe { libc::ioctl(fd, cow::abi::COW_IOC_SNAPSHOT as _, &mut a) };
    ensure!(
        rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL),
        "snapshot flag 4: {rc}"
    );
    Ok(())
}
