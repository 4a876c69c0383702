//! The book: libcow's own bookkeeping memory, which the in-process backends never cover.
//!
//! The mainline backends snapshot every private writable mapping of the process, so anything
//! libcow must remember across a restore (shadow pages, undo records, the list of snapshots)
//! has to live somewhere a restore does not touch. The book is one large anonymous reservation
//! (`MAP_NORESERVE`: pages exist only once used) with a size-class allocator; the backends skip
//! its address range. Its address is stored once, before any snapshot, so restoring the static
//! that holds it is harmless.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Default reservation: 64 GiB of address space (`COW_BOOK_GIB` overrides).
const DEFAULT_GIB: usize = 64;
/// Smallest block, as a power of two.
const MIN_SHIFT: u32 = 6;
/// Size classes 64 B .. 2^47 B.
const CLASSES: usize = 42;

/// The bookkeeping arena.
pub struct Book {
    base: usize,
    end: usize,
    bump: AtomicUsize,
    /// Free lists per size class (blocks link through their first word).
    free: Mutex<[usize; CLASSES]>,
    /// Words of libcow's process-wide state that must outlive every restore and exist before
    /// the first snapshot: a static of libcow's is covered memory, and one first set after a
    /// snapshot goes back to unset when a restore rewinds to it. See [`Book::word`].
    words: [AtomicU64; WORDS],
}

/// Process-wide words in the book ([`Book::word`]).
pub const WORDS: usize = 8;

/// The reservation, or the size (GiB) that could not be reserved.
static BOOK: OnceLock<Result<&'static Book, usize>> = OnceLock::new();

/// Smallest reservation tried when the default does not fit (an address-space limit).
const MIN_MIB: usize = 256;

/// The process's book, reserved on first use.
///
/// # Panics
///
/// When the reservation is impossible; [`try_book`] (called by every backend's set-up, so by
/// `cow_init`) reports that as an error first.
pub fn book() -> &'static Book {
    match try_book() {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

/// The process's book, reserved on first use: `COW_BOOK_GIB` GiB if set, else 64 GiB or, under
/// an address-space limit (`RLIMIT_AS`), the largest power-of-two share of it that fits, down
/// to 256 MiB.
pub fn try_book() -> crate::Result<&'static Book> {
    let reserved = BOOK.get_or_init(|| {
        let asked: Option<usize> = std::env::var("COW_BOOK_GIB")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut size = asked.unwrap_or(DEFAULT_GIB) << 30;
        loop {
            if let Some(b) = reserve(size) {
                return Ok(b);
            }
            if asked.is_some() || size / 2 < MIN_MIB << 20 {
                return Err(asked.unwrap_or(DEFAULT_GIB));
            }
            size /= 2;
        }
    });
    reserved.map_err(|_| crate::Error::Os {
        op: "libcow cannot reserve address space for its bookkeeping (an address-space limit? \
             COW_BOOK_GIB sets the size)",
        errno: libc::ENOMEM,
    })
}

/// Reserves `size` bytes and puts the book's header at their start.
fn reserve(size: usize) -> Option<&'static Book> {
    // SAFETY: a fresh anonymous reservation that aliases nothing. The system call itself, not
    // `mmap`: libcow_preload interposes `mmap` to cover what programs map, and the book must
    // never be covered.
    let base = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0usize,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base < 0 {
        return None;
    }
    // Small pages only: the book is sparse, and under THP "always" (Debian's default) every
    // first touch of 2 MiB would make a huge page of it (4 MiB resident for a few KiB used,
    // and as much for a recorder to read at every checkpoint). Advice only: failure is fine.
    // SAFETY: advice on the reservation just made; the raw call, as for the mmap above.
    unsafe { libc::syscall(libc::SYS_madvise, base, size, libc::MADV_NOHUGEPAGE) };
    let base = base as usize;
    let header = base as *mut Book;
    // SAFETY: the header goes at the start of the reservation, which nothing else uses.
    unsafe {
        header.write(Book {
            base,
            end: base + size,
            bump: AtomicUsize::new(base + 4096),
            free: Mutex::new([0; CLASSES]),
            words: [const { AtomicU64::new(0) }; WORDS],
        });
        Some(&*header)
    }
}

fn class_of(size: usize) -> usize {
    let size = size.max(1 << MIN_SHIFT).next_power_of_two();
    (size.trailing_zeros() - MIN_SHIFT) as usize
}

impl Book {
    /// Process-wide word `i` (< [`WORDS`]), zero at first: each user owns fixed indices
    /// (`sys::ProcSelfFile`: 0–3).
    pub fn word(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }

    /// The reserved address range `[start, end)`.
    pub fn range(&self) -> (usize, usize) {
        (self.base, self.end)
    }

