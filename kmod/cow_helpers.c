// SPDX-License-Identifier: GPL-2.0
/*
 * C helpers for cow.ko: tiny wrappers around static inline kernel functions and macros that
 * Rust cannot call directly. They expand to exported symbols only; no kernel internals.
 */
#include <linux/mm.h>

unsigned long cow_page_to_pfn(struct page *page);

unsigned long cow_page_to_pfn(struct page *page)
{
	return page_to_pfn(page);
}
