//! Legacy interrupt wiring: KVM's default irqchip routes and the fixed PCI
//! INTx swizzle the DSDT's `_PRT` describes.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, so the one owner
//! of that table (the interrupt manager) must start it from
//! [`default_irqchip_routes`] or the PIC/IOAPIC pins stop being reachable
//! through their GSIs (irqfds on GSI 4 for the serial port, for example).

use kvm_bindings::{
    kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP,
};
use vm_allocator::layout::IOAPIC_PINS;

/// Number of ISA interrupt lines, each wired to the PIC and the IOAPIC.
const ISA_IRQS: u32 = 16;

/// First IOAPIC pin used for PCI INTx.
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of IOAPIC pins PCI INTx is spread over (16..=23). The device
/// manager should keep these out of dynamic legacy IRQ allocation.
pub const PCI_INTX_GSIS: u32 = 8;

const _: () = assert!(PCI_INTX_GSI_BASE + PCI_INTX_GSIS <= IOAPIC_PINS);

/// A PCI function's interrupt pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IntxPin {
    /// INTA#
    IntA,
    /// INTB#
    IntB,
    /// INTC#
    IntC,
    /// INTD#
    IntD,
}

impl IntxPin {
    /// All pins in order.
    pub const ALL: [IntxPin; 4] = [IntxPin::IntA, IntxPin::IntB, IntxPin::IntC, IntxPin::IntD];

    /// From the Interrupt Pin configuration register: 1..=4 for INTA#..INTD#,
    /// `None` for 0 ("no pin") or an invalid value.
    pub fn from_config_pin(pin: u8) -> Option<Self> {
        match pin {
            1 => Some(IntxPin::IntA),
            2 => Some(IntxPin::IntB),
            3 => Some(IntxPin::IntC),
            4 => Some(IntxPin::IntD),
            _ => None,
        }
    }

    /// The pin number ACPI's `_PRT` uses: 0..=3 for INTA#..INTD#.
    pub fn acpi_index(self) -> u8 {
        self as u8
    }
}

/// The GSI (= IOAPIC pin) that `slot`'s `pin` is wired to on bus 0.
///
/// Slot n's INTA# goes to GSI 16 + n % 8, and each further pin to the next
/// GSI (wrapping within 16..=23), so neighbouring slots' INTA# lines do not
/// share a GSI. The DSDT's `_PRT` is generated from this same function; the
/// device manager uses it for a function's Interrupt Line register and its
/// INTx route.
pub fn legacy_irq_for(slot: u8, pin: IntxPin) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin.acpi_index())) % PCI_INTX_GSIS
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

/// The routes KVM installs by itself when the in-kernel irqchip is created:
/// GSIs 0-15 go to both the IOAPIC pin and the PIC pin of the same number
/// (master for 0-7, slave for 8-15), GSIs 16-23 to the IOAPIC only.
///
/// Whoever calls `KVM_SET_GSI_ROUTING` must include these, because that
/// ioctl replaces the whole table.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity((ISA_IRQS + IOAPIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < ISA_IRQS {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, pic, gsi % 8));
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_pins() {
        assert_eq!(IntxPin::from_config_pin(0), None);
        assert_eq!(IntxPin::from_config_pin(1), Some(IntxPin::IntA));
        assert_eq!(IntxPin::from_config_pin(4), Some(IntxPin::IntD));
        assert_eq!(IntxPin::from_config_pin(5), None);
        assert_eq!(IntxPin::IntC.acpi_index(), 2);
    }

    #[test]
    fn swizzle_stays_in_16_to_23() {
        assert_eq!(legacy_irq_for(0, IntxPin::IntA), 16);
        assert_eq!(legacy_irq_for(0, IntxPin::IntD), 19);
        assert_eq!(legacy_irq_for(1, IntxPin::IntA), 17);
        assert_eq!(legacy_irq_for(5, IntxPin::IntD), 16);
        assert_eq!(legacy_irq_for(7, IntxPin::IntA), 23);
        assert_eq!(legacy_irq_for(8, IntxPin::IntA), 16);
        for slot in 0..=u8::MAX {
            for pin in IntxPin::ALL {
                let gsi = legacy_irq_for(slot, pin);
                assert!((16..24).contains(&gsi), "slot {slot} {pin:?} -> {gsi}");
            }
        }
    }

    #[test]
    fn default_routes_match_kvm() {
        let routes = default_irqchip_routes();
        assert_eq!(routes.len(), 40);
        let find = |gsi: u32, chip: u32| {
            routes
                .iter()
                .filter(|r| r.gsi == gsi && r.type_ == KVM_IRQ_ROUTING_IRQCHIP)
                // SAFETY: every entry was built as an irqchip route above.
                .map(|r| unsafe { r.u.irqchip })
                .find(|c| c.irqchip == chip)
                .map(|c| c.pin)
        };
        assert_eq!(find(0, KVM_IRQCHIP_IOAPIC), Some(0));
        assert_eq!(find(0, KVM_IRQCHIP_PIC_MASTER), Some(0));
        assert_eq!(find(4, KVM_IRQCHIP_PIC_MASTER), Some(4));
        assert_eq!(find(9, KVM_IRQCHIP_PIC_SLAVE), Some(1));
        assert_eq!(find(15, KVM_IRQCHIP_PIC_SLAVE), Some(7));
        assert_eq!(find(23, KVM_IRQCHIP_IOAPIC), Some(23));
        assert_eq!(find(16, KVM_IRQCHIP_PIC_SLAVE), None);
        assert_eq!(find(24, KVM_IRQCHIP_IOAPIC), None);
    }
}
