//! The VMM side of BAR moves, as the fuzz target models it: the MMIO and
//! port I/O buses the BARs are mapped on, and a [`DeviceRelocation`] that
//! refuses moves a VMM could not apply.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::{Bus, BusDevice};
use pci::{BarReprogrammingParams, DeviceRelocation, PciBarRegionType, PciDevice, PciError};

use super::device::{BarSpec, TestDevice, BARS};

/// Guest RAM: BARs may not move over it.
pub const RAM: (u64, u64) = (0, 0x8000_0000);
/// Where the VMM maps the ECAM window.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// Legacy ISA ports, including 0xCF8: I/O BARs may not move over them.
pub const LEGACY_PORTS: (u64, u64) = (0, 0x1000);

/// A range the VMM owns on a bus; reads as all ones.
struct Reserved;

impl BusDevice for Reserved {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// Routes a bus access to the BAR-region handlers of the test function.
struct BarWindow(Arc<Mutex<TestDevice>>);

impl BusDevice for BarWindow {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.0).read_bar(base, offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        lock(&self.0).write_bar(base, offset, data);
    }
}

/// Locks, ignoring poison: a panic already failed the run.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one BAR is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Address space.
    pub region: PciBarRegionType,
    /// Base address.
    pub base: u64,
    /// Length.
    pub len: u64,
}

impl Mapping {
    /// End of the range; u128 so that ranges touching 2^64 are exact.
    pub fn end(&self) -> u128 {
        u128::from(self.base) + u128::from(self.len)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, base: u64, len: u64) -> bool {
        u128::from(base) < self.end() && u128::from(self.base) < u128::from(base) + u128::from(len)
    }

    /// Whether the range is in the I/O space rather than memory.
    pub fn is_io(&self) -> bool {
        self.region == PciBarRegionType::IoRegion
    }
}

/// The highest end (one past the last address) a BAR range of `region`
/// may have.
pub fn address_limit(region: PciBarRegionType) -> u128 {
    match region {
        PciBarRegionType::IoRegion => 1 << 16,
        PciBarRegionType::Memory32BitRegion => 1 << 32,
        // A bus range's end must fit in a u64, so nothing ends at 2^64.
        PciBarRegionType::Memory64BitRegion => u128::from(u64::MAX),
    }
}

/// The VMM's ranges that no BAR may overlap, for a BAR in `region`.
pub fn reserved_ranges(region: PciBarRegionType) -> Vec<Mapping> {
    let (region, ranges) = match region {
        PciBarRegionType::IoRegion => (region, vec![LEGACY_PORTS]),
        _ => (
            PciBarRegionType::Memory64BitRegion,
            vec![RAM, (ECAM_BASE, super::ECAM_WINDOW_SIZE)],
        ),
    };
    ranges
        .into_iter()
        .map(|(base, len)| Mapping { region, base, len })
        .collect()
}

#[derive(Default)]
struct State {
    bars: BTreeMap<usize, Mapping>,
    accepted: Vec<BarReprogrammingParams>,
    refused: usize,
}

/// The VMM model: buses plus the map of BARs, kept in step.
pub struct Vmm {
    state: Mutex<State>,
    mmio: Bus,
    pio: Bus,
}

impl Vmm {
    /// Maps every BAR of `device` at its initial address.
    pub fn new(device: &Arc<Mutex<TestDevice>>) -> Self {
        let vmm = Vmm {
            state: Mutex::new(State::default()),
            mmio: Bus::new(),
            pio: Bus::new(),
        };
        for region in [
            PciBarRegionType::IoRegion,
            PciBarRegionType::Memory64BitRegion,
        ] {
            for r in reserved_ranges(region) {
                vmm.bus(r.region)
                    .insert(Arc::new(Mutex::new(Reserved)), r.base, r.len)
                    .expect("reserved ranges are disjoint");
            }
        }
        let mut state = lock(&vmm.state);
        for BarSpec {
            index,
            region,
            base,
            size,
            ..
        } in BARS
        {
            vmm.bus(region)
                .insert(Arc::new(Mutex::new(BarWindow(device.clone()))), base, size)
                .expect("initial BAR layout is disjoint");
            let mapping = Mapping {
                region,
                base,
                len: size,
            };
            state.bars.insert(index, mapping);
        }
        drop(state);
        vmm
    }

