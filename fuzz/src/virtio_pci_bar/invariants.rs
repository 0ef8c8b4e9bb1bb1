//! What must hold after every step, with the device's worker idle:
//!
//! - device_status holds only the bits virtio defines, in an order the
//!   initialization sequence allows, and reads 0 right after a reset;
//! - FEATURES_OK is never set while the driver features hold a bit that
//!   was not offered, or lack VIRTIO_F_VERSION_1;
//! - msix_config and every queue_msix_vector read a table entry or
//!   NO_VECTOR; num_queues never changes;
//! - the MSI-X capability in configuration space agrees with `MsixConfig`,
//!   and no deliverable vector has its pending bit set;
//! - the interrupt group only hears of vectors of the table, and a vector
//!   only fires if it was the configuration vector, the vector of an
//!   enabled queue or pending, before or after the step;
//! - INTx is asserted exactly when the ISR is non-zero, INTx is not
//!   disabled and MSI-X is off, never twice in a row, and the PCI status
//!   interrupt bit says the same;
//! - BAR 0 is where the VMM mapped it;
//! - at most one worker thread, none unless DRIVER_OK.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use pci::interrupt::InterruptEvent;
use pci::PciDevice;
use virtio_devices::transport::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, VIRTIO_MSI_NO_VECTOR};
use virtio_devices::{DEVICE_ACKNOWLEDGE, DEVICE_DRIVER, DEVICE_DRIVER_OK, DEVICE_FEATURES_OK};

use super::harness::*;

/// Status bits virtio 1.2 §2.1 defines.
const STATUS_BITS: u8 = 0x01 | 0x02 | 0x04 | 0x08 | 0x40 | 0x80;
const F_VERSION_1: u64 = 1 << 32;

impl Harness {
    /// Every invariant that depends only on the current state.
    pub fn check_all(&mut self) {
        // Taken out so that the checks can use `self` mutably while the
        // message formatting (only on failure) borrows the step.
        let step = self.step.take();
        let ctx = Describe(&step);
        self.check_status(&ctx);
        self.check_vectors(&ctx);
        self.check_msix(&ctx);
        self.check_intx(&ctx);
        self.check_bar(&ctx);
        self.check_threads(&ctx);
        self.step = step;
    }

    fn check_status(&mut self, ctx: &Describe) {
        let status = self.dev.device_status();
        assert_eq!(
            status & !STATUS_BITS,
            0,
            "{ctx}: device_status {status:#x} has undefined bits"
        );
        let read = self.common(DEVICE_STATUS) as u8;
        assert_eq!(
            read, status,
            "{ctx}: device_status reads {read:#x}, is {status:#x}"
        );
        if self.reset {
            assert_eq!(
                status, 0,
                "{ctx}: device_status {status:#x} right after a reset"
            );
        }
        let order = [
            (DEVICE_DRIVER, DEVICE_ACKNOWLEDGE),
            (DEVICE_FEATURES_OK, DEVICE_DRIVER),
            (DEVICE_DRIVER_OK, DEVICE_FEATURES_OK),
        ];
        for (bit, needs) in order {
            assert!(
                status & bit == 0 || status & needs != 0,
                "{ctx}: device_status {status:#x} has {bit:#x} without {needs:#x}"
            );
        }
        if status & DEVICE_FEATURES_OK != 0 {
            let driver = self.dev.driver_features();
            let offered = self.offered();
            assert_eq!(
                driver & !offered,
                0,
                "{ctx}: FEATURES_OK with driver features {driver:#x}, offered {offered:#x}"
            );
            assert_ne!(
                driver & F_VERSION_1,
                0,
                "{ctx}: FEATURES_OK without VIRTIO_F_VERSION_1 ({driver:#x})"
            );
        }
    }

    /// Per queue: (vector, enabled), read through the BAR (the select
    /// register is put back).
    pub(super) fn queue_state(&mut self) -> Vec<(u16, bool)> {
        let select = self.common(QUEUE_SELECT);
        let state = (0..self.num_queues)
            .map(|q| {
                self.set_common(QUEUE_SELECT, u64::from(q));
                let vector = self.common(QUEUE_MSIX_VECTOR) as u16;
                let enabled = self.common(QUEUE_ENABLE) == 1;
                (vector, enabled)
            })
            .collect();
        self.set_common(QUEUE_SELECT, select);
        state
    }

    fn check_vectors(&mut self, ctx: &Describe) {
        let num = self.common(NUM_QUEUES) as u16;
        assert_eq!(num, self.num_queues, "{ctx}: num_queues changed to {num}");
        let vectors = self.vectors;
        let valid = move |v: u16| v < vectors || v == VIRTIO_MSI_NO_VECTOR;
        let config = self.common(MSIX_CONFIG) as u16;
        assert!(valid(config), "{ctx}: msix_config reads {config:#x}");
        for (q, (vector, _)) in self.queue_state().into_iter().enumerate() {
            assert!(
                valid(vector),
                "{ctx}: queue {q}: queue_msix_vector reads {vector:#x}, {} vectors",
                self.vectors
            );
        }
    }

