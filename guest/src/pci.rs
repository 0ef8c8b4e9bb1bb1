//! PCI configuration access (ECAM or ports 0xCF8/0xCFC), BAR assignment and
//! MSI-X programming, on top of virtio-drivers' `PciRoot`.

use crate::arch::{inl, outl};
use crate::serial::Dec;
use core::fmt;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, ConfigurationAccess, DeviceFunction, HeaderType, MemoryBarType, MmioCam,
    PciRoot,
};

const PCI_CAP_ID_MSIX: u8 = 0x11;
/// MSI-X message control: enable and function mask.
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;
/// MSI address for the LAPIC doorbell; the destination APIC ID sits in bits 19:12.
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// Window used for BARs that firmware or the VMM left unassigned; it is the
/// 32-bit MMIO window of our VMM's layout and free on QEMU's q35 too.
pub const BAR_WINDOW_START: u64 = 0xc000_0000;
/// Exclusive end of that window.
pub const BAR_WINDOW_END: u64 = 0xe000_0000;

/// Configuration mechanism #1 through ports 0xCF8/0xCFC (256 bytes/function).
pub struct PortCam;

impl PortCam {
    fn address(df: DeviceFunction, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device) << 11)
            | (u32::from(df.function) << 8)
            | u32::from(offset & 0xfc)
    }
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        outl(0xcf8, Self::address(df, offset));
        inl(0xcfc)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        outl(0xcf8, Self::address(df, offset));
        outl(0xcfc, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// Either configuration mechanism, chosen at run time.
pub enum ConfigAccess {
    Ecam(MmioCam<'static>),
    Port(PortCam),
}

impl ConfigurationAccess for ConfigAccess {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        match self {
            Self::Ecam(cam) => cam.read_word(df, offset),
            Self::Port(cam) => cam.read_word(df, offset),
        }
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        match self {
            Self::Ecam(cam) => cam.write_word(df, offset, data),
            Self::Port(cam) => cam.write_word(df, offset, data),
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        match self {
            // SAFETY: the caller promises to only read read-only fields.
            Self::Ecam(cam) => Self::Ecam(unsafe { cam.unsafe_clone() }),
            Self::Port(_) => Self::Port(PortCam),
        }
    }
}

/// Direct config access for what `PciRoot` has no method for (raw dwords).
enum RawAccess {
    Ecam(u64),
    Port,
}

/// The root bus and the ECAM it was found through, if any.
pub struct Pci {
    pub root: PciRoot<ConfigAccess>,
    raw: RawAccess,
    /// Next free address in the fallback BAR window.
    next_bar: u64,
}

impl Pci {
    /// Uses ECAM at `ecam` if given, else the port mechanism.
    pub fn new(ecam: Option<u64>) -> Self {
        let access = match ecam {
            // SAFETY: the MCFG's ECAM is 256 MiB of MMIO inside the boot
            // identity map (checked by the caller) that nothing else uses.
            Some(base) => ConfigAccess::Ecam(unsafe { MmioCam::new(base as *mut u8, Cam::Ecam) }),
            None => ConfigAccess::Port(PortCam),
        };
        Pci {
            root: PciRoot::new(access),
            raw: ecam.map_or(RawAccess::Port, RawAccess::Ecam),
            next_bar: BAR_WINDOW_START,
        }
    }

    /// Reads a config dword.
    pub fn read(&self, df: DeviceFunction, offset: u8) -> u32 {
        match self.raw {
            RawAccess::Ecam(base) => {
                let addr = base + u64::from(Cam::Ecam.cam_offset(df, offset & 0xfc));
                // SAFETY: inside the ECAM region (see `new`); config space
                // is only touched with volatile dword accesses, by `root` or
                // here, from one CPU.
                unsafe { (addr as *const u32).read_volatile() }
            }
            RawAccess::Port => PortCam.read_word(df, offset),
        }
    }

    /// Writes a config dword.
    pub fn write(&mut self, df: DeviceFunction, offset: u8, value: u32) {
        match self.raw {
            RawAccess::Ecam(base) => {
                let addr = base + u64::from(Cam::Ecam.cam_offset(df, offset & 0xfc));
                // SAFETY: as in `read`.
                unsafe { (addr as *mut u32).write_volatile(value) }
            }
            RawAccess::Port => PortCam.write_word(df, offset, value),
        }
    }

    /// Moves the fallback allocator past the BARs of every function on bus 0
    /// (see `reserve_assigned`).
    pub fn reserve_bus0(&mut self) {
        let mut functions = [None; 256];
        let standard = self
            .root
            .enumerate_bus(0)
            .filter(|(_, info)| info.header_type == HeaderType::Standard);
        for (slot, (df, _)) in functions.iter_mut().zip(standard) {
            *slot = Some(df);
        }
        for df in functions.into_iter().flatten() {
            self.reserve_assigned(df);
        }
    }

    /// Moves the fallback allocator past every memory BAR already placed
    /// inside its window, so a fresh assignment cannot overlap one.
    fn reserve_assigned(&mut self, df: DeviceFunction) {
        if let Ok(bars) = self.root.bars(df) {
            for bar in bars.iter().flatten() {
                if let Some((addr, size)) = bar.memory_address_size() {
                    if (BAR_WINDOW_START..BAR_WINDOW_END).contains(&addr) {
                        self.next_bar = self.next_bar.max(addr + size);
                    }
                }
            }
        }
    }

    /// Gives every unassigned memory BAR (address 0) an address from the
    /// fallback window, or every memory BAR when `force`, then enables memory
    /// decoding and bus mastering and disables INTx. Returns how many BARs
    /// were (re)assigned.
    pub fn setup_function(
        &mut self,
        df: DeviceFunction,
        force: bool,
    ) -> Result<u32, PciSetupError> {
        let bars = self.root.bars(df).map_err(|_| PciSetupError::BadBar)?;
        // Decoding stays off while BARs move.
        let (_, command) = self.root.get_status_command(df);
        self.root
            .set_command(df, command & !(Command::MEMORY_SPACE | Command::IO_SPACE));
        let mut assigned = 0;
        for (index, bar) in bars.iter().enumerate() {
            let Some(BarInfo::Memory {
                address_type,
                address,
                size,
                ..
            }) = bar
            else {
                continue;
            };
            if *address != 0 && !force {
                continue;
            }
            let size = (*size).max(0x1000);
            let base = self.next_bar.next_multiple_of(size);
            if base + size > BAR_WINDOW_END {
                return Err(PciSetupError::WindowFull);
            }
            self.next_bar = base + size;
            match address_type {
                MemoryBarType::Width64 => self.root.set_bar_64(df, index as u8, base),
                _ => self.root.set_bar_32(df, index as u8, base as u32),
            }
            assigned += 1;
        }
        self.root.set_command(
            df,
            Command::MEMORY_SPACE | Command::BUS_MASTER | Command::INTERRUPT_DISABLE,
        );
        Ok(assigned)
    }

    /// The memory address of BAR `index` (0 if unassigned or not memory).
    pub fn bar_address(&mut self, df: DeviceFunction, index: u8) -> u64 {
        match self.root.bar_info(df, index) {
            Ok(Some(bar)) => bar.memory_address_size().map_or(0, |(addr, _)| addr),
            _ => 0,
        }
    }

    /// Finds the virtio common configuration (vendor capability, cfg_type 1)
    /// and returns its address.
    pub fn virtio_common_cfg(&mut self, df: DeviceFunction) -> Option<u64> {
        let cap = self
            .root
            .capabilities(df)
            .find(|cap| cap.id == 0x09 && (cap.private_header >> 8) as u8 == 1)?;
        let bar = self.read(df, cap.offset + 4) as u8;
        let offset = self.read(df, cap.offset + 8);
        let base = self.bar_address(df, bar);
        (base != 0).then_some(base + u64::from(offset))
    }

    /// Enables MSI-X on `df` and points table entry `i` at `vectors[i]` on the
    /// LAPIC with ID `apic_id`. Entries past `vectors` stay masked.
    pub fn enable_msix(
        &mut self,
        df: DeviceFunction,
        vectors: &[u8],
        apic_id: u32,
    ) -> Result<MsixInfo, PciSetupError> {
        let cap = self
            .root
            .capabilities(df)
            .find(|cap| cap.id == PCI_CAP_ID_MSIX)
            .ok_or(PciSetupError::NoMsix)?;
        let control = u32::from(cap.private_header);
        let table_size = (control & 0x7ff) + 1;
        if vectors.len() > table_size as usize {
            return Err(PciSetupError::TooFewVectors(table_size));
        }
        let table = self.read(df, cap.offset + 4);
        let bir = (table & 7) as u8;
        let table_base = self.bar_address(df, bir);
        if table_base == 0 {
            return Err(PciSetupError::BadBar);
        }
        let table_addr = table_base + u64::from(table & !7);
        let header = self.read(df, cap.offset) & 0xffff;

        // Enable with the function masked while entries are written.
        let control = (control | MSIX_ENABLE | MSIX_FUNCTION_MASK) & !0x7ff;
        self.write(df, cap.offset, header | (control << 16));
        for (i, &vector) in vectors.iter().enumerate() {
            let entry = (table_addr + 16 * i as u64) as *mut u32;
            // SAFETY: the table lies in a BAR we assigned/verified, inside
            // the uncached identity map, and `i` is below the table size.
            unsafe {
                entry.write_volatile(MSI_ADDRESS_BASE | ((apic_id & 0xff) << 12));
                entry.add(1).write_volatile(0);
                entry.add(2).write_volatile(u32::from(vector));
                entry.add(3).write_volatile(0); // unmasked
            }
        }
        self.write(
            df,
            cap.offset,
            header | ((control & !MSIX_FUNCTION_MASK) << 16),
        );
        Ok(MsixInfo {
            table_size,
            table_addr,
        })
    }
}

/// What `enable_msix` found.
#[derive(Clone, Copy, Debug)]
pub struct MsixInfo {
    pub table_size: u32,
    pub table_addr: u64,
}

/// Why a function could not be set up.
#[derive(Clone, Copy, Debug)]
pub enum PciSetupError {
    BadBar,
    WindowFull,
    NoMsix,
    TooFewVectors(u32),
}

impl fmt::Display for PciSetupError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::BadBar => write!(f, "bad-or-unassigned-bar"),
            Self::WindowFull => write!(f, "bar-window-full"),
            Self::NoMsix => write!(f, "no-msix-capability"),
            Self::TooFewVectors(n) => write!(f, "msix-table-has-only-{}-entries", Dec((*n).into())),
        }
    }
}
