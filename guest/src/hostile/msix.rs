//! Hostile MSI-X programming of virtio-blk: messages to nowhere, garbage
//! data, masking with interrupts pending, MSI-X switched off, writes past
//! the table.
//!
//! What trellis documents (pci/src/msix.rs): a vector raised while masked
//! (entry or function mask) sets its pending bit and fires once unmasked; a
//! vector raised while MSI-X is disabled is dropped (INTx is used instead,
//! and we keep INTx disabled); table bytes beyond the table read as zero and
//! ignore writes; the PBA is read-only; address bits 1:0 and vector control
//! bits 31:1 are read-only zero. Whatever a message says, the VMM passes it
//! to KVM: a message to nowhere must not hurt the VMM, and the interrupt may
//! go nowhere. We keep the delivery mode "fixed" (or lowest priority) and
//! vectors >= 0x20 in garbage data, since NMI/INIT/SIPI or an exception
//! vector would hit our own vCPU rather than the VMM.

use super::dev::*;
use super::mem::{peek, poke};
use super::{fmt, spin_ms, wait_ms, Action, Hx, Res};
use crate::interrupts;
use crate::serial::Hex;
use alloc::string::String;

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_MASK: u16 = 1 << 14;

/// A good request on the running device; whether `vector` fired.
fn request_irq(dev: &mut Dev, vector: u8) -> Result<bool, String> {
    let before = interrupts::count(vector);
    dev.good_request()?;
    Ok(wait_ms(200, || interrupts::count(vector) != before))
}

/// Entry 0 gets `address`/`data`; a request must still complete; then the
/// entry is restored and the interrupt must arrive again.
fn odd_message(hx: &mut Hx, dev: &mut Dev, address: u64, data: u32, watch: u8) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let entry = dev.msix_entry(0);
    poke::<u32>(entry, address as u32);
    poke::<u32>(entry + 4, (address >> 32) as u32);
    poke::<u32>(entry + 8, data);
    let seen = request_irq(dev, watch)?;
    dev.restore_msix_entry(0, hx.apic_id);
    if !request_irq(dev, dev.vector(0))? {
        return Err("no interrupt after restoring the entry".into());
    }
    Ok(fmt!(
        "completed, irq on {}={}",
        Hex(watch.into()),
        if seen { "yes" } else { "no" }
    ))
}

fn addr_zero(hx: &mut Hx, dev: &mut Dev) -> Res {
    let v = dev.vector(0);
    odd_message(hx, dev, 0, v.into(), v)
}

fn addr_outside_lapic(hx: &mut Hx, dev: &mut Dev) -> Res {
    let v = dev.vector(0);
    odd_message(hx, dev, 0xffff_ffff_dead_beec, v.into(), v)
}

fn data_garbage(hx: &mut Hx, dev: &mut Dev) -> Res {
    let lapic = 0xfee0_0000 | (u64::from(hx.apic_id & 0xff) << 12);
    // Reserved bits set, fixed delivery, vector 0xee.
    let a = odd_message(hx, dev, lapic, 0xdead_00ee, 0xee)?;
    // Lowest priority delivery, vector 0xed.
    let b = odd_message(hx, dev, lapic, 0x0000_01ed, 0xed)?;
    Ok(fmt!("{a}; {b}"))
}

fn pending_bit(dev: &Dev) -> bool {
    peek::<u64>(dev.bar + dev.msix_pba) & 1 != 0
}

/// Masks entry 0 (or the whole function), completes a request, checks
/// that it is pending and silent, unmasks and checks that it fires.
fn masked_pending(hx: &mut Hx, dev: &mut Dev, function: bool) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let vector = dev.vector(0);
    let mask = |hx: &mut Hx, dev: &Dev, on: bool| {
        if function {
            let control = if on {
                MSIX_ENABLE | MSIX_MASK
            } else {
                MSIX_ENABLE
            };
            dev.set_msix_control(hx.pci, control);
        } else {
            poke::<u32>(dev.msix_entry(0) + 12, u32::from(on));
        }
    };
    mask(hx, dev, true);
    let before = interrupts::count(vector);
    let result = dev.good_request();
    spin_ms(50);
    let silent = interrupts::count(vector) == before;
    let pending = pending_bit(dev);
    mask(hx, dev, false);
    result?;
    if !silent {
        return Err("interrupt delivered while masked".into());
    }
    if !pending {
        return Err("pending bit not set while masked".into());
    }
    if !wait_ms(500, || interrupts::count(vector) != before) {
        return Err("pending interrupt not delivered on unmask".into());
    }
    if pending_bit(dev) {
        return Err("pending bit still set after delivery".into());
    }
    Ok("pending, delivered on unmask".into())
}

fn function_mask_pending(hx: &mut Hx, dev: &mut Dev) -> Res {
    masked_pending(hx, dev, true)
}

fn vector_mask_pending(hx: &mut Hx, dev: &mut Dev) -> Res {
    masked_pending(hx, dev, false)
}

fn disabled(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let vector = dev.vector(0);
    dev.read_isr();
    dev.set_msix_control(hx.pci, 0);
    let before = interrupts::count(vector);
    let result = dev.good_request();
    spin_ms(50);
    let isr = dev.read_isr();
    dev.set_msix_control(hx.pci, MSIX_ENABLE);
    result?;
    spin_ms(50);
    if interrupts::count(vector) != before {
        return Err("MSI delivered while MSI-X was disabled".into());
    }
    if isr & 1 == 0 {
        return Err(fmt!("ISR {} lacks the queue bit", Hex(isr.into())));
    }
    Ok(fmt!("completed, no MSI, isr={}", Hex(isr.into())))
}

fn table_overrun(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let beyond = dev.msix_entry(dev.msix_entries);
    for i in 0..4 {
        poke::<u32>(beyond + 4 * i, u32::MAX);
        if peek::<u32>(beyond + 4 * i) != 0 {
            return Err("bytes past the table are not zero".into());
        }
    }
    let pba = dev.bar + dev.msix_pba;
    poke::<u64>(pba, u64::MAX);
    if peek::<u64>(pba) != 0 {
        return Err("PBA accepted a write".into());
    }
    let entry = dev.msix_entry(0);
    poke::<u32>(entry, 0xfee0_0003 | ((hx.apic_id & 0xff) << 12));
    if peek::<u32>(entry) & 3 != 0 {
        return Err("address bits 1:0 writable".into());
    }
    poke::<u32>(entry + 12, 0xffff_fffe);
    if peek::<u32>(entry + 12) != 0 {
        return Err("vector control reserved bits writable".into());
    }
    // One qword over data and vector control: masks the entry.
    poke::<u64>(entry + 8, (1 << 32) | u64::from(dev.vector(0)));
    if peek::<u32>(entry + 12) != 1 {
        return Err("qword write did not mask".into());
    }
    dev.restore_msix_entry(0, hx.apic_id);
    if !request_irq(dev, dev.vector(0))? {
        return Err("no interrupt after restoring the entry".into());
    }
    Ok("ignored".into())
}

macro_rules! blk {
    ($name:literal, $f:ident) => {
        Action {
            name: $name,
            kind: Kind::Blk,
            run: $f,
        }
    };
}

pub const ACTIONS: &[Action] = &[
    blk!("msix-addr-zero", addr_zero),
    blk!("msix-addr-outside-lapic", addr_outside_lapic),
    blk!("msix-data-garbage", data_garbage),
    blk!("msix-function-mask-pending", function_mask_pending),
    blk!("msix-vector-mask-pending", vector_mask_pending),
    blk!("msix-disabled", disabled),
    blk!("msix-table-overrun", table_overrun),
];
