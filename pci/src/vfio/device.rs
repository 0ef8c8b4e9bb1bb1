//! [`VfioPciDevice`]: the PCI function the guest sees for a host function.

use std::any::Any;
use std::sync::Arc;

use devices::BusDevice;
use log::{debug, info, warn};

use super::bars::{discover_bars, mmap_chunks, BarInfo, MmapChunk};
use super::config::{ByteOwner, ConfigLayout};
use super::irq::{msix_ranges, EmulatedMsi, EmulatedMsix, Interrupts, IntxEventFds, IrqMode};
use super::VFIO_PCI_CONFIG_REGION_INDEX;
use super::{GuestMemoryMapper, HostMapping, VfioBackend, VfioPciError};
use crate::configuration::{PciConfiguration, PciConfigurationParams, ROM_BAR_INDEX};
use crate::configuration::{COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE};
use crate::device::{BarReprogrammingParams, PciDevice};
use crate::interrupt::MsiInterruptGroup;
use crate::PciBarRegionType;

/// What the VMM needs to know to place a host function, from
/// [`VfioPciDevice::probe`].
#[derive(Clone, Debug)]
pub struct VfioDeviceInfo {
    /// Vendor ID of the host function.
    pub vendor_id: u16,
    /// Device ID of the host function.
    pub device_id: u16,
    /// The BARs to allocate, in index order.
    pub bars: Vec<BarInfo>,
    /// The expansion ROM, to allocate in 32-bit MMIO.
    pub rom: Option<BarInfo>,
    /// MSI vectors the function is capable of, if it has MSI.
    pub msi_vectors: Option<u16>,
    /// MSI-X table size, if it has a usable MSI-X capability.
    pub msix_vectors: Option<u16>,
    /// Whether INTx can be wired (the function has a pin and VFIO INTx).
    pub has_intx: bool,
    layout: ConfigLayout,
}

impl VfioDeviceInfo {
    /// The configuration space layout.
    pub fn layout(&self) -> &ConfigLayout {
        &self.layout
    }
}

/// What the VMM gives a host function: guest addresses, interrupts, and
/// the means to map BAR memory.
pub struct VfioResources {
    /// Guest address of each BAR of [`VfioDeviceInfo::bars`] (and of the
    /// ROM, as [`ROM_BAR_INDEX`]), as (index, address).
    pub bar_addresses: Vec<(usize, u64)>,
    /// Vectors for MSI (at least [`VfioDeviceInfo::msi_vectors`]).
    pub msi_group: Option<Arc<dyn MsiInterruptGroup>>,
    /// Vectors for MSI-X (at least [`VfioDeviceInfo::msix_vectors`]).
    pub msix_group: Option<Arc<dyn MsiInterruptGroup>>,
    /// The INTx eventfds, if INTx is wired.
    pub intx: Option<IntxEventFds>,
    /// The interrupt line register value (the INTx GSI).
    pub intx_line: u8,
    /// Guest memory slots for the mmapped BAR areas.
    pub mapper: Arc<dyn GuestMemoryMapper>,
    /// Guest ranges `[start, end)` where BAR memory may be mapped (the
    /// MMIO windows): a BAR the guest moves elsewhere stays trapped.
    pub mmio_windows: Vec<(u64, u64)>,
    /// Host page size (mmap granularity).
    pub page_size: u64,
}

/// One mmapped area of a BAR and the slot showing it to the guest.
struct MappedChunk {
    chunk: MmapChunk,
    host: Box<dyn HostMapping>,
    /// (slot, guest address) while mapped.
    slot: Option<(u32, u64)>,
}

/// The mmapped areas of one memory BAR.
struct BarMmap {
    index: usize,
    size: u64,
    chunks: Vec<MappedChunk>,
}

/// Where a trapped BAR byte goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarTarget {
    Region,
    MsixTable(u64),
    MsixPba(u64),
    Unbacked,
}

