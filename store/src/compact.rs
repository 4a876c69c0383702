//! Bounding a recording: the oldest half of its checkpoints merged into one.

use crate::frame::{self, Kind};
use crate::reader::Recording;
use crate::writer::encode_checkpoint;
use crate::{Result, LOG_FILE};
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Rewrites the log in `dir` keeping its newer half: the first kept checkpoint becomes the
/// whole state at that instant (every page's newest blob), later ones are copied; blobs no
/// kept checkpoint names are dropped. The new log replaces the old one atomically (rename).
/// Returns the kept blobs by content hash, the new length, and how many checkpoints merged.
pub(crate) fn compact_oldest_half(dir: &Path) -> Result<(HashMap<u128, u64>, u64, u64)> {
    let r = Recording::open(dir)?;
    let Some((first, last)) = r.range() else {
        let len = std::fs::metadata(dir.join(LOG_FILE))?.len();
        return Ok((HashMap::new(), len, 0));
    };
    let keep_from = (first + (last - first + 1).div_ceil(2)).min(last);
    let tmp = dir.join(format!("{LOG_FILE}.compacting"));
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    let meta = serde_json::to_vec(r.meta()).map_err(std::io::Error::other)?;
    let mut offset = frame::write(&mut out, Kind::Meta, &meta)?;
    let mut moved: HashMap<u64, u64> = HashMap::from([(0, 0)]);
    let mut hashes: HashMap<u128, u64> = HashMap::new();
    for n in keep_from..=last {
        let pages = if n == keep_from {
            r.state_at(n)?
        } else {
            r.delta(n)?
        };
        let mut renamed = Vec::with_capacity(pages.len());
        for (addr, blob) in pages {
            let new = match moved.get(&blob) {
                Some(&b) => b,
                None => {
                    let payload = r.blob_payload(blob)?;
                    let at = offset;
                    offset += frame::write(&mut out, Kind::Blob, &payload)?;
                    let hash = u128::from_le_bytes(payload[..16].try_into().unwrap());
                    hashes.insert(hash, at);
                    moved.insert(blob, at);
                    at
                }
            };
            renamed.push((addr, new));
        }
        let (time_ns, reason, signal) = r.checkpoint(n)?;
        let maps = if n == keep_from {
            Some(r.maps(n)?)
        } else {
            r.maps_changed_at(n)?
        };
        let p = encode_checkpoint(
            n,
            time_ns,
            reason,
            signal,
            &r.threads(n)?,
            &renamed,
            maps.unwrap_or(""),
        );
        offset += frame::write(&mut out, Kind::Checkpoint, &p)?;
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    std::fs::rename(&tmp, dir.join(LOG_FILE))?;
    Ok((hashes, offset, keep_from - first))
}
