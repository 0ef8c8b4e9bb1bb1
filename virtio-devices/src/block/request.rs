//! One virtio-blk request (virtio 1.2 §5.2.6): split the chain into its
//! device-readable and device-writable byte streams, decode the header,
//! perform the request against the image and write the status byte.
//!
//! Framing follows the spec's "no assumptions" rule (§2.6.4): the header
//! is the first 16 bytes of the readable stream, the status the last byte
//! of the writable stream, whatever the descriptor boundaries.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::disk::{Disk, ID_BYTES};
use super::SECTOR_SIZE;
use crate::queue::{drain_queue, QueueOutcome};

/// `struct virtio_blk_req` header: type u32, reserved u32, sector u64.
const HEADER_LEN: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector u64, num_sectors u32,
/// flags u32.
const DISCARD_SEGMENT_LEN: u64 = 16;
/// Descriptors kept per chain. The driver is told seg_max = queue size - 2,
/// but indirect tables may hold up to 65535 entries; longer chains are
/// failed rather than buffered.
const MAX_CHAIN_DESCRIPTORS: usize = 1024;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// One descriptor's buffer.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// One validated discard / write-zeroes range, in bytes.
#[derive(Clone, Copy, Debug)]
struct ByteRange {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// How a chain is shaped, before its contents are looked at.
#[derive(Debug)]
struct Shape {
    /// The last descriptor still had NEXT set: the chain was cut short
    /// (loop, next index out of range, unreadable descriptor or indirect
    /// table), so nothing in it can be trusted to be the status byte.
    truncated: bool,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    too_long: bool,
    /// A device-readable descriptor after a device-writable one.
    misordered: bool,
    /// Where the status byte goes: the last byte of the writable stream.
    status: Option<GuestAddress>,
}

/// The virtio-blk request path of one device, without a worker thread:
/// the device's worker calls [`process_queue`](Self::process_queue) when a
/// queue is notified; benchmarks and tests may call it directly.
#[derive(Debug)]
pub struct BlockRequestProcessor {
    disk: Arc<Disk>,
    // Scratch space reused across requests to keep allocation off the
    // request path.
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    ranges: Vec<ByteRange>,
}

impl BlockRequestProcessor {
    pub(crate) fn new(disk: Arc<Disk>) -> Self {
        BlockRequestProcessor {
            disk,
            readable: Vec::with_capacity(16),
            writable: Vec::with_capacity(16),
            readable_len: 0,
            writable_len: 0,
            ranges: Vec::with_capacity(MAX_DISCARD_SEGMENTS as usize),
        }
    }

    /// Performs every request available on `queue` and puts it on the used
    /// ring. The caller interrupts the driver if `notify` is set and stops
    /// using the queue if `error` is.
    pub fn process_queue(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> QueueOutcome {
        drain_queue(queue, mem, |chain| self.process_chain(mem, chain))
    }

    /// Performs one request; returns the used length (data bytes written
    /// to the driver plus the status byte), or 0 if no status byte could be
    /// written.
    pub(crate) fn process_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let head = chain.head_index();
        let shape = self.collect(chain);
        // A request whose completion cannot be reported is not performed.
        let status_addr = match shape.status {
            Some(addr) if !shape.truncated && GuestMemoryBackend::check_range(mem, addr, 1) => addr,
            _ => {
                log::debug!("virtio-blk: chain {head} has no usable status byte; dropped");
                return 0;
            }
        };
        let (status, written) = if shape.too_long || shape.misordered {
            log::debug!("virtio-blk: chain {head} is malformed: {shape:?}");
            (S_IOERR, 0)
        } else {
            self.execute(mem)
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            log::debug!("virtio-blk: cannot write status of chain {head}: {e}");
            return 0;
        }
        written.saturating_add(1)
    }

