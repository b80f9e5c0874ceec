//! Free loopback ports.
//!
//! Ports are taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), where no
//! outgoing connection's source port can land: a port from the ephemeral range, released for a
//! component to bind, can meanwhile become the source port of any client connection on the
//! machine (a watch, a probe), and the component then fails with "address already in use" on
//! every restart. Each process walks the range from its own starting point, so parallel runs
//! rarely try the same ports, and a port is bound (so known free) before it is handed out. A
//! [`Reserved`] port stays held by its listener until [`Reserved::release`], right before the
//! component that uses it is spawned; the plane still retries a start whose component reports
//! "address already in use".

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out (above the registered services most machines run).
const LOWEST: u16 = 20000;
/// The first ephemeral port when `/proc` does not say (Linux's default).
const EPHEMERAL_DEFAULT: u16 = 32768;

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_DEFAULT)
}

/// Binds the next free loopback port below the ephemeral range.
fn bind_next() -> anyhow::Result<TcpListener> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let top = ephemeral_start().max(LOWEST + 1000);
    let span = u32::from(top - LOWEST);
    // Each process starts somewhere else in the range (by pid and clock), then walks on.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()))
            % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = LOWEST + offset as u16;
        if let Ok(listener) = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            return Ok(listener);
        }
    }
    // Every port below the ephemeral range is taken: let the kernel choose.
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .context("binding a free loopback port")
}

use anyhow::Context as _;

/// A loopback port held open by a listener until released.
#[derive(Debug)]
pub struct Reserved {
    port: u16,
    listener: Option<TcpListener>,
}

impl Reserved {
    /// Binds a free loopback port below the ephemeral range and keeps the listener.
    pub fn new() -> anyhow::Result<Self> {
        let listener = bind_next()?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        Ok(Self {
            port,
            listener: Some(listener),
        })
    }

    /// The reserved port number.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the listener so the component can bind the port.
    pub fn release(&mut self) {
        self.listener = None;
    }
}

/// Reserves `n` distinct free loopback ports.
pub fn reserve(n: usize) -> anyhow::Result<Vec<Reserved>> {
    (0..n).map(|_| Reserved::new()).collect()
}

/// A free loopback port (released immediately; prefer [`Reserved`]).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(Reserved::new()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range() {
        let top = ephemeral_start();
        for _ in 0..50 {
            let port = free_port().unwrap();
            assert!(
                (LOWEST..top).contains(&port),
                "{port} not in {LOWEST}..{top}"
            );
        }
    }

    #[test]
    fn reserved_ports_are_distinct_and_held() {
        let ports = reserve(5).unwrap();
        let mut nums: Vec<u16> = ports.iter().map(Reserved::port).collect();
        nums.sort_unstable();
        nums.dedup();
        assert_eq!(nums.len(), 5);
        // Held: binding the same port fails while reserved.
        assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0].port())).is_err());
    }

    #[test]
    fn released_port_can_be_bound() {
        let mut r = Reserved::new().unwrap();
        r.release();
        TcpListener::bind((Ipv4Addr::LOCALHOST, r.port())).unwrap();
    }
}