/// A host PCI function passed through with VFIO; see the module
/// documentation of [`crate::vfio`].
pub struct VfioPciDevice {
    id: String,
    backend: Arc<dyn VfioBackend>,
    layout: ConfigLayout,
    shadow: PciConfiguration,
    bars: Vec<BarInfo>,
    rom: Option<BarInfo>,
    irqs: Interrupts,
    mmaps: Vec<BarMmap>,
    mapper: Arc<dyn GuestMemoryMapper>,
    mmio_windows: Vec<(u64, u64)>,
    stats: VfioAccessStats,
}

/// How guest BAR accesses reached the device (those that exited to the
/// VMM: direct-mapped ones never do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioAccessStats {
    /// Accesses forwarded with VFIO region reads and writes.
    pub forwarded: u64,
    /// Accesses to the emulated MSI-X table or PBA.
    pub msix: u64,
}

impl VfioPciDevice {
    /// Reads what the VMM needs from the host function: its BARs, ROM,
    /// interrupts and configuration layout. An MSI-X capability whose table
    /// or PBA is not inside a memory BAR is hidden.
    pub fn probe(backend: &dyn VfioBackend) -> Result<VfioDeviceInfo, VfioPciError> {
        let mut layout = ConfigLayout::probe(backend)?;
        let (bars, rom) = discover_bars(backend)?;
        if let Some((offset, cap)) = layout.msix() {
            let inside = msix_ranges(&cap).iter().all(|&(bir, off, size)| {
                bars.iter().any(|b| {
                    b.index == bir
                        && b.is_memory()
                        && off
                            .checked_add(size)
                            .is_some_and(|end| end <= b.region_size)
                })
            });
            if !inside {
                warn!("VFIO: MSI-X capability at {offset:#x} points outside its BARs");
                layout.hide_msix();
            }
        }
        let mut id = [0u8; 4];
        backend
            .read_region(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
            .map_err(|source| VfioPciError::ConfigRead { offset: 0, source })?;
        Ok(VfioDeviceInfo {
            vendor_id: u16::from_le_bytes([id[0], id[1]]),
            device_id: u16::from_le_bytes([id[2], id[3]]),
            msi_vectors: layout.msi().map(|(_, c)| c.capable_vectors()),
            msix_vectors: layout.msix().map(|(_, c)| c.table_size()),
            has_intx: layout.interrupt_pin() != 0,
            bars,
            rom,
            layout,
        })
    }

    /// The function as the guest will see it, with the BARs at the
    /// addresses in `res`, the BAR areas VFIO allows mmapped (not yet
    /// mapped into the guest: that happens while memory decoding is on),
    /// and INTx delivered if wired. A capability without its interrupt
    /// group is hidden; an area that cannot be mmapped stays trapped.
    pub fn new(
        id: &str,
        backend: Arc<dyn VfioBackend>,
        info: VfioDeviceInfo,
        res: VfioResources,
    ) -> Result<Self, VfioPciError> {
        let VfioDeviceInfo {
            bars,
            rom,
            mut layout,
            ..
        } = info;
        let mut shadow = PciConfiguration::new(&PciConfigurationParams::default());
        let address = |index: usize| {
            res.bar_addresses
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, a)| *a)
                .ok_or(VfioPciError::MissingBarAddress(index))
        };
        for bar in &bars {
            shadow
                .add_bar(
                    bar.index,
                    address(bar.index)?,
                    bar.size,
                    bar.region_type,
                    bar.prefetchable,
                )
                .map_err(|source| VfioPciError::Bar {
                    index: bar.index,
                    source,
                })?;
        }
        if let Some(rom) = &rom {
            let addr = address(ROM_BAR_INDEX)?;
            let bad = |source| VfioPciError::Bar {
                index: ROM_BAR_INDEX,
                source,
            };
            let addr32 = u32::try_from(addr).map_err(|_| {
                bad(crate::PciError::InvalidBarAddress {
                    index: ROM_BAR_INDEX,
                    addr,
                })
            })?;
            // The ROM is at most 16 MiB (see discover_bars).
            shadow.add_rom_bar(addr32, rom.size as u32).map_err(bad)?;
        }