    /// Splits `chain` into the readable and writable streams.
    fn collect(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Shape {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        let mut shape = Shape {
            truncated: true,
            too_long: false,
            misordered: false,
            status: None,
        };
        let mut count = 0usize;
        let mut seen_writable = false;
        for desc in chain {
            count += 1;
            shape.truncated = desc.has_next();
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            let keep = count <= MAX_CHAIN_DESCRIPTORS;
            shape.too_long |= !keep;
            // Lengths are summed in u64: virtio-queue caps a chain at 4 GiB.
            if desc.is_write_only() {
                seen_writable = true;
                self.writable_len += u64::from(seg.len);
                if seg.len > 0 {
                    shape.status = seg.addr.checked_add(u64::from(seg.len) - 1);
                }
                if keep {
                    self.writable.push(seg);
                }
            } else {
                shape.misordered |= seen_writable;
                self.readable_len += u64::from(seg.len);
                if keep {
                    self.readable.push(seg);
                }
            }
        }
        shape
    }

    /// Decodes and performs the request; returns the status and the number
    /// of data bytes written to the driver.
    fn execute(&mut self, mem: &GuestMemoryMmap) -> (u8, u32) {
        let mut header = [0u8; HEADER_LEN as usize];
        if self.readable_len < HEADER_LEN
            || read_stream(mem, &self.readable, 0, &mut header).is_err()
        {
            log::debug!("virtio-blk: request header missing or unreadable");
            return (S_IOERR, 0);
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        match request_type {
            VIRTIO_BLK_T_IN => self.read(mem, sector),
            VIRTIO_BLK_T_OUT => (self.write(mem, sector), 0),
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    log::error!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => self.get_id(mem),
            VIRTIO_BLK_T_DISCARD => (self.discard_or_zero(mem, false), 0),
            VIRTIO_BLK_T_WRITE_ZEROES => (self.discard_or_zero(mem, true), 0),
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (S_UNSUPP, 0)
            }
        }
    }

    /// IN: returns the status and the data bytes written to the driver.
    fn read(&mut self, mem: &GuestMemoryMmap, sector: u64) -> (u8, u32) {
        let len = self.writable_len.saturating_sub(1);
        // Extra readable bytes would be data flowing the wrong way.
        if self.readable_len != HEADER_LEN || len % SECTOR_SIZE != 0 {
            log::debug!("virtio-blk: malformed read");
            return (S_IOERR, 0);
        }
        let Some(offset) = self.disk.byte_range(sector, len) else {
            log::debug!("virtio-blk: read of {len} bytes at sector {sector} beyond capacity");
            return (S_IOERR, 0);
        };
        if !stream_in_memory(mem, &self.writable, 0, len) {
            log::debug!("virtio-blk: read buffer outside guest memory");
            return (S_IOERR, 0);
        }
        let disk = &self.disk;
        let mut pos = offset;
        let result = for_each_range(&self.writable, 0, len, |addr, n| {
            for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
                let slice = slice.map_err(io::Error::other)?;
                disk.read_to_guest(&slice, pos)?;
                pos += slice.len() as u64;
            }
            Ok(())
        });
        match result {
            // len < 4 GiB: virtio-queue caps a chain at 4 GiB.
            Ok(()) => (S_OK, u32::try_from(len).unwrap_or(u32::MAX - 1)),
            Err(e) => {
                log::error!("virtio-blk: read at sector {sector} failed: {e}");
                (S_IOERR, 0)
            }
        }
    }

    fn write(&mut self, mem: &GuestMemoryMmap, sector: u64) -> u8 {
        if self.disk.read_only() {
            return S_IOERR;
        }
        let len = self.readable_len.saturating_sub(HEADER_LEN);
        // The only writable byte must be the status.
        if self.writable_len != 1 || len % SECTOR_SIZE != 0 {
            log::debug!("virtio-blk: malformed write");
            return S_IOERR;
        }
        let Some(offset) = self.disk.byte_range(sector, len) else {
            log::debug!("virtio-blk: write of {len} bytes at sector {sector} beyond capacity");
            return S_IOERR;
        };
        if !stream_in_memory(mem, &self.readable, HEADER_LEN, len) {
            log::debug!("virtio-blk: write buffer outside guest memory");
            return S_IOERR;
        }
        let disk = &self.disk;
        let mut pos = offset;
        let result = for_each_range(&self.readable, HEADER_LEN, len, |addr, n| {
            for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
                let slice = slice.map_err(io::Error::other)?;
                disk.write_from_guest(&slice, pos)?;
                pos += slice.len() as u64;
            }
            Ok(())
        });
        match result {
            Ok(()) => S_OK,
            Err(e) => {
                log::error!("virtio-blk: write at sector {sector} failed: {e}");
                S_IOERR
            }
        }
    }

    fn get_id(&mut self, mem: &GuestMemoryMmap) -> (u8, u32) {
        let room = self.writable_len.saturating_sub(1);
        let n = room.min(ID_BYTES as u64) as usize;
        if n == 0 {
            return (S_IOERR, 0);
        }
        match write_stream(mem, &self.writable, 0, &self.disk.id()[..n]) {
            Ok(()) => (S_OK, n as u32),
            Err(e) => {
                log::debug!("virtio-blk: cannot write the id: {e}");
                (S_IOERR, 0)
            }
        }
    }

