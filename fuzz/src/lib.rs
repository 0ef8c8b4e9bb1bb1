//! Shared code of Trellis's fuzz targets: the models the targets run the
//! code under test against, kept in a library so unit tests can replay the
//! seed corpus without libFuzzer.

pub mod pci_config;

#[cfg(test)]
mod seeds;
