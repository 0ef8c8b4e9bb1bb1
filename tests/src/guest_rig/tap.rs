//! A tap for the guest's virtio-net, watched from the host side.
//!
//! The tap is created (persistent, up) before trellis starts so a packet
//! socket can be bound to it first: every frame trellis writes is then
//! queued on the socket and checked after the VM ended. trellis attaches
//! with TUNSETIFF like it would to a tap it creates itself. Needs root
//! (CAP_NET_ADMIN) and `ip`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use super::run_bounded;

/// `ip` should answer at once; this only bounds a wedged one.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// A tap interface, deleted on drop.
pub struct Tap {
    name: String,
    socket: Option<OwnedFd>,
}

impl Tap {
    /// Creates tap `name` (at most 15 bytes), sets it up and binds a packet
    /// socket to it.
    pub fn create(name: &str) -> Result<Tap, String> {
        // A leftover from a killed run would make `tuntap add` fail.
        let _ = ip(&["link", "del", name]);
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        // From here on, drop removes the interface.
        let mut tap = Tap {
            name: name.to_string(),
            socket: None,
        };
        ip(&["link", "set", name, "up"])?;
        tap.socket = Some(packet_socket(name)?);
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every frame queued on the socket so far (each at most 2 KiB).
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let Some(socket) = &self.socket else {
            return Vec::new();
        };
        let mut frames = Vec::new();
        loop {
            let mut buf = vec![0u8; 2048];
            // SAFETY: recv writes at most buf.len() bytes into buf, which
            // lives across the call; the socket is a valid open fd.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            // Negative: EAGAIN (queue empty) or an error; either way done.
            let Ok(n) = usize::try_from(n) else {
                return frames;
            };
            buf.truncate(n);
            frames.push(buf);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.socket = None;
        if let Err(e) = ip(&["link", "del", &self.name]) {
            eprintln!("guest rig: could not remove tap {}: {e}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = run_bounded(cmd, IP_TIMEOUT).map_err(|e| format!("cannot run ip: {e}"))?;
    match out.success() {
        true => Ok(()),
        false => Err(format!(
            "`ip {}` failed ({}): {} (the net tests need root and /dev/net/tun)",
            args.join(" "),
            out.describe_status(),
            out.stderr.trim()
        )),
    }
}

/// An AF_PACKET socket receiving every frame on interface `name`.
fn packet_socket(name: &str) -> Result<OwnedFd, String> {
    let cname = std::ffi::CString::new(name).map_err(|_| "tap name with a NUL".to_string())?;
    // SAFETY: cname is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(format!(
            "if_nametoindex({name}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; no pointers involved.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(all),
        )
    };
    if fd < 0 {
        return Err(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a valid sockaddr_ll and the length passed is its size.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(format!(
            "bind packet socket to {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(socket)
}
