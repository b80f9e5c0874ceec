//! Free loopback ports.
//!
//! A port comes from the kernel (bind to port 0) and stays reserved by its
//! listener until [`Reserved::release`] right before the component that uses it
//! is spawned. That keeps the window for another process (a parallel test run)
//! to take it as small as possible; the plane still retries a start whose
//! component reports "address already in use".

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use anyhow::Context as _;

/// A loopback port held open by a listener until released.
#[derive(Debug)]
pub struct Reserved {
    port: u16,
    listener: Option<TcpListener>,
}

impl Reserved {
    /// Binds `127.0.0.1:0` and keeps the listener.
    pub fn new() -> anyhow::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .context("binding a free loopback port")?;
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
