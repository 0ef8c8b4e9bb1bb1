//! A virtio-pci function driven by hand: capabilities read from config
//! space, the common configuration poked field by field, and split rings in
//! our own memory, so that actions can craft any descriptor or register
//! write. Also the "good request" of each device type, used as a probe after
//! every action and as a barrier after a hostile chain.

use super::mem::{self, desc, peek, poke, DATA, HDR, STATUS};
use super::{fmt, wait_ms, Res};
use crate::interrupts;
use crate::pci::Pci;
use crate::serial::{Dec, Hex};
use alloc::string::String;
use core::sync::atomic::{fence, Ordering};
use virtio_drivers::transport::pci::bus::DeviceFunction;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const VERSION_1: u64 = 1 << 32;
pub const INDIRECT_DESC: u64 = 1 << 28;
pub const EVENT_IDX: u64 = 1 << 29;
pub const RING_RESET: u64 = 1 << 40;

pub const ACK: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const NEEDS_RESET: u8 = 0x40;
pub const FAILED: u8 = 0x80;

/// Common configuration offsets (virtio 1.2, 4.1.4.3).
pub mod cc {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CONFIG_GEN: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOTIFY_OFF: u64 = 0x1e;
    pub const Q_DESC: u64 = 0x20;
    pub const Q_DRIVER: u64 = 0x28;
    pub const Q_DEVICE: u64 = 0x30;
    pub const Q_RESET: u64 = 0x3a;
}

/// virtio-blk request types and status values.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Written into status bytes and buffers before a request: a device that
/// did not write them leaves this.
pub const SENTINEL: u8 = 0xee;
/// The virtio-net header with VERSION_1 (num_buffers included).
pub const VNET_HDR_LEN: u32 = 12;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Default queue size for the actions (loops stop after this many steps).
pub const QSIZE: u16 = 16;
/// Descriptors 8.. of queue 0 are left to the barrier/probe request.
pub const GOOD_DESC: u16 = 8;
/// Slot of the barrier/probe request.
pub const GOOD_SLOT: u64 = 63;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Blk,
    Rng,
    Console,
    Net,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Blk => "blk",
            Kind::Rng => "rng",
            Kind::Console => "console",
            Kind::Net => "net",
        }
    }

    /// Queues the actions use.
    pub fn queues(self) -> usize {
        match self {
            Kind::Blk | Kind::Rng => 1,
            Kind::Console | Kind::Net => 2,
        }
    }

    /// The queue good requests go to (transmit for console and net).
    pub fn good_queue(self) -> u16 {
        match self {
            Kind::Blk | Kind::Rng => 0,
            Kind::Console | Kind::Net => 1,
        }
    }
}

/// One virtio-pci function under our control.
pub struct Dev {
    pub kind: Kind,
    pub df: DeviceFunction,
    /// BAR 0 as last programmed (every structure is in BAR 0 on trellis).
    pub bar: u64,
    pub common: u64,
    pub notify: u64,
    pub notify_mul: u32,
    pub isr: u64,
    pub devcfg: u64,
    pub msix_cap: u8,
    pub msix_table: u64,
    pub msix_pba: u64,
    pub msix_entries: u16,
    /// The PCI configuration access capability (cfg_type 5), 0 if none.
    pub cfg_cap: u8,
    pub num_queues: u16,
    /// IDT vector of MSI-X entry 0; entry e uses `vector_base + e`.
    pub vector_base: u8,
    pub ring_set: usize,
    pub sizes: [u16; 2],
    avail_idx: [u16; 2],
    last_used: [u16; 2],
    /// Capacity in sectors (blk).
    pub capacity: u64,
}

/// A capability structure in a BAR: (bar, offset).
fn cap_location(pci: &Pci, df: DeviceFunction, at: u8) -> (u8, u64) {
    let bar = pci.read(df, at + 4) as u8;
    (bar, u64::from(pci.read(df, at + 8)))
}

/// BAR 0 as the guest sees it (64-bit memory BAR).
pub fn read_bar0(pci: &Pci, df: DeviceFunction) -> u64 {
    let lo = u64::from(pci.read(df, 0x10) & !0xf);
    let hi = u64::from(pci.read(df, 0x14));
    (hi << 32) | lo
}

