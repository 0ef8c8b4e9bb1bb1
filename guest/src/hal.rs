//! Memory for virtio-drivers: the `Hal` (DMA pages from a static bump pool,
//! identity physical addresses) and a small global allocator (the drivers
//! box indirect descriptor tables and the console's receive buffer).
//!
//! Everything lives in .bss inside the first GiB, which the boot page tables
//! identity-map write-back, so a pointer *is* the device-visible address.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

const DMA_POOL_SIZE: usize = 8 << 20;
const HEAP_SIZE: usize = 4 << 20;

#[repr(C, align(4096))]
struct Pool<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: the pools are only handed out in disjoint pieces (bump offsets
// advanced atomically / under the heap lock), never shared as a whole.
unsafe impl<const N: usize> Sync for Pool<N> {}

static DMA_POOL: Pool<DMA_POOL_SIZE> = Pool(UnsafeCell::new([0; DMA_POOL_SIZE]));
static DMA_NEXT: AtomicUsize = AtomicUsize::new(0);

// DMA pages are never returned: devices are reset rarely here, and a bump
// pool keeps DMA memory trivially correct.

/// The `Hal` for virtio-drivers.
pub struct GuestHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, never-reused pages from a
// static pool, so they are valid and alias nothing; physical == virtual for
// every address we hand out or receive (identity map).
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let size = pages * PAGE_SIZE;
        let offset = DMA_NEXT.fetch_add(size, Ordering::Relaxed);
        if offset + size > DMA_POOL_SIZE {
            crate::println!(
                "dma_alloc: pool exhausted ({} pages)",
                crate::serial::Dec(pages as u64)
            );
            return (0, NonNull::dangling());
        }
        let ptr = DMA_POOL.0.get().cast::<u8>().wrapping_add(offset);
        // SAFETY: `ptr..ptr+size` lies inside the pool and was never handed
        // out before (the offset only grows).
        unsafe { ptr.write_bytes(0, size) };
        (
            ptr as PhysAddr,
            NonNull::new(ptr).expect("pool is not at 0"),
        )
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("BAR at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Size classes 16 B .. 4 KiB, each with a free list; larger blocks come from
/// the bump region and are never reused.
const CLASSES: usize = 9;
const MIN_CLASS_SHIFT: u32 = 4;

struct HeapState {
    next: usize,
    free: [usize; CLASSES],
}

/// A spin-locked size-class allocator over a static region.
pub struct Heap {
    lock: AtomicBool,
    state: UnsafeCell<HeapState>,
}

// SAFETY: `state` is only touched while `lock` is held.
unsafe impl Sync for Heap {}

static HEAP_POOL: Pool<HEAP_SIZE> = Pool(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static HEAP: Heap = Heap {
    lock: AtomicBool::new(false),
    state: UnsafeCell::new(HeapState {
        next: 0,
        free: [0; CLASSES],
    }),
};

impl Heap {
    fn with<R>(&self, f: impl FnOnce(&mut HeapState) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let result = f(unsafe { &mut *self.state.get() });
        self.lock.store(false, Ordering::Release);
        result
    }
}

fn class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS_SHIFT);
    let shift = size.next_power_of_two().trailing_zeros();
    let class = (shift - MIN_CLASS_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

fn bump(state: &mut HeapState, size: usize, align: usize) -> *mut u8 {
    let start = state.next.next_multiple_of(align);
    if start + size > HEAP_SIZE {
        return core::ptr::null_mut();
    }
    state.next = start + size;
    HEAP_POOL.0.get().cast::<u8>().wrapping_add(start)
}

// SAFETY: blocks are carved from the static pool without overlap: a block is
// either fresh from the bump pointer or popped from a free list it was pushed
// onto by `dealloc` with the same class; class blocks are aligned to their
// (power of two) size, which covers the requested alignment.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|state| match class_of(&layout) {
            Some(class) => {
                let head = state.free[class];
                if head != 0 {
                    // SAFETY: free blocks store the next free block in their
                    // first word, written by `dealloc`.
                    state.free[class] = unsafe { (head as *const usize).read() };
                    head as *mut u8
                } else {
                    let size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
                    bump(state, size, size)
                }
            }
            None => bump(state, layout.size(), layout.align()),
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(class) = class_of(&layout) {
            self.with(|state| {
                // SAFETY: `ptr` is a block of this class (at least 16 bytes,
                // aligned) that the caller no longer uses.
                unsafe { (ptr as *mut usize).write(state.free[class]) };
                state.free[class] = ptr as usize;
            });
        }
    }
}
