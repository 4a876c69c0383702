//! Watching the kernel log (`/dev/kmsg`) for warnings while a test runs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

/// Kernel log levels 0..=4 are emerg, alert, crit, err and warning: any of them fails a test.
const WORST_ALLOWED_LEVEL: u32 = 5;

/// A position in the kernel log; [`Watch::bad_lines`] returns what was logged since.
pub struct Watch {
    kmsg: File,
}

/// One kernel log record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Syslog level (0 = emerg .. 7 = debug).
    pub level: u32,
    /// The message text.
    pub text: String,
}

impl Watch {
    /// Starts watching at the end of the current log.
    pub fn start() -> std::io::Result<Self> {
        let mut kmsg = open_kmsg()?;
        kmsg.seek(SeekFrom::End(0))?;
        Ok(Watch { kmsg })
    }

    /// Every record logged since the watch started (or since the last call).
    pub fn records(&mut self) -> Vec<Record> {
        read_records(&mut self.kmsg)
    }

    /// The records at warning level or worse, plus any text that marks a kernel bug, except
    /// those inside an `expected` block (from a record containing its first marker to one
    /// containing its second, inclusive).
    pub fn bad_lines(&mut self, expected: Option<(&str, &str)>) -> Vec<String> {
        let mut inside = false;
        let mut bad = Vec::new();
        for r in self.records() {
            if let Some((first, last)) = expected {
                inside |= r.text.contains(first);
                if inside {
                    inside = !r.text.contains(last);
                    continue;
                }
            }
            if is_bad(&r) {
                bad.push(format!("<{}> {}", r.level, r.text));
            }
        }
        bad
    }
}

fn open_kmsg() -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
}

/// Warning-level lines that are expected: loading any out-of-tree module taints the kernel.
const EXPECTED: [&str; 1] = ["cow: loading out-of-tree module taints kernel."];

/// Whether a record shows a problem: warning level or worse, or an oops/BUG/WARN marker.
pub fn is_bad(r: &Record) -> bool {
    if EXPECTED.contains(&r.text.as_str()) {
        return false;
    }
    const MARKERS: [&str; 6] = [
        "WARNING:",
        "BUG:",
        "Oops",
        "Call Trace",
        "general protection",
        "refcount_t",
    ];
    r.level < WORST_ALLOWED_LEVEL || MARKERS.iter().any(|m| r.text.contains(m))
}

/// Every record in the kernel log from the beginning.
pub fn all_records() -> std::io::Result<Vec<Record>> {
    let mut kmsg = open_kmsg()?;
    Ok(read_records(&mut kmsg))
}

fn read_records(kmsg: &mut File) -> Vec<Record> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // "prio,seq,usec,flags[,...];text\n" + continuation lines starting with ' '.
                let rec = String::from_utf8_lossy(&buf[..n]);
                let (head, text) = rec.split_once(';').unwrap_or(("6", &rec));
                let prio: u32 = head
                    .split(',')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(6);
                let text = text.lines().next().unwrap_or("").to_string();
                out.push(Record {
                    level: prio & 7,
                    text,
                });
            }
            // EPIPE: records were overwritten while we read; keep going from the next one.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break, // EAGAIN: no more records.
        }
    }
    out
}
