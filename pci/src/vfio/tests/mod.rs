//! Tests of the VFIO device model against a fake VFIO device.

mod bars;
mod device;
mod fake;
mod irqs;
mod layout;