    /// DISCARD (`zero == false`) or WRITE_ZEROES. Every segment is checked
    /// before any is performed, so a bad request changes nothing.
    fn discard_or_zero(&mut self, mem: &GuestMemoryMmap, zero: bool) -> u8 {
        if self.disk.read_only() {
            return S_IOERR;
        }
        let payload = self.readable_len.saturating_sub(HEADER_LEN);
        let count = payload / DISCARD_SEGMENT_LEN;
        if self.writable_len != 1
            || payload == 0
            || payload % DISCARD_SEGMENT_LEN != 0
            || count > u64::from(MAX_DISCARD_SEGMENTS)
        {
            log::debug!("virtio-blk: malformed discard/write-zeroes ({payload} payload bytes)");
            return S_IOERR;
        }
        self.ranges.clear();
        let mut status = S_OK;
        for i in 0..count {
            let mut raw = [0u8; DISCARD_SEGMENT_LEN as usize];
            let at = HEADER_LEN + i * DISCARD_SEGMENT_LEN;
            if read_stream(mem, &self.readable, at, &mut raw).is_err() {
                return S_IOERR;
            }
            let [s @ .., n0, n1, n2, n3, f0, f1, f2, f3] = raw;
            let sector = u64::from_le_bytes(s);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // §5.2.6.2: unknown flags, and unmap on a discard, are UNSUPP;
            // that outranks range errors in other segments.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zero) {
                return S_UNSUPP;
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            match self.disk.byte_range(sector, len) {
                Some(offset) if sectors <= MAX_DISCARD_SECTORS => {
                    self.ranges.push(ByteRange { offset, len, unmap })
                }
                _ => status = S_IOERR,
            }
        }
        if status != S_OK {
            return status;
        }
        for r in &self.ranges {
            if r.len == 0 {
                continue;
            }
            let result = if zero {
                self.disk.write_zeroes(r.offset, r.len, r.unmap)
            } else {
                self.disk.discard(r.offset, r.len)
            };
            if let Err(e) = result {
                log::error!("virtio-blk: discard/write-zeroes failed: {e}");
                return S_IOERR;
            }
        }
        S_OK
    }
}

/// Calls `f(addr, len)` for each guest range that makes up bytes
/// `[start, start + len)` of the stream formed by `segs`.
fn for_each_range(
    segs: &[Segment],
    mut start: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> io::Result<()>,
) -> io::Result<()> {
    for seg in segs {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if start >= seg_len {
            start -= seg_len;
            continue;
        }
        let n = (seg_len - start).min(len);
        let addr = seg
            .addr
            .checked_add(start)
            .ok_or_else(|| io::Error::other("guest address overflow"))?;
        // n <= u32::MAX.
        f(addr, n as usize)?;
        start = 0;
        len -= n;
    }
    if len != 0 {
        return Err(io::Error::other("descriptor chain shorter than expected"));
    }
    Ok(())
}

/// Whether bytes `[start, start + len)` of the stream lie in guest RAM.
fn stream_in_memory(mem: &GuestMemoryMmap, segs: &[Segment], start: u64, len: u64) -> bool {
    for_each_range(segs, start, len, |addr, n| {
        if GuestMemoryBackend::check_range(mem, addr, n) {
            Ok(())
        } else {
            Err(io::Error::other("outside guest memory"))
        }
    })
    .is_ok()
}

fn read_stream(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    start: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut pos = 0usize;
    for_each_range(segs, start, buf.len() as u64, |addr, n| {
        let dst = buf
            .get_mut(pos..pos + n)
            .ok_or_else(|| io::Error::other("stream range"))?;
        mem.read_slice(dst, addr).map_err(io::Error::other)?;
        pos += n;
        Ok(())
    })
}

fn write_stream(mem: &GuestMemoryMmap, segs: &[Segment], start: u64, buf: &[u8]) -> io::Result<()> {
    let mut pos = 0usize;
    for_each_range(segs, start, buf.len() as u64, |addr, n| {
        let src = buf
            .get(pos..pos + n)
            .ok_or_else(|| io::Error::other("stream range"))?;
        mem.write_slice(src, addr).map_err(io::Error::other)?;
        pos += n;
        Ok(())
    })
}