    /// The bus a BAR of `region` lives on.
    pub fn bus(&self, region: PciBarRegionType) -> &Bus {
        match region {
            PciBarRegionType::IoRegion => &self.pio,
            _ => &self.mmio,
        }
    }

    /// Where BAR `index` is mapped.
    pub fn mapping(&self, index: usize) -> Option<Mapping> {
        lock(&self.state).bars.get(&index).copied()
    }

    /// All BAR mappings, by index.
    pub fn mappings(&self) -> Vec<(usize, Mapping)> {
        lock(&self.state)
            .bars
            .iter()
            .map(|(i, m)| (*i, *m))
            .collect()
    }

    /// Moves accepted since the last call.
    pub fn take_accepted(&self) -> Vec<BarReprogrammingParams> {
        std::mem::take(&mut lock(&self.state).accepted)
    }

    /// Number of moves refused so far.
    pub fn refused(&self) -> usize {
        lock(&self.state).refused
    }

    /// Why `params` cannot be applied, if it cannot.
    fn refusal(state: &State, params: &BarReprogrammingParams) -> Option<String> {
        let new = Mapping {
            region: params.region_type,
            base: params.new_base,
            len: params.len,
        };
        if new.end() > address_limit(new.region) {
            return Some(format!("{new:x?} leaves the {:?} space", new.region));
        }
        if let Some(r) = reserved_ranges(new.region)
            .into_iter()
            .find(|r| r.overlaps(new.base, new.len))
        {
            return Some(format!("{new:x?} overlaps reserved {r:x?}"));
        }
        state
            .bars
            .iter()
            .filter(|(i, m)| **i != params.bar_index && m.is_io() == new.is_io())
            .find(|(_, m)| m.overlaps(new.base, new.len))
            .map(|(i, m)| format!("{new:x?} overlaps BAR {i} at {m:x?}"))
    }
}

impl DeviceRelocation for Vmm {
    fn move_bar(
        &self,
        params: &BarReprogrammingParams,
        device: &mut dyn PciDevice,
    ) -> Result<(), PciError> {
        assert!(
            device.as_any_mut().is::<TestDevice>(),
            "BAR move reported by a function other than the test device: {params:x?}"
        );
        let mut state = lock(&self.state);
        let Some(current) = state.bars.get(&params.bar_index).copied() else {
            panic!("move of a BAR the VMM never mapped: {params:x?}");
        };
        assert!(
            params.old_base == current.base
                && params.len == current.len
                && params.region_type == current.region,
            "move does not start where the VMM has the BAR ({current:x?}): {params:x?}"
        );
        assert!(
            params.new_base.is_multiple_of(params.len),
            "pci asked to move a BAR to an address not aligned to its size: {params:x?}"
        );
        if let Some(reason) = Self::refusal(&state, params) {
            state.refused += 1;
            return Err(PciError::BarRelocation {
                index: params.bar_index,
                old_base: params.old_base,
                new_base: params.new_base,
                reason,
            });
        }
        if let Err(e) =
            self.bus(current.region)
                .update_range(params.old_base, params.new_base, params.len)
        {
            panic!("bus refused a move the VMM model allows ({params:x?}): {e}");
        }
        state.bars.insert(
            params.bar_index,
            Mapping {
                base: params.new_base,
                ..current
            },
        );
        state.accepted.push(*params);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::pci_config::ops::{Func, Op, Width};
    use crate::pci_config::run;

    /// Found by the fuzzer once enabling decoding over an all-ones BAR
    /// became a move: the model allowed a 64-bit BAR ending exactly at 2^64,
    /// which no bus range can hold.
    #[test]
    fn bar_ending_at_the_top_of_the_address_space_is_refused() {
        let write = |offset, width, value| Op::EcamWrite {
            func: Func::Device,
            offset,
            width,
            value,
        };
        run(&[
            write(0x10, Width::Four, 0xffff_ffff),
            write(0x14, Width::Four, 0xffff_ffff),
            write(0x04, Width::Two, 0x2),
        ]);
    }
}