        let msi = match (layout.msi(), res.msi_group) {
            (Some((offset, cap)), Some(group)) => {
                Some(EmulatedMsi::new(offset, cap, group).map_err(|source| {
                    VfioPciError::Interrupts {
                        what: "MSI",
                        source,
                    }
                })?)
            }
            (Some(_), None) => {
                layout.hide_msi();
                None
            }
            _ => None,
        };
        let msix = match (layout.msix(), res.msix_group) {
            (Some((offset, cap)), Some(group)) => {
                Some(EmulatedMsix::new(offset, cap, group).map_err(|source| {
                    VfioPciError::Interrupts {
                        what: "MSI-X",
                        source,
                    }
                })?)
            }
            (Some(_), None) => {
                layout.hide_msix();
                None
            }
            _ => None,
        };
        let intx = match res.intx {
            Some(fds) if layout.interrupt_pin() != 0 => Some(fds),
            _ => {
                layout.drop_intx();
                None
            }
        };
        shadow.set_interrupt_line(if intx.is_some() { res.intx_line } else { 0xff });

        let mut device = VfioPciDevice {
            id: id.to_string(),
            backend,
            layout,
            shadow,
            bars,
            rom,
            irqs: Interrupts {
                msi,
                msix,
                intx,
                mode: IrqMode::None,
            },
            mmaps: Vec::new(),
            mapper: res.mapper,
            mmio_windows: res.mmio_windows,
            stats: VfioAccessStats::default(),
        };
        device.mmap_bars(res.page_size);
        // Nothing enabled MSI yet: this turns INTx on, if the function has it.
        device.irqs.sync(&*device.backend, &device.id);
        Ok(device)
    }

    /// mmaps every area of every memory BAR that VFIO allows, except the
    /// pages of the MSI-X table and PBA.
    fn mmap_bars(&mut self, page_size: u64) {
        let trapped: Vec<(usize, u64, u64)> = self
            .irqs
            .msix
            .as_ref()
            .map(|m| vec![m.table(), m.pba()])
            .unwrap_or_default();
        for bar in self.bars.iter().filter(|b| b.is_memory()) {
            let Some(region) = self.backend.region_info(bar.region_index()) else {
                continue;
            };
            let holes: Vec<(u64, u64)> = trapped
                .iter()
                .filter(|(bir, _, _)| *bir == bar.index)
                .map(|&(_, offset, size)| (offset, size))
                .collect();
            let mut mapped = Vec::new();
            for chunk in mmap_chunks(bar.region_size, &region.mmap_areas, &holes, page_size) {
                match self
                    .backend
                    .mmap_region(bar.region_index(), chunk.offset, chunk.size)
                {
                    Ok(host) if host.size() >= chunk.size => mapped.push(MappedChunk {
                        chunk,
                        host,
                        slot: None,
                    }),
                    Ok(_) => warn!("{}: BAR {} mmap came back short", self.id, bar.index),
                    Err(e) => warn!(
                        "{}: cannot mmap {:#x} bytes at {:#x} of BAR {}, trapping them: {e}",
                        self.id, chunk.size, chunk.offset, bar.index
                    ),
                }
            }
            if !mapped.is_empty() {
                info!(
                    "{}: BAR {} direct-mapped areas {:x?}",
                    self.id,
                    bar.index,
                    mapped.iter().map(|m| m.chunk).collect::<Vec<_>>()
                );
                self.mmaps.push(BarMmap {
                    index: bar.index,
                    size: bar.size,
                    chunks: mapped,
                });
            }
        }
    }

    /// The guest ranges currently mapped straight to the device, as
    /// (guest address, size), in BAR order.
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        self.mmaps
            .iter()
            .flat_map(|b| b.chunks.iter())
            .filter_map(|c| c.slot.map(|(_, addr)| (addr, c.chunk.size)))
            .collect()
    }

    /// The configuration layout in use.
    pub fn layout(&self) -> &ConfigLayout {
        &self.layout
    }

    /// The BAR areas that are mmapped (and mapped into the guest while
    /// memory decoding is on), as (BAR index, area).
    pub fn mmapped_areas(&self) -> Vec<(usize, MmapChunk)> {
        self.mmaps
            .iter()
            .flat_map(|b| b.chunks.iter().map(move |c| (b.index, c.chunk)))
            .collect()
    }

    /// How many guest BAR accesses exited to the VMM, by where they went.
    pub fn access_stats(&self) -> VfioAccessStats {
        self.stats
    }

    /// VM shutdown: stops VFIO interrupts, removes the memory slots and
    /// resets the function.
    pub fn shutdown(&mut self) {
        self.irqs.reset(&*self.backend, &self.id);
        self.unmap_all();
        match self.backend.reset() {
            Ok(true) => info!("{}: reset", self.id),
            Ok(false) => info!("{}: the function has no reset method", self.id),
            Err(e) => warn!("{}: reset failed: {e}", self.id),
        }
    }

    /// Where BAR `index`'s memory should be mapped now: where it is
    /// decoded, if memory decoding is on and that lies in an MMIO window.
    fn slot_target(&self, index: usize, size: u64) -> Option<u64> {
        if self.shadow.command() & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        let base = self.shadow.bar_mapped_address(index)?;
        let end = base.checked_add(size)?;
        self.mmio_windows
            .iter()
            .any(|&(start, stop)| base >= start && end <= stop)
            .then_some(base)
    }

    /// Makes the memory slots match the BARs: removed while decoding is
    /// off, moved with a BAR. Slots are all removed before any is added,
    /// so BARs swapping places never overlap.
    fn sync_slots(&mut self) {
        let targets: Vec<Option<u64>> = self
            .mmaps
            .iter()
            .map(|b| self.slot_target(b.index, b.size))
            .collect();
        for (bar, target) in self.mmaps.iter_mut().zip(&targets) {
            for c in &mut bar.chunks {
                let want = target.map(|base| base + c.chunk.offset);
                if let Some((slot, addr)) = c.slot.filter(|&(_, addr)| Some(addr) != want) {
                    match self.mapper.unmap(slot) {
                        Ok(()) => c.slot = None,
                        Err(e) => warn!("{}: cannot unmap slot at {addr:#x}: {e}", self.id),
                    }
                }
            }
        }
        for (bar, target) in self.mmaps.iter_mut().zip(&targets) {
            let Some(base) = target else { continue };
            for c in bar.chunks.iter_mut().filter(|c| c.slot.is_none()) {
                let addr = base + c.chunk.offset;
                // SAFETY: `c.host` is a live mapping of at least
                // `c.chunk.size` bytes (checked when it was made) and it is
                // only dropped after this slot is removed (`unmap_all`
                // runs in `Drop` before the fields are dropped).
                match unsafe { self.mapper.map(addr, c.chunk.size, c.host.host_addr()) } {
                    Ok(slot) => c.slot = Some((slot, addr)),
                    Err(e) => warn!(
                        "{}: cannot map BAR {} at {addr:#x}, trapping it: {e}",
                        self.id, bar.index
                    ),
                }
            }
        }
    }

    fn unmap_all(&mut self) {
        for c in self.mmaps.iter_mut().flat_map(|b| b.chunks.iter_mut()) {
            if let Some((slot, addr)) = c.slot.take() {
                if let Err(e) = self.mapper.unmap(slot) {
                    warn!("{}: cannot unmap slot at {addr:#x}: {e}", self.id);
                }
            }
        }
    }

    /// The BAR (or ROM) decoded at `base`, if its decoding is on.
    fn bar_at(&self, base: u64) -> Option<BarInfo> {
        let bar = self
            .bars
            .iter()
            .chain(self.rom.iter())
            .find(|b| self.shadow.bar_mapped_address(b.index) == Some(base))
            .copied()?;
        let command = self.shadow.command();
        let decoding = match bar.region_type {
            _ if bar.index == ROM_BAR_INDEX => self.shadow.rom_enabled(),
            PciBarRegionType::IoRegion => command & COMMAND_IO_SPACE != 0,
            _ => command & COMMAND_MEMORY_SPACE != 0,
        };
        decoding.then_some(bar)
    }

    /// Where byte `offset` of `bar` goes.
    fn bar_target(&self, bar: &BarInfo, offset: u64) -> BarTarget {
        if let Some(msix) = &self.irqs.msix {
            let (table_bir, table, table_size) = msix.table();
            if table_bir == bar.index && offset >= table && offset - table < table_size {
                return BarTarget::MsixTable(offset - table);
            }
            let (pba_bir, pba, pba_size) = msix.pba();
            if pba_bir == bar.index && offset >= pba && offset - pba < pba_size {
                return BarTarget::MsixPba(offset - pba);
            }
        }
        if offset < bar.region_size {
            BarTarget::Region
        } else {
            BarTarget::Unbacked
        }
    }

    /// Splits an access into runs of bytes with the same target, as
    /// (target of the run's first byte, its BAR offset, range in the access).
    fn bar_runs(
        &self,
        bar: &BarInfo,
        offset: u64,
        len: usize,
    ) -> Vec<(BarTarget, u64, usize, usize)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < len {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            let first = self.bar_target(bar, at);
            let mut end = i + 1;
            while let Some(next) = offset.checked_add(end as u64).filter(|_| end < len) {
                if self.bar_target(bar, next) != first.advanced((end - i) as u64) {
                    break;
                }
                end += 1;
            }
            runs.push((first, at, i, end));
            i = end;
        }
        runs
    }
}

