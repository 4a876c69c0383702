//! Appending checkpoints to a recording.

use crate::frame::{self, Kind};
use crate::{Codec, Meta, Reason, Result, ThreadState, LOG_FILE, PAGE};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// What a writer has stored so far.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct WriterStats {
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Page images handed to the writer (one per changed page per checkpoint).
    pub pages: u64,
    /// Of those, all-zero pages (never stored).
    pub zero_pages: u64,
    /// Distinct non-zero page contents stored.
    pub unique_pages: u64,
    /// Bytes of those distinct pages before compression.
    pub raw_bytes: u64,
    /// Bytes of the log on disk.
    pub log_bytes: u64,
    /// Checkpoints merged away to stay under the size bound.
    pub merged: u64,
}

/// One checkpoint to append.
pub struct NewCheckpoint<'a> {
    /// When it was taken (CLOCK_MONOTONIC, ns).
    pub time_ns: u64,
    /// Why.
    pub reason: Reason,
    /// With [`Reason::Crash`]: the signal.
    pub signal: u32,
    /// Every thread's registers.
    pub threads: &'a [ThreadState],
    /// The pages that changed since the previous checkpoint: (page address, its contents).
    pub pages: &'a [(u64, &'a [u8])],
    /// The memory map (`/proc/PID/maps` text) if it changed since the previous checkpoint.
    pub maps: Option<&'a str>,
}

/// Appends checkpoints to a new recording.
pub struct Writer {
    out: BufWriter<File>,
    codec: Codec,
    /// Content hash → the blob's record offset.
    blobs: HashMap<u128, u64>,
    offset: u64,
    stats: WriterStats,
    dir: std::path::PathBuf,
    max_size: Option<u64>,
    /// Do not compact again before the log reaches this size.
    next_compaction: u64,
}

impl Writer {
    /// Creates the recording directory `dir` (which must not hold a recording yet) and writes
    /// its meta record.
    pub fn create(dir: &Path, meta: &Meta) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(LOG_FILE))?;
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 20, file),
            codec: meta.codec,
            blobs: HashMap::new(),
            offset: 0,
            stats: WriterStats::default(),
            dir: dir.to_path_buf(),
            max_size: None,
            next_compaction: 0,
        };
        let meta = Meta {
            version: crate::FORMAT_VERSION,
            ..meta.clone()
        };
        let json = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
        w.offset += frame::write(&mut w.out, Kind::Meta, &json)?;
        w.out.flush()?;
        Ok(w)
    }

    /// What was stored so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            log_bytes: self.offset,
            ..self.stats
        }
    }

    /// Stores `page` once per distinct content; returns its blob (0 for a zero page).
    fn blob(&mut self, page: &[u8]) -> Result<u64> {
        self.stats.pages += 1;
        if page.iter().all(|&b| b == 0) {
            self.stats.zero_pages += 1;
            return Ok(0);
        }
        let hash = xxhash_rust::xxh3::xxh3_128(page);
        if let Some(&at) = self.blobs.get(&hash) {
            return Ok(at);
        }
        let (codec, data) = self.codec.compress(page);
        let mut payload = Vec::with_capacity(21 + data.len());
        payload.extend_from_slice(&hash.to_le_bytes());
        payload.push(codec.code());
        payload.extend_from_slice(&(page.len() as u32).to_le_bytes());
        payload.extend_from_slice(&data);
        let at = self.offset;
        self.offset += frame::write(&mut self.out, Kind::Blob, &payload)?;
        self.blobs.insert(hash, at);
        self.stats.unique_pages += 1;
        self.stats.raw_bytes += page.len() as u64;
        Ok(at)
    }

    /// Appends a checkpoint (its new page contents first) and flushes it to the file, so that
    /// it survives the recorder's death; returns its number (1, 2, …).
    pub fn checkpoint(&mut self, c: &NewCheckpoint<'_>) -> Result<u64> {
        let number = self.stats.checkpoints + 1;
        let mut pages = Vec::with_capacity(c.pages.len());
        for &(addr, data) in c.pages {
            debug_assert_eq!(data.len(), PAGE);
            pages.push((addr, self.blob(data)?));
        }
        let p = encode_checkpoint(
            number,
            c.time_ns,
            c.reason,
            c.signal,
            c.threads,
            &pages,
            c.maps.unwrap_or(""),
        );
        self.offset += frame::write(&mut self.out, Kind::Checkpoint, &p)?;
        self.out.flush()?;
        self.stats.checkpoints = number;
        if let Some(max) = self.max_size {
            if self.offset > max && self.offset >= self.next_compaction {
                self.compact(max)?;
            }
        }
        Ok(number)
    }

    /// Bounds the log to about `bytes`: past it, the oldest half of the checkpoints is merged
    /// into one (the state at the first kept checkpoint), and [`WriterStats::merged`] says how
    /// many were merged away.
    pub fn set_max_size(&mut self, bytes: u64) {
        self.max_size = Some(bytes);
    }

    fn compact(&mut self, max: u64) -> Result<()> {
        self.out.flush()?;
        let (blobs, len, merged) = crate::compact::compact_oldest_half(&self.dir)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        self.out = BufWriter::with_capacity(1 << 20, file);
        self.blobs = blobs;
        self.offset = len;
        self.stats.merged += merged;
        // A state larger than the bound cannot shrink further: wait until the log doubles.
        self.next_compaction = if len < max { 0 } else { len * 2 };
        Ok(())
    }
}

/// Encodes a checkpoint record's payload (its pages already stored as blobs).
pub(crate) fn encode_checkpoint(
    number: u64,
    time_ns: u64,
    reason: Reason,
    signal: u32,
    threads: &[ThreadState],
    pages: &[(u64, u64)],
    maps: &str,
) -> Vec<u8> {
    let maps = maps.as_bytes();
    let mut p = Vec::with_capacity(64 + threads.len() * 744 + pages.len() * 16 + maps.len());
    p.extend_from_slice(&number.to_le_bytes());
    p.extend_from_slice(&time_ns.to_le_bytes());
    p.extend_from_slice(&reason.code().to_le_bytes());
    p.extend_from_slice(&signal.to_le_bytes());
    p.extend_from_slice(&(threads.len() as u32).to_le_bytes());
    for t in threads {
        p.extend_from_slice(&t.tid.to_le_bytes());
        p.extend_from_slice(&(t.fpregs.len() as u32).to_le_bytes());
        for r in t.regs {
            p.extend_from_slice(&r.to_le_bytes());
        }
        p.extend_from_slice(&t.fpregs);
    }
    p.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for (addr, blob) in pages {
        p.extend_from_slice(&addr.to_le_bytes());
        p.extend_from_slice(&blob.to_le_bytes());
    }
    p.extend_from_slice(&(maps.len() as u32).to_le_bytes());
    p.extend_from_slice(maps);
    p
}
