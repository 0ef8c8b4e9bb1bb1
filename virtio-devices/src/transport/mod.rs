//! The virtio-pci transport.
