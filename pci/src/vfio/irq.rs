//! The interrupts of a passed-through function: the emulated MSI and
//! MSI-X capabilities, and which kind VFIO delivers at any moment.
//!
//! The guest programs messages and masks into our emulation; the
//! [`MsiInterruptGroup`] behind it turns them into KVM routes (through the
//! VMM's one routing-table owner). VFIO is only told which eventfds to
//! signal: the group's notifiers, which are KVM irqfds while their vector
//! is unmasked, so host interrupts never pass through the VMM. A vector
//! the guest masked has no irqfd: what the device raises meanwhile waits in
//! the eventfd and is delivered on unmask.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, error, info};
use vmm_sys_util::eventfd::EventFd;

use super::{VfioBackend, VfioIrqIndex};
use crate::capability::{PciCapability, PciCapabilityId};
use crate::interrupt::MsiInterruptGroup;
use crate::msi::{MsiCapability, MsiConfig};
use crate::msix::{MsixCapability, MsixConfig, MSIX_CAP_SIZE, MSIX_MSG_CTL_ENABLE};
use crate::msix::{MSIX_MSG_CTL_FUNCTION_MASK, MSIX_TABLE_ENTRY_SIZE};
use crate::PciError;

/// The INTx eventfds handed to VFIO: `trigger` must be a KVM irqfd with
/// resampling on the line's IOAPIC pin and `resample` its resample eventfd,
/// so the guest's EOI unmasks the host line without the VMM.
#[derive(Debug)]
pub struct IntxEventFds {
    /// Signalled by VFIO when the device asserts INTx.
    pub trigger: EventFd,
    /// Signalled by KVM on EOI; VFIO then unmasks the host line.
    pub resample: EventFd,
}

/// The emulated MSI capability: its bytes as the guest sees them, and the
/// state behind them.
pub(crate) struct EmulatedMsi {
    pub(crate) offset: usize,
    bytes: Vec<u8>,
    mask: Vec<u8>,
    config: MsiConfig,
}

impl EmulatedMsi {
    pub(crate) fn new(
        offset: usize,
        cap: MsiCapability,
        group: Arc<dyn MsiInterruptGroup>,
    ) -> Result<Self, PciError> {
        let config = MsiConfig::new(
            cap.vectors_log2(),
            cap.is_64bit(),
            cap.per_vector_mask(),
            group,
        )?;
        // The ID and next pointer are the layout's business; keep room.
        let mut bytes = vec![PciCapabilityId::Msi as u8, 0];
        bytes.extend(cap.body());
        let mut mask = vec![0, 0];
        mask.extend(cap.writable_mask());
        Ok(EmulatedMsi {
            offset,
            bytes,
            mask,
            config,
        })
    }

    /// Byte `rel` of the capability (zero past its end). As for the MSI-X
    /// PBA (see [`EmulatedMsix::read_pba`]), an interrupt the device raised
    /// while its vector was masked waits in the vector's eventfd, so the
    /// pending bits also show masked vectors whose eventfd holds a count.
    pub(crate) fn read(&self, rel: usize) -> u8 {
        let mut byte = self.bytes.get(rel).copied().unwrap_or(0);
        let Some(first) = self.config.layout().pending_bits else {
            return byte;
        };
        let Some(byte_index) = rel.checked_sub(first).filter(|&b| b < 4) else {
            return byte;
        };
        let group = self.config.group();
        for bit in 0..8u8 {
            // At most 31: a valid vector number.
            let vector = (byte_index * 8) as u16 + u16::from(bit);
            if vector < self.config.num_enabled_vectors()
                && self.config.is_vector_masked(vector)
                && group.notifier(vector).is_some_and(has_count)
            {
                byte |= 1 << bit;
            }
        }
        byte
    }

    /// Stores a guest byte through the writable mask; call
    /// [`commit`](Self::commit) once the whole access is stored.
    pub(crate) fn write(&mut self, rel: usize, value: u8) {
        if let (Some(byte), Some(mask)) = (self.bytes.get_mut(rel), self.mask.get(rel)) {
            *byte = (*byte & !mask) | (value & mask);
        }
    }

    /// Applies what the guest wrote (routes, masks) and mirrors the pending
    /// bits the device owns.
    pub(crate) fn commit(&mut self) {
        self.config.update_from_config(&self.bytes);
        if let Some(at) = self.config.layout().pending_bits {
            let pending = self.config.pending_bits().to_le_bytes();
            if let Some(dst) = self.bytes.get_mut(at..at + 4) {
                dst.copy_from_slice(&pending);
            }
        }
    }

