//! Cross-crate integration tests live in tests/; this library holds what
//! they share: an in-process virtio-pci guest driver, and the rig that
//! boots the test guest under the trellis binary.

pub mod guest_rig;
pub mod virtio_driver;
