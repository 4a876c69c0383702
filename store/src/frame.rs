//! The log's framing: every record is a 16-byte header (magic, kind, length, CRC-32 of kind,
//! length and payload) followed by its payload.

use std::io::{Read, Write};

/// "DLRC" little-endian: the first bytes of every record.
pub(crate) const MAGIC: u32 = u32::from_le_bytes(*b"DLRC");
/// Header size.
pub(crate) const HEADER: usize = 16;
/// Largest payload accepted (a checkpoint of many threads and pages stays far below).
pub(crate) const MAX_PAYLOAD: u32 = 1 << 30;

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Meta = 1,
    Blob = 2,
    Checkpoint = 3,
}

impl Kind {
    fn from_u8(k: u8) -> Option<Self> {
        match k {
            1 => Some(Kind::Meta),
            2 => Some(Kind::Blob),
            3 => Some(Kind::Checkpoint),
            _ => None,
        }
    }
}

fn crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes one record; returns its size in bytes.
pub(crate) fn write(out: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<u64> {
    let len = payload.len() as u32;
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4] = kind as u8;
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..16].copy_from_slice(&crc(kind as u8, len, payload).to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)?;
    Ok((HEADER + payload.len()) as u64)
}

/// What reading a record found.
pub(crate) enum Found {
    /// A valid record.
    Record(Kind, Vec<u8>),
    /// The input ended cleanly before a new record.
    End,
    /// An incomplete or invalid record (torn tail or corruption), with why.
    Bad(String),
}

/// Reads the next record.
pub(crate) fn read(input: &mut impl Read) -> std::io::Result<Found> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = input.read(&mut header[got..])?;
        if n == 0 {
            return Ok(if got == 0 {
                Found::End
            } else {
                Found::Bad(format!("a {got}-byte partial header"))
            });
        }
        got += n;
    }
    if u32::from_le_bytes(header[..4].try_into().unwrap()) != MAGIC {
        return Ok(Found::Bad("no record magic".into()));
    }
    let Some(kind) = Kind::from_u8(header[4]) else {
        return Ok(Found::Bad(format!("unknown record kind {}", header[4])));
    };
    let len = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Ok(Found::Bad(format!("record length {len}")));
    }
    let mut payload = vec![0u8; len as usize];
    let mut got = 0;
    while got < payload.len() {
        let n = input.read(&mut payload[got..])?;
        if n == 0 {
            return Ok(Found::Bad(format!("a record cut at {got} of {len} bytes")));
        }
        got += n;
    }
    let want = u32::from_le_bytes(header[12..16].try_into().unwrap());
    if crc(header[4], len, &payload) != want {
        return Ok(Found::Bad("checksum mismatch".into()));
    }
    Ok(Found::Record(kind, payload))
}

/// Little-endian field reader over a payload.
pub(crate) struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Fields { data, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let r = &self.data[self.pos..];
        self.pos = self.data.len();
        r
    }
}
