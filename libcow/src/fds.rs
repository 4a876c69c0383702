//! libcow's own file descriptors, kept from the program's hands. Daemons close every descriptor
//! they did not open (`for (fd = 3; fd < max; fd++) close(fd)`, `close_range(3, ~0U, 0)`,
//! `closefrom(3)`); that closed the userfaultfd, `/dev/cow` or pagemap libcow drives, and every
//! later snapshot failed — or, with the number reused by the program's next `open`, would have
//! been made on the program's file. libcow_preload's `close`, `close_range`, `closefrom`,
//! `dup2` and `dup3` consult [`is_own`] and leave these descriptors alone.
//!
//! The registry is a bitmap in the book (libcow's own memory: a restore must not rewind it),
//! lock-free and async-signal-safe. Descriptors from [`LIMIT`] on are not kept.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// Descriptors below this are kept (64 Ki: 8 KiB of bits).
pub const LIMIT: usize = 1 << 16;
const WORDS: usize = LIMIT / 64;

static BITS: AtomicPtr<[AtomicU64; WORDS]> = AtomicPtr::new(std::ptr::null_mut());

fn bits() -> &'static [AtomicU64; WORDS] {
    let p = BITS.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: set once below from a leaked book allocation, never freed.
        return unsafe { &*p };
    }
    let fresh = crate::book::leak([const { AtomicU64::new(0) }; WORDS]) as *mut _;
    match BITS.compare_exchange(
        std::ptr::null_mut(),
        fresh,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        // SAFETY: ours, leaked: lives for the process.
        Ok(_) => unsafe { &*fresh },
        // Another thread won the race (our 8 KiB stay leaked in the book).
        // SAFETY: as above, theirs.
        Err(theirs) => unsafe { &*theirs },
    }
}

fn slot(fd: RawFd) -> Option<(&'static AtomicU64, u64)> {
    let fd = usize::try_from(fd).ok().filter(|&fd| fd < LIMIT)?;
    Some((&bits()[fd / 64], 1 << (fd % 64)))
}

/// Marks `fd` as libcow's.
pub fn reserve(fd: RawFd) {
    if let Some((word, bit)) = slot(fd) {
        word.fetch_or(bit, Ordering::AcqRel);
    }
}

/// `fd` is no longer libcow's (about to be closed).
pub fn release(fd: RawFd) {
    if let Some((word, bit)) = slot(fd) {
        word.fetch_and(!bit, Ordering::AcqRel);
    }
}

/// Whether `fd` is libcow's.
pub fn is_own(fd: RawFd) -> bool {
    if BITS.load(Ordering::Acquire).is_null() {
        return false;
    }
    slot(fd).is_some_and(|(word, bit)| word.load(Ordering::Acquire) & bit != 0)
}

/// libcow's descriptors in `[first, last]`, in order.
pub fn own_in(first: u32, last: u32) -> impl Iterator<Item = RawFd> {
    let (first, end) = (first as usize, (last as usize).saturating_add(1).min(LIMIT));
    let p = BITS.load(Ordering::Acquire);
    // SAFETY: null, or set once from a leaked book allocation, never freed.
    let words: &'static [AtomicU64] = if p.is_null() { &[] } else { unsafe { &*p } };
    let span = first / 64..end.div_ceil(64).max(first / 64);
    words
        .get(span.clone())
        .unwrap_or(&[])
        .iter()
        .zip(span)
        .flat_map(move |(w, i)| {
            let v = w.load(Ordering::Acquire);
            (0..64)
                .filter(move |b| v & (1 << b) != 0)
                .map(move |b| i * 64 + b)
                .filter(move |&fd| fd >= first && fd < end)
                .map(|fd| fd as RawFd)
        })
}

/// A descriptor of libcow's own: reserved while it lives, released just before it closes.
#[derive(Debug)]
pub struct KeptFd(OwnedFd);

impl KeptFd {
    /// Keeps `fd` (see the module's text).
    pub fn new(fd: OwnedFd) -> Self {
        reserve(fd.as_raw_fd());
        KeptFd(fd)
    }
}

impl Drop for KeptFd {
    fn drop(&mut self) {
        // The OwnedFd field closes it right after.
        release(self.0.as_raw_fd());
    }
}

impl std::ops::Deref for KeptFd {
    type Target = OwnedFd;
    fn deref(&self) -> &OwnedFd {
        &self.0
    }
}

impl AsFd for KeptFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for KeptFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
