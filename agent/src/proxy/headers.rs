//! What the proxy changes in requests and responses on the way through.

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::{BufMut, BytesMut};

pub use cutover_common::net::Network;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION,
    TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1);
/// they must not be forwarded. Names, not strings: removing by a string
/// parses and hashes it on every request.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Headers the proxy sets for the release: a client must not be able to
/// strip what a load balancer in front set, by naming them hop-by-hop.
const FORWARDING: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REQUEST_ID,
];

/// Whether a header of this name (any case) describes the connection, not
/// the message.
pub(super) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop.as_str().as_bytes()))
}

/// Whether a Connection header may name this header (any case) for
/// removal.
pub(super) fn may_be_named_hop_by_hop(name: &[u8]) -> bool {
    !FORWARDING
        .iter()
        .any(|own| name.eq_ignore_ascii_case(own.as_str().as_bytes()))
}

/// The items of a header value that is a comma-separated list (the
/// tokens of a Connection header, the hops of an X-Forwarded-For one).
pub(super) fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|v| !v.is_empty())
}

/// Whether the request asks to switch protocols (WebSocket and others).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(list_items)
            .any(|token| token.eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including those the Connection header names.
/// For an upgrade, `Connection: upgrade` and `Upgrade` are what the upstream
/// needs to see, so they are put back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none (or only Connection): one pass comparing
    // names costs less than a hashed removal per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let upgrade_value = headers.get(UPGRADE).cloned();
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(list_items)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .filter(|name| !FORWARDING.contains(name))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade {
        if let Some(value) = upgrade_value {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, value);
        }
    }
}

/// Bytes the values the proxy makes per request are cut from: one
/// allocation serves many values (each holds a share of it), instead of
/// one per value. Per thread: no lock.
const CARVING_BLOCK: usize = 16 << 10;

thread_local! {
    static CARVING: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value of at most `bound` bytes, written by `write` into the
/// thread's carving block (a new block when this one is used up).
fn carved(
    bound: usize,
    write: impl FnOnce(&mut BytesMut),
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    CARVING.with_borrow_mut(|block| {
        if block.capacity() - block.len() < bound {
            *block = BytesMut::with_capacity(CARVING_BLOCK.max(bound));
        }
        write(block);
        HeaderValue::from_maybe_shared(block.split().freeze())
    })
}

/// The request id a request goes on with: the one the client sent (read
/// off its head) when it is sane, else a new one.
pub(super) fn request_id_from(sent: Option<&[u8]>) -> HeaderValue {
    match sent {
        Some(id) if usable_request_id(id) => {
            carved(id.len(), |buf| buf.put_slice(id)).unwrap_or_else(|_| new_request_id())
        }
        _ => new_request_id(),
    }
}

/// Whether a request id the client sent is safe to pass on and log.
fn usable_request_id(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() <= 200 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// Peers trusted by default: loopback only (a proxy on the node itself).
/// Private ranges are not: any client inside them could claim to be
/// another address or https. Load balancers are configured by address.
pub fn default_trusted_networks() -> Vec<Network> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .map(|n| n.parse().expect("valid default network"))
        .collect()
}

pub fn is_trusted(peer: IpAddr, trusted: &[Network]) -> bool {
    trusted.iter().any(|network| network.contains(peer))
}

/// The X-Forwarded-For hops, first (the original client) to last. Several
/// X-Forwarded-For headers are one list in order (RFC 9110 5.3): each proxy
/// on the way may have added its own.
fn forwarded_hops(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(list_items)
}

/// Writes the X-Forwarded-For value a request goes on with: the hops it
/// came with, then `client`.
pub(super) fn put_forwarded_for<'a>(
    buf: &mut impl BufMut,
    hops: impl Iterator<Item = &'a str>,
    client: IpAddr,
) {
    for hop in hops {
        buf.put_slice(hop.as_bytes());
        buf.put_slice(b", ");
    }
    let _ = std::io::Write::write_fmt(&mut (&mut *buf).writer(), format_args!("{client}"));
}

/// A new request id, from the thread-local generator: a fresh id per
/// request must not cost a getrandom system call.
pub(super) fn new_request_id() -> HeaderValue {
    carved(uuid::fmt::Hyphenated::LENGTH, |buf| {
        let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        buf.put_slice(
            uuid.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
    })
    .expect("uuid is a valid header")
}

/// The client a request comes from: when the peer is trusted (a load
/// balancer in front knows the client), the last X-Forwarded-For hop that
/// is not a trusted proxy itself, read from the right: hops further left
/// are what the client sent, and a client can claim any address there (a
/// load balancer appends to the header). Else, and when a hop is no
/// address, the peer itself.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[Network]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_hops(headers).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(address) = hop.parse::<IpAddr>() else {
            return peer;
        };
        client = address;
        if !is_trusted(address, trusted) {
            break;
        }
    }
    client
}

