//! Runtimes that run releases. The process runtime runs a release as a
//! supervised process group; a docker runtime arrives with the docker issue
//! behind the same interface.

pub mod logs;
pub mod process;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

/// Picks a free port on `address` from `range`, starting at a random offset
/// so concurrent releases do not race for the same one, and skipping
/// `taken` (ports of releases that are still starting).
pub fn allocate_port(address: IpAddr, range: &RangeInclusive<u16>, taken: &[u16]) -> Option<u16> {
    let size = u32::from(range.end() - range.start()) + 1;
    let offset: u32 = rand::random::<u32>() % size;
    (0..size)
        .map(|i| range.start() + ((offset + i) % size) as u16)
        .filter(|port| !taken.contains(port))
        .find(|port| TcpListener::bind(SocketAddr::new(address, *port)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_free_ports_in_range() {
        let address: IpAddr = "127.0.0.1".parse().unwrap();
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = holder.local_addr().unwrap().port();
        // A range of exactly the busy port and one excluded port has nothing.
        assert_eq!(allocate_port(address, &(busy..=busy), &[]), None);
        let port = allocate_port(address, &(20000..=20100), &[]).unwrap();
        assert!((20000..=20100).contains(&port));
        let other = allocate_port(address, &(port..=port.saturating_add(1)), &[port]).unwrap();
        assert_ne!(other, port);
    }
}
