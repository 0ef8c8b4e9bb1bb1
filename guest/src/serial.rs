//! Polled 16550 UART on COM1 (0x3f8): every log line goes here, plus the
//! number formatting the rest of the guest must use.
//!
//! Why our own number formatting: the precompiled `core` of the host target
//! uses SSE arithmetic (movd, pinsrw, pshufd, ...) to print decimal numbers of
//! four digits or more and to pad to a width, and this host's KVM backend
//! emulates guest instructions without supporting those (it stops with a KVM
//! emulation failure). Our crates are built with SSE off, so the rule is:
//! format integers only through `Dec`/`Hex`/`HexN`, never with `{}`, `{:x}`,
//! a width, a precision or `{:?}` on core types.

use crate::arch::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
/// Line status register: transmit holding register empty.
const LSR_THRE: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1 with FIFOs and no UART interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR | RTS
}

fn put(byte: u8) {
    // Bounded wait so a UART without LSR (or none at all) cannot hang us.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & LSR_THRE != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, byte);
}

/// A writer for `core::fmt` that turns `\n` into `\r\n`.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

/// Prints under a spin lock so lines from different contexts do not mix.
pub fn print(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Serial.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// Prints without taking the lock: for fault handlers, which may have
/// interrupted a holder of the lock and never return to it.
pub fn print_unlocked(args: fmt::Arguments) {
    let _ = Serial.write_fmt(args);
}

/// `print!` to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

/// `println!` to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// An unsigned integer in decimal.
pub struct Dec(pub u64);

/// An unsigned integer in hex with a `0x` prefix.
pub struct Hex(pub u64);

/// The low `.1` hex digits of `.0`, zero-padded, no prefix.
pub struct HexN(pub u64, pub u32);

/// A MAC address as `xx:xx:xx:xx:xx:xx`.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(':')?;
            }
            write_digits(f, u64::from(*b), 16, 2)?;
        }
        Ok(())
    }
}

fn write_digits(f: &mut fmt::Formatter, mut n: u64, base: u64, min_digits: u32) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut digits = 0;
    while n != 0 || digits < min_digits.max(1) {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        digits += 1;
        if i == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        f.write_char(char::from(b))?;
    }
    Ok(())
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write_digits(f, self.0, 10, 1)
    }
}

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("0x")?;
        write_digits(f, self.0, 16, 1)
    }
}

impl fmt::Display for HexN {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let n = if self.1 >= 16 {
            self.0
        } else {
            self.0 & ((1 << (4 * self.1)) - 1)
        };
        write_digits(f, n, 16, self.1)
    }
}

/// Routes the `log` crate (used by virtio-drivers) to COM1.
pub struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            // Only the literal part: the arguments may need core's number
            // formatting (see the module comment).
            let text = record.args().as_str().unwrap_or("(message with arguments)");
            println!(
                "LOG {} {}: {}",
                record.level().as_str(),
                record.target(),
                text
            );
        }
    }

    fn flush(&self) {}
}
