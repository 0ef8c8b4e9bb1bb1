//! The `key=value,...` grammar of option values, and the value types in
//! them (sizes, switches, MAC addresses, names, host PCI addresses).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use virtio_devices::net::{MacAddr, MacParseError};

use super::ConfigError;

/// The parsed `key=value` pairs of one option value, checked against the
/// keys the option knows. Keys are taken out as they are used.
#[derive(Debug)]
pub(crate) struct OptionList<'a> {
    option: &'static str,
    pairs: BTreeMap<&'a str, &'a str>,
}

impl<'a> OptionList<'a> {
    /// Splits `value` of command line option `option` (e.g. "--disk") into
    /// pairs. Every item must be `key=value` with a known key, given once,
    /// with a non-empty value. Values cannot contain commas.
    pub(crate) fn parse(
        option: &'static str,
        value: &'a str,
        known: &[&'static str],
    ) -> Result<Self, ConfigError> {
        let mut pairs = BTreeMap::new();
        if value.is_empty() {
            return Err(ConfigError::Empty { option });
        }
        for item in value.split(',') {
            let Some((key, val)) = item.split_once('=') else {
                return Err(if item.is_empty() {
                    ConfigError::Empty { option }
                } else if known.contains(&item) {
                    ConfigError::MissingValue {
                        option,
                        key: item.to_string(),
                    }
                } else {
                    ConfigError::NotKeyValue {
                        option,
                        item: item.to_string(),
                    }
                });
            };
            if !known.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key: key.to_string(),
                    known: known.join(", "),
                });
            }
            if val.is_empty() {
                return Err(ConfigError::MissingValue {
                    option,
                    key: key.to_string(),
                });
            }
            if pairs.insert(key, val).is_some() {
                return Err(ConfigError::DuplicateKey {
                    option,
                    key: key.to_string(),
                });
            }
        }
        Ok(OptionList { option, pairs })
    }

    /// The value of `key`, if given.
    pub(crate) fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.get(key).copied()
    }

    /// The value of `key`, which must be given.
    pub(crate) fn required(&self, key: &'static str) -> Result<&'a str, ConfigError> {
        self.get(key).ok_or(ConfigError::MissingKey {
            option: self.option,
            key,
        })
    }

    /// The value of `key` converted by `convert`, whose error text becomes
    /// the reason of an [`ConfigError::InvalidValue`].
    pub(crate) fn get_with<T>(
        &self,
        key: &'static str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|value| {
                convert(value).map_err(|reason| ConfigError::InvalidValue {
                    option: self.option,
                    key,
                    value: value.to_string(),
                    reason,
                })
            })
            .transpose()
    }

    /// Like [`get_with`](Self::get_with) for a key that must be given.
    pub(crate) fn required_with<T>(
        &self,
        key: &'static str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.required(key)?;
        self.get_with(key, convert)?.ok_or(ConfigError::MissingKey {
            option: self.option,
            key,
        })
    }
}

/// Parses a byte size: decimal digits with an optional binary suffix
/// K, M, G or T (upper or lower case; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a number with an optional K, M, G or T suffix".to_string());
    }
    let n: u64 = digits.parse().map_err(|_| "number too large".to_string())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses an on/off switch (also true/false).
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("expected on or off".to_string()),
    }
}

/// Checks a device ID: 1 to 20 characters (the length of a virtio-blk
/// serial number) of letters, digits, '_', '-' and '.'.
pub fn check_id(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err("at most 20 characters".to_string());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("only letters, digits, '_', '-' and '.' are allowed".to_string());
    }
    Ok(s.to_string())
}

/// Checks a network interface name the way Linux does: 1 to 15 bytes, not
/// "." or "..", without '/', ':' or white space.
pub fn check_ifname(s: &str) -> Result<String, String> {
    if s.len() > 15 {
        return Err("interface names have at most 15 characters".to_string());
    }
    if s == "." || s == ".." {
        return Err("not a valid interface name".to_string());
    }
    if s.chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("interface names cannot contain '/', ':' or white space".to_string());
    }
    Ok(s.to_string())
}

/// Parses a guest MAC address: six hex bytes, unicast, not all zero.
pub fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let mac: MacAddr = s.parse().map_err(|e: MacParseError| e.to_string())?;
    if mac.is_multicast() || mac.bytes() == [0; 6] {
        return Err("not a unicast address (multicast bit set, or all zero)".to_string());
    }
    Ok(mac)
}

/// A host PCI function address, `DDDD:BB:DD.F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPciAddress {
    /// PCI segment (domain).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl FromStr for HostPciAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a PCI address like 0000:01:00.0");
        let hex = |part: &str, len: usize| -> Result<u32, String> {
            if part.len() != len || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(part, 16).map_err(|_| bad())
        };
        let (segment, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let (segment, bus) = (hex(segment, 4)?, hex(bus, 2)?);
        let (device, function) = (hex(device, 2)?, hex(function, 1)?);
        if device >= 32 || function >= 8 {
            return Err(format!(
                "'{s}': device must be below 0x20 and function below 8"
            ));
        }
        // Each value was checked to fit in its field width above.
        Ok(HostPciAddress {
            segment: segment as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for HostPciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}
