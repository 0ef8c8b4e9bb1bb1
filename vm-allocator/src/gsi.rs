// Copyright 2025 The Trellis Authors
// SPDX-License-Identifier: Apache-2.0

//! GSI allocation: legacy IOAPIC pins and MSI GSIs, kept apart.
//!
//! On x86_64 with KVM's in-kernel IOAPIC, GSI `n < pins` is IOAPIC pin `n`;
//! GSIs from `pins` up to the routing table size carry MSI routes.

use std::collections::BTreeMap;

use log::{debug, error};
use rust_vmm_allocator::IdAllocator;

use crate::error::{EngineError, Error, Result};

/// How GSIs are split between IOAPIC pins and MSI routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GsiLayout {
    /// Number of IOAPIC pins: legacy IRQs are `0..ioapic_pins`, and MSI GSIs
    /// start right after them.
    pub ioapic_pins: u32,
    /// Exclusive end of the MSI GSIs (KVM's routing table holds 4096).
    pub msi_gsi_limit: u32,
    /// Pins of fixed devices (serial, RTC, ...): never handed out by
    /// `allocate_legacy_irq`, each claimable once with `reserve_legacy_irq`.
    pub reserved_legacy_irqs: Vec<u32>,
}

/// Why a GSI engine call failed, with the operation for context.
fn engine(op: &'static str) -> impl Fn(EngineError) -> Error {
    move |source| Error::GsiEngine { op, source }
}

/// Takes `id` specifically out of `ids`, which must not have it allocated.
///
/// Why the loop: `IdAllocator` can only hand out its lowest free id. It
/// returns freed ids in ascending order before fresh ones, so `id` comes out
/// after at most one pass over the range; everything drawn before it is given
/// back, which keeps the lowest-first order for later allocations.
fn claim_id(ids: &mut IdAllocator, id: u32) -> std::result::Result<(), EngineError> {
    let mut drawn = Vec::new();
    let result = loop {
        match ids.allocate_id() {
            Ok(got) if got == id => break Ok(()),
            Ok(got) => drawn.push(got),
            Err(e) => break Err(e),
        }
    };
    for other in drawn {
        if let Err(e) = ids.free_id(other) {
            error!("cannot give back id {other} while claiming {id}: {e}");
        }
    }
    result
}

/// Allocator for legacy IRQs and MSI GSIs.
#[derive(Clone, Debug)]
pub(crate) struct GsiAllocator {
    pins: u32,
    msi_limit: u32,
    legacy: IdAllocator,
    msi: IdAllocator,
    /// Reserved pins -> whether currently claimed. They stay allocated in
    /// `legacy` forever so that dynamic allocation never sees them.
    reserved: BTreeMap<u32, bool>,
}

