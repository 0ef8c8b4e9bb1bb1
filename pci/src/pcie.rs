//! The PCI Express capability, for functions that expose the 4 KiB
//! extended configuration space.

use crate::capability::{PciCapability, PciCapabilityId};

/// PCI Express device/port types (the PCIe capability's bits 7:4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum PciExpressDeviceType {
    /// PCI Express endpoint.
    Endpoint = 0x0,
    /// Root port of a root complex.
    RootPort = 0x4,
    /// Endpoint integrated in the root complex: what a device on the root
    /// bus of a host bridge without root ports is.
    #[default]
    RootComplexIntegratedEndpoint = 0x9,
}

/// The PCI Express capability (version 2, 60 bytes), for functions that
/// expose the extended configuration space.
#[derive(Clone, Copy, Debug, Default)]
pub struct PciExpressCapability {
    /// Device/port type.
    pub device_type: PciExpressDeviceType,
    /// Whether the function advertises Function Level Reset.
    pub function_level_reset: bool,
}

impl PciExpressCapability {
    /// Size of the capability including its 2-byte header.
    pub const SIZE: usize = 0x3c;
    /// Offset of the device control register inside the capability.
    pub const DEVICE_CONTROL: usize = 0x08;

    fn has_link(&self) -> bool {
        self.device_type != PciExpressDeviceType::RootComplexIntegratedEndpoint
    }
}

impl PciCapability for PciExpressCapability {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::PciExpress
    }

    fn body(&self) -> Vec<u8> {
        // Offsets below are from the capability start; the body starts at 2.
        let mut cap = vec![0u8; Self::SIZE];
        let capabilities: u16 = 0x2 | (self.device_type as u16) << 4;
        cap[0x02..0x04].copy_from_slice(&capabilities.to_le_bytes());
        // Device capabilities: 128-byte max payload, role-based error
        // reporting (bit 15), optional FLR (bit 28).
        let device_caps: u32 = 1 << 15 | u32::from(self.function_level_reset) << 28;
        cap[0x04..0x08].copy_from_slice(&device_caps.to_le_bytes());
        // Device control: 512-byte max read request, relaxed ordering and
        // no snoop enabled, as at reset.
        let device_control: u16 = 0x2 << 12 | 1 << 11 | 1 << 4;
        cap[0x08..0x0a].copy_from_slice(&device_control.to_le_bytes());
        if self.has_link() {
            // Link capabilities: 2.5 GT/s, x1, port number 0.
            cap[0x0c..0x10].copy_from_slice(&(0x1u32 | 0x1 << 4).to_le_bytes());
            // Link status: the negotiated speed and width match.
            cap[0x12..0x14].copy_from_slice(&(0x1u16 | 0x1 << 4).to_le_bytes());
        }
        cap.split_off(2)
    }

    fn writable_mask(&self) -> Vec<u8> {
        let mut mask = vec![0u8; Self::SIZE];
        // Device control: error reporting enables, relaxed ordering, max
        // payload, extended tag, no snoop, max read request; bit 15
        // (initiate FLR) is left to the device model.
        mask[0x08..0x0a].copy_from_slice(&0x79ffu16.to_le_bytes());
        if self.has_link() {
            // Link control: ASPM control, read completion boundary, common
            // clock, extended synch.
            mask[0x10..0x12].copy_from_slice(&0x00cbu16.to_le_bytes());
        }
        // Device control 2: completion timeout value and disable.
        mask[0x28..0x2a].copy_from_slice(&0x001fu16.to_le_bytes());
        mask.split_off(2)
    }
}
