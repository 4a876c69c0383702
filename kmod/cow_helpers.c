// SPDX-License-Identifier: GPL-2.0
/*
 * C helpers for cow.ko: thin wrappers around static inline kernel functions, macros, and
 * exported functions whose headers the Rust bindings do not include. Each expands to exported
 * symbols only; no kernel internals. Keeping mapping_wrprotect_range() here means its prototype
 * comes from <linux/rmap.h>, so a changed signature fails the build instead of the call.
 */
#include <linux/capability.h>
#include <linux/mm.h>
#include <linux/moduleparam.h>
#include <linux/rmap.h>
#include <linux/sched.h>

#ifndef CONFIG_64BIT
#error "cow.ko needs a 64-bit kernel: a space spans 2^32 pages of file offsets"
#endif

/*
 * The module parameters live here because Rust's module! params in 7.3 never appear in sysfs
 * (their kernel_param has perm 0). Root may change them at run time: they are the defaults
 * and caps of spaces opened afterwards, read once per use with READ_ONCE.
 */
static unsigned int max_snapshots = 64;
module_param(max_snapshots, uint, 0644);
MODULE_PARM_DESC(max_snapshots,
		 "Most snapshots a space holds by default; COW_IOC_LIMITS may lower it, raising it needs CAP_SYS_RESOURCE");

static unsigned long max_held_mib = 1024;
module_param(max_held_mib, ulong, 0644);
MODULE_PARM_DESC(max_held_mib,
		 "Most MiB of pre-images of older snapshots a space holds by default (the newest is never evicted); COW_IOC_LIMITS may lower it, raising it needs CAP_SYS_RESOURCE");

unsigned int cow_param_max_snapshots(void);
unsigned long cow_param_max_held_mib(void);
unsigned long cow_page_to_pfn(struct page *page);
int cow_wrprotect_page(struct address_space *mapping, pgoff_t pgoff, struct page *page);
bool cow_page_maybe_pinned(struct page *page);
bool cow_capable_sys_resource(void);
void cow_cond_resched(void);

unsigned int cow_param_max_snapshots(void)
{
	return READ_ONCE(max_snapshots);
}

unsigned long cow_param_max_held_mib(void)
{
	return READ_ONCE(max_held_mib);
}

unsigned long cow_page_to_pfn(struct page *page)
{
	return page_to_pfn(page);
}

/* Write-protects every PTE that maps @page at @pgoff of @mapping; returns how many. */
int cow_wrprotect_page(struct address_space *mapping, pgoff_t pgoff, struct page *page)
{
	return mapping_wrprotect_range(mapping, pgoff, page_to_pfn(page), 1);
}

/* Whether @page may be pinned for DMA (O_DIRECT, vmsplice): writes bypass its PTEs. */
bool cow_page_maybe_pinned(struct page *page)
{
	return folio_maybe_dma_pinned(page_folio(page));
}

bool cow_capable_sys_resource(void)
{
	return capable(CAP_SYS_RESOURCE);
}

void cow_cond_resched(void)
{
	cond_resched();
}
