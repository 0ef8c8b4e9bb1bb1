//! The host side of a passed-through function: sysfs checks that turn the
//! usual setup mistakes into clear errors, and [`VfioBackend`] over the
//! kernel's VFIO device file.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pci::vfio::{HostMapping, MmapArea, VfioBackend, VfioIrqIndex, VfioRegionInfo};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref};

use super::VfioSetupError;

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// Where the host's IOMMU groups and VFIO nodes are (elsewhere in tests).
pub(super) struct HostRoots {
    /// `/sys/kernel/iommu_groups`.
    pub(super) iommu_groups: PathBuf,
    /// `/dev/vfio`.
    pub(super) dev_vfio: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        HostRoots {
            iommu_groups: PathBuf::from("/sys/kernel/iommu_groups"),
            dev_vfio: PathBuf::from("/dev/vfio"),
        }
    }
}

/// The driver a sysfs device is bound to, if any.
fn driver_of(device: &Path) -> Option<String> {
    std::fs::read_link(device.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Drivers VFIO lets share a group with a device in use: VFIO's own, the
/// stub, and bridges' port driver.
fn vfio_compatible(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(d) => d.contains("vfio") || d == "pci-stub" || d == "pcieport",
    }
}

/// Checks that `path` is a host PCI function ready for VFIO: it exists, is
/// bound to vfio-pci, has an IOMMU group whose every member VFIO accepts,
/// and VFIO's device nodes exist. Returns the group number.
pub(super) fn check_host_function(path: &Path) -> Result<u32, VfioSetupError> {
    check_host_function_in(path, &HostRoots::default())
}

/// [`check_host_function`] against the given roots.
pub(super) fn check_host_function_in(
    path: &Path,
    roots: &HostRoots,
) -> Result<u32, VfioSetupError> {
    let path_buf = path.to_path_buf();
    if !path.join("config").exists() {
        return Err(VfioSetupError::NoSuchDevice(path_buf));
    }
    let driver = driver_of(path);
    if !driver.as_deref().is_some_and(|d| d.contains("vfio")) {
        return Err(VfioSetupError::NotBoundToVfio {
            path: path_buf,
            driver: driver.unwrap_or_else(|| "no driver".to_string()),
        });
    }
    let group_link = std::fs::read_link(path.join("iommu_group"))
        .map_err(|_| VfioSetupError::NoIommuGroup(path_buf.clone()))?;
    let group: u32 = group_link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| VfioSetupError::NoIommuGroup(path_buf.clone()))?;
    if !roots.dev_vfio.join("vfio").exists() {
        return Err(VfioSetupError::NoVfio);
    }
    let members = roots.iommu_groups.join(group.to_string()).join("devices");
    let mut blocking = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&members) {
        for entry in entries.flatten() {
            let driver = driver_of(&entry.path());
            if !vfio_compatible(driver.as_deref()) {
                blocking.push(format!(
                    "{} is bound to {}",
                    entry.file_name().to_string_lossy(),
                    driver.unwrap_or_default()
                ));
            }
        }
    }
    if !blocking.is_empty() {
        blocking.sort();
        return Err(VfioSetupError::GroupNotViable {
            group,
            blocking: blocking.join(", "),
        });
    }
    if !roots.dev_vfio.join(group.to_string()).exists() {
        return Err(VfioSetupError::NoGroupNode(group));
    }
    Ok(group)
}

/// A host function opened through a VFIO container.
pub(super) struct HostVfioDevice {
    device: VfioDevice,
    /// The device file again (a dup), for positioned reads and writes.
    file: File,
    flags: u32,
}

impl HostVfioDevice {
    /// Opens `path` (checked by [`check_host_function`]) in `container`.
    pub(super) fn open(path: &Path, container: Arc<VfioContainer>) -> Result<Self, VfioSetupError> {
        let open_err = |source| VfioSetupError::Open {
            path: path.to_path_buf(),
            source,
        };
        let device =
            VfioDevice::new(path, container as Arc<dyn VfioOps>, false).map_err(open_err)?;
        let info_err = |source| VfioSetupError::DeviceInfo {
            path: path.to_path_buf(),
            source,
        };
        // SAFETY: the fd belongs to `device`, which outlives this borrow;
        // it is only duplicated here.
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = File::from(fd.try_clone_to_owned().map_err(info_err)?);
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_INFO fills a vfio_device_info of the
        // size given in argsz, which is the struct we pass.
        let ret = unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_INFO(), &mut info) };
        if ret < 0 {
            return Err(info_err(io::Error::last_os_error()));
        }
        Ok(HostVfioDevice {
            device,
            file,
            flags: info.flags,
        })
    }

    /// The region's offset in the device file, after checking that
    /// `offset..offset + len` lies inside it.
    fn file_offset(&self, index: u32, offset: u64, len: usize) -> io::Result<u64> {
        let size = self.device.get_region_size(index);
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset:#x} are outside region {index} ({size:#x} bytes)"),
            ));
        }
        self.device
            .get_region_offset(index)
            .checked_add(offset)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
    }
}

