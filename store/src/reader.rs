//! Opening a recording: verify every record, index every page, answer reads of the past.

use crate::frame::{self, Fields, Kind, Parsed};
use crate::{Codec, Error, Meta, Reason, Result, ThreadState, LOG_FILE, PAGE};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

/// One checkpoint in the index.
#[derive(Clone, Copy, Debug)]
struct Entry {
    number: u64,
    time_ns: u64,
    reason: Reason,
    signal: u32,
    /// Offset of its record in the log.
    offset: u64,
}

/// A thread at a checkpoint.
pub type Thread = ThreadState;

/// What `cowctl recording info` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Info {
    /// The program recorded.
    pub exe: String,
    /// Its arguments.
    pub argv: Vec<String>,
    /// How memory was captured.
    pub backend: String,
    /// The page codec.
    pub codec: Codec,
    /// Checkpoints readable.
    pub checkpoints: u64,
    /// Number of the first readable checkpoint (above 1 once `--max-size` merged older ones).
    pub first: u64,
    /// Number of the last.
    pub last: u64,
    /// Time from the first to the last checkpoint, seconds.
    pub span_s: f64,
    /// Why the last checkpoint was taken (`crash` after a fatal signal).
    pub last_reason: Option<Reason>,
    /// With a `crash` last checkpoint: the signal.
    pub last_signal: Option<u32>,
    /// Page images across all checkpoints (one per changed page per checkpoint).
    pub page_images: u64,
    /// Distinct non-zero page contents stored.
    pub unique_pages: u64,
    /// Distinct page addresses ever recorded.
    pub addresses: u64,
    /// Bytes of the log on disk.
    pub bytes_on_disk: u64,
    /// Page images per stored page (zero pages cost nothing).
    pub dedup_ratio: f64,
    /// Bytes of the stored pages before compression per byte after.
    pub compress_ratio: f64,
    /// Bytes after the last complete checkpoint that were ignored (a torn tail), if any.
    pub torn_tail_bytes: u64,
}

/// A recording opened for reading.
pub struct Recording {
    /// The log, mapped read-only: records are parsed and verified in place.
    log: memmap2::Mmap,
    meta: Meta,
    checkpoints: Vec<Entry>,
    /// Page address → (checkpoint index, blob), in checkpoint order.
    pages: HashMap<u64, Vec<(u32, u64)>>,
    /// (checkpoint index, maps text) where the memory map changed.
    maps: Vec<(u32, String)>,
    page_images: u64,
    unique_pages: u64,
    blob_bytes: u64,
    valid_len: u64,
    log_len: u64,
    /// Recently decompressed pages.
    cache: Mutex<HashMap<u64, std::sync::Arc<Vec<u8>>>>,
}

/// Most pages kept decompressed.
const CACHE_PAGES: usize = 4096;

fn corrupt(offset: u64, after: u64, what: impl Into<String>) -> Error {
    Error::Corrupt {
        offset,
        after_checkpoint: after,
        what: what.into(),
    }
}

/// Whether a valid record starts anywhere in `data` (which follows a bad one).
fn valid_record_in(data: &[u8]) -> bool {
    let magic = frame::MAGIC.to_le_bytes();
    let mut i = 0;
    while i + frame::HEADER <= data.len() {
        if data[i..i + 4] == magic {
            if let Parsed::Record(..) = frame::parse(&data[i..]) {
                return true;
            }
        }
        i += 1;
    }
    false
}

