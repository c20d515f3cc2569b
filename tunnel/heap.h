/* heap: give the allocator's free pages back to the kernel, where the C library can. */
#ifndef TETHER_HEAP_H
#define TETHER_HEAP_H

#ifdef HAVE_MALLOC_TRIM
#include <malloc.h>
#endif

/*
 * glibc returns only the top of its heap by itself, so after a burst of connections closes
 * the freed chunks between live ones stay resident until malloc_trim. musl's allocator
 * (the static build) unmaps freed groups on its own and has no malloc_trim: nothing to do.
 */
static inline void heap_trim(void)
{
#ifdef HAVE_MALLOC_TRIM
    malloc_trim(0);
#endif
}

#endif
