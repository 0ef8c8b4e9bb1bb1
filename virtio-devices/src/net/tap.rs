//! The host side of virtio-net: the [`NetBackend`] abstraction and its Linux
//! tap implementation.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// Length of the `virtio_net_hdr_v1` (with `num_buffers`) that precedes
/// every frame, on the virtqueues and on the backend alike.
pub const VNET_HDR_LEN: usize = 12;

/// Where guest frames go and host frames come from.
///
/// Frames in both directions start with a [`VNET_HDR_LEN`]-byte
/// `virtio_net_hdr_v1`, which is what a tap opened with `IFF_VNET_HDR` and a
/// header size of 12 exchanges, so the device passes it through unchanged.
/// The device's worker polls [`as_raw_fd`](Self::as_raw_fd) edge-triggered
/// for readability and writability, so implementations must be
/// non-blocking.
pub trait NetBackend: Send + Sync {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting, `0`
    /// at end of file. A frame larger than `buf` may be truncated.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one whole frame; `WouldBlock` when the backend cannot take it
    /// now (the device retries once the fd becomes writable).
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;

    /// The file descriptor to poll.
    fn as_raw_fd(&self) -> RawFd;

    /// Sets which offloads (`TUN_F_*` bits) the guest accepts on receive,
    /// i.e. which partial-checksum and GSO frames the backend may hand over.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Interface names are 1 to 15 bytes without NUL.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` is missing or not accessible.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// TUNGETFEATURES failed.
    #[error("cannot query the tun driver's features: {0}")]
    GetFeatures(#[source] io::Error),
    /// The tun driver lacks a feature we need.
    #[error("the tun driver does not support {0}")]
    Unsupported(&'static str),
    /// TUNSETIFF failed: no permission to create the interface, or an
    /// existing interface of that name with other flags.
    #[error("cannot create or attach tap {name:?}: {source}")]
    SetIff {
        /// The requested name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the vnet header size: {0}")]
    SetVnetHdrSize(#[source] io::Error),
    /// A multiqueue tap needs at least one queue.
    #[error("a tap needs at least one queue")]
    NoQueues,
}

/// One queue of a Linux tap interface, with vnet headers, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Puts `name` into an `ifreq` with `flags`.
fn ifreq_for(name: &str, flags: libc::c_int) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::InvalidName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data (byte arrays, integers and raw
    // pointers in a union), for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // The flags are 16 bits wide in the kernel ABI; ours all fit.
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(ifr)
}

/// The NUL-terminated name the kernel wrote back into `ifr`.
fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Tap {
    /// Opens tap `name` with one queue, creating the interface if no
    /// interface has that name (which needs CAP_NET_ADMIN). An empty name,
    /// or one with `%d`, lets the kernel pick; see [`name`](Self::name).
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        Self::open_queue(name, false)
    }

    /// Opens `queues` queues of the multiqueue tap `name` (created by the
    /// first open if needed; the others attach to it).
    pub fn open_multiqueue(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        if queues == 0 {
            return Err(TapError::NoQueues);
        }
        let first = Self::open_queue(name, true)?;
        // Attach the others by the kernel's name, in case `name` was a
        // template such as "tap%d".
        let actual = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Self::open_queue(&actual, true)?);
        }
        Ok(taps)
    }

    fn open_queue(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut ifr = ifreq_for(name, flags)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let fd = file.as_raw_fd();

        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int through the
        // pointer, which points to a live local of that type.
        let ret = unsafe { libc::ioctl(fd, libc::TUNGETFEATURES, &mut features) };
        if ret < 0 {
            return Err(TapError::GetFeatures(io::Error::last_os_error()));
        }
        if features & libc::IFF_VNET_HDR as libc::c_uint == 0 {
            return Err(TapError::Unsupported("IFF_VNET_HDR"));
        }
        if multi_queue && features & libc::IFF_MULTI_QUEUE as libc::c_uint == 0 {
            return Err(TapError::Unsupported("IFF_MULTI_QUEUE"));
        }

        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, and `ifr`
        // is a properly initialised ifreq that outlives the call.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points to a live local of that type.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize(io::Error::last_os_error()));
        }

        Ok(Tap {
            file,
            name: ifreq_name(&ifr),
        })
    }

    /// The interface name the kernel gave the tap.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours; the fd is a tap we own.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_validated() {
        assert!(matches!(
            Tap::open_named("a-name-that-is-too-long"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(
            Tap::open_named("nul\0name"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(
            Tap::open_multiqueue("x", 0),
            Err(TapError::NoQueues)
        ));
    }

    #[test]
    fn ifreq_round_trips_the_name() {
        let ifr = ifreq_for("trellis0", libc::IFF_TAP).unwrap();
        assert_eq!(ifreq_name(&ifr), "trellis0");
        let longest = "a".repeat(libc::IFNAMSIZ - 1);
        assert_eq!(ifreq_name(&ifreq_for(&longest, 0).unwrap()), longest);
    }
}