impl VfioPciDevice {
    /// Counts one trapped access by where its bytes go.
    fn count(&mut self, runs: &[(BarTarget, u64, usize, usize)]) {
        if runs.iter().any(|r| r.0 == BarTarget::Region) {
            self.stats.forwarded += 1;
        }
        if runs
            .iter()
            .any(|r| matches!(r.0, BarTarget::MsixTable(_) | BarTarget::MsixPba(_)))
        {
            self.stats.msix += 1;
        }
    }
}

impl BarTarget {
    /// The target `step` bytes further on, if the run continues.
    fn advanced(self, step: u64) -> BarTarget {
        match self {
            BarTarget::MsixTable(o) => BarTarget::MsixTable(o + step),
            BarTarget::MsixPba(o) => BarTarget::MsixPba(o + step),
            other => other,
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        let base = reg_idx.saturating_mul(4);
        if base >= self.layout.size() {
            return u32::MAX;
        }
        let mut device = None;
        let mut bytes = [0u8; 4];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let at = base + i;
            *byte = match self.layout.owner(at) {
                ByteOwner::Device | ByteOwner::DeviceAndShadow => {
                    let dword = *device.get_or_insert_with(|| {
                        let mut d = [0xffu8; 4];
                        if let Err(e) = self.backend.read_region(
                            VFIO_PCI_CONFIG_REGION_INDEX,
                            base as u64,
                            &mut d,
                        ) {
                            debug!("{}: config read at {base:#x} failed: {e}", self.id);
                            d = [0xff; 4];
                        }
                        d
                    });
                    dword[i]
                }
                ByteOwner::Shadow => self.shadow.read_reg(reg_idx).to_le_bytes()[i],
                ByteOwner::Msi => self.irqs.msi.as_ref().map_or(0, |m| m.read(at - m.offset)),
                ByteOwner::Msix => self.irqs.msix.as_ref().map_or(0, |m| m.read(at - m.offset)),
                ByteOwner::Virtual => self.layout.value(at),
                ByteOwner::Hidden => 0,
            };
        }
        u32::from_le_bytes(bytes)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogrammingParams> {
        let Some(base) = reg_idx.checked_mul(4) else {
            return Vec::new();
        };
        let in_dword = usize::try_from(offset)
            .ok()
            .filter(|o| o + data.len() <= 4)
            .is_some();
        if base >= self.layout.size() || !in_dword || data.is_empty() {
            return Vec::new();
        }
        let start = base + offset as usize;
        let mut moves = Vec::new();
        let (mut msi, mut msix, mut command) = (false, false, false);
        let mut i = 0;
        while i < data.len() {
            let owner = self.layout.owner(start + i);
            let mut end = i + 1;
            while end < data.len() && self.layout.owner(start + end) == owner {
                end += 1;
            }
            let at = start + i;
            let bytes = &data[i..end];
            match owner {
                ByteOwner::Device | ByteOwner::DeviceAndShadow => {
                    if let Err(e) =
                        self.backend
                            .write_region(VFIO_PCI_CONFIG_REGION_INDEX, at as u64, bytes)
                    {
                        debug!("{}: config write at {at:#x} failed: {e}", self.id);
                    }
                    if owner == ByteOwner::DeviceAndShadow {
                        moves.extend(self.shadow.write_reg(reg_idx, (at - base) as u64, bytes));
                        command = true;
                    }
                }
                ByteOwner::Shadow => {
                    moves.extend(self.shadow.write_reg(reg_idx, (at - base) as u64, bytes));
                }
                ByteOwner::Msi => {
                    if let Some(m) = &mut self.irqs.msi {
                        for (j, &b) in bytes.iter().enumerate() {
                            m.write(at + j - m.offset, b);
                        }
                        msi = true;
                    }
                }
                ByteOwner::Msix => {
                    if let Some(m) = &mut self.irqs.msix {
                        for (j, &b) in bytes.iter().enumerate() {
                            m.write(at + j - m.offset, b);
                        }
                        msix = true;
                    }
                }
                ByteOwner::Virtual | ByteOwner::Hidden => {}
            }
            i = end;
        }
        if msi {
            if let Some(m) = &mut self.irqs.msi {
                m.commit();
            }
        }
        if msix {
            if let Some(m) = &mut self.irqs.msix {
                m.commit();
            }
        }
        if msi || msix {
            self.irqs.sync(&*self.backend, &self.id);
        }
        if command || !moves.is_empty() {
            self.sync_slots();
        }
        moves
    }

    fn restore_bar(&mut self, params: &BarReprogrammingParams) {
        self.shadow.restore_bar(params);
        self.sync_slots();
    }

    fn config_space_size(&self) -> usize {
        self.layout.size()
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(bar) = self.bar_at(base) else {
            return;
        };
        let runs = self.bar_runs(&bar, offset, data.len());
        self.count(&runs);
        for (target, at, from, to) in runs {
            let out = &mut data[from..to];
            match target {
                BarTarget::Region => {
                    if let Err(e) = self.backend.read_region(bar.region_index(), at, out) {
                        debug!("{}: BAR {} read at {at:#x} failed: {e}", self.id, bar.index);
                        out.fill(0xff);
                    }
                }
                BarTarget::MsixTable(o) => {
                    if let Some(m) = &self.irqs.msix {
                        m.config.read_table(o, out);
                    }
                }
                BarTarget::MsixPba(o) => {
                    if let Some(m) = &self.irqs.msix {
                        m.read_pba(o, out);
                    }
                }
                BarTarget::Unbacked => {}
            }
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(bar) = self.bar_at(base) else {
            return;
        };
        if bar.index == ROM_BAR_INDEX {
            // Read-only memory.
            return;
        }
        let runs = self.bar_runs(&bar, offset, data.len());
        self.count(&runs);
        for (target, at, from, to) in runs {
            let bytes = &data[from..to];
            match target {
                BarTarget::Region => {
                    if let Err(e) = self.backend.write_region(bar.region_index(), at, bytes) {
                        debug!(
                            "{}: BAR {} write at {at:#x} failed: {e}",
                            self.id, bar.index
                        );
                    }
                }
                BarTarget::MsixTable(o) => {
                    if let Some(m) = &mut self.irqs.msix {
                        m.config.write_table(o, bytes);
                    }
                }
                BarTarget::MsixPba(o) => {
                    if let Some(m) = &mut self.irqs.msix {
                        m.config.write_pba(o, bytes);
                    }
                }
                BarTarget::Unbacked => {}
            }
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl BusDevice for VfioPciDevice {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.read_bar(base, offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.write_bar(base, offset, data);
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // Slots go before the host mappings they show (dropped after this).
        self.unmap_all();
        self.irqs.disable(&*self.backend, &self.id);
    }
}
