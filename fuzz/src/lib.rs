//! Shared code of Trellis's fuzz targets: the models the targets run the
//! code under test against, kept in a library so unit tests can replay the
//! seed corpus without libFuzzer.

pub mod cli_args;
pub mod encode;
pub mod pci_config;
pub mod requests;
pub mod threads;
pub mod virtio_pci_bar;
pub mod virtq;

#[cfg(test)]
mod seeds;
