//! The log's framing: every record is a 16-byte header (magic, kind, length, CRC-32 of kind,
//! length and payload) followed by its payload.

use std::io::Write;

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

/// What parsing a record in memory found (the payload borrowed).
pub(crate) enum Parsed<'a> {
    /// A valid record and its size (header included).
    Record(Kind, &'a [u8], usize),
    /// `data` is empty: the log ended cleanly before a new record.
    End,
    /// An incomplete or invalid record (torn tail or corruption), with why.
    Bad(String),
}

/// Parses the record at the start of `data`, checksum verified, without copying.
pub(crate) fn parse(data: &[u8]) -> Parsed<'_> {
    if data.is_empty() {
        return Parsed::End;
    }
    if data.len() < HEADER {
        return Parsed::Bad(format!("a {}-byte partial header", data.len()));
    }
    if u32::from_le_bytes(data[..4].try_into().unwrap()) != MAGIC {
        return Parsed::Bad("no record magic".into());
    }
    let Some(kind) = Kind::from_u8(data[4]) else {
        return Parsed::Bad(format!("unknown record kind {}", data[4]));
    };
    let len = u32::from_le_bytes(data[8..12].try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Parsed::Bad(format!("record length {len}"));
    }
    let Some(payload) = data.get(HEADER..HEADER + len as usize) else {
        return Parsed::Bad(format!(
            "a record cut at {} of {len} bytes",
            data.len() - HEADER
        ));
    };
    let want = u32::from_le_bytes(data[12..16].try_into().unwrap());
    if crc(data[4], len, payload) != want {
        return Parsed::Bad("checksum mismatch".into());
    }
    Parsed::Record(kind, payload, HEADER + len as usize)
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
