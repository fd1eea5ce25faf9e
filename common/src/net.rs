//! Port selection and networks.

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

/// What to do about `addr` that cannot be bound: who may hold it, or why
/// the port or address is refused, then `change` (where another address is
/// set: "set `listen` in coordinator.toml") with what to set it to.
pub fn explain_bind(addr: &SocketAddr, error: &std::io::Error, change: &str) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "another process listens there; `ss -ltnp 'sport = :{}'` names it: stop it, or {change} to a free address",
            addr.port()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; {change} to a port above 1023"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "no interface of this machine has {}; {change} to one of its addresses",
            addr.ip()
        ),
        _ => format!("{change} to an address this machine can listen on"),
    }
}

/// A network in CIDR notation, e.g. `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid network {text:?}: expected e.g. 10.0.0.0/8 or fd00::/8");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
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
