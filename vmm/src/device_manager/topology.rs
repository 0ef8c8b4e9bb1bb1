//! What is on the PCI bus, for the log and for tests.

use std::fmt;

use log::info;
use pci::PciBdf;
use vm_allocator::GuestRange;

use super::{DeviceManager, TOPOLOGY_LOG_TARGET};

/// One PCI function as the guest finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunctionInfo {
    /// Its address.
    pub bdf: PciBdf,
    /// The device ID from the configuration ("host bridge" for 00:00.0).
    pub id: String,
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// Mapped BARs as (index, current range).
    pub bars: Vec<(usize, GuestRange)>,
    /// The GSI of each MSI-X vector, by vector index.
    pub msix_gsis: Vec<u32>,
    /// The IOAPIC pin of INTA#, if the function has one.
    pub intx_gsi: Option<u32>,
}

impl fmt::Display for PciFunctionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} [{:04x}:{:04x}]",
            self.bdf, self.id, self.vendor_id, self.device_id
        )?;
        for (index, range) in &self.bars {
            write!(f, ", BAR{index} {range} ({:#x} bytes)", range.size())?;
        }
        if let (Some(first), Some(last)) = (self.msix_gsis.first(), self.msix_gsis.last()) {
            let contiguous = self.msix_gsis.windows(2).all(|w| w[1] == w[0] + 1);
            write!(f, ", MSI-X {} vectors on GSI", self.msix_gsis.len())?;
            if contiguous {
                write!(f, " {first}-{last}")?;
            } else {
                write!(f, "s {:?}", self.msix_gsis)?;
            }
        }
        if let Some(gsi) = self.intx_gsi {
            write!(f, ", INTA# on GSI {gsi}")?;
        }
        Ok(())
    }
}

impl DeviceManager {
    /// Every function on the root bus, in BDF order, with its current BARs.
    pub fn topology(&self) -> Vec<PciFunctionInfo> {
        let root = self.lock_root();
        root.bdfs()
            .into_iter()
            .map(|bdf| {
                let ids = root.device(bdf).map_or(u32::MAX, |d| {
                    d.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .read_config_register(0)
                });
                let function = self.functions.iter().find(|f| f.bdf == bdf);
                PciFunctionInfo {
                    bdf,
                    id: function.map_or_else(|| "host bridge".to_string(), |f| f.id.clone()),
                    vendor_id: ids as u16,
                    device_id: (ids >> 16) as u16,
                    bars: self.relocator.bars_of(bdf),
                    msix_gsis: function
                        .and_then(|f| f.msix.as_ref())
                        .map_or_else(Vec::new, |g| g.gsis().to_vec()),
                    intx_gsi: function.and_then(|f| f.intx.as_ref()).map(|i| i.gsi()),
                }
            })
            .collect()
    }

    /// Logs [`topology`](Self::topology), one line per function, at info
    /// level under [`TOPOLOGY_LOG_TARGET`].
    pub fn log_topology(&self) {
        for function in self.topology() {
            info!(target: TOPOLOGY_LOG_TARGET, "{function}");
        }
    }
}