    fn check_msix(&mut self, ctx: &Describe) {
        let cap = self.msix_cap;
        let ctl = self.cfg_read(cap + 2, 2) as u16;
        let table = self.cfg_read(cap + 4, 4);
        let pba = self.cfg_read(cap + 8, 4);
        let msix = self.dev.msix_config().clone();
        let msix = msix.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            (ctl & 0x8000 != 0, ctl & 0x4000 != 0),
            (msix.enabled(), msix.function_masked()),
            "{ctx}: message control {ctl:#x} vs MsixConfig (enabled, masked)"
        );
        assert_eq!(
            (ctl & 0x7ff) + 1,
            msix.vector_count(),
            "{ctx}: table size field of {ctl:#x}"
        );
        assert_eq!(msix.vector_count(), self.vectors, "{ctx}: vector count");
        assert_eq!(table, MSIX_TABLE_OFFSET as u32, "{ctx}: table offset/BIR");
        assert_eq!(pba, MSIX_PBA_OFFSET as u32, "{ctx}: PBA offset/BIR");
        for v in 0..msix.vector_count() {
            assert!(
                msix.is_vector_masked(v) || !msix.pending(v),
                "{ctx}: vector {v} is deliverable and pending"
            );
        }
    }

    fn check_intx(&mut self, ctx: &Describe) {
        let interrupt = self.dev.interrupt().clone();
        let isr = interrupt.isr();
        let msix = self.dev.msix_config().lock().map(|m| m.enabled());
        let msix = msix.unwrap_or(false);
        let disabled = self.cfg_read(0x04, 2) & 0x400 != 0;
        let line = self.intx.asserted.load(Ordering::Acquire);
        assert!(
            !self.intx.redundant.load(Ordering::Acquire),
            "{ctx}: INTx asserted or deasserted twice in a row"
        );
        assert_eq!(
            line,
            interrupt.intx_asserted(),
            "{ctx}: the INTx line and the transport disagree"
        );
        let want = isr != 0 && !disabled && !msix;
        assert_eq!(
            line, want,
            "{ctx}: INTx {line} with ISR {isr:#x}, INTx disable {disabled}, MSI-X {msix}"
        );
        let status = self.dev.read_config_register(1) >> 16;
        assert_eq!(
            status & 0x8 != 0,
            isr != 0 && !msix,
            "{ctx}: PCI status {status:#x} with ISR {isr:#x}, MSI-X {msix}"
        );
    }

    fn check_bar(&mut self, ctx: &Describe) {
        let at = self.dev.bar_address();
        assert_eq!(
            at, self.mapped,
            "{ctx}: BAR 0 at {at:#x}, the VMM mapped it at {:#x}",
            self.mapped
        );
    }

    fn check_threads(&mut self, ctx: &Describe) {
        let extra = self.threads.extra();
        let status = self.dev.device_status();
        assert!(extra.len() <= 1, "{ctx}: {} worker threads", extra.len());
        self.stats.worker_steps += extra.len();
        self.stats.intx = self.intx.count.load(Ordering::Acquire);
        if status & DEVICE_DRIVER_OK == 0 {
            self.threads.assert_count(0, ctx);
        }
    }

    /// The vectors that may fire: the configuration vector, the vectors
    /// of enabled queues, and pending vectors.
    pub(super) fn allowed_vectors(&mut self) -> BTreeSet<u16> {
        let mut allowed: BTreeSet<u16> = self
            .queue_state()
            .into_iter()
            .filter(|(_, enabled)| *enabled)
            .map(|(v, _)| v)
            .collect();
        allowed.insert(self.common(MSIX_CONFIG) as u16);
        let msix = self.dev.msix_config().clone();
        let msix = msix.lock().unwrap_or_else(|e| e.into_inner());
        allowed.extend((0..msix.vector_count()).filter(|&v| msix.pending(v)));
        allowed
    }

    /// What the interrupt group heard during the step.
    pub(super) fn check_interrupts(&mut self, before: &BTreeSet<u16>) {
        let mut allowed = self.allowed_vectors();
        allowed.extend(before);
        let ctx = Describe(&self.step);
        for event in self.group.take_events() {
            let index = match event {
                InterruptEvent::Triggered(v) => {
                    self.stats.msix += 1;
                    assert!(
                        allowed.contains(&v),
                        "{ctx}: vector {v} fired; allowed were {allowed:?}"
                    );
                    v
                }
                InterruptEvent::Updated { index, .. } => index,
            };
            assert!(
                index < self.vectors,
                "{ctx}: {event:?} for a vector beyond the {} of the table",
                self.vectors
            );
        }
    }
}