    /// A block of at least `size` bytes, aligned to its size class (so pages are page-aligned).
    /// Contents are unspecified.
    pub fn alloc(&self, size: usize) -> *mut u8 {
        let class = class_of(size);
        let bytes = 1usize << (class as u32 + MIN_SHIFT);
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let head = free[class];
            if head != 0 {
                // SAFETY: free blocks store the next free block in their first word.
                free[class] = unsafe { (head as *const usize).read() };
                return head as *mut u8;
            }
        }
        let align = bytes.min(1 << 21);
        let mut cur = self.bump.load(Ordering::Relaxed);
        loop {
            let start = cur.next_multiple_of(align);
            let next = start + bytes;
            assert!(
                next <= self.end,
                "libcow: bookkeeping reservation exhausted (COW_BOOK_GIB)"
            );
            match self
                .bump
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return start as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    /// A zeroed block of at least `size` bytes.
    pub fn alloc_zeroed(&self, size: usize) -> *mut u8 {
        let p = self.alloc(size);
        // SAFETY: `p` is a block of at least `size` bytes that we own.
        unsafe { std::ptr::write_bytes(p, 0, size) };
        p
    }

    /// Returns a block from [`Book::alloc`] of the same `size`. Large blocks give their pages
    /// back to the kernel.
    pub fn free(&self, p: *mut u8, size: usize) {
        if p.is_null() {
            return;
        }
        let class = class_of(size);
        let bytes = 1usize << (class as u32 + MIN_SHIFT);
        if bytes >= 1 << 16 {
            // SAFETY: releasing the pages of a block we own; the range stays reserved. The
            // system call itself: libcow_preload interposes `madvise` (under its own lock).
            unsafe { libc::syscall(libc::SYS_madvise, p as usize, bytes, libc::MADV_DONTNEED) };
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the block is ours and at least a word long.
        unsafe { (p as *mut usize).write(free[class]) };
        free[class] = p as usize;
    }
}

/// A growable array of plain values stored in the book.
pub struct BookVec<T: Copy> {
    ptr: *mut T,
    len: usize,
    cap: usize,
}

// SAFETY: the vector owns its block exclusively; T is plain data.
unsafe impl<T: Copy + Send> Send for BookVec<T> {}

impl<T: Copy> Default for BookVec<T> {
    fn default() -> Self {
        BookVec {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        }
    }
}

impl<T: Copy> BookVec<T> {
    /// An empty vector (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `v`.
    pub fn push(&mut self, v: T) {
        if self.len == self.cap {
            self.reserve(self.cap.max(16));
        }
        // SAFETY: `len < cap` after reserve; the slot is inside our block.
        unsafe { self.ptr.add(self.len).write(v) };
        self.len += 1;
    }

    /// Appends a copy of `items`.
    pub fn extend_from_slice(&mut self, items: &[T]) {
        if items.is_empty() {
            return;
        }
        self.reserve(items.len());
        // SAFETY: room for `items.len()` more elements after reserve; `items` is not inside our
        // block (we hold `&mut self`).
        unsafe {
            std::ptr::copy_nonoverlapping(items.as_ptr(), self.ptr.add(self.len), items.len())
        };
        self.len += items.len();
    }

    /// Keeps only the elements for which `keep` holds, in order.
    pub fn retain(&mut self, keep: impl Fn(&T) -> bool) {
        let v = self.as_mut_slice();
        let mut w = 0;
        for r in 0..v.len() {
            if keep(&v[r]) {
                v[w] = v[r];
                w += 1;
            }
        }
        self.truncate(w);
    }

    /// Makes room for `more` elements.
    pub fn reserve(&mut self, more: usize) {
        let need = self.len + more;
        if need <= self.cap {
            return;
        }
        let cap = need.next_power_of_two();
        let size = std::mem::size_of::<T>();
        let p = book().alloc(cap * size) as *mut T;
        if !self.ptr.is_null() {
            // SAFETY: copying our `len` initialised elements into the new, larger block.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr, p, self.len) };
            book().free(self.ptr.cast(), self.cap * size);
        }
        self.ptr = p;
        self.cap = cap;
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: `len` initialised elements at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every element (keeps the block).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `n` elements.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
}

impl<T: Copy + Ord> BookVec<T> {
    /// Sorts the elements and removes duplicates.
    pub fn sort_dedup(&mut self) {
        let v = self.as_mut_slice();
        v.sort_unstable();
        let mut w = 0;
        for r in 0..v.len() {
            if w == 0 || v[w - 1] != v[r] {
                v[w] = v[r];
                w += 1;
            }
        }
        self.truncate(w);
    }
}

impl<T: Copy> Drop for BookVec<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            book().free(self.ptr.cast(), self.cap * std::mem::size_of::<T>());
        }
    }
}

/// Moves `value` into the book and returns a reference that lives as long as the process.
pub fn leak<T>(value: T) -> &'static mut T {
    let p = book().alloc(std::mem::size_of::<T>().max(1)) as *mut T;
    // SAFETY: a fresh, suitably aligned (size-class aligned, ≥ 64) block of the right size.
    unsafe {
        p.write(value);
        &mut *p
    }
}

/// `len` zeroed bytes that no backend covers (for a program's own reference data, say).
pub fn alloc_uncovered(len: usize) -> &'static mut [u8] {
    let p = book().alloc_zeroed(len);
    // SAFETY: a fresh block of `len` bytes, never handed out again.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}
