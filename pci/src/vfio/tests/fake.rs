//! A fake VFIO device (configuration space, regions, interrupt calls), a
//! fake slot mapper and an interrupt group with eventfds.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptError, MsiInterruptGroup, MsiMessage, RecordingInterruptGroup};
use crate::vfio::*;

pub const PAGE: u64 = 4096;

/// One call the device model made on the fake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Enable(VfioIrqIndex, usize),
    Disable(VfioIrqIndex),
    IntxUnmask,
    Reset,
    Mmap(u32, u64, u64),
    Write(u32, u64, Vec<u8>),
}

/// A fake vfio-pci device: a configuration space the device model reads
/// and writes, BAR regions with memory behind them, and a call log.
pub struct FakeVfio {
    pub config: Mutex<Vec<u8>>,
    pub regions: BTreeMap<u32, VfioRegionInfo>,
    pub data: Mutex<BTreeMap<u32, Vec<u8>>>,
    pub irqs: [u32; 3],
    pub calls: Mutex<Vec<Call>>,
    pub has_reset: bool,
}

impl FakeVfio {
    /// A function with `config` (256 or 4096 bytes) and no regions but
    /// the configuration one; INTx, 1 MSI and 16 MSI-X interrupts.
    pub fn new(config: Vec<u8>) -> Self {
        let mut regions = BTreeMap::new();
        regions.insert(
            VFIO_PCI_CONFIG_REGION_INDEX,
            VfioRegionInfo {
                size: config.len() as u64,
                readable: true,
                writable: true,
                mmap_areas: Vec::new(),
            },
        );
        FakeVfio {
            config: Mutex::new(config),
            regions,
            data: Mutex::new(BTreeMap::new()),
            irqs: [1, 1, 16],
            calls: Mutex::new(Vec::new()),
            has_reset: true,
        }
    }

    /// Adds region `index` of `size` bytes, mmap-able as a whole or not.
    pub fn with_region(mut self, index: u32, size: u64, mmap: bool) -> Self {
        let areas = if mmap {
            vec![MmapArea { offset: 0, size }]
        } else {
            Vec::new()
        };
        self.regions.insert(
            index,
            VfioRegionInfo {
                size,
                readable: true,
                writable: index != VFIO_PCI_ROM_REGION_INDEX,
                mmap_areas: areas,
            },
        );
        // Each byte reads as its offset's low byte, so forwarding is visible.
        let data = (0..size).map(|i| i as u8).collect();
        self.data.lock().unwrap().insert(index, data);
        self
    }

    /// Sets the sparse mmap areas of region `index`.
    pub fn with_areas(mut self, index: u32, areas: &[(u64, u64)]) -> Self {
        if let Some(r) = self.regions.get_mut(&index) {
            r.mmap_areas = areas
                .iter()
                .map(|&(offset, size)| MmapArea { offset, size })
                .collect();
        }
        self
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn log(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    pub fn config_byte(&self, at: usize) -> u8 {
        self.config.lock().unwrap()[at]
    }

    pub fn region_bytes(&self, index: u32, at: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[&index][at..at + len].to_vec()
    }
}

impl VfioBackend for FakeVfio {
    fn region_info(&self, index: u32) -> Option<VfioRegionInfo> {
        self.regions.get(&index).cloned()
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let mut fill = |src: &[u8]| -> io::Result<()> {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let bytes = src
                .get(start..start + data.len())
                .ok_or_else(|| io::Error::other(format!("read past region {index}")))?;
            data.copy_from_slice(bytes);
            Ok(())
        };
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            return fill(&self.config.lock().unwrap());
        }
        match self.data.lock().unwrap().get(&index) {
            Some(d) => fill(d),
            None => Err(io::Error::other("no such region")),
        }
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.log(Call::Write(index, offset, data.to_vec()));
        let store = |dst: &mut Vec<u8>| -> io::Result<()> {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            dst.get_mut(start..start + data.len())
                .ok_or_else(|| io::Error::other(format!("write past region {index}")))?
                .copy_from_slice(data);
            Ok(())
        };
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            return store(&mut self.config.lock().unwrap());
        }
        match self.data.lock().unwrap().get_mut(&index) {
            Some(d) => store(d),
            None => Err(io::Error::other("no such region")),
        }
    }

    fn irq_count(&self, index: VfioIrqIndex) -> u32 {
        self.irqs[index as usize]
    }

    fn enable_irq(&self, index: VfioIrqIndex, fds: &[&EventFd]) -> io::Result<()> {
        if fds.len() > self.irqs[index as usize] as usize {
            return Err(io::Error::from_raw_os_error(libc_einval()));
        }
        self.log(Call::Enable(index, fds.len()));
        Ok(())
    }

    fn disable_irq(&self, index: VfioIrqIndex) -> io::Result<()> {
        self.log(Call::Disable(index));
        Ok(())
    }

    fn set_intx_unmask_fd(&self, _fd: &EventFd) -> io::Result<()> {
        self.log(Call::IntxUnmask);
        Ok(())
    }

    fn reset(&self) -> io::Result<bool> {
        self.log(Call::Reset);
        Ok(self.has_reset)
    }

    fn mmap_region(&self, index: u32, offset: u64, size: u64) -> io::Result<Box<dyn HostMapping>> {
        self.log(Call::Mmap(index, offset, size));
        Ok(Box::new(FakeMapping {
            addr: 0x7f00_0000_0000 + (u64::from(index) << 32) + offset,
            size,
        }))
    }
}

