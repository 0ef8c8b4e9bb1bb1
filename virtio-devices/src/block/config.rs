//! The virtio-blk configuration space (`struct virtio_blk_config`, virtio
//! 1.2 §5.2.4), encoded little-endian at the offsets the spec fixes.

/// Bytes of `struct virtio_blk_config` we expose: everything up to and
/// including `unused1` (secure erase and zoned fields are not offered, so
/// they read as zero like any byte past the end).
pub(crate) const CONFIG_SPACE_SIZE: usize = 60;

/// Field offsets (virtio 1.2 §5.2.4).
pub(crate) mod offset {
    pub const CAPACITY: usize = 0;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// Largest number of sectors one discard or write-zeroes segment may cover
/// (2 GiB): large enough that guests rarely split, small enough that the
/// write-zeroes fallback (plain writes) stays bounded per segment.
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest number of segments in one discard or write-zeroes request.
pub(crate) const MAX_DISCARD_SEGMENTS: u32 = 32;

/// How the host's preferred I/O size is reported to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Topology {
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks (0: no preference).
    pub opt_io_size: u32,
}

impl Topology {
    /// Derives the topology from the backing file's `st_blksize`.
    ///
    /// The "physical block" is capped at 4 KiB: claiming larger physical
    /// sectors (some filesystems report 128 KiB or more) would make guests
    /// align partitions and filesystems oddly for no gain. The optimal I/O
    /// size may be larger, up to 4 MiB. Odd values (not a power of two, or
    /// below 512) fall back to plain 512-byte sectors.
    pub(crate) fn from_host_block_size(blksize: u64) -> Topology {
        const SECTOR: u64 = 512;
        if blksize < SECTOR || !blksize.is_power_of_two() {
            return Topology {
                physical_block_exp: 0,
                min_io_size: 1,
                opt_io_size: 0,
            };
        }
        let physical = blksize.min(4096);
        let physical_block_exp = (physical / SECTOR).trailing_zeros() as u8;
        let opt = blksize.min(4 << 20) / SECTOR;
        Topology {
            physical_block_exp,
            min_io_size: 1 << physical_block_exp,
            opt_io_size: opt as u32,
        }
    }

    /// The discard alignment, in sectors: one physical block.
    pub(crate) fn physical_sectors(&self) -> u32 {
        1 << self.physical_block_exp
    }
}

/// The values the device reports in its configuration space.
#[derive(Clone, Debug)]
pub(crate) struct BlockConfigSpace {
    pub capacity: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub topology: Topology,
    pub num_queues: u16,
}

impl BlockConfigSpace {
    /// Encodes the structure as the guest reads it.
    pub(crate) fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        put(&mut b, offset::CAPACITY, &self.capacity.to_le_bytes());
        put(&mut b, offset::SEG_MAX, &self.seg_max.to_le_bytes());
        put(&mut b, offset::BLK_SIZE, &self.blk_size.to_le_bytes());
        b[offset::PHYSICAL_BLOCK_EXP] = self.topology.physical_block_exp;
        b[offset::ALIGNMENT_OFFSET] = 0;
        put(
            &mut b,
            offset::MIN_IO_SIZE,
            &self.topology.min_io_size.to_le_bytes(),
        );
        put(
            &mut b,
            offset::OPT_IO_SIZE,
            &self.topology.opt_io_size.to_le_bytes(),
        );
        // writeback is only meaningful with VIRTIO_BLK_F_CONFIG_WCE, which
        // is not offered: the device always behaves as a writeback cache
        // that FLUSH makes durable.
        b[offset::WRITEBACK] = 0;
        put(&mut b, offset::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(
            &mut b,
            offset::MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            &mut b,
            offset::MAX_DISCARD_SEG,
            &MAX_DISCARD_SEGMENTS.to_le_bytes(),
        );
        put(
            &mut b,
            offset::DISCARD_SECTOR_ALIGNMENT,
            &self.topology.physical_sectors().to_le_bytes(),
        );
        put(
            &mut b,
            offset::MAX_WRITE_ZEROES_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            &mut b,
            offset::MAX_WRITE_ZEROES_SEG,
            &MAX_DISCARD_SEGMENTS.to_le_bytes(),
        );
        // The unmap flag is honoured by punching a hole, which reads back
        // as zeroes.
        b[offset::WRITE_ZEROES_MAY_UNMAP] = 1;
        b
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}
