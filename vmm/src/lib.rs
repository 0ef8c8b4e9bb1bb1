//! Trellis' virtual machine monitor: KVM, guest memory, vCPUs, interrupt
//! routing, the devices a VM is built from, and booting a kernel.
//!
//! Module ownership (who builds what):
//! - platform: `arch`, `memory`, `vcpu`, `boot`, `acpi`, `vm`;
//! - plumbing: `config` (the CLI and its option grammar), `logger` (the
//!   log's rate limit per call site), `interrupt` (the one owner of the
//!   KVM GSI routing table, MSI-X groups, INTx),
//!   `device_manager` (PCI root, virtio devices, legacy devices, BAR
//!   relocation with ioeventfds);
//! - `machine`: one VM built from the configuration and run, and the loop
//!   that rebuilds it when the guest resets it.

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod config;
pub mod device_manager;
pub mod interrupt;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod vcpu;
pub mod vm;
