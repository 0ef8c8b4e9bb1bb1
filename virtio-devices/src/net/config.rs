//! virtio-net configuration: what the VMM asks for ([`NetConfig`]), MAC
//! addresses, and the device configuration space (virtio 1.2 §5.1.4).

use std::fmt;
use std::str::FromStr;

use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

/// The MTU advertised with VIRTIO_NET_F_MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Default number of receive/transmit queue pairs.
pub const DEFAULT_QUEUE_PAIRS: u16 = 1;
/// Default size of every queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most queue pairs a device accepts (one tap queue and two virtqueues
/// each; more would only cost file descriptors).
pub const MAX_QUEUE_PAIRS: u16 = 64;
/// Bytes of configuration space we implement: mac, status,
/// max_virtqueue_pairs, mtu.
pub(crate) const CONFIG_SPACE_SIZE: usize = 12;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

/// Why a MAC address string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex bytes such as 02:00:00:00:00:01")]
pub struct MacParseError(String);

impl MacAddr {
    /// The address made of `bytes`.
    pub const fn new(bytes: [u8; 6]) -> Self {
        MacAddr(bytes)
    }

    /// The six bytes, in wire order.
    pub const fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether this is a group (multicast/broadcast) address, which a NIC
    /// must not have.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// A random unicast, locally administered address: first byte 0x02,
    /// five random bytes (so it cannot clash with any vendor's OUI).
    pub fn random_local() -> Self {
        let mut bytes = [0u8; 6];
        fill_random(&mut bytes[1..]);
        bytes[0] = 0x02;
        MacAddr(bytes)
    }
}

/// Fills `buf` from the kernel's random pool, falling back to std's
/// randomly seeded hasher keys if getrandom is unavailable.
fn fill_random(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`, a
    // valid, exclusively borrowed buffer of that length.
    let ret = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(ret).ok() == Some(buf.len()) {
        return;
    }
    log::warn!(
        "getrandom failed ({}), using a weaker source for the MAC address",
        std::io::Error::last_os_error()
    );
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(t.as_nanos());
    }
    let random = hasher.finish().to_le_bytes();
    for (dst, src) in buf.iter_mut().zip(random.iter().cycle()) {
        *dst = *src;
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            // from_str_radix alone would accept a leading '+'.
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// How the VMM wants a tap-backed network device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface to create or attach to; empty (or with `%d`) lets the
    /// kernel choose.
    pub tap_name: String,
    /// The guest's MAC; a random locally administered one if `None`.
    pub mac: Option<MacAddr>,
    /// Receive/transmit queue pairs (multiqueue tap when more than one).
    pub queue_pairs: u16,
    /// Size of every virtqueue (a power of two).
    pub queue_size: u16,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tap_name: String::new(),
            mac: None,
            queue_pairs: DEFAULT_QUEUE_PAIRS,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Checks a queue size: split rings need a power of two up to 32768.
pub(crate) fn validate_queue_size(size: u16) -> Result<(), String> {
    if size < 2 || !size.is_power_of_two() {
        return Err(format!(
            "queue size {size} is not a power of two between 2 and 32768"
        ));
    }
    Ok(())
}

/// Checks the number of queue pairs.
pub(crate) fn validate_queue_pairs(pairs: usize) -> Result<(), String> {
    if pairs == 0 || pairs > usize::from(MAX_QUEUE_PAIRS) {
        return Err(format!(
            "{pairs} queue pairs requested, between 1 and {MAX_QUEUE_PAIRS} supported"
        ));
    }
    Ok(())
}

/// The configuration space: `mac` @0, `status` @6 (link always up),
/// `max_virtqueue_pairs` @8, `mtu` @10, all little-endian.
pub(crate) fn config_space(mac: MacAddr, queue_pairs: u16, mtu: u16) -> [u8; CONFIG_SPACE_SIZE] {
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    config[0..6].copy_from_slice(&mac.bytes());
    // VIRTIO_NET_S_LINK_UP is bit 0; the status field is 16 bits wide.
    config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    config[10..12].copy_from_slice(&mtu.to_le_bytes());
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddr = "02:ab:CD:0:1:ff".parse().unwrap();
        assert_eq!(mac.bytes(), [0x02, 0xab, 0xcd, 0x00, 0x01, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "02:ab:cd:00:01:fff",
            "02:ab:cd::01:ff",
            "0g:ab:cd:00:01:ff",
            "+2:ab:cd:00:01:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn random_macs_are_local_unicast_and_differ() {
        let a = MacAddr::random_local();
        let b = MacAddr::random_local();
        assert_eq!(a.bytes()[0], 0x02);
        assert!(!a.is_multicast());
        assert_ne!(a, b, "two random MACs collided");
    }

    #[test]
    fn config_space_layout() {
        let mac = MacAddr::new([2, 1, 2, 3, 4, 5]);
        let config = config_space(mac, 4, 1500);
        assert_eq!(&config[0..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(&config[6..8], &[1, 0]);
        assert_eq!(&config[8..10], &[4, 0]);
        assert_eq!(&config[10..12], &1500u16.to_le_bytes());
    }

    #[test]
    fn limits() {
        assert!(validate_queue_size(256).is_ok());
        assert!(validate_queue_size(32768).is_ok());
        assert!(validate_queue_size(0).is_err());
        assert!(validate_queue_size(1).is_err());
        assert!(validate_queue_size(100).is_err());
        assert!(validate_queue_pairs(0).is_err());
        assert!(validate_queue_pairs(1).is_ok());
        assert!(validate_queue_pairs(65).is_err());
    }
}