/// Adds the forwarding headers and returns the request id (the client's when
/// it sent a sane one, a new uuid otherwise). Forwarding headers that a
/// trusted peer (a load balancer in front, within `trusted`) set are kept:
/// it knows the original client, scheme and host. From anyone else they
/// are replaced, so a client cannot pose as another address or scheme.
pub fn add_forwarding(headers: &mut HeaderMap, client: IpAddr, trusted: &[Network]) -> HeaderValue {
    if !is_trusted(client, trusted) {
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(&X_FORWARDED_PROTO);
        headers.remove(&X_FORWARDED_HOST);
    }
    // An address is at most 45 characters (IPv6 with an IPv4 tail).
    let bound = forwarded_hops(headers)
        .map(|hop| hop.len() + 2)
        .sum::<usize>()
        + 45;
    let forwarded_for = carved(bound, |buf| {
        put_forwarded_for(buf, forwarded_hops(headers), client);
    });
    if let Ok(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        if let Some(host) = headers.get(HOST).cloned() {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
    let request_id = match headers.get(&X_REQUEST_ID) {
        Some(value) if usable_request_id(value.as_bytes()) => value.clone(),
        _ => new_request_id(),
    };
    headers.insert(X_REQUEST_ID, request_id.clone());
    request_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_client_cannot_forge_forwarding_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("shop.example"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(X_FORWARDED_HOST, HeaderValue::from_static("admin.example"));
        add_forwarding(
            &mut headers,
            "203.0.113.50".parse().unwrap(),
            &default_trusted_networks(),
        );
        assert_eq!(headers.get(X_FORWARDED_FOR).unwrap(), "203.0.113.50");
        assert_eq!(headers.get(X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(headers.get(X_FORWARDED_HOST).unwrap(), "shop.example");
    }

    #[test]
    fn networks_parse_and_match() {
        let net: Network = "172.16.0.0/12".parse().unwrap();
        assert!(net.contains("172.31.255.1".parse().unwrap()));
        assert!(!net.contains("172.32.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:172.16.0.9".parse().unwrap()),
            "ipv4-mapped"
        );
        let v6: Network = "fc00::/7".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("2001:db8::1".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("10.0.0.0".parse::<Network>().is_err());
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrade_survives() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, Upgrade, X-Forwarded-For"),
        );
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        assert!(is_upgrade(&headers));
        let mut plain = headers.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 2, "{plain:?}");
        assert_eq!(
            plain.get(X_FORWARDED_FOR).unwrap(),
            "203.0.113.7",
            "a client cannot strip it"
        );
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(UPGRADE).unwrap(), "websocket");
        assert_eq!(headers.get(CONNECTION).unwrap(), "upgrade");
        assert!(headers.get("x-secret").is_none());
    }

    fn load_balancers() -> Vec<Network> {
        vec!["10.0.0.0/24".parse().unwrap()]
    }

    #[test]
    fn by_default_only_loopback_is_trusted() {
        let trusted = default_trusted_networks();
        let is_trusted = |ip: &str| trusted.iter().any(|n| n.contains(ip.parse().unwrap()));
        for ip in ["127.0.0.1", "127.3.2.1", "::1"] {
            assert!(is_trusted(ip), "{ip}");
        }
        for ip in [
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.1",
            "fd00::1",
            "203.0.113.5",
        ] {
            assert!(!is_trusted(ip), "{ip}");
        }
        // A private-range client's claim of https is replaced.
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        add_forwarding(&mut headers, "10.1.2.3".parse().unwrap(), &trusted);
        assert_eq!(headers.get(X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(headers.get(X_FORWARDED_FOR).unwrap(), "10.1.2.3");
    }

    #[test]
    fn several_forwarded_for_headers_from_a_trusted_peer_are_kept_in_order() {
        let mut headers = HeaderMap::new();
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("198.51.100.2, 10.0.0.9"),
        );
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static(" "));
        add_forwarding(&mut headers, "10.0.0.2".parse().unwrap(), &load_balancers());
        let all: Vec<_> = headers.get_all(X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["203.0.113.7, 198.51.100.2, 10.0.0.9, 10.0.0.2"]);
    }

    #[test]
    fn the_client_is_the_last_untrusted_hop_of_a_trusted_peer_only() {
        let mut headers = HeaderMap::new();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("203.0.113.7, 10.0.0.9"),
        );
        let lb = "10.0.0.2".parse().unwrap();
        let stranger = "198.51.100.1".parse().unwrap();
        let client = "203.0.113.7".parse::<IpAddr>().unwrap();
        assert_eq!(client_address(&headers, lb, &load_balancers()), client);
        assert_eq!(
            client_address(&headers, stranger, &load_balancers()),
            stranger
        );
        // What the client itself put in front of the load balancer's hop
        // does not count: it could claim any address.
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("10.9.9.9, 1.2.3.4, 203.0.113.7"),
        );
        assert_eq!(client_address(&headers, lb, &load_balancers()), client);
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("unknown"));
        assert_eq!(client_address(&headers, lb, &load_balancers()), lb);
    }

    #[test]
    fn forwarding_headers_append_and_keep() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("shop.example"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        let id = add_forwarding(&mut headers, "10.0.0.2".parse().unwrap(), &load_balancers());
        assert_eq!(id, "abc-123");
        assert_eq!(
            headers.get(X_FORWARDED_FOR).unwrap(),
            "203.0.113.7, 10.0.0.2"
        );
        assert_eq!(headers.get(X_FORWARDED_HOST).unwrap(), "shop.example");
        assert_eq!(headers.get(X_FORWARDED_PROTO).unwrap(), "http");

        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        let id = add_forwarding(&mut headers, "10.0.0.2".parse().unwrap(), &load_balancers());
        assert_eq!(id.len(), 36);
    }
}
