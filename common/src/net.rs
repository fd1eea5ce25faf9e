//! Port selection.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

/// Ports for listeners that must be re-bindable after a restart (dev
/// clusters, tests): below the kernel's default ephemeral range
/// (32768-60999), so no outgoing connection can take one while its owner
/// restarts, and above the default release port range (20000-29999).
pub const STABLE_PORTS: RangeInclusive<u16> = 30000..=32767;

/// Picks a free port on `address` from `range`, starting at a random offset
/// so concurrent callers do not race for the same one, and skipping `taken`
/// (ports reserved but not bound yet).
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
        assert_eq!(allocate_port(address, &(busy..=busy), &[]), None);
        let port = allocate_port(address, &STABLE_PORTS, &[]).unwrap();
        assert!(STABLE_PORTS.contains(&port));
        assert_eq!(
            allocate_port(address, &(port..=port), &[port]),
            None,
            "taken ports are skipped"
        );
    }
}
