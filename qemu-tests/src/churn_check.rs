//! Checks a recording of `c/record_churn.c` byte for byte: at every checkpoint where the
//! program was between steps, the digest recomputed from the recorded memory (slot table,
//! global buffer, every live block) must equal the digest the program stored there, and the
//! last checkpoint must hold the program's final state. Shared by the host test (uffd, scan)
//! and the guest test (kmod).

use std::path::Path;

const NSLOTS: usize = 32;

/// The addresses `record_churn` printed.
struct Layout {
    state: u64,
    slots: u64,
    gbuf: u64,
    gbuf_len: usize,
    final_step: u64,
    final_digest: u64,
}

fn field(text: &str, key: &str) -> Result<u64, String> {
    let v = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .ok_or_else(|| format!("no {key}= in the program's output:\n{text}"))?;
    let (digits, radix) = match v.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None if key == "digest" => (v, 16),
        None => (v, 10),
    };
    u64::from_str_radix(digits, radix).map_err(|e| format!("{key}={v}: {e}"))
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Reads `len` bytes at `addr` as of checkpoint `n` as a debugger sees them (pages never
/// recorded read as their mapping holds them unwritten); every byte must be mapped.
fn read(rec: &store::Recording, n: u64, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let maps = store::parse_maps(rec.maps(n).map_err(|e| format!("checkpoint {n}: {e:#}"))?);
    let mut buf = vec![0u8; len];
    let got = rec
        .read_as_mapped(n, addr, &mut buf, &maps, &mut store::Files::default())
        .map_err(|e| format!("checkpoint {n}: {e:#}"))?;
    if got < len {
        return Err(format!(
            "checkpoint {n}: {:#x} is not mapped",
            addr + got as u64
        ));
    }
    Ok(buf)
}

/// Verifies the recording in `dir` of a run whose stderr is `stderr`; returns how many
/// checkpoints were compared (those taken between two steps).
pub fn check(dir: &Path, stderr: &str) -> Result<usize, String> {
    let l = Layout {
        state: field(stderr, "state")?,
        slots: field(stderr, "slots")?,
        gbuf: field(stderr, "gbuf")?,
        gbuf_len: field(stderr, "gbuf_len")? as usize,
        final_step: field(stderr, "step")?,
        final_digest: field(stderr, "digest")?,
    };
    let rec = store::Recording::open(dir).map_err(|e| format!("{e:#}"))?;
    let (first, last) = rec.range().ok_or("an empty recording")?;
    let mut compared = 0;
    for n in first..=last {
        let state = read(&rec, n, l.state, 24)?;
        let (step, busy, digest) = (u64_at(&state, 0), u64_at(&state, 1), u64_at(&state, 2));
        if n == last && (step != l.final_step || digest != l.final_digest || busy != 0) {
            return Err(format!(
                "last checkpoint {n}: step {step} digest {digest:x} busy {busy}, but the \
                 program ended at step {} digest {:x}",
                l.final_step, l.final_digest
            ));
        }
        if busy != 0 || step == 0 {
            continue;
        }
        let table = read(&rec, n, l.slots, NSLOTS * 24)?;
        let mut h = fnv(0xcbf29ce484222325, &table);
        h = fnv(h, &read(&rec, n, l.gbuf, l.gbuf_len)?);
        for i in 0..NSLOTS {
            let (addr, len) = (u64_at(&table, 3 * i), u64_at(&table, 3 * i + 1));
            if addr != 0 {
                h = fnv(h, &read(&rec, n, addr, len as usize)?);
            }
        }
        if h != digest {
            return Err(format!(
                "checkpoint {n} (step {step}): the recorded memory digests to {h:x}, the \
                 program stored {digest:x}: some write was not recorded"
            ));
        }
        compared += 1;
    }
    Ok(compared)
}
