//! Where a chunked message body ends. The plain path passes a chunked
//! response through as it came and only needs to know its last byte: the
//! connection is reused after it, and a body cut short must not be taken
//! for a whole one.

/// A body that is not valid chunked coding: the connection it came on
/// cannot be trusted any further.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed;

/// Chunk sizes beyond this are refused rather than risk an overflow.
const MAX_CHUNK: u64 = 1 << 48;

#[derive(Debug, Clone, Copy)]
enum State {
    /// In the hex size of a chunk; `digits` read so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: only more of it, an extension or the
    /// line's end may follow (as hyper reads it).
    SizeSpace {
        size: u64,
    },
    /// In a chunk extension, up to the end of the size line.
    Extension {
        size: u64,
    },
    /// After the CR of a size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    /// After a chunk's data: its CR LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    InTrailer,
    /// After the CR of the final empty line.
    FinalLf,
    Done,
}

#[derive(Debug)]
pub(super) struct Chunked {
    state: State,
}

impl Chunked {
    pub(super) fn new() -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
        }
    }

    /// Reads on through `data`, the body's next bytes: `Some(n)` when the
    /// body ends after its first `n` bytes, `None` when all of it belongs
    /// to the body and more is to come.
    pub(super) fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut at = 0;
        while at < data.len() {
            if let State::Data { left } = self.state {
                let take = left.min((data.len() - at) as u64);
                at += take as usize;
                self.state = if take == left {
                    State::DataCr
                } else {
                    State::Data { left: left - take }
                };
                continue;
            }
            let byte = data[at];
            at += 1;
            self.state = match (self.state, byte) {
                (State::Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
                    let digit = u64::from(hex_value(byte));
                    let size = size * 16 + digit;
                    if size > MAX_CHUNK {
                        return Err(Malformed);
                    }
                    State::Size {
                        size,
                        digits: digits.saturating_add(1),
                    }
                }
                (State::Size { digits: 0, .. }, _) => return Err(Malformed),
                (State::Size { size, .. } | State::SizeSpace { size }, b' ' | b'\t') => {
                    State::SizeSpace { size }
                }
                (State::Size { size, .. } | State::SizeSpace { size }, b';') => {
                    State::Extension { size }
                }
                (
                    State::Size { size, .. }
                    | State::SizeSpace { size }
                    | State::Extension { size },
                    b'\r',
                ) => State::SizeLf { size },
                (
                    State::Size { size, .. }
                    | State::SizeSpace { size }
                    | State::Extension { size }
                    | State::SizeLf { size },
                    b'\n',
                ) => {
                    if size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data { left: size }
                    }
                }
                // Extension text: no control bytes but tab.
                (State::Extension { size }, _)
                    if byte == b'\t' || (b' '..0x7f).contains(&byte) || byte > 0x7f =>
                {
                    State::Extension { size }
                }
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataCr | State::DataLf, b'\n') => State::Size { size: 0, digits: 0 },
                (State::TrailerStart, b'\r') => State::FinalLf,
                (State::TrailerStart | State::FinalLf, b'\n') => {
                    self.state = State::Done;
                    return Ok(Some(at));
                }
                (State::InTrailer, b'\n') => State::TrailerStart,
                (State::TrailerStart | State::InTrailer, _) => State::InTrailer,
                _ => return Err(Malformed),
            };
        }
        Ok(matches!(self.state, State::Done).then_some(at))
    }
}

fn hex_value(byte: u8) -> u8 {
    match byte {
        b'0'..=b'9' => byte - b'0',
        b'a'..=b'f' => byte - b'a' + 10,
        _ => byte - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` fed in pieces of `step` bytes; the offset of its end.
    fn end_of(body: &[u8], step: usize) -> Result<Option<usize>, Malformed> {
        let mut chunked = Chunked::new();
        let mut offset = 0;
        for piece in body.chunks(step) {
            if let Some(end) = chunked.scan(piece)? {
                return Ok(Some(offset + end));
            }
            offset += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn the_end_is_found_however_the_body_is_cut() {
        let body = b"5\r\nhello\r\n1A;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in 1..body.len() {
            assert_eq!(end_of(body, step), Ok(Some(end)), "pieces of {step}");
        }
        assert_eq!(end_of(b"0\r\n\r\n", 2), Ok(Some(5)));
        // Bare LF line ends are taken as well (as hyper takes them), and
        // whitespace before an extension or the line end.
        assert_eq!(end_of(b"3\nabc\n0\n\n", 1), Ok(Some(9)));
        assert_eq!(end_of(b"3 \t;x=y\r\nabc\r\n0 \r\n\r\n", 1), Ok(Some(20)));
    }

    #[test]
    fn a_body_cut_short_has_no_end() {
        for cut in [
            b"5\r\nhel".as_slice(),
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"0\r\nx: 1\r\n",
        ] {
            assert_eq!(
                end_of(cut, 1),
                Ok(None),
                "{:?}",
                String::from_utf8_lossy(cut)
            );
        }
    }

    #[test]
    fn malformed_coding_is_refused() {
        for bad in [
            b"\r\n".as_slice(),
            b"zz\r\n",
            b"5\r\nhelloXX",
            b"fffffffffffffffff\r\n",
            b"5 5\r\nhello\r\n",
            b"5;a\x01b\r\nhello\r\n",
        ] {
            assert_eq!(
                end_of(bad, 1),
                Err(Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
