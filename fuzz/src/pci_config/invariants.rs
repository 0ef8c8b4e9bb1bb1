//! The invariants checked after every step. Each failure panics with what
//! broke and the step that broke it.

use devices::{BusDevice, BusRange};
use pci::interrupt::InterruptEvent;
use pci::{
    MsiMessage, PciBarRegionType, PciBdf, PciCapabilityId, EXTENDED_CONFIG_SPACE_SIZE,
    LEGACY_CONFIG_SPACE_SIZE, PCI_CONFIG_IO_PORT, ROM_BAR_INDEX,
};

use super::device::{
    VendorCapability, BARS, DEVICE_ID, INTERRUPT_PIN, MSIX_BAR, MSIX_PBA_OFFSET, MSIX_VECTORS,
    MSI_VECTORS_LOG2, PROG_IF, REVISION_ID, SUBCLASS, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use super::harness::{
    bar_address_bits, bar_reg, describe, dev, Delivery, Effect, Harness, Snapshot,
    CONFIG_ADDRESS_MASK,
};
use super::ops::{config_address, ecam_offset};
use super::vmm::{address_limit, lock, reserved_ranges};

fn u16_at(s: &Snapshot, at: usize) -> u16 {
    u16::from_le_bytes([s[at], s[at + 1]])
}

fn u32_at(s: &Snapshot, at: usize) -> u32 {
    u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]])
}

/// Functions that do not exist and must read as all ones.
fn absent() -> [PciBdf; 4] {
    [
        PciBdf::new(0, 2, 0),
        PciBdf::new(0, 1, 1),
        PciBdf::new(1, 0, 0),
        PciBdf::new(0, 31, 7),
    ]
}

/// Walks a capability list with `read(offset)` returning the dword there,
/// checking it is acyclic, dword aligned and inside 0x40..0x100.
fn walk_chain(mut read: impl FnMut(u8) -> u32) -> Result<Vec<(u8, usize)>, String> {
    let mut seen = [false; LEGACY_CONFIG_SPACE_SIZE / 4];
    let mut chain = Vec::new();
    let mut at = usize::from(read(0x34) as u8);
    while at != 0 {
        if at % 4 != 0 || !(0x40..LEGACY_CONFIG_SPACE_SIZE).contains(&at) {
            return Err(format!("capability at {at:#x} after {chain:x?}"));
        }
        if std::mem::replace(&mut seen[at / 4], true) {
            return Err(format!("cycle back to {at:#x} after {chain:x?}"));
        }
        let header = read(at as u8);
        chain.push((header as u8, at));
        at = usize::from((header >> 8) as u8);
    }
    Ok(chain)
}

impl Harness {
    /// Checks the state right after construction.
    pub fn check_initial(&mut self) {
        self.check(&Effect::None);
    }

    /// Checks everything after a step that had `effect`.
    pub(super) fn check(&mut self, effect: &Effect) {
        let cur = self.snapshot(dev());
        self.check_header(&cur);
        self.check_read_only(&cur, effect);
        self.check_capability_chain();
        self.check_capability_fields(&cur);
        self.check_bars(&cur);
        self.check_relocation(&cur);
        self.check_msix(&cur, effect);
        self.check_msi(&cur, effect);
        self.check_other_functions();
        self.prev = cur;
    }

    /// Checks that only need doing once, at the end of an input.
    pub fn check_final(&mut self) {
        self.step = None;
        // No extended capabilities and nothing writable above 256 bytes.
        for at in (LEGACY_CONFIG_SPACE_SIZE..EXTENDED_CONFIG_SPACE_SIZE).step_by(4) {
            let mut d = [0u8; 4];
            self.ecam.read(0, ecam_offset(dev(), at as u64), &mut d);
            assert_eq!(d, [0; 4], "at the end: extended config dword {at:#x}");
        }
        // The host bridge: only the header's writable bits may differ, and
        // its space ends at 256 bytes.
        let host = PciBdf::new(0, 0, 0);
        let now = self.snapshot(host);
        for (at, (a, b)) in self.host_initial.iter().zip(now.iter()).enumerate() {
            let writable = match at {
                0x04 => 0x47,
                0x05 => 0x05,
                0x0c | 0x3c => 0xff,
                _ => 0,
            };
            assert_eq!(
                (a ^ b) & !writable,
                0,
                "at the end: host bridge byte {at:#x} went from {a:#x} to {b:#x}"
            );
        }
        let mut d = [0u8; 4];
        self.ecam.read(0, ecam_offset(host, 0x100), &mut d);
        assert_eq!(
            d, [0xff; 4],
            "at the end: host bridge has no extended space"
        );
    }

