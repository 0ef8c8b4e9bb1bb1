//! Cross-crate integration tests live in tests/; this library holds what
//! they share: an in-process virtio-pci guest driver.

pub mod virtio_driver;