impl GsiAllocator {
    pub(crate) fn new(layout: &GsiLayout) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidGsiLayout { reason };
        let pins = layout.ioapic_pins;
        let last_pin = pins
            .checked_sub(1)
            .ok_or_else(|| invalid("at least one IOAPIC pin is needed".into()))?;
        if layout.msi_gsi_limit <= pins {
            return Err(invalid(format!(
                "MSI GSI limit {} leaves no MSI GSIs above the {pins} IOAPIC pins",
                layout.msi_gsi_limit
            )));
        }
        let mut legacy =
            IdAllocator::new(0, last_pin).map_err(engine("creating the legacy IRQ allocator"))?;
        let msi = IdAllocator::new(pins, layout.msi_gsi_limit - 1)
            .map_err(engine("creating the MSI GSI allocator"))?;
        let mut reserved = BTreeMap::new();
        for &irq in &layout.reserved_legacy_irqs {
            if irq >= pins {
                return Err(invalid(format!(
                    "reserved legacy IRQ {irq} is not an IOAPIC pin (0..{pins})"
                )));
            }
            // Listing a pin twice is harmless.
            if reserved.insert(irq, false).is_none() {
                claim_id(&mut legacy, irq).map_err(engine("reserving a legacy IRQ"))?;
            }
        }
        Ok(GsiAllocator {
            pins,
            msi_limit: layout.msi_gsi_limit,
            legacy,
            msi,
            reserved,
        })
    }

    pub(crate) fn ioapic_pins(&self) -> u32 {
        self.pins
    }

    pub(crate) fn msi_gsis(&self) -> std::ops::Range<u32> {
        self.pins..self.msi_limit
    }

    pub(crate) fn allocate_legacy_irq(&mut self) -> Result<u32> {
        match self.legacy.allocate_id() {
            Ok(irq) => {
                debug!("allocated legacy IRQ {irq}");
                Ok(irq)
            }
            Err(EngineError::ResourceNotAvailable) => {
                Err(Error::LegacyIrqsExhausted { pins: self.pins })
            }
            Err(e) => Err(engine("allocating a legacy IRQ")(e)),
        }
    }

    pub(crate) fn reserve_legacy_irq(&mut self, irq: u32) -> Result<()> {
        if irq >= self.pins {
            return Err(Error::LegacyIrqOutOfRange {
                irq,
                pins: self.pins,
            });
        }
        if let Some(claimed) = self.reserved.get_mut(&irq) {
            if *claimed {
                return Err(Error::LegacyIrqInUse { irq });
            }
            *claimed = true;
        } else {
            if self.legacy.is_allocated(irq) {
                return Err(Error::LegacyIrqInUse { irq });
            }
            claim_id(&mut self.legacy, irq).map_err(engine("claiming a legacy IRQ"))?;
        }
        debug!("reserved legacy IRQ {irq}");
        Ok(())
    }

    pub(crate) fn is_legacy_irq_allocated(&self, irq: u32) -> bool {
        match self.reserved.get(&irq) {
            Some(&claimed) => claimed,
            None => self.legacy.is_allocated(irq),
        }
    }

    pub(crate) fn free_legacy_irq(&mut self, irq: u32) -> Result<()> {
        if irq >= self.pins {
            return Err(Error::LegacyIrqOutOfRange {
                irq,
                pins: self.pins,
            });
        }
        if !self.is_legacy_irq_allocated(irq) {
            return Err(Error::LegacyIrqNotAllocated { irq });
        }
        if let Some(claimed) = self.reserved.get_mut(&irq) {
            // Back to reserved, not to the dynamic pool.
            *claimed = false;
        } else {
            self.legacy
                .free_id(irq)
                .map_err(engine("freeing a legacy IRQ"))?;
        }
        debug!("freed legacy IRQ {irq}");
        Ok(())
    }

    fn msi_exhausted(&self, count: u32) -> Error {
        Error::MsiGsisExhausted {
            count,
            base: self.pins,
            limit: self.msi_limit,
        }
    }

    pub(crate) fn allocate_msi_gsi(&mut self) -> Result<u32> {
        match self.msi.allocate_id() {
            Ok(gsi) => {
                debug!("allocated MSI GSI {gsi}");
                Ok(gsi)
            }
            Err(EngineError::ResourceNotAvailable) => Err(self.msi_exhausted(1)),
            Err(e) => Err(engine("allocating an MSI GSI")(e)),
        }
    }

    pub(crate) fn allocate_msi_gsis(&mut self, count: u32) -> Result<Vec<u32>> {
        if count == 0 {
            return Err(Error::ZeroGsiCount);
        }
        if count > self.msi_limit - self.pins {
            return Err(self.msi_exhausted(count));
        }
        let mut got = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match self.msi.allocate_id() {
                Ok(gsi) => got.push(gsi),
                Err(e) => {
                    // All or nothing: give back what this call took.
                    for &gsi in &got {
                        if let Err(e) = self.msi.free_id(gsi) {
                            error!("cannot roll back MSI GSI {gsi}: {e}");
                        }
                    }
                    return Err(match e {
                        EngineError::ResourceNotAvailable => self.msi_exhausted(count),
                        e => engine("allocating MSI GSIs")(e),
                    });
                }
            }
        }
        debug!("allocated {count} MSI GSIs: {got:?}");
        Ok(got)
    }

    pub(crate) fn is_msi_gsi_allocated(&self, gsi: u32) -> bool {
        self.msi.is_allocated(gsi)
    }

    pub(crate) fn free_msi_gsi(&mut self, gsi: u32) -> Result<()> {
        if !self.msi_gsis().contains(&gsi) {
            return Err(Error::MsiGsiOutOfRange {
                gsi,
                base: self.pins,
                limit: self.msi_limit,
            });
        }
        if !self.msi.is_allocated(gsi) {
            return Err(Error::MsiGsiNotAllocated { gsi });
        }
        self.msi
            .free_id(gsi)
            .map_err(engine("freeing an MSI GSI"))?;
        debug!("freed MSI GSI {gsi}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(pins: u32, limit: u32, reserved: &[u32]) -> GsiLayout {
        GsiLayout {
            ioapic_pins: pins,
            msi_gsi_limit: limit,
            reserved_legacy_irqs: reserved.to_vec(),
        }
    }

    fn gsis(pins: u32, limit: u32, reserved: &[u32]) -> GsiAllocator {
        GsiAllocator::new(&layout(pins, limit, reserved)).unwrap()
    }

    fn drain_legacy(g: &mut GsiAllocator) -> Vec<u32> {
        std::iter::from_fn(|| g.allocate_legacy_irq().ok()).collect()
    }

    #[test]
    fn layout_is_validated() {
        let err = |l: GsiLayout| match GsiAllocator::new(&l) {
            Err(Error::InvalidGsiLayout { reason }) => reason,
            other => panic!("expected an invalid layout, got {other:?}"),
        };
        assert!(err(layout(0, 4096, &[])).contains("IOAPIC pin"));
        assert!(err(layout(24, 24, &[])).contains("no MSI GSIs"));
        assert!(err(layout(24, 10, &[])).contains("no MSI GSIs"));
        assert!(err(layout(24, 4096, &[4, 24])).contains("reserved legacy IRQ 24"));
        let g = gsis(24, 25, &[4, 4]);
        assert_eq!((g.ioapic_pins(), g.msi_gsis()), (24, 24..25));
        let g = gsis(1, u32::MAX, &[]);
        assert_eq!(g.msi_gsis(), 1..u32::MAX);
    }

    #[test]
    fn legacy_and_msi_ranges_never_cross() {
        let mut g = gsis(24, 4096, &[]);
        let legacy = drain_legacy(&mut g);
        assert_eq!(legacy, (0..24).collect::<Vec<_>>());
        assert_eq!(
            g.allocate_legacy_irq().unwrap_err(),
            Error::LegacyIrqsExhausted { pins: 24 }
        );
        assert_eq!(
            g.allocate_legacy_irq().unwrap_err().to_string(),
            "no free legacy IRQ among IOAPIC pins 0..24"
        );
        let mut msi = Vec::new();
        while let Ok(gsi) = g.allocate_msi_gsi() {
            assert!((24..4096).contains(&gsi), "{gsi}");
            msi.push(gsi);
        }
        assert_eq!(msi.len(), 4096 - 24);
        assert_eq!(msi.first(), Some(&24));
        assert_eq!(
            g.allocate_msi_gsi().unwrap_err(),
            Error::MsiGsisExhausted {
                count: 1,
                base: 24,
                limit: 4096
            }
        );
        // Freeing one MSI GSI gives it back, never a legacy one.
        g.free_msi_gsi(1000).unwrap();
        assert_eq!(g.allocate_msi_gsi().unwrap(), 1000);
        assert!(g.allocate_legacy_irq().is_err());
    }

    #[test]
    fn reserved_pins_are_not_handed_out() {
        let mut g = gsis(24, 64, &[0, 1, 4, 8, 23]);
        let legacy = drain_legacy(&mut g);
        let expected: Vec<u32> = (0..24).filter(|i| ![0, 1, 4, 8, 23].contains(i)).collect();
        assert_eq!(legacy, expected);
        for irq in [0, 1, 4, 8, 23] {
            assert!(!g.is_legacy_irq_allocated(irq));
        }
        // Each reserved pin can be claimed once.
        g.reserve_legacy_irq(4).unwrap();
        assert!(g.is_legacy_irq_allocated(4));
        assert_eq!(
            g.reserve_legacy_irq(4).unwrap_err(),
            Error::LegacyIrqInUse { irq: 4 }
        );
        // Freed, it goes back to reserved, not to the dynamic pool.
        g.free_legacy_irq(4).unwrap();
        assert_eq!(
            g.free_legacy_irq(4).unwrap_err(),
            Error::LegacyIrqNotAllocated { irq: 4 }
        );
        assert!(g.allocate_legacy_irq().is_err());
        g.reserve_legacy_irq(4).unwrap();
    }

    #[test]
    fn reserve_claims_a_specific_pin() {
        let mut g = gsis(24, 64, &[4]);
        assert_eq!(g.allocate_legacy_irq().unwrap(), 0);
        g.reserve_legacy_irq(7).unwrap();
        g.reserve_legacy_irq(2).unwrap();
        assert_eq!(
            g.reserve_legacy_irq(0).unwrap_err(),
            Error::LegacyIrqInUse { irq: 0 }
        );
        assert_eq!(
            g.reserve_legacy_irq(7).unwrap_err(),
            Error::LegacyIrqInUse { irq: 7 }
        );
        assert_eq!(
            g.reserve_legacy_irq(24).unwrap_err(),
            Error::LegacyIrqOutOfRange { irq: 24, pins: 24 }
        );
        // Lowest-first order survives the claims.
        let rest = drain_legacy(&mut g);
        let expected: Vec<u32> = (1..24).filter(|i| ![2, 4, 7].contains(i)).collect();
        assert_eq!(rest, expected);
        // Claiming a pin that was freed earlier works too.
        g.free_legacy_irq(10).unwrap();
        g.free_legacy_irq(12).unwrap();
        g.reserve_legacy_irq(12).unwrap();
        assert_eq!(g.allocate_legacy_irq().unwrap(), 10);
        assert!(g.allocate_legacy_irq().is_err());
    }

    #[test]
    fn free_errors() {
        let mut g = gsis(24, 64, &[]);
        assert_eq!(
            g.free_legacy_irq(3).unwrap_err(),
            Error::LegacyIrqNotAllocated { irq: 3 }
        );
        assert_eq!(
            g.free_legacy_irq(30).unwrap_err(),
            Error::LegacyIrqOutOfRange { irq: 30, pins: 24 }
        );
        let irq = g.allocate_legacy_irq().unwrap();
        g.free_legacy_irq(irq).unwrap();
        assert_eq!(
            g.free_legacy_irq(irq).unwrap_err(),
            Error::LegacyIrqNotAllocated { irq }
        );

        let out = |gsi| Error::MsiGsiOutOfRange {
            gsi,
            base: 24,
            limit: 64,
        };
        assert_eq!(g.free_msi_gsi(5).unwrap_err(), out(5));
        assert_eq!(g.free_msi_gsi(64).unwrap_err(), out(64));
        assert_eq!(
            g.free_msi_gsi(24).unwrap_err(),
            Error::MsiGsiNotAllocated { gsi: 24 }
        );
        let gsi = g.allocate_msi_gsi().unwrap();
        assert!(g.is_msi_gsi_allocated(gsi));
        g.free_msi_gsi(gsi).unwrap();
        assert!(!g.is_msi_gsi_allocated(gsi));
        assert_eq!(
            g.free_msi_gsi(gsi).unwrap_err(),
            Error::MsiGsiNotAllocated { gsi }
        );
    }

    #[test]
    fn msi_batches_are_all_or_nothing() {
        let mut g = gsis(24, 40, &[]);
        assert_eq!(g.allocate_msi_gsis(0).unwrap_err(), Error::ZeroGsiCount);
        let first = g.allocate_msi_gsis(10).unwrap();
        assert_eq!(first, (24..34).collect::<Vec<_>>());
        // 6 left: a batch of 7 fails and leaves all 6 free.
        assert_eq!(
            g.allocate_msi_gsis(7).unwrap_err(),
            Error::MsiGsisExhausted {
                count: 7,
                base: 24,
                limit: 40
            }
        );
        assert!((34..40).all(|gsi| !g.is_msi_gsi_allocated(gsi)));
        // Way too many is refused up front.
        assert!(g.allocate_msi_gsis(u32::MAX).is_err());
        assert_eq!(
            g.allocate_msi_gsis(6).unwrap(),
            (34..40).collect::<Vec<_>>()
        );
        assert!(g.allocate_msi_gsi().is_err());

        // Non-contiguous batches after frees, still ascending.
        g.free_msi_gsi(25).unwrap();
        g.free_msi_gsi(30).unwrap();
        g.free_msi_gsi(38).unwrap();
        assert!(g.allocate_msi_gsis(4).is_err());
        assert_eq!(g.allocate_msi_gsis(3).unwrap(), vec![25, 30, 38]);
    }

    #[test]
    fn failed_batch_does_not_disturb_order() {
        let mut g = gsis(24, 4096, &[]);
        let a = g.allocate_msi_gsis(4000).unwrap();
        assert!(g.allocate_msi_gsis(100).is_err());
        // The GSIs drawn and given back come out again in ascending order.
        let rest = g.allocate_msi_gsis(72).unwrap();
        assert_eq!(rest, (4024..4096).collect::<Vec<_>>());
        assert_eq!(a.last(), Some(&4023));
    }
}