fn libc_einval() -> i32 {
    22
}

/// A pretend host mapping: an address nobody dereferences.
pub struct FakeMapping {
    addr: u64,
    size: u64,
}

// SAFETY: only used with FakeMapper, which records addresses and never
// dereferences them.
unsafe impl HostMapping for FakeMapping {
    fn host_addr(&self) -> u64 {
        self.addr
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// Records the slots; refuses overlapping ones like KVM would.
#[derive(Default)]
pub struct FakeMapper {
    pub slots: Mutex<BTreeMap<u32, (u64, u64, u64)>>,
    next: Mutex<u32>,
}

impl FakeMapper {
    /// The mapped (guest address, size, host address), by guest address.
    pub fn mapped(&self) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<_> = self.slots.lock().unwrap().values().copied().collect();
        v.sort_unstable();
        v
    }
}

impl GuestMemoryMapper for FakeMapper {
    unsafe fn map(&self, guest_addr: u64, size: u64, host_addr: u64) -> io::Result<u32> {
        let mut slots = self.slots.lock().unwrap();
        if slots
            .values()
            .any(|&(g, s, _)| guest_addr < g + s && g < guest_addr + size)
        {
            return Err(io::Error::other("overlap"));
        }
        let mut next = self.next.lock().unwrap();
        *next += 1;
        slots.insert(*next, (guest_addr, size, host_addr));
        Ok(*next)
    }

    fn unmap(&self, slot: u32) -> io::Result<()> {
        self.slots
            .lock()
            .unwrap()
            .remove(&slot)
            .map(|_| ())
            .ok_or_else(|| io::Error::other("no such slot"))
    }
}

/// A recording group whose vectors have eventfds, like the VMM's.
pub struct FdGroup {
    pub record: RecordingInterruptGroup,
    fds: Vec<EventFd>,
}

impl FdGroup {
    pub fn new(vectors: u16) -> Arc<Self> {
        Arc::new(FdGroup {
            record: RecordingInterruptGroup::new(vectors),
            fds: (0..vectors).map(|_| EventFd::new(0).unwrap()).collect(),
        })
    }
}

impl MsiInterruptGroup for FdGroup {
    fn trigger(&self, index: u16) -> Result<(), InterruptError> {
        self.record.trigger(index)
    }
    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        self.record.update(index, msg, masked)
    }
    fn notifier(&self, index: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(index))
    }
}

/// Builds a type-0 configuration space.
pub struct ConfigBuilder {
    pub bytes: Vec<u8>,
    last_cap: Option<usize>,
}

impl ConfigBuilder {
    pub fn new(size: usize) -> Self {
        let mut bytes = vec![0u8; size];
        bytes[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        bytes[0x08] = 0x10; // revision
        bytes[0x0b] = 0x00; // class
        bytes[0x3d] = 1; // INTA#
        ConfigBuilder {
            bytes,
            last_cap: None,
        }
    }

    pub fn put(mut self, at: usize, value: &[u8]) -> Self {
        self.bytes[at..at + value.len()].copy_from_slice(value);
        self
    }

    pub fn bar(self, index: usize, low_bits: u32) -> Self {
        self.put(0x10 + 4 * index, &low_bits.to_le_bytes())
    }

    /// Appends capability `id` at `at` with `body` after the header.
    pub fn cap(mut self, at: usize, id: u8, body: &[u8]) -> Self {
        self.bytes[0x06] |= 0x10;
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = at as u8,
            None => self.bytes[0x34] = at as u8,
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        self.last_cap = Some(at);
        self
    }

    /// Appends an extended capability at `at` (linking from `prev`).
    pub fn ext_cap(mut self, at: usize, id: u16, prev: Option<usize>) -> Self {
        let header = u32::from(id) | 1 << 16;
        self.bytes[at..at + 4].copy_from_slice(&header.to_le_bytes());
        self.bytes[at + 4..at + 8]
            .copy_from_slice(&0xabcd_0000u32.wrapping_add(at as u32).to_le_bytes());
        if let Some(p) = prev {
            let mut h = u32::from_le_bytes(self.bytes[p..p + 4].try_into().unwrap());
            h |= (at as u32) << 20;
            self.bytes[p..p + 4].copy_from_slice(&h.to_le_bytes());
        }
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.bytes
    }
}

/// MSI capability body: message control only.
pub fn msi_body(log2: u8, is_64bit: bool, pvm: bool) -> Vec<u8> {
    let ctl = u16::from(log2) << 1 | u16::from(is_64bit) << 7 | u16::from(pvm) << 8;
    let size = match (is_64bit, pvm) {
        (false, false) => 10,
        (true, false) => 14,
        (false, true) => 20,
        (true, true) => 24,
    };
    let mut body = vec![0u8; size - 2];
    body[0..2].copy_from_slice(&ctl.to_le_bytes());
    body
}

/// MSI-X capability body.
pub fn msix_body(vectors: u16, table: (u8, u32), pba: (u8, u32)) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(vectors - 1).to_le_bytes());
    body.extend_from_slice(&(table.1 | u32::from(table.0)).to_le_bytes());
    body.extend_from_slice(&(pba.1 | u32::from(pba.0)).to_le_bytes());
    body
}
