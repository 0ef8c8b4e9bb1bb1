//! The function the PCI fuzz target puts at 00:01.0: a PCI Express endpoint
//! with every kind of BAR and every capability the `pci` crate offers,
//! wired the way a real device model wires them.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use pci::interrupt::RecordingInterruptGroup;
use pci::{
    BarReprogrammingParams, InterruptError, MsiConfig, MsixCapability, MsixConfig,
    PciBarPrefetchable, PciBarRegionType, PciCapability, PciCapabilityId, PciClassCode,
    PciConfiguration, PciConfigurationParams, PciDevice, PciError, PciExpressCapability,
    PciExpressDeviceType, ROM_BAR_INDEX,
};

/// Identity of the test function; all of it is read-only to the guest.
pub const VENDOR_ID: u16 = 0x1de5;
/// Device ID.
pub const DEVICE_ID: u16 = 0xf00d;
/// Revision ID.
pub const REVISION_ID: u8 = 0x02;
/// Subclass (0x80: other network controller).
pub const SUBCLASS: u8 = 0x80;
/// Programming interface.
pub const PROG_IF: u8 = 0x01;
/// Subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1de5;
/// Subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x0042;
/// INTA#.
pub const INTERRUPT_PIN: u8 = 1;

/// MSI-X vectors: more than 64, so the PBA spans two qwords.
pub const MSIX_VECTORS: u16 = 70;
/// The MSI-X table sits at the start of BAR 0.
pub const MSIX_TABLE_OFFSET: u32 = 0;
/// The PBA sits in the second half of BAR 0.
pub const MSIX_PBA_OFFSET: u32 = 0x2000;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 0;
/// MSI: 2^3 = 8 vectors, 64-bit address, per-vector masking.
pub const MSI_VECTORS_LOG2: u8 = 3;
/// Vectors the interrupt groups accept: more than the device has, so an
/// index the device should never use is recorded instead of rejected.
pub const GROUP_VECTORS: u16 = 2048;

/// A BAR of the test function and where the VMM first placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR index, or [`ROM_BAR_INDEX`].
    pub index: usize,
    /// Address space.
    pub region: PciBarRegionType,
    /// Prefetchable bit of a memory BAR.
    pub prefetchable: bool,
    /// Initial address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Every BAR: 64-bit prefetchable (MSI-X), 32-bit, I/O, a 64-bit BAR larger
/// than 4 GiB (so its lower dword has no address bits), and the ROM.
pub const BARS: [BarSpec; 5] = [
    BarSpec {
        index: 0,
        region: PciBarRegionType::Memory64BitRegion,
        prefetchable: true,
        base: 0x1_0000_0000,
        size: 0x4000,
    },
    BarSpec {
        index: 2,
        region: PciBarRegionType::Memory32BitRegion,
        prefetchable: false,
        base: 0xc000_0000,
        size: 0x1000,
    },
    BarSpec {
        index: 3,
        region: PciBarRegionType::IoRegion,
        prefetchable: false,
        base: 0xc000,
        size: 0x100,
    },
    BarSpec {
        index: 4,
        region: PciBarRegionType::Memory64BitRegion,
        prefetchable: true,
        base: 0x40_0000_0000,
        size: 0x2_0000_0000,
    },
    BarSpec {
        index: ROM_BAR_INDEX,
        region: PciBarRegionType::Memory32BitRegion,
        prefetchable: false,
        base: 0xd000_0000,
        size: 0x1_0000,
    },
];

/// The PCI Express capability of the test function: an endpoint, so it has
/// link registers, with FLR advertised.
pub const PCIE_CAP: PciExpressCapability = PciExpressCapability {
    device_type: PciExpressDeviceType::Endpoint,
    function_level_reset: true,
};

/// A vendor-specific capability (ID 0x09): a length byte, read-only bytes,
/// and a few guest-writable ones.
#[derive(Clone, Copy, Debug)]
pub struct VendorCapability;

impl VendorCapability {
    /// Length including the ID and next pointer.
    pub const SIZE: usize = 20;
    /// Capability offsets of the bytes the guest may write, and the bits.
    pub const WRITABLE: [(usize, u8); 5] =
        [(8, 0xff), (9, 0xff), (10, 0xff), (11, 0xff), (16, 0x0f)];
}

impl PciCapability for VendorCapability {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VendorSpecific
    }

    fn body(&self) -> Vec<u8> {
        // Byte 2 of a vendor-specific capability is its length.
        let mut cap: Vec<u8> = (0..Self::SIZE as u8).map(|i| i.wrapping_mul(37)).collect();
        cap[2] = Self::SIZE as u8;
        cap.split_off(2)
    }

    fn writable_mask(&self) -> Vec<u8> {
        let mut mask = vec![0u8; Self::SIZE];
        for (at, bits) in Self::WRITABLE {
            mask[at] = bits;
        }
        mask.split_off(2)
    }
}

/// Offsets of the capabilities in configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapOffsets {
    /// PCI Express.
    pub pcie: usize,
    /// MSI.
    pub msi: usize,
    /// MSI-X.
    pub msix: usize,
    /// Vendor specific.
    pub vendor: usize,
}

impl CapOffsets {
    /// (ID, offset) of each capability, in the order they were added.
    pub fn chain(&self) -> [(u8, usize); 4] {
        [
            (PciCapabilityId::PciExpress as u8, self.pcie),
            (PciCapabilityId::Msi as u8, self.msi),
            (PciCapabilityId::MsiX as u8, self.msix),
            (PciCapabilityId::VendorSpecific as u8, self.vendor),
        ]
    }
}

