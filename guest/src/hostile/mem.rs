//! Guest memory the hostile actions hand to devices: one ring set (descriptor
//! table, available ring, used ring) per queue, and a buffer arena. Both are
//! statics in .bss: identity-mapped write-back RAM, and already touched by
//! the boot code's .bss clearing, so their pages count in the VMM's RSS
//! before the first action.
//!
//! Devices write these buffers behind the compiler's back, so every access
//! is volatile and goes through the checked helpers below, which refuse any
//! address outside the arena, the rings, the scratch page at the top of RAM
//! or MMIO above RAM.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// Ring sets: blk 1, rng 1, console 2, net 2 queues.
pub const RING_SETS: usize = 6;
/// Largest queue size one ring set holds (a 4 KiB descriptor table).
pub const MAX_QSIZE: u16 = 256;

/// 16-byte request headers, one per slot.
pub const HDR: u64 = 0x0;
/// Status bytes, one per slot.
pub const STATUS: u64 = 0x800;
/// Two indirect descriptor tables of 4 KiB.
pub const IND: u64 = 0x1000;
/// 512-byte data buffers, one per slot (64 slots).
pub const DATA: u64 = 0x4000;
/// A 128 KiB buffer for the oversized rng request.
pub const BIG: u64 = 0x10000;
/// Bytes in the arena.
pub const ARENA_SIZE: usize = 0x30000;
/// Slots (headers, status bytes, data buffers).
pub const SLOTS: u64 = 64;

/// Size of a ring set: descriptor table, available ring, used ring.
const RING_SET_SIZE: usize = 3 * 4096;

#[repr(C, align(4096))]
struct Region<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: the regions are only accessed through volatile reads and writes
// of plain integers at checked addresses, from one CPU; no Rust reference
// to their contents is ever created.
unsafe impl<const N: usize> Sync for Region<N> {}

static RINGS: Region<{ RING_SETS * RING_SET_SIZE }> =
    Region(UnsafeCell::new([0; RING_SETS * RING_SET_SIZE]));
static ARENA: Region<ARENA_SIZE> = Region(UnsafeCell::new([0; ARENA_SIZE]));
/// One 1 MiB buffer: the destination of every long read, so that requests
/// take long enough to still be running when a reset or BAR move comes.
static LONG: Region<LONG_SIZE> = Region(UnsafeCell::new([0; LONG_SIZE]));
/// Bytes in the long-read buffer.
pub const LONG_SIZE: usize = 1 << 20;
/// Start of the scratch page at the top of RAM (0 = none).
static SCRATCH: AtomicU64 = AtomicU64::new(0);
/// First address above guest RAM: MMIO and holes from here up.
static RAM_TOP: AtomicU64 = AtomicU64::new(u64::MAX);

/// Addresses of ring set `set`: (descriptor table, available, used).
pub fn ring_set(set: usize) -> (u64, u64, u64) {
    assert!(set < RING_SETS);
    let base = RINGS.0.get() as u64 + (set * RING_SET_SIZE) as u64;
    (base, base + 4096, base + 8192)
}

/// Guest-physical address of the long-read buffer.
pub fn long_buffer() -> u64 {
    LONG.0.get() as u64
}

/// Guest-physical address of arena offset `off`.
pub fn arena(off: u64) -> u64 {
    assert!(off < ARENA_SIZE as u64);
    ARENA.0.get() as u64 + off
}

/// Address of slot `slot` of `area` (HDR, STATUS or DATA).
pub fn slot(area: u64, slot: u64) -> u64 {
    assert!(slot < SLOTS);
    let stride = match area {
        HDR => 16,
        STATUS => 1,
        _ => 512,
    };
    arena(area + slot * stride)
}

/// Declares guest RAM to end at `ram_top` and allows the last page below it
/// as scratch (nothing of the guest lives there: the image is near 1 MiB).
pub fn set_ram_top(ram_top: u64) {
    RAM_TOP.store(ram_top, Ordering::Relaxed);
    SCRATCH.store(ram_top - 4096, Ordering::Relaxed);
}

fn inside(addr: u64, len: u64, start: u64, size: u64) -> bool {
    addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
}

/// Whether `len` bytes at `addr` may be accessed: our DMA memory, the
/// scratch page, or device MMIO above RAM.
fn allowed(addr: u64, len: u64) -> bool {
    let rings = RINGS.0.get() as u64;
    let scratch = SCRATCH.load(Ordering::Relaxed);
    inside(addr, len, rings, (RING_SETS * RING_SET_SIZE) as u64)
        || inside(addr, len, ARENA.0.get() as u64, ARENA_SIZE as u64)
        || inside(addr, len, LONG.0.get() as u64, LONG_SIZE as u64)
        || (scratch != 0 && inside(addr, len, scratch, 4096))
        || addr >= RAM_TOP.load(Ordering::Relaxed)
}

/// Volatile write of `value` at guest-physical `addr`.
pub fn poke<T: Copy>(addr: u64, value: T) {
    let len = core::mem::size_of::<T>() as u64;
    assert!(allowed(addr, len), "poke outside the hostile regions");
    // SAFETY: `addr` is identity-mapped and lies in our DMA regions, the
    // scratch page or MMIO (checked above), none of which holds a Rust
    // object; plain integers have no invalid bit patterns.
    unsafe { (addr as *mut T).write_volatile(value) }
}

/// Volatile read of a `T` at guest-physical `addr`.
pub fn peek<T: Copy>(addr: u64) -> T {
    let len = core::mem::size_of::<T>() as u64;
    assert!(allowed(addr, len), "peek outside the hostile regions");
    // SAFETY: as in `poke`; only integer types are read this way.
    unsafe { (addr as *const T).read_volatile() }
}

/// Fills `len` bytes at `addr` (8-byte aligned, `len` a multiple of 8) with
/// `byte`. Word stores: every guest instruction costs ~10 µs on our hosts.
pub fn fill(addr: u64, len: u64, byte: u8) {
    assert!(addr.is_multiple_of(8) && len.is_multiple_of(8));
    let word = u64::from_ne_bytes([byte; 8]);
    for i in (0..len).step_by(8) {
        poke(addr + i, word);
    }
}

/// A hash of `len` bytes at `addr` (8-byte aligned, multiple of 8), to see
/// whether a device wrote to a buffer.
pub fn hash(addr: u64, len: u64) -> u64 {
    assert!(addr.is_multiple_of(8) && len.is_multiple_of(8));
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for i in (0..len).step_by(8) {
        h = (h ^ peek::<u64>(addr + i)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What `hash` returns for `len` bytes of `byte`.
pub fn hash_of_fill(len: u64, byte: u8) -> u64 {
    let word = u64::from_ne_bytes([byte; 8]);
    (0..len / 8).fold(0xcbf2_9ce4_8422_2325u64, |h, _| {
        (h ^ word).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Copies `bytes` to `addr`.
pub fn write_bytes(addr: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        poke(addr + i as u64, b);
    }
}

/// Whether the bytes at `addr` start with `bytes`.
pub fn starts_with(addr: u64, bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| peek::<u8>(addr + i as u64) == b)
}

/// Writes a split-ring descriptor at `table[index]`.
pub fn desc(table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + 16 * u64::from(index);
    poke(at, addr);
    poke(at + 8, len);
    poke(at + 12, flags);
    poke(at + 14, next);
}
