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
#include <linux/sort.h>

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

static bool batch_wrprotect = true;
module_param(batch_wrprotect, bool, 0644);
MODULE_PARM_DESC(batch_wrprotect,
		 "Write-protect a snapshot's written pages in runs (one page-table walk and TLB flush per run) where the kernel can; 0: one rmap walk per page (for comparison)");

static unsigned int fault_around = 16;
module_param(fault_around, uint, 0644);
MODULE_PARM_DESC(fault_around,
		 "Most pages a first write in a sequential run also saves and maps writable ahead of the writer (capped at 32); 0: off (for comparison)");

unsigned int cow_param_max_snapshots(void);
unsigned int cow_param_fault_around(void);
vm_fault_t cow_map_writable_at(struct vm_fault *vmf, unsigned long ahead, struct page *page);
unsigned long cow_param_max_held_mib(void);
unsigned long cow_page_to_pfn(struct page *page);
int cow_wrprotect_page(struct address_space *mapping, pgoff_t pgoff, struct page *page);
bool cow_can_wrprotect_range(void);
unsigned long cow_wrprotect_range(struct address_space *mapping, pgoff_t first, pgoff_t nr);
bool cow_page_maybe_pinned(struct page *page);
bool cow_capable_sys_resource(void);
bool cow_current_alone(void);
void cow_cond_resched(void);
void cow_sort_u64(u64 *v, size_t n);

unsigned int cow_param_max_snapshots(void)
{
	return READ_ONCE(max_snapshots);
}

unsigned int cow_param_fault_around(void)
{
	return READ_ONCE(fault_around);
}

/*
 * Maps @page writable @ahead pages past the address of @vmf, a write fault in progress on one
 * of our VMAs (its lock held): the same call the fault itself ends with, for a neighbour the
 * caller has already saved. An existing read-only PTE of @page is upgraded, a missing one
 * installed. The caller keeps the address inside the VMA.
 */
vm_fault_t cow_map_writable_at(struct vm_fault *vmf, unsigned long ahead, struct page *page)
{
	struct vm_fault at = {
		.vma = vmf->vma,
		.gfp_mask = vmf->gfp_mask,
		.pgoff = vmf->pgoff + ahead,
		.address = vmf->address + ahead * PAGE_SIZE,
		.real_address = vmf->address + ahead * PAGE_SIZE,
		.flags = vmf->flags,
	};

	return vmf_insert_page_mkwrite(&at, page, true);
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

/*
 * Whether to write-protect by ranges: this kernel has wp_shared_mapping_range()
 * (CONFIG_MAPPING_DIRTY_HELPERS, selected by vmwgfx: one page-table walk per VMA and one ranged
 * TLB flush for a run of page offsets) and the batch_wrprotect parameter is on.
 */
bool cow_can_wrprotect_range(void)
{
	return IS_ENABLED(CONFIG_MAPPING_DIRTY_HELPERS) && READ_ONCE(batch_wrprotect);
}

/*
 * Write-protects every writable PTE that maps a page offset in [@first, @first + @nr) of
 * @mapping, in every process; returns how many. Without the helper it does nothing and
 * returns 0: callers ask cow_can_wrprotect_range() first.
 */
unsigned long cow_wrprotect_range(struct address_space *mapping, pgoff_t first, pgoff_t nr)
{
#ifdef CONFIG_MAPPING_DIRTY_HELPERS
	return wp_shared_mapping_range(mapping, first, nr);
#else
	return 0;
#endif
}

/* Whether @page may be pinned for DMA (O_DIRECT, vmsplice): writes bypass its PTEs. */
bool cow_page_maybe_pinned(struct page *page)
{
	return folio_maybe_dma_pinned(page_folio(page));
}

/*
 * Whether the calling process is alone with its memory: one thread, and no other holder of its
 * mm (a vfork child, a /proc or ptrace access in progress) that could write it meanwhile.
 */
bool cow_current_alone(void)
{
	return current->mm && get_nr_threads(current) == 1 &&
	       atomic_read(&current->mm->mm_users) == 1;
}

bool cow_capable_sys_resource(void)
{
	return capable(CAP_SYS_RESOURCE);
}

void cow_cond_resched(void)
{
	cond_resched();
}

static int cow_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/* Heapsort from lib/sort.c: no recursion, no allocation, nothing that can panic. */
void cow_sort_u64(u64 *v, size_t n)
{
	sort(v, n, sizeof(*v), cow_cmp_u64, NULL);
}
