//! Page compression codecs.

/// How page blobs are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// zstd at level 1: the better ratio.
    #[default]
    Zstd,
    /// LZ4 (lz4_flex): the faster one.
    Lz4,
    /// Stored as is.
    None,
}

impl Codec {
    /// Every codec, for benchmarks.
    pub const ALL: [Codec; 3] = [Codec::Zstd, Codec::Lz4, Codec::None];

    /// The codec's name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
            Codec::None => "none",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Codec::Zstd => 1,
            Codec::Lz4 => 2,
            Codec::None => 0,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// Compresses `data`; a result no smaller than the input is stored raw (codec `None`).
    pub(crate) fn compress(self, data: &[u8]) -> (Codec, Vec<u8>) {
        let packed = match self {
            Codec::Zstd => zstd::bulk::compress(data, 1).ok(),
            Codec::Lz4 => Some(lz4_flex::block::compress(data)),
            Codec::None => None,
        };
        match packed {
            Some(p) if p.len() < data.len() => (self, p),
            _ => (Codec::None, data.to_vec()),
        }
    }

    /// Decompresses `data` of a `raw_len`-byte original.
    pub(crate) fn decompress(self, data: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let out = match self {
            Codec::None => data.to_vec(),
            Codec::Zstd => zstd::bulk::decompress(data, raw_len).map_err(|e| bad(e.to_string()))?,
            Codec::Lz4 => {
                lz4_flex::block::decompress(data, raw_len).map_err(|e| bad(e.to_string()))?
            }
        };
        if out.len() != raw_len {
            return Err(bad(format!(
                "{} bytes decompressed, {raw_len} expected",
                out.len()
            )));
        }
        Ok(out)
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown codec {s:?} (zstd, lz4, none)"))
    }
}
