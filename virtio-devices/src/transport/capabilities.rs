//! The vendor-specific capabilities that tell a driver where the virtio
//! structures are (virtio 1.2 §4.1.4): `struct virtio_pci_cap` and its
//! notify (`virtio_pci_notify_cap`) and PCI configuration access
//! (`virtio_pci_cfg_cap`) extensions.

use pci::{PciCapability, PciCapabilityId};

/// `cfg_type` of the common configuration capability.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notification capability.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status capability.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device-specific configuration capability.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// `cfg_type` of the PCI configuration access capability.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Offsets inside a capability, counted from its ID byte.
pub(crate) const CAP_BAR: usize = 4;
pub(crate) const CAP_OFFSET: usize = 8;
pub(crate) const CAP_LENGTH: usize = 12;
/// `notify_off_multiplier` of the notify cap, `pci_cfg_data` of the cfg cap.
pub(crate) const CAP_EXTRA: usize = 16;

/// Size of `struct virtio_pci_cap`.
const CAP_SIZE: u8 = 16;
/// Size of the notify and PCI configuration access capabilities.
const CAP_SIZE_EXTENDED: u8 = 20;
/// The capability ID and next pointer are the configuration space's.
const CAP_HEADER: usize = 2;

/// What follows the common part of the capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    None,
    NotifyOffMultiplier(u32),
    /// `pci_cfg_data`, initially zero and guest-writable.
    PciCfgData,
}

/// One virtio vendor-specific capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPciCap {
    cfg_type: u8,
    bar: u8,
    offset: u32,
    length: u32,
    extra: Extra,
}

impl VirtioPciCap {
    /// A capability of `cfg_type` describing `length` bytes at `offset` in
    /// BAR `bar`.
    pub fn new(cfg_type: u8, bar: u8, offset: u32, length: u32) -> Self {
        VirtioPciCap {
            cfg_type,
            bar,
            offset,
            length,
            extra: Extra::None,
        }
    }

    /// The notification capability, with its `notify_off_multiplier`.
    pub fn notify(bar: u8, offset: u32, length: u32, multiplier: u32) -> Self {
        VirtioPciCap {
            extra: Extra::NotifyOffMultiplier(multiplier),
            ..Self::new(VIRTIO_PCI_CAP_NOTIFY_CFG, bar, offset, length)
        }
    }

    /// The PCI configuration access capability: the driver programs its
    /// `bar`, `offset` and `length` fields and accesses `pci_cfg_data`.
    pub fn pci_cfg() -> Self {
        VirtioPciCap {
            extra: Extra::PciCfgData,
            ..Self::new(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0)
        }
    }

    /// The full structure, from the ID byte (next pointer left zero).
    fn bytes(&self) -> Vec<u8> {
        let len = match self.extra {
            Extra::None => CAP_SIZE,
            Extra::NotifyOffMultiplier(_) | Extra::PciCfgData => CAP_SIZE_EXTENDED,
        };
        let mut cap = vec![0u8; usize::from(len)];
        cap[0] = PciCapabilityId::VendorSpecific as u8;
        cap[2] = len;
        cap[3] = self.cfg_type;
        cap[CAP_BAR] = self.bar;
        // cap[5] is `id`, only meaningful for shared memory capabilities.
        cap[CAP_OFFSET..CAP_OFFSET + 4].copy_from_slice(&self.offset.to_le_bytes());
        cap[CAP_LENGTH..CAP_LENGTH + 4].copy_from_slice(&self.length.to_le_bytes());
        if let Extra::NotifyOffMultiplier(m) = self.extra {
            cap[CAP_EXTRA..CAP_EXTRA + 4].copy_from_slice(&m.to_le_bytes());
        }
        cap
    }
}

impl PciCapability for VirtioPciCap {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VendorSpecific
    }

    fn body(&self) -> Vec<u8> {
        self.bytes().split_off(CAP_HEADER)
    }

    fn writable_mask(&self) -> Vec<u8> {
        let mut mask = vec![0u8; self.bytes().len()];
        if self.extra == Extra::PciCfgData {
            // The window's bar, offset, length and data; cap_len, cfg_type,
            // id and padding stay read-only.
            mask[CAP_BAR] = 0xff;
            mask[CAP_OFFSET..CAP_EXTRA + 4].fill(0xff);
        }
        mask.split_off(CAP_HEADER)
    }
}
