//! What a capability hands to the configuration space when it is added to
//! the chain.

/// Standard capability IDs (PCI Local Bus spec, "Capability IDs").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PciCapabilityId {
    /// Power management.
    PowerManagement = 0x01,
    /// Message signalled interrupts.
    Msi = 0x05,
    /// Vendor specific (virtio uses these).
    VendorSpecific = 0x09,
    /// PCI Express.
    PciExpress = 0x10,
    /// MSI-X.
    MsiX = 0x11,
}

impl PciCapabilityId {
    /// The ID byte for a raw value, if it is one we know.
    pub fn from_u8(id: u8) -> Option<Self> {
        match id {
            0x01 => Some(Self::PowerManagement),
            0x05 => Some(Self::Msi),
            0x09 => Some(Self::VendorSpecific),
            0x10 => Some(Self::PciExpress),
            0x11 => Some(Self::MsiX),
            _ => None,
        }
    }
}

/// A capability structure to place in the capability list.
///
/// The first two bytes of every capability (ID and next pointer) belong to
/// the configuration space, which fills them in and keeps them read-only;
/// a capability describes only what follows them.
pub trait PciCapability {
    /// The capability ID.
    fn id(&self) -> PciCapabilityId;

    /// The bytes after the ID and next pointer.
    fn body(&self) -> Vec<u8>;

    /// For each byte of [`body`](Self::body), the bits the guest may change.
    /// Must have the same length as the body. Defaults to read-only.
    fn writable_mask(&self) -> Vec<u8> {
        vec![0; self.body().len()]
    }
}
