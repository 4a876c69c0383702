//! What the program's mappings hold where no checkpoint recorded a page: a page nobody wrote
//! reads as its mapping made it — the mapped file's bytes, or zero for anonymous memory.
//! Debuggers read recorded pages first and this second (code, read-only data, untouched
//! memory).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// One line of `/proc/PID/maps` (a recording keeps them per checkpoint).
#[derive(Clone, Debug)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// `rwxp`-style permissions.
    pub perms: String,
    /// Offset in the mapped file.
    pub offset: u64,
    /// The mapped file, `[heap]`-style name, or empty (anonymous).
    pub path: String,
}

/// Parses `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (range, perms, offset) = (it.next()?, it.next()?, it.next()?);
            let _dev = it.next()?;
            let _inode = it.next()?;
            let path = it.collect::<Vec<_>>().join(" ");
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms: perms.into(),
                offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

/// Files opened to read unrecorded pages from (kept open between reads).
#[derive(Default)]
pub struct Files(HashMap<String, Option<File>>);

/// Fills `out` with the bytes at `addr` as its mapping in `maps` holds them unwritten: the
/// file's bytes (zero past its end), zero for anonymous memory and devices. False when no
/// mapping holds `addr` or its file cannot be read. `out` must not cross a page boundary.
pub fn read_unwritten(maps: &[Mapping], files: &mut Files, addr: u64, out: &mut [u8]) -> bool {
    let Some(m) = maps.iter().find(|m| addr >= m.start && addr < m.end) else {
        return false;
    };
    if !m.path.starts_with('/') || m.path.starts_with("/dev/") {
        out.fill(0);
        return true;
    }
    let file = files
        .0
        .entry(m.path.clone())
        .or_insert_with(|| File::open(&m.path).ok());
    let Some(f) = file else { return false };
    let got = f.read_at(out, m.offset + (addr - m.start)).unwrap_or(0);
    out[got..].fill(0); // past the end of the file: zero, as the kernel maps it
    true
}

/// Reads `buf.len()` bytes at `addr` as a debugger sees them at one checkpoint: the pages
/// `page` returns (the recorded ones), else what their mapping in `maps` holds unwritten.
/// Returns how many leading bytes exist (reading stops outside the mappings); an error from
/// `page` (a corrupt record) is returned, never served.
pub fn read_through<E>(
    addr: u64,
    buf: &mut [u8],
    maps: &[Mapping],
    files: &mut Files,
    mut page: impl FnMut(u64) -> Result<Option<Arc<Vec<u8>>>, E>,
) -> Result<usize, E> {
    let mut done = 0;
    while done < buf.len() {
        let a = addr + done as u64;
        let page_addr = a & !(crate::PAGE as u64 - 1);
        let off = (a - page_addr) as usize;
        let n = (crate::PAGE - off).min(buf.len() - done);
        let out = &mut buf[done..done + n];
        match page(page_addr)? {
            Some(p) => out.copy_from_slice(&p[off..off + n]),
            None if read_unwritten(maps, files, a, out) => {}
            None => break,
        }
        done += n;
    }
    Ok(done)
}
