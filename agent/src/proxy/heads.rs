//! The heads the plain path (`plain`) reads and writes: what a request
//! head says that the proxy acts on, and the response head the client
//! gets, rewritten from the release's in one pass.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderValue, StatusCode};

use super::chunked::Chunked;
use super::headers::{is_hop_by_hop, list_items, may_be_named_hop_by_hop};
use super::levers::carries_bypass_cookie;

/// Headers a head may have on this path: a request with more is left to
/// hyper, a response with more is a 502.
pub(super) const MAX_HEADERS: usize = 100;

/// How a response body ends.
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked(Chunked),
    /// When the release closes the connection.
    Close,
}

pub(super) struct ResponseHead {
    pub(super) status: u16,
    pub(super) framing: Framing,
    /// The release keeps the connection open after this response.
    pub(super) reusable: bool,
    /// The head the client got says `Connection: close`: its connection
    /// closes after this response, and only then (a client told nothing
    /// may send its next request on it at once).
    pub(super) close: bool,
}

/// What the proxy adds to the response head it writes.
#[derive(Clone, Copy)]
pub(super) struct Reply<'a> {
    pub(super) head: bool,
    pub(super) request_id: Option<&'a HeaderValue>,
    pub(super) cookie: Option<&'a HeaderValue>,
    /// Close the client connection after this response.
    pub(super) close: bool,
}

/// What a request head says that the proxy acts on.
#[derive(Default)]
pub(super) struct RequestFacts<'a> {
    pub(super) length: Option<u64>,
    pub(super) close: bool,
    pub(super) host: Option<&'a [u8]>,
    pub(super) forwarded_proto: bool,
    pub(super) forwarded_host: bool,
    pub(super) request_id: Option<&'a [u8]>,
    /// Headers its Connection header names: not passed on.
    named: Vec<&'a str>,
}

impl<'a> RequestFacts<'a> {
    /// Notes what `header` says; false when this path does not take a
    /// request with it.
    pub(super) fn read(&mut self, header: &httparse::Header<'a>, trusted: bool) -> bool {
        let name = header.name;
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is("content-length") {
            let Some(length) = parse_length(header.value) else {
                return false;
            };
            // Repeated, it must say the same (else hyper refuses it).
            return self
                .length
                .replace(length)
                .is_none_or(|before| before == length);
        }
        if is("transfer-encoding") || is("upgrade") || is("expect") {
            return false;
        }
        if is("connection") {
            let Ok(value) = std::str::from_utf8(header.value) else {
                return false;
            };
            for token in list_items(value) {
                if token.eq_ignore_ascii_case("close") {
                    self.close = true;
                } else if frames_the_message(token) {
                    // Dropping it would leave the body framed differently
                    // for the release than here: hyper rebuilds it.
                    return false;
                } else if !token.eq_ignore_ascii_case("keep-alive") {
                    self.named.push(token);
                }
            }
        } else if is("cookie") {
            return !carries_bypass_cookie(header.value);
        } else if is("host") {
            self.host.get_or_insert(header.value);
        } else if is("x-forwarded-proto") {
            self.forwarded_proto |= trusted;
        } else if is("x-forwarded-host") {
            self.forwarded_host |= trusted;
        } else if is("x-request-id") && self.request_id.is_none() {
            self.request_id = Some(header.value);
        }
        true
    }

    /// Whether a header of `name` goes on as it came: not hop-by-hop, not
    /// one the proxy sets.
    pub(super) fn passes(&self, name: &str, trusted: bool) -> bool {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        !(is_hop_by_hop(name.as_bytes())
            || is("x-forwarded-for")
            || is("x-request-id")
            || (!trusted && (is("x-forwarded-proto") || is("x-forwarded-host")))
            || (self.named.iter().any(|named| is(named))
                && may_be_named_hop_by_hop(name.as_bytes())))
    }
}

pub(super) enum Parsed {
    Partial,
    /// An informational (1xx) head of this many bytes.
    Informational(usize),
    Final(usize, ResponseHead),
}

/// Parses the response head at the start of `buf` and, for a final one,
/// writes the head the client gets to `out`.
pub(super) fn parse_response(
    buf: &[u8],
    reply: &Reply<'_>,
    out: &mut Vec<u8>,
) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(error) => return Err(format!("invalid response head: {error}")),
    };
    let status = response.code.unwrap_or(0);
    match status {
        101 => return Err("the release switched protocols unasked".into()),
        100..=199 => return Ok(Parsed::Informational(head_len)),
        _ => {}
    }
    let mut reusable = response.version == Some(1);
    let mut dated = false;
    let mut chunked = false;
    let mut coded = false;
    let mut length = None;
    let mut named: Vec<&str> = Vec::new();
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            let value = std::str::from_utf8(header.value).unwrap_or("close");
            for token in list_items(value) {
                if token.eq_ignore_ascii_case("close") {
                    reusable = false;
                } else if !token.eq_ignore_ascii_case("keep-alive") && !frames_the_message(token) {
                    named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
            chunked = std::str::from_utf8(header.value).is_ok_and(|codings| {
                codings
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if name.eq_ignore_ascii_case("date") {
            dated = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            let parsed = parse_length(header.value)
                .ok_or_else(|| "invalid content-length in the response".to_string())?;
            if length
                .replace(parsed)
                .is_some_and(|before| before != parsed)
            {
                return Err("conflicting content-length in the response".into());
            }
        }
    }
    let framing = if reply.head || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked(Chunked::new())
    } else if coded {
        Framing::Close
    } else {
        match length {
            Some(length) => Framing::Length(length),
            None => Framing::Close,
        }
    };
    if matches!(framing, Framing::Close) {
        reusable = false;
    }
    let close = reply.close || matches!(framing, Framing::Close);
    out.clear();
    put_status_line(out, status, response.reason.unwrap_or(""));
    for header in response.headers.iter() {
        let name = header.name;
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        let dropped = (is_hop_by_hop(name.as_bytes())
            && !(coded && !chunked && is("transfer-encoding")))
            || is("x-request-id")
            || (chunked && is("content-length"))
            || named.iter().any(|named| is(named));
        if !dropped {
            put_header(out, name.as_bytes(), header.value);
        }
    }
    if chunked {
        put_header(out, b"transfer-encoding", b"chunked");
    }
    // A proxy dates a response that came without (RFC 9110 6.6.1).
    if !dated {
        put_date(out);
    }
    if let Some(id) = reply.request_id {
        put_header(out, b"x-request-id", id.as_bytes());
    }
    if let Some(cookie) = reply.cookie {
        put_header(out, b"set-cookie", cookie.as_bytes());
    }
    if close {
        put_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Parsed::Final(
        head_len,
        ResponseHead {
            status,
            framing,
            reusable,
            close,
        },
    ))
}

/// Whether a header of `name` says where the message is (its length, its
/// coding, its host): a `Connection` header cannot have it dropped.
fn frames_the_message(name: &str) -> bool {
    ["content-length", "transfer-encoding", "host"]
        .iter()
        .any(|framing| name.eq_ignore_ascii_case(framing))
}

/// A Content-Length value: digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

pub(super) fn put_status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    let reason = if reason.is_empty() {
        StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
    } else {
        reason
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The Date header value of the second it was made in: one made per
    /// second, not per response.
    static DATE: RefCell<(u64, String)> = RefCell::default();
}

pub(super) fn put_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(made, date)| {
        if *made != second || date.is_empty() {
            *date = httpdate::fmt_http_date(now);
            *made = second;
        }
        put_header(out, b"date", date.as_bytes());
    });
}

pub(super) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