/// The test function.
pub struct TestDevice {
    config: PciConfiguration,
    msix: MsixConfig,
    msi: MsiConfig,
    caps: CapOffsets,
}

fn overlaps(a: Range<usize>, b: Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

impl TestDevice {
    /// Builds the function; MSI-X and MSI vectors go to the given groups.
    pub fn new(
        msix_group: Arc<RecordingInterruptGroup>,
        msi_group: Arc<RecordingInterruptGroup>,
    ) -> Result<Self, PciError> {
        let mut config = PciConfiguration::new(&PciConfigurationParams {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            revision_id: REVISION_ID,
            class_code: PciClassCode::NetworkController,
            subclass: SUBCLASS,
            prog_if: PROG_IF,
            subsystem_vendor_id: SUBSYSTEM_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
            interrupt_pin: INTERRUPT_PIN,
            extended_config_space: true,
            ..Default::default()
        });
        for bar in BARS {
            if bar.index == ROM_BAR_INDEX {
                // ROM addresses and sizes are 32-bit by construction of BARS.
                config.add_rom_bar(bar.base as u32, bar.size as u32)?;
            } else {
                let prefetchable = if bar.prefetchable {
                    PciBarPrefetchable::Prefetchable
                } else {
                    PciBarPrefetchable::NotPrefetchable
                };
                config.add_bar(bar.index, bar.base, bar.size, bar.region, prefetchable)?;
            }
        }
        let msix = MsixConfig::new(MSIX_VECTORS, msix_group)?;
        let msi = MsiConfig::new(MSI_VECTORS_LOG2, true, true, msi_group)?;
        let msix_cap = MsixCapability::new(
            MSIX_VECTORS,
            MSIX_BAR as u8,
            MSIX_TABLE_OFFSET,
            MSIX_BAR as u8,
            MSIX_PBA_OFFSET,
        );
        let caps = CapOffsets {
            pcie: config.add_capability(&PCIE_CAP)?,
            msi: config.add_capability(&msi.capability())?,
            msix: config.add_capability(&msix_cap)?,
            vendor: config.add_capability(&VendorCapability)?,
        };
        Ok(TestDevice {
            config,
            msix,
            msi,
            caps,
        })
    }

    /// The configuration space.
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }

    /// MSI-X state.
    pub fn msix(&self) -> &MsixConfig {
        &self.msix
    }

    /// MSI state.
    pub fn msi(&self) -> &MsiConfig {
        &self.msi
    }

    /// Where the capabilities were placed.
    pub fn caps(&self) -> CapOffsets {
        self.caps
    }

    /// The device raises MSI-X vector `vector`.
    pub fn trigger_msix(&mut self, vector: u16) -> Result<(), InterruptError> {
        self.msix.trigger(vector)
    }

    /// The device raises MSI vector `vector`; pending bits are device-owned
    /// state the guest reads from configuration space, so mirror them.
    pub fn trigger_msi(&mut self, vector: u16) -> Result<(), InterruptError> {
        let result = self.msi.trigger(vector);
        self.mirror_msi_pending();
        result
    }

    fn mirror_msi_pending(&mut self) {
        if let Some(at) = self.msi.layout().pending_bits {
            let pending = self.msi.pending_bits().to_le_bytes();
            self.config.write_bytes(self.caps.msi + at, &pending);
        }
    }

    fn msix_range(&self) -> Range<usize> {
        self.caps.msix..self.caps.msix + pci::msix::MSIX_CAP_SIZE
    }

    fn msi_range(&self) -> Range<usize> {
        self.caps.msi..self.caps.msi + self.msi.layout().size
    }

    /// Whether `base` is where BAR `index` is mapped: BAR accesses arrive
    /// with the base of the bus range that was hit.
    fn is_bar(&self, base: u64, index: usize) -> bool {
        self.config.bar_mapped_address(index) == Some(base)
    }
}

impl PciDevice for TestDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogrammingParams> {
        let moves = self.config.write_reg(reg_idx, offset, data);
        // Saturating: the bus never passes huge indices, but a device model
        // should not trust that.
        let start = reg_idx.saturating_mul(4).saturating_add(offset as usize);
        let written = start..start.saturating_add(data.len());
        if overlaps(written.clone(), self.msix_range()) {
            let ctl = self
                .config
                .read_u16(self.caps.msix + pci::msix::MSIX_CAP_MSG_CTL_OFFSET);
            self.msix.set_message_control(ctl);
        }
        if overlaps(written, self.msi_range()) {
            let mut cap = vec![0u8; self.msi.layout().size];
            self.config.read_bytes(self.caps.msi, &mut cap);
            self.msi.update_from_config(&cap);
            self.mirror_msi_pending();
        }
        moves
    }

    fn restore_bar(&mut self, params: &BarReprogrammingParams) {
        self.config.restore_bar(params);
    }

    fn config_space_size(&self) -> usize {
        self.config.size()
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if !self.is_bar(base, MSIX_BAR) {
            data.fill(0xff);
            return;
        }
        let pba = u64::from(MSIX_PBA_OFFSET);
        if offset >= pba {
            self.msix.read_pba(offset - pba, data);
        } else {
            let table = u64::from(MSIX_TABLE_OFFSET);
            self.msix.read_table(offset - table, data);
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        if !self.is_bar(base, MSIX_BAR) {
            return;
        }
        let pba = u64::from(MSIX_PBA_OFFSET);
        if offset >= pba {
            self.msix.write_pba(offset - pba, data);
        } else {
            let table = u64::from(MSIX_TABLE_OFFSET);
            self.msix.write_table(offset - table, data);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