impl Recording {
    /// Opens the recording in `dir`, verifying every record's checksum. A torn tail (a
    /// recorder killed mid-write) is ignored and reported by [`Recording::info`]; a bad record
    /// followed by good ones is [`Error::Corrupt`].
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(LOG_FILE);
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotARecording(format!("{} does not exist", path.display()))
            }
            _ => Error::Io(e),
        })?;
        let log_len = file.metadata()?.len();
        if log_len == 0 {
            return Err(Error::NotARecording(format!("{} is empty", path.display())));
        }
        // SAFETY: a recording is append-only: bytes once written never change, and only the
        // prefix that existed now is mapped. (Truncating it from another process while it is
        // open — `repair` of the same directory — would fault; cowctl never does that.)
        let log = unsafe { memmap2::Mmap::map(&file)? };
        let mut r = Recording {
            log,
            meta: Meta::default(),
            checkpoints: Vec::new(),
            pages: HashMap::new(),
            maps: Vec::new(),
            page_images: 0,
            unique_pages: 0,
            blob_bytes: 0,
            valid_len: 0,
            log_len,
            cache: Mutex::new(HashMap::new()),
        };
        let mut offset = 0u64;
        // Blobs count once a checkpoint that follows them is complete.
        let (mut blobs, mut blob_bytes) = (0u64, 0u64);
        loop {
            let last = r.checkpoints.last().map_or(0, |e| e.number);
            let found = frame::parse(&r.log[offset as usize..]);
            match found {
                Parsed::End => break,
                Parsed::Bad(why) => {
                    if offset == 0 {
                        return Err(Error::NotARecording(format!("{}: {why}", path.display())));
                    }
                    if valid_record_in(&r.log[offset as usize + 1..]) {
                        return Err(corrupt(offset, last, why));
                    }
                    break; // a torn tail: what follows the last checkpoint is ignored
                }
                Parsed::Record(kind, payload, size) => {
                    let size = size as u64;
                    match kind {
                        Kind::Meta if offset == 0 => {
                            r.meta = serde_json::from_slice(payload)
                                .map_err(|e| corrupt(0, 0, format!("meta record: {e}")))?;
                            if r.meta.version != crate::FORMAT_VERSION {
                                return Err(Error::NotARecording(format!(
                                    "format version {} (this cowctl reads {})",
                                    r.meta.version,
                                    crate::FORMAT_VERSION
                                )));
                            }
                            r.valid_len = size;
                        }
                        Kind::Meta => return Err(corrupt(offset, last, "a second meta record")),
                        _ if offset == 0 => {
                            return Err(Error::NotARecording("no meta record".into()))
                        }
                        Kind::Blob => {
                            blobs += 1;
                            blob_bytes += size;
                        }
                        Kind::Checkpoint => {
                            let payload = payload.to_vec(); // index_checkpoint borrows r
                            r.index_checkpoint(offset, &payload)?;
                            r.valid_len = offset + size;
                            r.unique_pages = blobs;
                            r.blob_bytes = blob_bytes;
                        }
                    }
                    offset += size;
                }
            }
        }
        Ok(r)
    }

    /// Opens the recording in `dir` for appending after a crash: truncates a torn tail and
    /// returns how many checkpoints survived.
    pub fn repair(dir: &Path) -> Result<u64> {
        let r = Recording::open(dir)?;
        if r.valid_len < r.log_len {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(LOG_FILE))?;
            f.set_len(r.valid_len)?;
        }
        Ok(r.checkpoints.len() as u64)
    }

    fn index_checkpoint(&mut self, offset: u64, payload: &[u8]) -> Result<()> {
        let last = self.checkpoints.last().map_or(0, |e| e.number);
        let bad = |what: &str| corrupt(offset, last, format!("checkpoint record: {what}"));
        let mut f = Fields::new(payload);
        let number = f.u64().ok_or_else(|| bad("short"))?;
        let time_ns = f.u64().ok_or_else(|| bad("short"))?;
        let reason = f
            .u32()
            .and_then(Reason::from_code)
            .ok_or_else(|| bad("reason"))?;
        let signal = f.u32().ok_or_else(|| bad("short"))?;
        let threads = f.u32().ok_or_else(|| bad("short"))?;
        for _ in 0..threads {
            let _tid = f.u32().ok_or_else(|| bad("thread"))?;
            let fp = f.u32().ok_or_else(|| bad("thread"))? as usize;
            f.bytes(27 * 8 + fp).ok_or_else(|| bad("thread"))?;
        }
        let idx = self.checkpoints.len() as u32;
        let n = f.u32().ok_or_else(|| bad("pages"))?;
        for _ in 0..n {
            let addr = f.u64().ok_or_else(|| bad("pages"))?;
            let blob = f.u64().ok_or_else(|| bad("pages"))?;
            if blob >= offset || addr % PAGE as u64 != 0 {
                return Err(bad("a page refers to no earlier blob"));
            }
            self.pages.entry(addr).or_default().push((idx, blob));
            self.page_images += 1;
        }
        let maps_len = f.u32().ok_or_else(|| bad("maps"))? as usize;
        let maps = f.bytes(maps_len).ok_or_else(|| bad("maps"))?;
        if maps_len > 0 {
            self.maps
                .push((idx, String::from_utf8_lossy(maps).into_owned()));
        }
        // Numbers follow each other; the first may be above 1 after a compaction.
        if !self.checkpoints.is_empty() && number != last + 1 {
            return Err(bad(&format!("number {number} after {last}")));
        }
        self.checkpoints.push(Entry {
            number,
            time_ns,
            reason,
            signal,
            offset,
        });
        Ok(())
    }

    /// What the recording is of.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Numbers of the first and last checkpoints (None: no checkpoint).
    pub fn range(&self) -> Option<(u64, u64)> {
        Some((
            self.checkpoints.first()?.number,
            self.checkpoints.last()?.number,
        ))
    }

    /// How many checkpoints can be read.
    pub fn len(&self) -> usize {
        self.checkpoints.len()
    }

    /// Whether no checkpoint can be read.
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
    }

    fn index_of(&self, number: u64) -> Result<usize> {
        let first = self
            .checkpoints
            .first()
            .ok_or(Error::NoCheckpoint(number))?
            .number;
        let i = number
            .checked_sub(first)
            .ok_or(Error::NoCheckpoint(number))? as usize;
        match self.checkpoints.get(i) {
            Some(e) if e.number == number => Ok(i),
            _ => Err(Error::NoCheckpoint(number)),
        }
    }

    /// Time (CLOCK_MONOTONIC ns), reason and signal of checkpoint `number`.
    pub fn checkpoint(&self, number: u64) -> Result<(u64, Reason, u32)> {
        let e = self.checkpoints[self.index_of(number)?];
        Ok((e.time_ns, e.reason, e.signal))
    }

    /// Every thread's registers at checkpoint `number`.
    pub fn threads(&self, number: u64) -> Result<Vec<Thread>> {
        let e = self.checkpoints[self.index_of(number)?];
        let payload = self.record_at(e.offset, e.number)?;
        let mut f = Fields::new(payload);
        f.bytes(24); // number, time, reason, signal
        let n = f.u32().unwrap_or(0);
        let mut threads = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (Some(tid), Some(fp)) = (f.u32(), f.u32()) else {
                break;
            };
            let mut regs = [0u64; 27];
            for r in regs.iter_mut() {
                *r = f.u64().unwrap_or(0);
            }
            let fpregs = f.bytes(fp as usize).unwrap_or(&[]).to_vec();
            threads.push(ThreadState { tid, regs, fpregs });
        }
        Ok(threads)
    }

    /// The memory map (`/proc/PID/maps` text) in effect at checkpoint `number`.
    pub fn maps(&self, number: u64) -> Result<&str> {
        let idx = self.index_of(number)? as u32;
        let i = self.maps.partition_point(|(at, _)| *at <= idx);
        Ok(if i == 0 { "" } else { &self.maps[i - 1].1 })
    }

    /// The pages checkpoint `number`'s own record names: (address, blob).
    pub(crate) fn delta(&self, number: u64) -> Result<Vec<(u64, u64)>> {
        let e = self.checkpoints[self.index_of(number)?];
        let payload = self.record_at(e.offset, e.number)?;
        let mut f = Fields::new(payload);
        f.bytes(24);
        let threads = f.u32().unwrap_or(0);
        for _ in 0..threads {
            let _tid = f.u32();
            let fp = f.u32().unwrap_or(0) as usize;
            f.bytes(27 * 8 + fp);
        }
        let n = f.u32().unwrap_or(0);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if let (Some(a), Some(b)) = (f.u64(), f.u64()) {
                out.push((a, b));
            }
        }
        Ok(out)
    }

    /// Every page recorded up to checkpoint `number`, with its newest blob then.
    pub(crate) fn state_at(&self, number: u64) -> Result<Vec<(u64, u64)>> {
        let idx = self.index_of(number)? as u32;
        let mut out: Vec<(u64, u64)> = self
            .pages
            .iter()
            .filter_map(|(&addr, entries)| {
                let i = entries.partition_point(|(at, _)| *at <= idx);
                (i > 0).then(|| (addr, entries[i - 1].1))
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The memory map if checkpoint `number`'s record carries one (it changed there).
    pub(crate) fn maps_changed_at(&self, number: u64) -> Result<Option<&str>> {
        let idx = self.index_of(number)? as u32;
        Ok(self
            .maps
            .binary_search_by_key(&idx, |(at, _)| *at)
            .ok()
            .map(|i| self.maps[i].1.as_str()))
    }

    /// The raw payload of the blob record at `offset` (for copying it verbatim).
    pub(crate) fn blob_payload(&self, offset: u64) -> Result<Vec<u8>> {
        Ok(self.record_at(offset, 0)?.to_vec())
    }

    /// Re-verifies the record at `offset`; returns its payload.
    fn record_at(&self, offset: u64, near: u64) -> Result<&[u8]> {
        let data = self
            .log
            .get(offset as usize..self.valid_len as usize)
            .ok_or_else(|| corrupt(offset, near, "offset past the recording's end"))?;
        match frame::parse(data) {
            Parsed::Record(_, payload, _) => Ok(payload),
            Parsed::Bad(why) => Err(corrupt(offset, near, why)),
            Parsed::End => Err(corrupt(offset, near, "empty")),
        }
    }

    /// The contents of blob `blob` (0: the zero page).
    fn blob(&self, blob: u64, near: u64) -> Result<std::sync::Arc<Vec<u8>>> {
        if let Some(p) = self.cache.lock().unwrap().get(&blob) {
            return Ok(p.clone());
        }
        let page = std::sync::Arc::new(self.decode(blob, near)?);
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_PAGES {
            cache.clear();
        }
        cache.insert(blob, page.clone());
        Ok(page)
    }

    /// Reads, verifies and decompresses blob `blob` (0: the zero page), bypassing the cache.
    fn decode(&self, blob: u64, near: u64) -> Result<Vec<u8>> {
        Ok(if blob == 0 {
            vec![0u8; PAGE]
        } else {
            let payload = self.record_at(blob, near)?;
            let mut f = Fields::new(payload);
            let bad = |w: &str| corrupt(blob, near, format!("page blob: {w}"));
            let hash =
                u128::from_le_bytes(f.bytes(16).ok_or_else(|| bad("short"))?.try_into().unwrap());
            let codec = f
                .bytes(1)
                .and_then(|c| Codec::from_code(c[0]))
                .ok_or_else(|| bad("codec"))?;
            let raw = f.u32().ok_or_else(|| bad("short"))? as usize;
            let page = codec
                .decompress(f.rest(), raw)
                .map_err(|e| bad(&e.to_string()))?;
            if xxhash_rust::xxh3::xxh3_128(&page) != hash {
                return Err(bad("contents do not match their hash"));
            }
            page
        })
    }

    /// The page at `page_addr` as of checkpoint `number`; None if no checkpoint up to it
    /// recorded that page.
    pub fn page(&self, number: u64, page_addr: u64) -> Result<Option<std::sync::Arc<Vec<u8>>>> {
        let idx = self.index_of(number)? as u32;
        let Some(entries) = self.pages.get(&page_addr) else {
            return Ok(None);
        };
        let i = entries.partition_point(|(at, _)| *at <= idx);
        if i == 0 {
            return Ok(None);
        }
        self.blob(entries[i - 1].1, number).map(Some)
    }

    /// Reads `buf.len()` bytes at `addr` as of checkpoint `number`; returns how many leading
    /// bytes were recorded (reading stops at the first page no checkpoint recorded).
    pub fn read(&self, number: u64, addr: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let a = addr + done as u64;
            let page = a & !(PAGE as u64 - 1);
            let off = (a - page) as usize;
            let n = (PAGE - off).min(buf.len() - done);
            match self.page(number, page)? {
                Some(p) => buf[done..done + n].copy_from_slice(&p[off..off + n]),
                None => break,
            }
            done += n;
        }
        Ok(done)
    }

    /// Reads `buf.len()` bytes at `addr` as of checkpoint `number` as a debugger sees them
    /// (see [`crate::read_through`]; `maps` are that checkpoint's).
    pub fn read_as_mapped(
        &self,
        number: u64,
        addr: u64,
        buf: &mut [u8],
        maps: &[crate::Mapping],
        files: &mut crate::Files,
    ) -> Result<usize> {
        crate::read_through(addr, buf, maps, files, |page| self.page(number, page))
    }

    /// Checkpoints at which any of the `len` bytes at `addr` differ from the checkpoint before
    /// (a page appearing after the first checkpoint counts), oldest first. Only checkpoints
    /// whose delta wrote one of those pages are compared.
    pub fn when(&self, addr: u64, len: u64) -> Result<Vec<u64>> {
        let mut hits: Vec<u32> = Vec::new();
        let end = addr.saturating_add(len);
        let mut page = addr & !(PAGE as u64 - 1);
        while page < end {
            let lo = (addr.max(page) - page) as usize;
            let hi = (end.min(page + PAGE as u64) - page) as usize;
            if let Some(entries) = self.pages.get(&page) {
                // Long histories are compared in parallel slices: each slice starts from the
                // entry before it.
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let slice = entries.len().div_ceil(threads).max(4096);
                let found: Vec<Result<Vec<u32>>> = std::thread::scope(|scope| {
                    let workers: Vec<_> = (0..entries.len())
                        .step_by(slice)
                        .map(|from| {
                            let to = (from + slice).min(entries.len());
                            scope.spawn(move || self.changes(entries, from, to, lo..hi))
                        })
                        .collect();
                    workers
                        .into_iter()
                        .map(|w| w.join().expect("a when worker panicked"))
                        .collect()
                });
                for f in found {
                    hits.extend(f?);
                }
            }
            page += PAGE as u64;
        }
        hits.sort_unstable();
        hits.dedup();
        Ok(hits
            .into_iter()
            .map(|i| self.checkpoints[i as usize].number)
            .collect())
    }

    /// Checkpoint indexes among `entries[from..to]` (one page's history) at which the bytes
    /// `range` of the page differ from the entry before (the first entry of the recording
    /// counts as a change unless it is checkpoint 0's initial image).
    fn changes(
        &self,
        entries: &[(u32, u64)],
        from: usize,
        to: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<u32>> {
        let mut hits = Vec::new();
        let mut prev: Option<(u64, Vec<u8>)> = match from.checked_sub(1) {
            Some(i) => {
                let (idx, blob) = entries[i];
                Some((
                    blob,
                    self.decode(blob, self.checkpoints[idx as usize].number)?,
                ))
            }
            None => None,
        };
        for &(idx, blob) in &entries[from..to] {
            if matches!(&prev, Some((b, _)) if *b == blob) {
                continue; // the same blob: the same bytes
            }
            let now = self.decode(blob, self.checkpoints[idx as usize].number)?;
            let changed = match &prev {
                None => idx > 0,
                Some((_, before)) => before[range.clone()] != now[range.clone()],
            };
            if changed {
                hits.push(idx);
            }
            prev = Some((blob, now));
        }
        Ok(hits)
    }

    /// The page address recorded at the most checkpoints (the one `when` works hardest on).
    pub fn busiest_page(&self) -> Option<u64> {
        self.pages
            .iter()
            .max_by_key(|(addr, e)| (e.len(), std::cmp::Reverse(**addr)))
            .map(|(addr, _)| *addr)
    }

    /// The summary `cowctl recording info` prints.
    pub fn info(&self) -> Info {
        let span = match (self.checkpoints.first(), self.checkpoints.last()) {
            (Some(a), Some(b)) => (b.time_ns - a.time_ns) as f64 / 1e9,
            _ => 0.0,
        };
        let last = self.checkpoints.last();
        Info {
            exe: self.meta.exe.clone(),
            argv: self.meta.argv.clone(),
            backend: self.meta.backend.clone(),
            codec: self.meta.codec,
            checkpoints: self.checkpoints.len() as u64,
            first: self.checkpoints.first().map_or(0, |e| e.number),
            last: last.map_or(0, |e| e.number),
            span_s: span,
            last_reason: last.map(|e| e.reason),
            last_signal: last.filter(|e| e.reason == Reason::Crash).map(|e| e.signal),
            page_images: self.page_images,
            unique_pages: self.unique_pages,
            addresses: self.pages.len() as u64,
            bytes_on_disk: self.log_len,
            dedup_ratio: if self.unique_pages == 0 {
                0.0
            } else {
                self.page_images as f64 / self.unique_pages as f64
            },
            compress_ratio: if self.blob_bytes == 0 {
                0.0
            } else {
                (self.unique_pages * PAGE as u64) as f64 / self.blob_bytes as f64
            },
            torn_tail_bytes: self.log_len - self.valid_len,
        }
    }
}
