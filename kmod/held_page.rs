// SPDX-License-Identifier: GPL-2.0
//! Pages a space holds (current pages and pre-images), counted module-wide: a leak then shows
//! as a number (`CowStats::module_pages`), not as drift in the system's free memory.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{alloc::AllocError, alloc::Flags, bindings, page::Page};

/// Pages of every space alive now.
static HELD: AtomicU64 = AtomicU64::new(0);

/// An order-0 page owned by a space; freed (and uncounted) when dropped.
pub(crate) struct HeldPage(Page);

impl HeldPage {
    /// Allocates a page with `flags`.
    pub(crate) fn alloc(flags: Flags) -> Result<Self, AllocError> {
        let page = Page::alloc_page(flags)?;
        HELD.fetch_add(1, Ordering::Relaxed);
        Ok(Self(page))
    }

    /// The `struct page`, valid while `self` lives.
    pub(crate) fn as_ptr(&self) -> *mut bindings::page {
        self.0.as_ptr()
    }
}

impl Drop for HeldPage {
    fn drop(&mut self) {
        // The page itself is freed by the `Page` field's drop, right after.
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Pages held by all spaces now.
pub(crate) fn module_pages() -> u64 {
    HELD.load(Ordering::Relaxed)
}