    /// Vectors the guest enabled (0 while MSI is disabled).
    pub(crate) fn enabled_vectors(&self) -> u16 {
        self.config.num_enabled_vectors()
    }

    fn group(&self) -> &Arc<dyn MsiInterruptGroup> {
        self.config.group()
    }

    fn reset(&mut self) {
        self.config.reset();
    }
}

/// The emulated MSI-X capability and the table and PBA behind it.
pub(crate) struct EmulatedMsix {
    pub(crate) offset: usize,
    cap: MsixCapability,
    ctl: u16,
    pub(crate) config: MsixConfig,
}

impl EmulatedMsix {
    pub(crate) fn new(
        offset: usize,
        cap: MsixCapability,
        group: Arc<dyn MsiInterruptGroup>,
    ) -> Result<Self, PciError> {
        let config = MsixConfig::new(cap.table_size(), group)?;
        Ok(EmulatedMsix {
            offset,
            cap,
            ctl: cap.message_control(),
            config,
        })
    }

    fn bytes(&self) -> [u8; MSIX_CAP_SIZE] {
        let mut bytes = [0u8; MSIX_CAP_SIZE];
        bytes[0] = PciCapabilityId::MsiX as u8;
        bytes[2..4].copy_from_slice(&self.ctl.to_le_bytes());
        let body = self.cap.body();
        bytes[4..].copy_from_slice(&body[2..]);
        bytes
    }

    /// Byte `rel` of the capability (zero past its end).
    pub(crate) fn read(&self, rel: usize) -> u8 {
        self.bytes().get(rel).copied().unwrap_or(0)
    }

    /// Stores a guest byte; only the enable and function mask bits of
    /// message control are writable. Call [`commit`](Self::commit) after.
    pub(crate) fn write(&mut self, rel: usize, value: u8) {
        let writable = MSIX_MSG_CTL_ENABLE | MSIX_MSG_CTL_FUNCTION_MASK;
        let (shift, mask) = match rel {
            2 => (0, writable & 0xff),
            3 => (8, writable >> 8),
            _ => return,
        };
        let value = u16::from(value) << shift;
        self.ctl = (self.ctl & !(mask << shift)) | (value & (mask << shift));
    }

    /// Applies the message control the guest wrote.
    pub(crate) fn commit(&mut self) {
        self.config.set_message_control(self.ctl);
    }

    /// Whether the guest enabled MSI-X.
    pub(crate) fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// The table as (BAR index, offset, size).
    pub(crate) fn table(&self) -> (usize, u64, u64) {
        (
            usize::from(self.cap.table_bir()),
            u64::from(self.cap.table_offset()),
            self.config.table_size_bytes(),
        )
    }

    /// The PBA as (BAR index, offset, size).
    pub(crate) fn pba(&self) -> (usize, u64, u64) {
        (
            usize::from(self.cap.pba_bir()),
            u64::from(self.cap.pba_offset()),
            self.config.pba_size_bytes(),
        )
    }

    fn vectors(&self) -> u16 {
        self.config.vector_count()
    }