impl Dev {
    /// Enables the function, finds its structures and programs MSI-X entry
    /// e to IDT vector `vector_base + e` (queue q uses entry q, the
    /// configuration interrupt the entry after the last queue).
    pub fn open(
        pci: &mut Pci,
        df: DeviceFunction,
        kind: Kind,
        ring_set: usize,
        vector_base: u8,
        apic_id: u32,
    ) -> Result<Dev, String> {
        pci.setup_function(df, false)
            .map_err(|e| fmt!("setup: {}", e))?;
        let bar = read_bar0(pci, df);
        let mut dev = Dev {
            kind,
            df,
            bar,
            common: u64::MAX,
            notify: u64::MAX,
            notify_mul: 0,
            isr: u64::MAX,
            devcfg: u64::MAX,
            msix_cap: 0,
            msix_table: 0,
            msix_pba: 0,
            msix_entries: 0,
            cfg_cap: 0,
            num_queues: 0,
            vector_base,
            ring_set,
            sizes: [0; 2],
            avail_idx: [0; 2],
            last_used: [0; 2],
            capacity: 0,
        };
        let mut at = (pci.read(df, 0x34) & 0xfc) as u8;
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let header = pci.read(df, at);
            let next = ((header >> 8) & 0xfc) as u8;
            match (header & 0xff) as u8 {
                0x09 => {
                    let (bar_index, offset) = cap_location(pci, df, at);
                    let cfg_type = (header >> 24) as u8;
                    if bar_index != 0 && cfg_type != 5 {
                        return Err(fmt!(
                            "cfg_type {} in BAR {}",
                            Dec(cfg_type.into()),
                            Dec(bar_index.into())
                        ));
                    }
                    match cfg_type {
                        1 => dev.common = offset,
                        2 => {
                            dev.notify = offset;
                            dev.notify_mul = pci.read(df, at + 16);
                        }
                        3 => dev.isr = offset,
                        4 => dev.devcfg = offset,
                        5 => dev.cfg_cap = at,
                        _ => {}
                    }
                }
                0x11 => {
                    dev.msix_cap = at;
                    dev.msix_entries = ((header >> 16) & 0x7ff) as u16 + 1;
                    dev.msix_table = u64::from(pci.read(df, at + 4) & !7);
                    dev.msix_pba = u64::from(pci.read(df, at + 8) & !7);
                }
                _ => {}
            }
            at = next;
        }
        if dev.common == u64::MAX || dev.notify == u64::MAX || dev.msix_cap == 0 {
            return Err("missing common/notify/msix capability".into());
        }
        let vectors: [u8; 8] = core::array::from_fn(|i| vector_base + i as u8);
        let entries = usize::from(dev.msix_entries).min(vectors.len());
        pci.enable_msix(df, &vectors[..entries], apic_id)
            .map_err(|e| fmt!("msix: {}", e))?;
        dev.num_queues = dev.r16(cc::NUM_QUEUES);
        if kind == Kind::Blk && dev.devcfg != u64::MAX {
            dev.capacity = peek::<u64>(dev.bar + dev.devcfg);
        }
        Ok(dev)
    }

    // Common configuration, by offset.
    pub fn r8(&self, off: u64) -> u8 {
        peek(self.bar + self.common + off)
    }
    pub fn r16(&self, off: u64) -> u16 {
        peek(self.bar + self.common + off)
    }
    pub fn r32(&self, off: u64) -> u32 {
        peek(self.bar + self.common + off)
    }
    pub fn r64(&self, off: u64) -> u64 {
        peek(self.bar + self.common + off)
    }
    pub fn w8(&self, off: u64, v: u8) {
        poke(self.bar + self.common + off, v)
    }
    pub fn w16(&self, off: u64, v: u16) {
        poke(self.bar + self.common + off, v)
    }
    pub fn w32(&self, off: u64, v: u32) {
        poke(self.bar + self.common + off, v)
    }
    pub fn w64(&self, off: u64, v: u64) {
        poke(self.bar + self.common + off, v)
    }

    pub fn status(&self) -> u8 {
        self.r8(cc::STATUS)
    }

    /// Entry used for configuration interrupts.
    pub fn config_entry(&self) -> u16 {
        self.num_queues
    }

    /// IDT vector of MSI-X entry `entry`.
    pub fn vector(&self, entry: u16) -> u8 {
        self.vector_base + entry as u8
    }

    /// Address of MSI-X table entry `entry`.
    pub fn msix_entry(&self, entry: u16) -> u64 {
        self.bar + self.msix_table + 16 * u64::from(entry)
    }

    /// Writes 0 to device_status; the reset is complete when it reads 0.
    pub fn reset(&mut self) -> Res {
        self.w8(cc::STATUS, 0);
        if !wait_ms(500, || self.status() == 0) {
            return Err(fmt!(
                "status reads {} after reset",
                Hex(self.status().into())
            ));
        }
        self.avail_idx = [0; 2];
        self.last_used = [0; 2];
        Ok(String::new())
    }

    /// ACKNOWLEDGE, DRIVER, features `want` (plus VERSION_1) as far as
    /// offered, FEATURES_OK, and msix_config set to the config entry.
    pub fn negotiate(&mut self, want: u64) -> Result<u64, String> {
        self.w8(cc::STATUS, ACK);
        self.w8(cc::STATUS, ACK | DRIVER);
        let offered = self.device_features();
        let features = (want | VERSION_1) & offered;
        self.set_driver_features(features);
        self.w8(cc::STATUS, ACK | DRIVER | FEATURES_OK);
        if self.status() & FEATURES_OK == 0 {
            return Err(fmt!("FEATURES_OK refused for {}", Hex(features)));
        }
        self.w16(cc::MSIX_CONFIG, self.config_entry());
        Ok(features)
    }

    pub fn device_features(&self) -> u64 {
        self.w32(cc::DFSELECT, 0);
        let lo = u64::from(self.r32(cc::DF));
        self.w32(cc::DFSELECT, 1);
        lo | (u64::from(self.r32(cc::DF)) << 32)
    }

    pub fn set_driver_features(&self, features: u64) {
        self.w32(cc::GFSELECT, 0);
        self.w32(cc::GF, features as u32);
        self.w32(cc::GFSELECT, 1);
        self.w32(cc::GF, (features >> 32) as u32);
    }

    /// Ring addresses of queue `q`: (descriptor table, avail, used).
    pub fn rings(&self, q: u16) -> (u64, u64, u64) {
        mem::ring_set(self.ring_set + usize::from(q))
    }

    /// Programs queue `q` with `size` entries in our ring memory (zeroed)
    /// and MSI-X entry q, and enables it.
    pub fn setup_queue(&mut self, q: u16, size: u16) -> Res {
        let (d, a, u) = self.rings(q);
        self.setup_queue_at(q, size, (d, a, u))
    }

    /// `setup_queue` with the rings at `rings` (inside our ring memory).
    pub fn setup_queue_at(&mut self, q: u16, size: u16, rings: (u64, u64, u64)) -> Res {
        assert!(usize::from(q) < self.kind.queues() && size <= mem::MAX_QSIZE);
        self.w16(cc::Q_SELECT, q);
        let max = self.r16(cc::Q_SIZE);
        if max < size {
            return Err(fmt!("queue {} max size {}", Dec(q.into()), Dec(max.into())));
        }
        let (d, a, u) = rings;
        mem::fill(d, 16 * u64::from(size), 0);
        mem::fill(a, 8 + 2 * u64::from(size), 0);
        mem::fill(u, 8 + 8 * u64::from(size), 0);
        self.w16(cc::Q_SIZE, size);
        self.w16(cc::Q_MSIX, q);
        if self.r16(cc::Q_MSIX) != q {
            return Err(fmt!("queue {} vector refused", Dec(q.into())));
        }
        self.w64(cc::Q_DESC, d);
        self.w64(cc::Q_DRIVER, a);
        self.w64(cc::Q_DEVICE, u);
        self.w16(cc::Q_ENABLE, 1);
        if self.r16(cc::Q_ENABLE) != 1 {
            return Err(fmt!("queue {} not enabled", Dec(q.into())));
        }
        self.sizes[usize::from(q)] = size;
        self.avail_idx[usize::from(q)] = 0;
        self.last_used[usize::from(q)] = 0;
        Ok(String::new())
    }

    pub fn driver_ok(&mut self) -> Res {
        let status = self.status();
        self.w8(cc::STATUS, status | DRIVER_OK);
        let now = self.status();
        if now & DRIVER_OK == 0 || now & NEEDS_RESET != 0 {
            return Err(fmt!("DRIVER_OK gave status {}", Hex(now.into())));
        }
        Ok(String::new())
    }

    /// Reset, negotiation, every queue with `size` entries, DRIVER_OK.
    pub fn init(&mut self, want: u64, size: u16) -> Res {
        self.reset()?;
        self.negotiate(want)?;
        for q in 0..self.kind.queues() as u16 {
            self.setup_queue(q, size)?;
        }
        self.driver_ok()
    }

    /// Writes descriptor `index` of queue `q`.
    pub fn desc(&self, q: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        desc(self.rings(q).0, index, addr, len, flags, next);
    }

    /// Makes chain `head` available (no notification).
    pub fn push(&mut self, q: u16, head: u16) {
        let qi = usize::from(q);
        let (_, avail, _) = self.rings(q);
        let idx = self.avail_idx[qi];
        let size = self.sizes[qi].max(1);
        poke(avail + 4 + 2 * u64::from(idx % size), head);
        fence(Ordering::SeqCst);
        self.avail_idx[qi] = idx.wrapping_add(1);
        poke(avail + 2, self.avail_idx[qi]);
        fence(Ordering::SeqCst);
    }

    /// Writes avail.flags (VIRTQ_AVAIL_F_NO_INTERRUPT is bit 0).
    pub fn set_avail_flags(&self, q: u16, flags: u16) {
        poke(self.rings(q).1, flags);
    }

    /// Writes used_event (after the available ring; VIRTIO_F_EVENT_IDX).
    pub fn set_used_event(&self, q: u16, idx: u16) {
        let size = u64::from(self.sizes[usize::from(q)]);
        poke(self.rings(q).1 + 4 + 2 * size, idx);
        fence(Ordering::SeqCst);
    }

    /// Used elements seen so far (the driver's last_used).
    pub fn last_used(&self, q: u16) -> u16 {
        self.last_used[usize::from(q)]
    }

    /// Writes avail.idx directly (hostile index jumps).
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) {
        poke(self.rings(q).1 + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// The queue's notification address.
    pub fn notify_addr(&self, q: u16) -> u64 {
        self.bar + self.notify + u64::from(q) * u64::from(self.notify_mul)
    }

    pub fn kick(&self, q: u16) {
        poke(self.notify_addr(q), q);
    }

    pub fn used_idx(&self, q: u16) -> u16 {
        peek(self.rings(q).2 + 2)
    }

    /// Used elements not consumed yet.
    pub fn pending_used(&self, q: u16) -> u16 {
        self.used_idx(q)
            .wrapping_sub(self.last_used[usize::from(q)])
    }

    /// Waits up to `ms` for the next used element of `q`: (id, len).
    pub fn wait_used(&mut self, q: u16, ms: u64) -> Option<(u32, u32)> {
        let qi = usize::from(q);
        if !wait_ms(ms, || self.pending_used(q) != 0) {
            return None;
        }
        fence(Ordering::SeqCst);
        let (_, _, used) = self.rings(q);
        let slot = self.last_used[qi] % self.sizes[qi].max(1);
        let at = used + 4 + 8 * u64::from(slot);
        self.last_used[qi] = self.last_used[qi].wrapping_add(1);
        Some((peek::<u32>(at), peek::<u32>(at + 4)))
    }

    /// Like `wait_used`, but an error naming the queue on time-out.
    pub fn expect_used(&mut self, q: u16, ms: u64) -> Result<(u32, u32), String> {
        self.wait_used(q, ms).ok_or_else(|| {
            fmt!(
                "no completion on queue {} (status {})",
                Dec(q.into()),
                Hex(self.status().into())
            )
        })
    }

    /// Reads the ISR status (which clears it).
    pub fn read_isr(&self) -> u8 {
        peek(self.bar + self.isr)
    }

    /// Makes a good request of this device type available on descriptors
    /// GOOD_DESC.. of its good queue (no notification).
    pub fn queue_good(&mut self) {
        let q = self.kind.good_queue();
        let d = GOOD_DESC;
        let data = mem::slot(DATA, GOOD_SLOT);
        match self.kind {
            Kind::Blk => {
                blk_header(GOOD_SLOT, T_IN, 0);
                let status = mem::slot(STATUS, GOOD_SLOT);
                mem::fill(data, 512, SENTINEL);
                poke(status, SENTINEL);
                self.desc(q, d, mem::slot(HDR, GOOD_SLOT), 16, F_NEXT, d + 1);
                self.desc(q, d + 1, data, 512, F_WRITE | F_NEXT, d + 2);
                self.desc(q, d + 2, status, 1, F_WRITE, 0);
            }
            Kind::Rng => {
                mem::fill(data, 512, 0);
                self.desc(q, d, data, 16, F_WRITE, 0);
            }
            Kind::Console => {
                mem::write_bytes(data, b"hostile-console-probe\n");
                self.desc(q, d, data, 22, 0, 0);
            }
            Kind::Net => {
                // A zero vnet header, then a broadcast frame of EtherType
                // 0x88b5 from a locally administered address.
                mem::fill(data, 512, 0);
                let frame = data + u64::from(VNET_HDR_LEN);
                mem::write_bytes(frame, &[0xff; 6]);
                mem::write_bytes(frame + 6, &[0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5]);
                mem::write_bytes(frame + 14, b"TRELLIS-HOSTILE");
                self.desc(q, d, data, VNET_HDR_LEN + 60, 0, 0);
            }
        }
        self.push(q, d);
    }

    /// Waits for the request of `queue_good` and checks its completion.
    pub fn check_good(&mut self) -> Res {
        let q = self.kind.good_queue();
        let (id, len) = self.expect_used(q, 2000)?;
        if id != u32::from(GOOD_DESC) {
            return Err(fmt!(
                "good request: used id {} (want {})",
                Dec(id.into()),
                Dec(GOOD_DESC.into())
            ));
        }
        let want = match self.kind {
            Kind::Blk => 513,
            Kind::Rng => 16,
            Kind::Console | Kind::Net => 0,
        };
        if len != want {
            return Err(fmt!(
                "good request: used len {} (want {})",
                Dec(len.into()),
                Dec(want.into())
            ));
        }
        if self.kind == Kind::Blk {
            let status = peek::<u8>(mem::slot(STATUS, GOOD_SLOT));
            if status != S_OK || !mem::starts_with(mem::slot(DATA, GOOD_SLOT), b"TRELLIS-DISK") {
                return Err(fmt!(
                    "good read: status {} or data wrong",
                    Hex(status.into())
                ));
            }
        }
        Ok(String::new())
    }

    /// A good request on the running device: queued, notified, checked.
    /// After a hostile chain it doubles as a barrier: the device serves a
    /// queue in order, so the hostile chain was handled before it.
    pub fn good_request(&mut self) -> Res {
        self.queue_good();
        self.kick(self.kind.good_queue());
        self.check_good()
    }

    /// Reset, init, good request, and its MSI-X interrupt: the device is
    /// usable after whatever happened before.
    pub fn probe(&mut self) -> Res {
        self.init(INDIRECT_DESC, QSIZE)?;
        let vector = self.vector(self.kind.good_queue());
        let before = interrupts::count(vector);
        self.good_request()?;
        if !wait_ms(500, || interrupts::count(vector) != before) {
            return Err(fmt!("no interrupt on vector {}", Hex(vector.into())));
        }
        Ok(String::new())
    }

    /// Writes MSI-X message control (16 bits at cap + 2) through config space.
    pub fn set_msix_control(&self, pci: &mut Pci, control: u16) {
        let header = pci.read(self.df, self.msix_cap) & 0xffff;
        pci.write(self.df, self.msix_cap, header | (u32::from(control) << 16));
    }

    /// Programs MSI-X entry `entry` as `Dev::open` did (unmasked).
    pub fn restore_msix_entry(&self, entry: u16, apic_id: u32) {
        let at = self.msix_entry(entry);
        poke::<u32>(at, 0xfee0_0000 | ((apic_id & 0xff) << 12));
        poke::<u32>(at + 4, 0);
        poke::<u32>(at + 8, self.vector(entry).into());
        poke::<u32>(at + 12, 0);
    }
}

/// Writes a blk request header into slot `slot`.
pub fn blk_header(slot: u64, request_type: u32, sector: u64) {
    let at = mem::slot(HDR, slot);
    poke(at, request_type);
    poke(at + 4, 0u32);
    poke(at + 8, sector);
}