    fn check_header(&self, cur: &Snapshot) {
        let expect = |what: &str, got: u32, want: u32| {
            assert_eq!(
                got,
                want,
                "{}: {what} is {got:#x}, expected {want:#x}",
                self.ctx()
            );
        };
        expect(
            "vendor/device ID",
            u32_at(cur, 0),
            u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID),
        );
        expect(
            "class/revision",
            u32_at(cur, 8),
            0x02 << 24
                | u32::from(SUBCLASS) << 16
                | u32::from(PROG_IF) << 8
                | u32::from(REVISION_ID),
        );
        // Latency timer, header type (type 0, single function) and BIST.
        expect("header type dword", u32_at(cur, 0x0c) & !0xff, 0);
        expect(
            "subsystem IDs",
            u32_at(cur, 0x2c),
            u32::from(SUBSYSTEM_ID) << 16 | u32::from(SUBSYSTEM_VENDOR_ID),
        );
        expect("CardBus CIS pointer", u32_at(cur, 0x28), 0);
        expect(
            "capability pointer dword",
            u32_at(cur, 0x34),
            self.caps.pcie as u32,
        );
        expect("reserved dword 0x38", u32_at(cur, 0x38), 0);
        expect(
            "interrupt pin, min grant, max latency",
            u32_at(cur, 0x3c) >> 8,
            u32::from(INTERRUPT_PIN),
        );
        expect(
            "reserved command bits",
            u32::from(u16_at(cur, 4) & !0x0547),
            0,
        );
        // Capability list bit set; nothing else can be set: the RW1C error
        // bits start clear and the device never raises INTx.
        expect("status", u32::from(u16_at(cur, 6)), 0x0010);
    }

    /// Read-only bits never change; after a write, the written writable bits
    /// hold what was written and nothing else moved.
    fn check_read_only(&self, cur: &Snapshot, effect: &Effect) {
        let m = &self.masks;
        for at in 0..LEGACY_CONFIG_SPACE_SIZE {
            let changeable = m.writable[at] | m.special[at];
            let (was, now) = (self.initial[at], cur[at]);
            assert_eq!(
                (was ^ now) & !changeable,
                0,
                "{}: read-only bits of byte {at:#x} changed from {was:#04x} to {now:#04x}",
                self.ctx()
            );
            let prev = self.prev[at];
            let expected = match effect {
                Effect::ConfigWrite { start, data, .. }
                    if (*start..start + data.len()).contains(&at) =>
                {
                    (prev & !m.writable[at]) | (data[at - start] & m.writable[at])
                }
                _ => prev,
            };
            assert_eq!(
                (now ^ expected) & !m.special[at],
                0,
                "{}: byte {at:#x} is {now:#04x}, expected {expected:#04x} (was {prev:#04x})",
                self.ctx()
            );
        }
        if let Effect::ConfigWrite {
            start,
            data,
            beyond,
        } = effect
        {
            let end = start + data.len();
            if !beyond.is_empty() {
                let from = (*start).max(LEGACY_CONFIG_SPACE_SIZE);
                let now = self.bytewise(dev(), from as u64, end - from);
                assert_eq!(
                    &now,
                    beyond,
                    "{}: bytes {from:#x}..{end:#x} of the extended space changed",
                    self.ctx()
                );
            }
        }
    }

    fn check_capability_chain(&mut self) {
        let expected: Vec<(u8, usize)> = self.caps.chain().to_vec();
        let io = &mut self.probe_io;
        // Mechanism #1, a byte at a time through the data port lanes.
        let by_io = walk_chain(|reg| {
            io.write(
                PCI_CONFIG_IO_PORT,
                0,
                &config_address(dev(), reg).to_le_bytes(),
            );
            let mut d = [0u8; 4];
            for lane in 0..4 {
                io.read(PCI_CONFIG_IO_PORT, 4 + lane, &mut d[lane as usize..][..1]);
            }
            u32::from_le_bytes(d)
        });
        let ecam = &mut self.ecam;
        let by_ecam = walk_chain(|reg| {
            let mut d = [0u8; 4];
            ecam.read(0, ecam_offset(dev(), u64::from(reg)), &mut d);
            u32::from_le_bytes(d)
        });
        for (how, chain) in [("mechanism #1", by_io), ("ECAM", by_ecam)] {
            assert_eq!(
                chain.as_ref(),
                Ok(&expected),
                "{}: capability chain through {how}",
                self.ctx()
            );
        }
        let device = lock(&self.device);
        let config = device.config();
        let offsets: Vec<usize> = config.capabilities().iter().map(|c| c.0).collect();
        let want: Vec<usize> = expected.iter().map(|c| c.1).collect();
        assert_eq!(
            offsets,
            want,
            "{}: PciConfiguration::capabilities",
            self.ctx()
        );
        for (id, at) in expected {
            let id = PciCapabilityId::from_u8(id).expect("known ID");
            assert_eq!(
                config.find_capability(id),
                Some(at),
                "{}: find_capability({id:?})",
                self.ctx()
            );
        }
    }

    fn check_capability_fields(&self, cur: &Snapshot) {
        let expect = |what: &str, got: u32, want: u32| {
            assert_eq!(
                got,
                want,
                "{}: {what} is {got:#x}, expected {want:#x}",
                self.ctx()
            );
        };
        let p = self.caps.pcie;
        // Version 2, endpoint.
        expect(
            "PCIe capabilities register",
            u32::from(u16_at(cur, p + 2)),
            0x0002,
        );
        expect(
            "PCIe device capabilities (RBER, FLR)",
            u32_at(cur, p + 4),
            1 << 15 | 1 << 28,
        );
        expect("PCIe link capabilities", u32_at(cur, p + 0x0c), 0x11);
        let x = self.caps.msix;
        expect(
            "MSI-X table size and reserved bits",
            u32::from(u16_at(cur, x + 2) & 0x3fff),
            u32::from(MSIX_VECTORS - 1),
        );
        expect(
            "MSI-X table offset/BIR",
            u32_at(cur, x + 4),
            MSIX_BAR as u32,
        );
        expect(
            "MSI-X PBA offset/BIR",
            u32_at(cur, x + 8),
            MSIX_PBA_OFFSET | MSIX_BAR as u32,
        );
        // Multiple message capable, 64-bit, per-vector masking.
        expect(
            "MSI capable bits",
            u32::from(u16_at(cur, self.caps.msi + 2) & !0x0071),
            u32::from(MSI_VECTORS_LOG2) << 1 | 1 << 7 | 1 << 8,
        );
        expect(
            "vendor capability length",
            u32::from(cur[self.caps.vendor + 2]),
            VendorCapability::SIZE as u32,
        );
    }

    /// BAR registers decode to an address aligned to the BAR size, the same
    /// one `bar_address` reports, with fixed type bits.
    fn check_bars(&self, cur: &Snapshot) {
        let device = lock(&self.device);
        let config = device.config();
        for spec in BARS {
            let reg = bar_reg(spec.index);
            let lo = u32_at(cur, reg);
            let (addr, type_bits, want_type) = match spec.region {
                _ if spec.index == ROM_BAR_INDEX => (u64::from(lo & 0xffff_f800), lo & 0x7fe, 0),
                PciBarRegionType::IoRegion => (u64::from(lo & !0x3), lo & 0x3, 0x1),
                PciBarRegionType::Memory32BitRegion => (
                    u64::from(lo & !0xf),
                    lo & 0xf,
                    u32::from(spec.prefetchable) << 3,
                ),
                PciBarRegionType::Memory64BitRegion => (
                    u64::from(u32_at(cur, reg + 4)) << 32 | u64::from(lo & !0xf),
                    lo & 0xf,
                    0x4 | u32::from(spec.prefetchable) << 3,
                ),
            };
            let i = spec.index;
            assert_eq!(
                type_bits,
                want_type,
                "{}: BAR {i} type bits ({lo:#x})",
                self.ctx()
            );
            assert_eq!(
                config.bar_address(i),
                Some(addr),
                "{}: BAR {i} bar_address vs config space",
                self.ctx()
            );
            assert_eq!(
                addr % spec.size,
                0,
                "{}: BAR {i} at {addr:#x} not aligned to its size {:#x}",
                self.ctx(),
                spec.size
            );
            assert_eq!(
                config.bar_size(i),
                Some(spec.size),
                "{}: BAR {i} size",
                self.ctx()
            );
            assert_eq!(
                config.bar_region_type(i),
                Some(spec.region),
                "{}: BAR {i} region",
                self.ctx()
            );
        }
        // The upper halves of 64-bit BARs are not BARs of their own.
        for upper in [1, 5] {
            assert_eq!(
                config.bar_address(upper),
                None,
                "{}: BAR {upper}",
                self.ctx()
            );
        }
    }

    /// The device, the VMM model and its buses agree on where each BAR is
    /// mapped; mapped ranges never overlap; a decoded BAR that is not being
    /// sized is where it is mapped.
    fn check_relocation(&self, cur: &Snapshot) {
        let mappings = self.vmm.mappings();
        let accepted = self.vmm.take_accepted();
        let command = u16_at(cur, 4);
        let device = lock(&self.device);
        let config = device.config();
        for spec in BARS {
            let i = spec.index;
            let m = mappings
                .iter()
                .find(|(index, _)| *index == i)
                .map(|(_, m)| *m)
                .expect("every BAR is mapped");
            assert_eq!(
                config.bar_mapped_address(i),
                Some(m.base),
                "{}: BAR {i}: pci's mapped address vs the VMM's {m:x?}",
                self.ctx()
            );
            if let Some(last) = accepted.iter().rev().find(|p| p.bar_index == i) {
                assert_eq!(last.new_base, m.base, "{}: BAR {i} last move", self.ctx());
            }
            assert!(
                m.end() <= address_limit(m.region),
                "{}: BAR {i} mapped outside its space: {m:x?}",
                self.ctx()
            );
            for r in reserved_ranges(m.region) {
                assert!(
                    !r.overlaps(m.base, m.len),
                    "{}: BAR {i} at {m:x?} overlaps {r:x?}",
                    self.ctx()
                );
            }
            for (j, other) in &mappings {
                assert!(
                    *j == i || other.is_io() != m.is_io() || !other.overlaps(m.base, m.len),
                    "{}: BARs {i} ({m:x?}) and {j} ({other:x?}) overlap",
                    self.ctx()
                );
            }
            assert_eq!(
                self.vmm.bus(m.region).range_of(m.base),
                Some(BusRange {
                    base: m.base,
                    len: m.len
                }),
                "{}: bus range of BAR {i}",
                self.ctx()
            );

            let reg = bar_reg(i);
            let (lo_bits, hi_bits) = bar_address_bits(&spec);
            let all_ones = |value: u32, bits: u32| bits != 0 && value & bits == bits;
            let sizing = all_ones(u32_at(cur, reg), lo_bits)
                || hi_bits.is_some_and(|bits| all_ones(u32_at(cur, reg + 4), bits));
            let decoding = match spec.region {
                PciBarRegionType::IoRegion => command & 0x1 != 0,
                _ if i == ROM_BAR_INDEX => command & 0x2 != 0 && cur[reg] & 0x1 != 0,
                _ => command & 0x2 != 0,
            };
            if decoding && !sizing {
                assert_eq!(
                    config.bar_address(i),
                    Some(m.base),
                    "{}: BAR {i} is decoded at an address other than where it is mapped",
                    self.ctx()
                );
            }
        }
    }

    fn check_msix(&mut self, cur: &Snapshot, effect: &Effect) {
        let ctl = u16_at(cur, self.caps.msix + 2);
        let (enabled, fmask) = (ctl & 0x8000 != 0, ctl & 0x4000 != 0);
        let mut triggered = Vec::new();
        let device = lock(&self.device);
        let msix = device.msix();
        assert_eq!(
            (msix.enabled(), msix.function_masked()),
            (enabled, fmask),
            "{}: MsixConfig (enable, function mask) vs message control {ctl:#06x}",
            self.ctx()
        );
        assert_eq!(msix.vector_count(), MSIX_VECTORS, "{}", self.ctx());
        for event in self.msix_group.take_events() {
            let index = match event {
                InterruptEvent::Triggered(v) => v,
                InterruptEvent::Updated { index, .. } => index,
            };
            assert!(
                index < MSIX_VECTORS,
                "{}: MSI-X group got {event:?}, beyond {MSIX_VECTORS} vectors",
                self.ctx()
            );
            match event {
                InterruptEvent::Triggered(v) => triggered.push(v),
                InterruptEvent::Updated { index, msg, masked } => {
                    self.msix_routes[usize::from(index)] = (msg, masked);
                }
            }
        }
        let mut pba = [0u64; 2];
        for v in 0..MSIX_VECTORS {
            let entry = msix.entry(v).expect("vector exists");
            let masked = entry.masked() || fmask || !enabled;
            let pending = msix.pending(v);
            let was_pending = std::mem::replace(&mut self.msix_pending[usize::from(v)], pending);
            let fired = triggered.iter().filter(|t| **t == v).count();
            pba[usize::from(v / 64)] |= u64::from(pending) << (v % 64);
            assert_eq!(
                self.msix_routes[usize::from(v)],
                (entry.message(), masked),
                "{}: the group's route for MSI-X vector {v} is stale ({entry:x?})",
                self.ctx()
            );
            assert!(
                entry.msg_addr_lo & 0x3 == 0 && entry.vector_ctl & !0x1 == 0,
                "{}: MSI-X entry {v} holds read-only-zero bits: {entry:x?}",
                self.ctx()
            );
            assert!(
                !pending || masked,
                "{}: MSI-X vector {v} is pending but deliverable (it should have fired)",
                self.ctx()
            );
            assert!(
                fired == 0 || !masked,
                "{}: MSI-X vector {v} fired but is masked",
                self.ctx()
            );
            let raised = |d: Delivery| {
                *effect
                    == Effect::MsixTrigger {
                        vector: v,
                        delivery: d,
                    }
            };
            let expected_fires =
                usize::from(raised(Delivery::Deliverable)) + usize::from(was_pending && !pending);
            assert_eq!(
                fired,
                expected_fires,
                "{}: MSI-X vector {v} fired {fired} times (pending {was_pending} -> {pending})",
                self.ctx()
            );
            assert!(
                was_pending || !pending || raised(Delivery::Masked),
                "{}: MSI-X vector {v} became pending without being raised while masked",
                self.ctx()
            );
            if raised(Delivery::Masked) {
                assert!(
                    pending,
                    "{}: masked MSI-X vector {v} not pending",
                    self.ctx()
                );
            }
        }
        assert!(
            !msix.pending(MSIX_VECTORS) && msix.entry(MSIX_VECTORS).is_none(),
            "{}: MSI-X vector past the table",
            self.ctx()
        );
        drop(device);

        // The PBA as the guest reads it through BAR 0.
        let base = self.vmm.mapping(MSIX_BAR).expect("mapped").base;
        for (i, want) in pba.iter().enumerate() {
            let mut d = [0u8; 8];
            let addr = base + u64::from(MSIX_PBA_OFFSET) + 8 * i as u64;
            let result = self.vmm.bus(BARS[0].region).read(addr, &mut d);
            assert!(result.is_ok(), "{}: PBA read: {result:?}", self.ctx());
            assert_eq!(
                u64::from_le_bytes(d),
                *want,
                "{}: PBA qword {i} through the BAR",
                self.ctx()
            );
        }
    }

    fn check_msi(&mut self, cur: &Snapshot, effect: &Effect) {
        let at = self.caps.msi;
        let device = lock(&self.device);
        let msi = device.msi();
        let layout = msi.layout();
        let ctl = u16_at(cur, at + layout.message_control);
        let enabled = ctl & 1 != 0;
        let log2 = ((ctl >> 4) & 0x7).min(u16::from(MSI_VECTORS_LOG2));
        let count = if enabled { 1u16 << log2 } else { 0 };
        let address = u64::from(u32_at(cur, at + layout.address_hi.expect("64-bit"))) << 32
            | u64::from(u32_at(cur, at + layout.address_lo) & !0x3);
        let data = u16_at(cur, at + layout.data);
        let mask = u32_at(cur, at + layout.mask_bits.expect("maskable"));
        let pending = u32_at(cur, at + layout.pending_bits.expect("maskable"));
        let step = self.step;
        assert_eq!(
            (msi.enabled(), msi.num_enabled_vectors(), msi.mask_bits()),
            (enabled, count, mask),
            "{}: MsiConfig (enabled, vectors, mask) vs capability (control {ctl:#06x})",
            describe(&step),
        );
        assert_eq!(
            msi.pending_bits(),
            pending,
            "{}: MSI pending bits vs configuration space",
            describe(&step)
        );
        let enabled_bits = (1u32 << count) - 1;
        assert_eq!(
            pending & !(mask & enabled_bits),
            0,
            "{}: MSI pending bits {pending:#x} outside the masked ({mask:#x}), enabled \
             ({count}) vectors",
            describe(&step)
        );

        let mut triggered = Vec::new();
        for event in self.msi_group.take_events() {
            let index = match event {
                InterruptEvent::Triggered(v) => v,
                InterruptEvent::Updated { index, .. } => index,
            };
            assert!(
                index < msi.capability().capable_vectors(),
                "{}: MSI group got {event:?}",
                describe(&step)
            );
            match event {
                InterruptEvent::Triggered(v) => triggered.push(v),
                InterruptEvent::Updated { index, msg, masked } => {
                    self.msi_routes[usize::from(index)] = (msg, masked);
                }
            }
        }
        for v in 0..msi.capability().capable_vectors() {
            let bit = 1u32 << v;
            let live = v < count;
            let want = if live {
                let low = u32::from(count) - 1;
                let message = MsiMessage {
                    address,
                    data: (u32::from(data) & !low) | u32::from(v),
                };
                (message, mask & bit != 0)
            } else {
                (MsiMessage::default(), true)
            };
            assert_eq!(
                self.msi_routes[usize::from(v)],
                want,
                "{}: the group's route for MSI vector {v} is stale",
                describe(&step)
            );
            assert_eq!(
                msi.message(v),
                live.then_some(want.0),
                "{}: MSI message {v}",
                describe(&step)
            );
            assert_eq!(
                msi.is_vector_masked(v),
                want.1,
                "{}: MSI vector {v} mask",
                describe(&step)
            );
            let (was, now) = (self.msi_pending & bit != 0, pending & bit != 0);
            let fired = triggered.iter().filter(|t| **t == v).count();
            let raised = |d: Delivery| {
                *effect
                    == Effect::MsiTrigger {
                        vector: v,
                        delivery: d,
                    }
            };
            // A pending vector either fires when unmasked or is dropped when
            // the guest stops enabling it.
            let delivered_pending = was && !now && live;
            let expected_fires =
                usize::from(raised(Delivery::Deliverable)) + usize::from(delivered_pending);
            assert_eq!(
                fired,
                expected_fires,
                "{}: MSI vector {v} fired {fired} times (pending {was} -> {now})",
                describe(&step)
            );
            assert!(
                fired == 0 || !want.1,
                "{}: MSI vector {v} fired but is masked",
                describe(&step)
            );
            assert!(
                was || !now || raised(Delivery::Masked),
                "{}: MSI vector {v} became pending without being raised while masked",
                describe(&step)
            );
        }
        self.msi_pending = pending;
    }

    /// Absent functions read all ones through both mechanisms; the host
    /// bridge is where it belongs; the guest's 0xCF8 holds what it wrote.
    fn check_other_functions(&mut self) {
        for bdf in absent() {
            let mut d = [0u8; 4];
            self.ecam.read(0, ecam_offset(bdf, 0), &mut d);
            assert_eq!(d, [0xff; 4], "{}: ECAM read of absent {bdf}", self.ctx());
            let mut d = [0u8; 4];
            let address = config_address(bdf, 0);
            self.probe_io
                .write(PCI_CONFIG_IO_PORT, 0, &address.to_le_bytes());
            self.probe_io.read(PCI_CONFIG_IO_PORT, 4, &mut d);
            assert_eq!(
                d,
                [0xff; 4],
                "{}: mechanism #1 read of absent {bdf}",
                self.ctx()
            );
        }
        let mut d = [0u8; 4];
        self.ecam
            .read(0, ecam_offset(PciBdf::new(0, 0, 0), 0), &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            0x0008_1b36,
            "{}: host bridge ID",
            self.ctx()
        );
        let mut d = [0u8; 4];
        self.io.read(PCI_CONFIG_IO_PORT, 0, &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            self.io_address,
            "{}: 0xCF8 reads back",
            self.ctx()
        );
        assert_eq!(self.io_address & !CONFIG_ADDRESS_MASK, 0);
    }
}
