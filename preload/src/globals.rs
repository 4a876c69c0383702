//! Moving the executable's writable globals into covered memory at start-up.
//!
//! For the main program's writable `PT_LOAD` segment (`.data`, `.bss`) minus its RELRO part
//! (which becomes read-only after relocation and never changes), the pages are copied aside, a
//! `/dev/cow` region is mapped over the same addresses, and the contents are copied back. This
//! runs in the preload constructor, before the program's own constructors and threads.

use crate::raw;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Most writable segments we cover (executables have one or two).
const MAX_SEGMENTS: usize = 4;

/// The page ranges of the executable's writable, non-RELRO globals.
fn writable_globals() -> [(usize, usize); MAX_SEGMENTS] {
    struct Found {
        ranges: [(usize, usize); MAX_SEGMENTS],
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for each object and our `data`.
        unsafe {
            let found = &mut *(data as *mut Found);
            let info = &*info;
            let page = raw::page_size();
            let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            let bias = info.dlpi_addr as usize;
            let mut relro_end = 0;
            for ph in phdrs {
                if ph.p_type == libc::PT_GNU_RELRO {
                    relro_end = bias + ph.p_vaddr as usize + ph.p_memsz as usize;
                }
            }
            let mut n = 0;
            for ph in phdrs {
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 && n < MAX_SEGMENTS {
                    let first = bias + ph.p_vaddr as usize;
                    let end = (first + ph.p_memsz as usize).next_multiple_of(page);
                    // The segment's first page is ours unless RELRO (read-only after
                    // relocation) reaches into it.
                    let mut start = first & !(page - 1);
                    if relro_end > start {
                        start = relro_end.next_multiple_of(page);
                    }
                    if start < end {
                        found.ranges[n] = (start, end);
                        n += 1;
                    }
                }
            }
        }
        1 // the first object is the executable: stop there
    }
    let mut found = Found {
        ranges: [(0, 0); MAX_SEGMENTS],
    };
    // SAFETY: the callback only reads the program headers it is given.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut found as *mut Found).cast()) };
    found.ranges
}

/// Replaces the executable's writable globals with covered memory holding the same bytes.
pub(crate) fn cover_executable_globals() {
    let Some(cow) = crate::space() else { return };
    for (i, (start, end)) in writable_globals().into_iter().enumerate() {
        if start < end {
            cover(cow, i, start, end - start);
        }
    }
}

fn cover(cow: &cow::Cow, slot: usize, start: usize, len: usize) {
    // SAFETY: a scratch anonymous mapping for the copy; the globals range is mapped read-write
    // (it is the executable's writable segment) and, in the constructor, nothing else runs.
    // Between the MAP_FIXED and the copy back, no code touches the executable's globals: only
    // this library's code runs, and its own state lives in its own segments.
    unsafe {
        let scratch = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if scratch == libc::MAP_FAILED {
            raw::write_stderr(b"libcow_preload: no scratch memory; globals NOT covered\n");
            return;
        }
        std::ptr::copy_nonoverlapping(start as *const u8, scratch.cast::<u8>(), len);
        match cow.map_region_at(start as *mut u8, len) {
            Ok(region) => {
                std::ptr::copy_nonoverlapping(scratch.cast::<u8>(), start as *mut u8, len);
                SEGMENTS[slot].store(start, Relaxed);
                LENGTHS[slot].store(len, Relaxed);
                OFFSETS[slot].store(region.offset as usize, Relaxed);
            }
            Err(_) => raw::write_stderr(
                b"libcow_preload: cannot map /dev/cow over the globals; NOT covered\n",
            ),
        }
        libc::munmap(scratch, len);
    }
}

static SEGMENTS: [AtomicUsize; MAX_SEGMENTS] = [const { AtomicUsize::new(0) }; MAX_SEGMENTS];
static LENGTHS: [AtomicUsize; MAX_SEGMENTS] = [const { AtomicUsize::new(0) }; MAX_SEGMENTS];
static OFFSETS: [AtomicUsize; MAX_SEGMENTS] = [const { AtomicUsize::new(0) }; MAX_SEGMENTS];

/// The covered globals: `(start address, length, space offset)` of each covered segment.
pub(crate) fn regions() -> impl Iterator<Item = (usize, usize, u64)> {
    (0..MAX_SEGMENTS).filter_map(|i| {
        let start = SEGMENTS[i].load(Relaxed);
        (start != 0).then(|| {
            (
                start,
                LENGTHS[i].load(Relaxed),
                OFFSETS[i].load(Relaxed) as u64,
            )
        })
    })
}
