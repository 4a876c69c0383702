//! Delorean's recording store: a program's checkpoints on disk.
//!
//! A recording is a directory holding one append-only log (`checkpoints.dlr`) of checksummed
//! records:
//! - a **meta** record first (the program, its auxiliary vector, the codec);
//! - **blob** records: the contents of one page, compressed, stored once per distinct content
//!   (an all-zero page is never stored);
//! - **checkpoint** records: a timestamp, why it was taken, every thread's registers, the pages
//!   that changed since the previous checkpoint (address → blob), and the memory map when it
//!   changed.
//!
//! Blobs are written before the checkpoint that names them, and a checkpoint exists once its
//! record is complete: a recorder killed mid-write leaves a torn tail that [`Recording::open`]
//! ignores (and [`Recording::repair`] truncates), never a checkpoint with missing pages. A
//! record whose checksum fails anywhere else is an error naming where it is.
//!
//! Opening a recording builds a per-page index (page → the checkpoints whose delta wrote it),
//! so "page P as of checkpoint N" is a binary search and "when did these bytes change" compares
//! only the checkpoints that wrote their page.

mod codec;
mod compact;
mod frame;
mod mapped;
mod reader;
mod writer;

pub use codec::Codec;
pub use mapped::{parse_maps, read_through, read_unwritten, Files, Mapping};
pub use reader::{Info, Recording, Thread};
pub use writer::{NewCheckpoint, Writer, WriterStats};

/// The page size recordings are kept at.
pub const PAGE: usize = 4096;

/// The log's file name inside a recording directory.
pub const LOG_FILE: &str = "checkpoints.dlr";

/// Why a checkpoint was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The first checkpoint, when recording began.
    Start,
    /// The periodic interval elapsed.
    Interval,
    /// The program entered a function named with `--at`.
    Breakpoint,
    /// A fatal signal is about to be delivered: the state at the faulting instruction.
    Crash,
    /// The program is exiting.
    Exit,
}

impl Reason {
    fn code(self) -> u32 {
        match self {
            Reason::Start => 0,
            Reason::Interval => 1,
            Reason::Breakpoint => 2,
            Reason::Crash => 3,
            Reason::Exit => 4,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        Some(match c {
            0 => Reason::Start,
            1 => Reason::Interval,
            2 => Reason::Breakpoint,
            3 => Reason::Crash,
            4 => Reason::Exit,
            _ => return None,
        })
    }
}

/// What the recording is of, written once at its start.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The program's executable (absolute path).
    pub exe: String,
    /// Its arguments, `argv[0]` first.
    pub argv: Vec<String>,
    /// Its pid while recorded.
    pub pid: i32,
    /// The backend that captured memory (`kmod`, `scan`).
    pub backend: String,
    /// The codec of the page blobs.
    pub codec: Codec,
    /// The auxiliary vector (`/proc/PID/auxv`), for a debugger to relocate the program.
    pub auxv: Vec<u8>,
}

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Registers of one thread at a checkpoint (x86-64, as `ptrace` returns them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadState {
    /// The thread id.
    pub tid: u32,
    /// `struct user_regs_struct`, in its field order (r15 … gs).
    pub regs: [u64; 27],
    /// `struct user_fpregs_struct` (the FXSAVE area: x87, MXCSR, XMM0-15), 512 bytes.
    pub fpregs: Vec<u8>,
}

/// Offsets of registers in [`ThreadState::regs`] (`struct user_regs_struct`).
pub mod reg {
    #![allow(missing_docs)]
    pub const R15: usize = 0;
    pub const R14: usize = 1;
    pub const R13: usize = 2;
    pub const R12: usize = 3;
    pub const RBP: usize = 4;
    pub const RBX: usize = 5;
    pub const R11: usize = 6;
    pub const R10: usize = 7;
    pub const R9: usize = 8;
    pub const R8: usize = 9;
    pub const RAX: usize = 10;
    pub const RCX: usize = 11;
    pub const RDX: usize = 12;
    pub const RSI: usize = 13;
    pub const RDI: usize = 14;
    pub const ORIG_RAX: usize = 15;
    pub const RIP: usize = 16;
    pub const CS: usize = 17;
    pub const EFLAGS: usize = 18;
    pub const RSP: usize = 19;
    pub const SS: usize = 20;
    pub const FS_BASE: usize = 21;
    pub const GS_BASE: usize = 22;
    pub const DS: usize = 23;
    pub const ES: usize = 24;
    pub const FS: usize = 25;
    pub const GS: usize = 26;
}

/// A store failure, with where it happened.
#[derive(Debug)]
pub enum Error {
    /// Reading or writing the files failed.
    Io(std::io::Error),
    /// The directory holds no recording (or one of another format version).
    NotARecording(String),
    /// A record's checksum or structure is wrong (not a torn tail: valid records follow).
    Corrupt {
        /// Byte offset of the bad record in the log.
        offset: u64,
        /// The last good checkpoint before it (0: none).
        after_checkpoint: u64,
        /// What is wrong.
        what: String,
    },
    /// No checkpoint with this number.
    NoCheckpoint(u64),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::NotARecording(why) => write!(f, "not a Delorean recording: {why}"),
            Error::Corrupt {
                offset,
                after_checkpoint,
                what,
            } => write!(
                f,
                "the recording is corrupt at byte {offset} (the record after checkpoint \
                 {after_checkpoint}): {what}; checkpoints up to {after_checkpoint} are intact"
            ),
            Error::NoCheckpoint(n) => write!(f, "no checkpoint {n} in the recording"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