/// VFIO's errors carry no errno; the one the failing ioctl left is the
/// best detail there is.
fn vfio_err(e: vfio_ioctls::VfioError) -> io::Error {
    let os = io::Error::last_os_error();
    io::Error::other(format!("{e} ({os})"))
}

impl VfioBackend for HostVfioDevice {
    fn region_info(&self, index: u32) -> Option<VfioRegionInfo> {
        // Regions 0..=7 (BARs, ROM, config) always exist for vfio-pci.
        if index > pci::vfio::VFIO_PCI_CONFIG_REGION_INDEX {
            return None;
        }
        let size = self.device.get_region_size(index);
        let flags = self.device.get_region_flags(index);
        let mmap_areas = if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            Vec::new()
        } else {
            let sparse = self
                .device
                .get_region_caps(index)
                .into_iter()
                .find_map(|cap| match cap {
                    VfioRegionInfoCap::SparseMmap(s) => Some(s.areas),
                    _ => None,
                });
            match sparse {
                Some(areas) => areas
                    .into_iter()
                    .map(|a| MmapArea {
                        offset: a.offset,
                        size: a.size,
                    })
                    .collect(),
                None => vec![MmapArea { offset: 0, size }],
            }
        };
        Some(VfioRegionInfo {
            size,
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap_areas,
        })
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file.read_exact_at(data, at)
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file.write_all_at(data, at)
    }

    fn irq_count(&self, index: VfioIrqIndex) -> u32 {
        self.device
            .get_irq_info(index as u32)
            .map_or(0, |irq| irq.count)
    }

    fn enable_irq(&self, index: VfioIrqIndex, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_irq(index as u32, fds.to_vec())
            .map_err(vfio_err)
    }

    fn disable_irq(&self, index: VfioIrqIndex) -> io::Result<()> {
        self.device.disable_irq(index as u32).map_err(vfio_err)
    }

    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(VfioIrqIndex::Intx as u32, vec![fd])
            .map_err(vfio_err)
    }

    fn reset(&self) -> io::Result<bool> {
        if self.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Ok(false);
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { ioctl(&self.file, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    fn mmap_region(&self, index: u32, offset: u64, size: u64) -> io::Result<Box<dyn HostMapping>> {
        let len = usize::try_from(size).map_err(io::Error::other)?;
        let at = self.file_offset(index, offset, len)?;
        let at = libc::off_t::try_from(at).map_err(io::Error::other)?;
        let flags = self.device.get_region_flags(index);
        let mut prot = 0;
        if flags & VFIO_REGION_INFO_FLAG_READ != 0 {
            prot |= libc::PROT_READ;
        }
        if flags & VFIO_REGION_INFO_FLAG_WRITE != 0 {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: a new shared mapping of the device file at a range VFIO
        // reported as part of the region; nothing else is replaced
        // (no MAP_FIXED), and the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                at,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(HostMmap {
            addr: addr as u64,
            len,
        }))
    }
}

/// A shared mapping of part of a device region, unmapped on drop.
struct HostMmap {
    addr: u64,
    len: usize,
}

// SAFETY: `addr..addr + len` is our own mmap, only unmapped in Drop.
unsafe impl HostMapping for HostMmap {
    fn host_addr(&self) -> u64 {
        self.addr
    }

    fn size(&self) -> u64 {
        self.len as u64
    }
}

impl Drop for HostMmap {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by mmap with this length and is
        // no longer used: the device model removes the guest slot first.
        if unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) } != 0 {
            log::warn!(
                "munmap of a VFIO BAR mapping at {:#x} failed: {}",
                self.addr,
                io::Error::last_os_error()
            );
        }
    }
}
