//! The disk image behind the blk target and what it should contain: a
//! shadow copy updated from the requests the device reported as done.

use std::fmt::Display;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtq::batch::{Batch, Completion};
use crate::virtq::walk::{read_stream, total, Desc};

/// Sector size.
pub const SECTOR: u64 = 512;
/// virtio-blk request types and status values.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device id.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;
/// Success.
pub const S_OK: u8 = 0;
/// Failure.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// A temporary image file and its expected contents.
pub struct Image {
    /// The file (removed by [`Image::opened`]).
    pub path: PathBuf,
    /// Kept open, so the contents can be read once the path is gone.
    file: std::fs::File,
    initial: Vec<u8>,
    shadow: Vec<u8>,
    /// Bytes whose content is known (discarded ranges are not).
    known: Vec<bool>,
    /// Capacity in sectors.
    pub capacity: u64,
    read_only: bool,
}

impl Image {
    /// Creates an image of `size` bytes with a recognisable pattern, in
    /// /dev/shm if there is one (no disk I/O on flush).
    pub fn create(size: usize, read_only: bool) -> Image {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let dir = ["/dev/shm"]
            .iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("trellis-fuzz-{}-{n}.img", std::process::id()));
        // Byte i of sector s is 7i + s (mod 256): a misplaced sector shows.
        let initial: Vec<u8> = (0..size).map(|i| (i * 7 + i / 512) as u8).collect();
        std::fs::write(&path, &initial).expect("create the disk image");
        let file = std::fs::File::open(&path).expect("open the disk image");
        Image {
            path,
            file,
            shadow: initial.clone(),
            known: vec![true; size],
            initial,
            capacity: size as u64 / SECTOR,
            read_only,
        }
    }

    /// The device has the image open: the name can go, so that a crash
    /// leaves no file behind.
    pub fn opened(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn contents(&self) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata().expect("image metadata").len();
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, 0)
            .expect("read the disk image");
        buf
    }

    /// Checks what holds whatever the device did: the size never changes,
    /// nor the bytes past the capacity, nor anything on a read-only disk.
    /// Returns the contents.
    fn check_bounds(&self, ctx: &dyn Display) -> Vec<u8> {
        let now = self.contents();
        assert_eq!(
            now.len(),
            self.initial.len(),
            "{ctx}: the disk image changed size"
        );
        let end = (self.capacity * SECTOR) as usize;
        assert!(
            now[end..] == self.initial[end..],
            "{ctx}: bytes past the capacity ({end}) changed"
        );
        if self.read_only && now != self.initial {
            let at = now.iter().zip(&self.initial).position(|(a, b)| a != b);
            panic!("{ctx}: read-only image changed at byte {at:?}");
        }
        now
    }

    /// After a batch: the bounds, then, for a clean batch, the requests
    /// the device completed replayed on the shadow and compared; after
    /// other batches the shadow is taken from the file.
    pub fn check(
        &mut self,
        mem: &GuestMemoryMmap,
        batch: &Batch,
        done: &[Completion],
        serial: Option<&[u8; ID_BYTES]>,
        ctx: &dyn Display,
    ) {
        if batch.clean {
            for c in done {
                if let Some((readable, writable)) = batch.walk(0, c.id).and_then(|w| w.split(mem)) {
                    self.replay(mem, &readable, &writable, c.len, serial, ctx);
                }
            }
        }
        let now = self.check_bounds(ctx);
        if !batch.clean {
            self.shadow = now;
            self.known.fill(true);
            return;
        }
        if now == self.shadow {
            return;
        }
        for (at, ((a, b), known)) in now.iter().zip(&self.shadow).zip(&self.known).enumerate() {
            assert!(
                !known || a == b,
                "{ctx}: image byte {at} is {a:#04x}, the completed requests say {b:#04x}"
            );
        }
    }

    /// `[sector, sector + len)` in bytes, checked against the capacity.
    fn range(&self, sector: u64, len: u64, what: &str, ctx: &dyn Display) -> usize {
        let end = sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(len))
            .filter(|&e| e <= self.capacity * SECTOR);
        assert!(
            end.is_some(),
            "{ctx}: {what} of {len} bytes at sector {sector} succeeded past the capacity of {} sectors",
            self.capacity
        );
        (sector * SECTOR) as usize
    }

    /// One well-formed chain the device completed with `len`.
    fn replay(
        &mut self,
        mem: &GuestMemoryMmap,
        readable: &[Desc],
        writable: &[Desc],
        len: u32,
        serial: Option<&[u8; ID_BYTES]>,
        ctx: &dyn Display,
    ) {
        let Some(last) = writable.last() else {
            assert_eq!(
                len, 0,
                "{ctx}: used length {len} for a chain without status"
            );
            return;
        };
        let status_at = last.addr + u64::from(last.len) - 1;
        let status: u8 = mem.read_obj(GuestAddress(status_at)).expect("in memory");
        assert!(
            matches!(status, S_OK | S_IOERR | S_UNSUPP),
            "{ctx}: status byte {status:#x} (used length {len})"
        );
        assert!(len >= 1, "{ctx}: status written but used length 0");
        let data_in = total(writable) - 1;
        if status != S_OK {
            assert_eq!(len, 1, "{ctx}: a failed request reports {len} bytes");
            return;
        }
        let header = read_stream(mem, readable, 16);
        assert_eq!(header.len(), 16, "{ctx}: request done without a header");
        let kind = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        let payload = total(readable) - 16;
        match kind {
            T_IN => {
                assert_eq!(u64::from(len), data_in + 1, "{ctx}: read length");
                let at = self.range(sector, data_in, "read", ctx);
                let data = read_stream(mem, writable, data_in as usize);
                for (i, byte) in data.iter().enumerate() {
                    assert!(
                        !self.known[at + i] || *byte == self.shadow[at + i],
                        "{ctx}: read of sector {sector} returned {byte:#04x} at byte {}, \
                         the image holds {:#04x}",
                        at + i,
                        self.shadow[at + i]
                    );
                }
            }
            T_OUT => {
                assert_eq!(len, 1, "{ctx}: write used length");
                let at = self.range(sector, payload, "write", ctx);
                let data = read_stream(mem, readable, (16 + payload) as usize);
                let n = payload as usize;
                self.shadow[at..at + n].copy_from_slice(&data[16..]);
                self.known[at..at + n].fill(true);
            }
            T_GET_ID => {
                let n = data_in.min(ID_BYTES as u64) as usize;
                assert_eq!(len as usize, n + 1, "{ctx}: GET_ID used length");
                if let Some(id) = serial {
                    let got = read_stream(mem, writable, n);
                    assert_eq!(got, id[..n], "{ctx}: GET_ID answer");
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                assert_eq!(len, 1, "{ctx}: discard used length");
                let bytes = read_stream(mem, readable, (16 + payload) as usize);
                for seg in bytes[16..].chunks_exact(16) {
                    let sector = u64::from_le_bytes(seg[..8].try_into().expect("8 bytes"));
                    let n = u64::from(u32::from_le_bytes(seg[8..12].try_into().expect("4")));
                    let at = self.range(sector, n * SECTOR, "discard/write-zeroes", ctx);
                    let end = at + (n * SECTOR) as usize;
                    if kind == T_WRITE_ZEROES {
                        self.shadow[at..end].fill(0);
                        self.known[at..end].fill(true);
                    } else {
                        self.known[at..end].fill(false);
                    }
                }
            }
            T_FLUSH => assert_eq!(len, 1, "{ctx}: flush used length"),
            other => panic!("{ctx}: request type {other} succeeded"),
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
