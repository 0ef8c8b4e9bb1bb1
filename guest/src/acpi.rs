//! Just enough ACPI to find the PCI ECAM (RSDP -> XSDT/RSDT -> MCFG) and
//! the reset register (FADT). All tables are read through the identity map.

/// One MCFG allocation: ECAM for a range of buses of one segment.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// Where the RSDP was found and what it points at.
#[derive(Clone, Copy, Debug)]
pub struct Rsdp {
    pub addr: u64,
    pub revision: u8,
    pub rsdt: u32,
    pub xsdt: u64,
}

fn read_bytes<const N: usize>(addr: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        // SAFETY: callers pass addresses of firmware tables, which lie in
        // identity-mapped low memory; volatile because firmware owns them.
        *byte = unsafe { ((addr + i as u64) as *const u8).read_volatile() };
    }
    out
}

fn read_u32(addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes::<4>(addr))
}

fn read_u64(addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(addr))
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        // SAFETY: as in `read_bytes`.
        sum = sum.wrapping_add(unsafe { ((addr + i) as *const u8).read_volatile() });
    }
    sum == 0
}

fn parse_rsdp(addr: u64) -> Option<Rsdp> {
    if &read_bytes::<8>(addr) != b"RSD PTR " || !checksum_ok(addr, 20) {
        return None;
    }
    let revision = read_bytes::<1>(addr + 15)[0];
    let rsdt = read_u32(addr + 16);
    let xsdt = if revision >= 2 && checksum_ok(addr, u64::from(read_u32(addr + 20))) {
        read_u64(addr + 24)
    } else {
        0
    };
    Some(Rsdp {
        addr,
        revision,
        rsdt,
        xsdt,
    })
}

/// Finds the RSDP: at `hint` (PVH start_info.rsdp_paddr) when non-zero, else
/// in the first KiB of the EBDA or in 0xE0000-0xFFFFF.
pub fn find_rsdp(hint: u64) -> Option<Rsdp> {
    if hint != 0 {
        if let Some(rsdp) = parse_rsdp(hint) {
            return Some(rsdp);
        }
    }
    let ebda = u64::from(u16::from_le_bytes(read_bytes::<2>(0x40e))) << 4;
    if (0x80000..0xa0000).contains(&ebda) {
        for addr in (ebda..ebda + 1024).step_by(16) {
            if let Some(rsdp) = parse_rsdp(addr) {
                return Some(rsdp);
            }
        }
    }
    (0xe0000..0x100000u64).step_by(16).find_map(parse_rsdp)
}

/// Looks up a table by signature through the XSDT (or the RSDT).
pub fn find_table(rsdp: &Rsdp, signature: &[u8; 4]) -> Option<u64> {
    let (root, entry_size) = if rsdp.xsdt != 0 {
        (rsdp.xsdt, 8)
    } else {
        (u64::from(rsdp.rsdt), 4)
    };
    if root == 0 || !checksum_ok(root, u64::from(read_u32(root + 4))) {
        return None;
    }
    let len = u64::from(read_u32(root + 4));
    let mut entry = root + 36;
    while entry + entry_size <= root + len {
        let table = if entry_size == 8 {
            read_u64(entry)
        } else {
            u64::from(read_u32(entry))
        };
        if table != 0 && &read_bytes::<4>(table) == signature {
            let table_len = u64::from(read_u32(table + 4));
            if checksum_ok(table, table_len) {
                return Some(table);
            }
        }
        entry += entry_size;
    }
    None
}

/// The ECAM covering segment 0, bus 0, from the MCFG.
pub fn find_ecam(rsdp: &Rsdp) -> Option<Ecam> {
    let mcfg = find_table(rsdp, b"MCFG")?;
    let len = u64::from(read_u32(mcfg + 4));
    let mut entry = mcfg + 44;
    while entry + 16 <= mcfg + len {
        let ecam = Ecam {
            base: read_u64(entry),
            segment: u16::from_le_bytes(read_bytes::<2>(entry + 8)),
            start_bus: read_bytes::<1>(entry + 10)[0],
            end_bus: read_bytes::<1>(entry + 11)[0],
        };
        if ecam.segment == 0 && ecam.start_bus == 0 {
            return Some(ecam);
        }
        entry += 16;
    }
    None
}

/// The FADT's reset register as (port, value), if the FADT has one
/// (RESET_REG_SUP, flags bit 10) in system I/O space.
pub fn find_reset_port(rsdp: &Rsdp) -> Option<(u16, u8)> {
    const FLAGS: u64 = 112;
    const RESET_REG: u64 = 116;
    const RESET_VALUE: u64 = 128;
    const RESET_REG_SUP: u32 = 1 << 10;
    const SYSTEM_IO: u8 = 1;
    let fadt = find_table(rsdp, b"FACP")?;
    if u64::from(read_u32(fadt + 4)) <= RESET_VALUE {
        return None;
    }
    // Generic address structure: space, bit width, bit offset, access
    // size, 64-bit address.
    let space = read_bytes::<1>(fadt + RESET_REG)[0];
    if read_u32(fadt + FLAGS) & RESET_REG_SUP == 0 || space != SYSTEM_IO {
        return None;
    }
    let port = u16::try_from(read_u64(fadt + RESET_REG + 4)).ok()?;
    Some((port, read_bytes::<1>(fadt + RESET_VALUE)[0]))
}