    /// Guest read of the PBA. The device signals its vectors' eventfds
    /// straight from VFIO, so an interrupt raised while a vector is masked
    /// never passes through [`MsixConfig::trigger`]: it waits in the
    /// eventfd (KVM delivers it when the irqfd comes back on unmask). A
    /// masked vector whose eventfd holds a count therefore reads as
    /// pending, as the device's own PBA would show it.
    pub(crate) fn read_pba(&self, offset: u64, out: &mut [u8]) {
        self.config.read_pba(offset, out);
        let group = self.config.group();
        for (byte_index, byte) in (offset..).zip(out.iter_mut()) {
            for bit in 0..8u8 {
                let Some(vector) = byte_index
                    .checked_mul(8)
                    .and_then(|v| v.checked_add(u64::from(bit)))
                    .and_then(|v| u16::try_from(v).ok())
                    .filter(|&v| v < self.vectors())
                else {
                    break;
                };
                if self.config.is_vector_masked(vector)
                    && group.notifier(vector).is_some_and(has_count)
                {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    fn reset(&mut self) {
        self.ctl = self.cap.message_control();
        self.config.reset();
    }
}

/// The (table BAR, offset, size) of an MSI-X capability's table and PBA,
/// before any state exists.
pub(crate) fn msix_ranges(cap: &MsixCapability) -> [(usize, u64, u64); 2] {
    let vectors = u64::from(cap.table_size());
    [
        (
            usize::from(cap.table_bir()),
            u64::from(cap.table_offset()),
            vectors * MSIX_TABLE_ENTRY_SIZE as u64,
        ),
        (
            usize::from(cap.pba_bir()),
            u64::from(cap.pba_offset()),
            vectors.div_ceil(64) * 8,
        ),
    ]
}

/// Which interrupt kind VFIO is delivering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IrqMode {
    /// Nothing enabled.
    None,
    /// INTx through the resampling irqfd.
    Intx,
    /// MSI with this many vectors.
    Msi(u16),
    /// MSI-X with every table entry.
    Msix,
}

/// The interrupt state of one function.
pub(crate) struct Interrupts {
    pub(crate) msi: Option<EmulatedMsi>,
    pub(crate) msix: Option<EmulatedMsix>,
    pub(crate) intx: Option<IntxEventFds>,
    pub(crate) mode: IrqMode,
}

impl Interrupts {
    /// What VFIO should deliver for the state the guest programmed: MSI-X
    /// if enabled, else MSI, else INTx if the function has it.
    pub(crate) fn wanted(&self) -> IrqMode {
        if self.msix.as_ref().is_some_and(EmulatedMsix::enabled) {
            return IrqMode::Msix;
        }
        match self.msi.as_ref().map(EmulatedMsi::enabled_vectors) {
            Some(n) if n > 0 => IrqMode::Msi(n),
            _ if self.intx.is_some() => IrqMode::Intx,
            _ => IrqMode::None,
        }
    }

    /// Switches VFIO to [`wanted`](Self::wanted) if it differs from what
    /// VFIO has. Failures are logged (the guest caused the change and
    /// cannot be told); the mode is then `None` so the next change retries.
    pub(crate) fn sync(&mut self, backend: &dyn VfioBackend, id: &str) {
        let wanted = self.wanted();
        let was = self.mode;
        if wanted == was {
            return;
        }
        self.disable(backend, id);
        let result = match wanted {
            IrqMode::None => Ok(()),
            IrqMode::Intx => self.intx.as_ref().map_or(Ok(()), |fds| {
                backend
                    .enable_irq(VfioIrqIndex::Intx, &[&fds.trigger])
                    .and_then(|()| backend.set_intx_unmask_fd(&fds.resample))
            }),
            IrqMode::Msi(n) => match &self.msi {
                Some(msi) => notifiers(msi.group(), n)
                    .and_then(|fds| backend.enable_irq(VfioIrqIndex::Msi, &fds)),
                None => Ok(()),
            },
            IrqMode::Msix => match &self.msix {
                Some(msix) => notifiers(msix.config.group(), msix.vectors())
                    .and_then(|fds| backend.enable_irq(VfioIrqIndex::Msix, &fds)),
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => {
                info!("{id}: VFIO interrupts {was:?} -> {wanted:?}");
                self.mode = wanted;
            }
            Err(e) => {
                error!("{id}: cannot switch VFIO interrupts to {wanted:?}: {e}");
                self.mode = IrqMode::None;
            }
        }
    }

    /// Turns off whatever VFIO delivers.
    pub(crate) fn disable(&mut self, backend: &dyn VfioBackend, id: &str) {
        let index = match self.mode {
            IrqMode::None => return,
            IrqMode::Intx => VfioIrqIndex::Intx,
            IrqMode::Msi(_) => VfioIrqIndex::Msi,
            IrqMode::Msix => VfioIrqIndex::Msix,
        };
        if let Err(e) = backend.disable_irq(index) {
            error!("{id}: cannot disable VFIO {index:?} interrupts: {e}");
        }
        debug!("{id}: VFIO {index:?} interrupts disabled");
        self.mode = IrqMode::None;
    }

    /// Device reset: VFIO delivers nothing, MSI and MSI-X are back to their
    /// reset state (routes removed).
    pub(crate) fn reset(&mut self, backend: &dyn VfioBackend, id: &str) {
        self.disable(backend, id);
        if let Some(msi) = &mut self.msi {
            msi.reset();
        }
        if let Some(msix) = &mut self.msix {
            msix.reset();
        }
    }
}

/// The eventfds of vectors `0..count` of `group`.
/// Whether `fd` has a non-zero count, without consuming it (a read would
/// take the interrupt away from KVM, and block on a blocking eventfd).
fn has_count(fd: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call, no timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready == 1 && pfd.revents & libc::POLLIN != 0
}

fn notifiers(group: &Arc<dyn MsiInterruptGroup>, count: u16) -> std::io::Result<Vec<&EventFd>> {
    (0..count)
        .map(|i| {
            group.notifier(i).ok_or_else(|| {
                std::io::Error::other(format!("interrupt vector {i} has no eventfd"))
            })
        })
        .collect()
}
