//! HPACK (RFC 7541) header-block decoding, only as deep as making an
//! invalid `:authority` valid needs. It follows the client's dynamic table
//! (to know which entries and names are `:authority`) but stores no header
//! values, and it never re-encodes anything except the one string it
//! replaces: every other byte of a block reaches h2 unchanged.

use std::collections::VecDeque;

use tonic::codegen::http::uri::Authority;

/// Why a header block could not be decoded. The caller stops rewriting and
/// lets h2 see the bytes as they are (h2 then reports its own error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index {0} is not in the static or dynamic table")]
    Index(usize),
    #[error("dynamic table size {0} exceeds {MAX_TABLE_SIZE}")]
    TableSize(usize),
    #[error("invalid Huffman code")]
    Huffman,
}

/// The largest dynamic table size update accepted. h2 allows only what it
/// advertised (4096, the protocol default); this bound just keeps a
/// misbehaving client from making the table unbounded here first.
const MAX_TABLE_SIZE: usize = 1 << 16;

/// The dynamic table size before any SETTINGS_HEADER_TABLE_SIZE (RFC 9113
/// §6.5.2).
const DEFAULT_TABLE_SIZE: usize = 4096;

/// The header names of the static table (RFC 7541 Appendix A), index 1
/// first. Only the names matter here: a literal may take its name from an
/// entry, and an entry's size counts its name's length.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

const AUTHORITY: &[u8] = b":authority";

/// What this decoder keeps of one dynamic table entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The entry's name is `:authority`.
    authority: bool,
    name_len: usize,
    /// RFC 7541 §4.1: name length + value length + 32.
    size: usize,
}

/// The decoder's view of the client's dynamic table (RFC 7541 §2.3, §4):
/// for each entry, newest first, whether it is an `:authority` and how
/// much room it takes.
#[derive(Debug)]
pub(super) struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
        }
    }
}

impl Table {
    /// Whether entry `index`'s name (static or dynamic) is `:authority`,
    /// and its length.
    fn name(&self, index: usize) -> Result<(bool, usize), HpackError> {
        match index {
            0 => Err(HpackError::Index(0)),
            1..=61 => Ok((index == 1, STATIC_NAMES[index - 1].len())),
            _ => self
                .entries
                .get(index - 62)
                .map(|e| (e.authority, e.name_len))
                .ok_or(HpackError::Index(index)),
        }
    }

    fn check_index(&self, index: usize) -> Result<(), HpackError> {
        if index == 0 || index > 61 + self.entries.len() {
            return Err(HpackError::Index(index));
        }
        Ok(())
    }

    /// Adds an entry, evicting the oldest ones to make room; an entry
    /// larger than the whole table empties it and is not added (§4.4).
    fn insert(&mut self, e: Entry) {
        self.evict_to(self.max_size.saturating_sub(e.size));
        if e.size <= self.max_size {
            self.size += e.size;
            self.entries.push_front(e);
        }
    }

    /// A dynamic table size update (§6.3).
    fn resize(&mut self, max_size: usize) -> Result<(), HpackError> {
        if max_size > MAX_TABLE_SIZE {
            return Err(HpackError::TableSize(max_size));
        }
        self.max_size = max_size;
        self.evict_to(max_size);
        Ok(())
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let Some(old) = self.entries.pop_back() else {
                break;
            };
            self.size -= old.size;
        }
    }

    /// The table's size in RFC 7541 terms.
    #[cfg(test)]
    fn size(&self) -> usize {
        self.size
    }
}

/// Makes every invalid `:authority` in a header block valid, following the
/// client's dynamic table in `table` as it goes. Returns the new block, or
/// `None` when no field needed a change (the block is then to be passed on
/// as it is).
///
/// Only literal fields are rewritten: the value of an `:authority` that h2
/// would refuse is replaced by [`fix_authority`]'s value of the same
/// length, written as a plain (not Huffman) string. The same length keeps
/// h2's dynamic table, whose entry sizes count octets, exactly in step with
/// the client's, so an index the client sends later still names the same
/// entry in h2's table, now holding the valid value. Everything else,
/// including the representation (indexed or not, never-indexed) and the
/// name's encoding, stays byte for byte.
///
/// On an error the table is left part-updated; the caller stops rewriting.
pub(super) fn rewrite_block(
    block: &[u8],
    table: &mut Table,
) -> Result<Option<Vec<u8>>, HpackError> {
    let mut r = Reader { buf: block, pos: 0 };
    let mut rewritten: Option<Vec<u8>> = None;
    // block[..copied] is already in `rewritten`.
    let mut copied = 0;
    while let Some(&first) = block.get(r.pos) {
        if first & 0x80 != 0 {
            // Indexed field (§6.1): names an entry, adds none.
            table.check_index(r.int(7)?)?;
        } else if first & 0x40 == 0 && first & 0x20 != 0 {
            // Dynamic table size update (§6.3).
            table.resize(r.int(5)?)?;
        } else {
            // Literal with incremental indexing (§6.2.1), without indexing
            // (§6.2.2) or never indexed (§6.2.3).
            let indexing = first & 0x40 != 0;
            let index = r.int(if indexing { 6 } else { 4 })?;
            let (authority, name_len) = if index == 0 {
                let name = r.string()?.decode()?;
                (name == AUTHORITY, name.len())
            } else {
                table.name(index)?
            };
            let value_start = r.pos;
            let value = r.string()?;
            let value_len = if authority {
                let decoded = value.decode()?;
                if let Some(fixed) = fix_authority(&decoded) {
                    tracing::debug!(
                        from = %String::from_utf8_lossy(&decoded),
                        to = %String::from_utf8_lossy(&fixed),
                        "replacing an invalid :authority"
                    );
                    let out = rewritten.get_or_insert_with(|| Vec::with_capacity(block.len() + 32));
                    out.extend_from_slice(&block[copied..value_start]);
                    encode_int(fixed.len(), 7, 0, out);
                    out.extend_from_slice(&fixed);
                    copied = r.pos;
                }
                decoded.len()
            } else if indexing {
                value.decode()?.len()
            } else {
                0
            };
            if indexing {
                table.insert(Entry {
                    authority,
                    name_len,
                    size: name_len + value_len + 32,
                });
            }
        }
    }
    Ok(rewritten.map(|mut out| {
        out.extend_from_slice(&block[copied..]);
        out
    }))
}

/// The replacement for an `:authority` value h2 refuses (it must parse as
/// a URI authority, `[userinfo@]host[:port]`): the same number of octets,
/// every one other than a letter, digit, `.` or `-` made a `-`. C-core's
/// `tmp%2Fx%2Fcsi.sock` becomes `tmp-2Fx-2Fcsi.sock`, grpc-java's
/// `/run/csi.sock` becomes `-run-csi.sock`. `None` for a value h2 accepts,
/// and for the empty value, which has no same-length replacement (and no
/// gRPC client sends).
pub(super) fn fix_authority(value: &[u8]) -> Option<Vec<u8>> {
    if value.is_empty() || Authority::try_from(value).is_ok() {
        return None;
    }
    let fixed: Vec<u8> = value
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
                b
            } else {
                b'-'
            }
        })
        .collect();
    Authority::try_from(fixed.as_slice())
        .is_ok()
        .then_some(fixed)
}

/// Reads primitives from a header block.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// An integer with a `prefix_bits`-bit prefix (§5.1). Values above
    /// 2^32 are refused (no length or index in a sane block comes close).
    fn int(&mut self, prefix_bits: u32) -> Result<usize, HpackError> {
        let mask = ((1u16 << prefix_bits) - 1) as u8;
        let first = *self.buf.get(self.pos).ok_or(HpackError::Truncated)?;
        self.pos += 1;
        if first & mask < mask {
            return Ok(usize::from(first & mask));
        }
        let mut value = u64::from(mask);
        let mut shift = 0;
        loop {
            let b = *self.buf.get(self.pos).ok_or(HpackError::Truncated)?;
            self.pos += 1;
            value += u64::from(b & 0x7f) << shift;
            if value > u64::from(u32::MAX) {
                return Err(HpackError::IntegerOverflow);
            }
            if b & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
            }
            shift += 7;
            if shift > 28 {
                return Err(HpackError::IntegerOverflow);
            }
        }
    }

    /// A string literal (§5.2), not yet decoded.
    fn string(&mut self) -> Result<StringLiteral<'a>, HpackError> {
        let huffman = self.buf.get(self.pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or(HpackError::Truncated)?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(StringLiteral { huffman, bytes })
    }
}

/// A string literal as sent: Huffman-coded or plain octets.
struct StringLiteral<'a> {
    huffman: bool,
    bytes: &'a [u8],
}

impl StringLiteral<'_> {
    fn decode(&self) -> Result<Vec<u8>, HpackError> {
        if self.huffman {
            huffman_decode(self.bytes)
        } else {
            Ok(self.bytes.to_vec())
        }
    }
}

/// Appends `value` as an integer with a `prefix_bits`-bit prefix whose
/// first octet's other bits are `flags` (§5.1).
fn encode_int(value: usize, prefix_bits: u32, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The length in bits of each symbol's Huffman code (RFC 7541 Appendix
/// B), octets 0-255 then EOS (256). The code is canonical: codes of one
/// length are consecutive in symbol order, and each length's first code
/// follows the previous length's last, so these lengths define it.
#[rustfmt::skip]
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00-0x0f
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10-0x1f
     6, 10, 10, 12, 13,  6,  8, 11, 10, 10,  8, 11,  8,  6,  6,  6, // 0x20-0x2f
     5,  5,  5,  6,  6,  6,  6,  6,  6,  6,  7,  8, 15,  6, 12, 10, // 0x30-0x3f
    13,  6,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7, // 0x40-0x4f
     7,  7,  7,  7,  7,  7,  7,  7,  8,  7,  8, 13, 19, 13, 14,  6, // 0x50-0x5f
    15,  5,  6,  5,  6,  5,  6,  6,  6,  5,  7,  7,  6,  6,  6,  5, // 0x60-0x6f
     6,  7,  6,  5,  5,  6,  7,  7,  7,  7,  7, 15, 11, 14, 13, 28, // 0x70-0x7f
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80-0x8f
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90-0x9f
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0-0xaf
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0-0xbf
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0-0xcf
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0-0xdf
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0-0xef
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0-0xff
    30, // EOS
];

const EOS: u16 = 256;
const MAX_CODE_LEN: usize = 30;

/// The canonical code in decoding form: how many codes each length has,
/// and the symbols ordered by (code length, symbol).
struct Canonical {
    counts: [u16; MAX_CODE_LEN + 1],
    symbols: [u16; 257],
}

const CANONICAL: Canonical = {
    let mut counts = [0u16; MAX_CODE_LEN + 1];
    let mut s = 0;
    while s < 257 {
        counts[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut symbols = [0u16; 257];
    let mut n = 0;
    let mut len = 1;
    while len <= MAX_CODE_LEN {
        let mut s = 0;
        while s < 257 {
            if CODE_LENGTHS[s] as usize == len {
                symbols[n] = s as u16;
                n += 1;
            }
            s += 1;
        }
        len += 1;
    }
    Canonical { counts, symbols }
};

/// Decodes a Huffman-coded string (§5.2): fails on the EOS symbol, and on
/// padding longer than 7 bits or not all ones (a prefix of EOS).
pub(super) fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let mut out = Vec::with_capacity(src.len() * 8 / 5 + 1);
    // The bits of the current code read so far, its length, the first
    // code of that length, and the position of that code's symbol.
    let (mut code, mut len, mut first, mut index) = (0u32, 0usize, 0u32, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            code |= u32::from((byte >> shift) & 1);
            len += 1;
            let count = u32::from(CANONICAL.counts[len]);
            if code < first + count {
                let symbol = CANONICAL.symbols[index + (code - first) as usize];
                if symbol == EOS {
                    return Err(HpackError::Huffman);
                }
                out.push(symbol as u8);
                (code, len, first, index) = (0, 0, 0, 0);
            } else {
                if len == MAX_CODE_LEN {
                    return Err(HpackError::Huffman);
                }
                index += count as usize;
                first = (first + count) << 1;
                code <<= 1;
            }
        }
    }
    // `code` holds the `len` unused bits, shifted left once.
    if len > 7 || code >> 1 != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The canonical codes the lengths define, derived independently of
    /// the decoder: (code, length) per symbol.
    fn codes() -> Vec<(u32, u8)> {
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODE_LENGTHS[s], s));
        let mut codes = vec![(0u32, 0u8); 257];
        let (mut code, mut prev_len) = (0u32, CODE_LENGTHS[order[0]]);
        for (i, &s) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (CODE_LENGTHS[s] - prev_len);
            }
            prev_len = CODE_LENGTHS[s];
            codes[s] = (code, prev_len);
        }
        codes
    }

    pub(crate) fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let codes = codes();
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &b in s {
            let (code, len) = codes[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    #[test]
    fn the_code_lengths_define_rfc_7541_appendix_b() {
        let codes = codes();
        // Spot checks against the RFC's table, and a complete code (Kraft
        // sum exactly 1) whose last code, EOS, is 30 ones.
        assert_eq!(codes[usize::from(b'0')], (0x0, 5));
        assert_eq!(codes[usize::from(b' ')], (0x14, 6));
        assert_eq!(codes[usize::from(b'%')], (0x15, 6));
        assert_eq!(codes[usize::from(b'/')], (0x18, 6));
        assert_eq!(codes[usize::from(b'a')], (0x3, 5));
        assert_eq!(codes[0], (0x1ff8, 13));
        assert_eq!(codes[255], (0x3ffffee, 26));
        assert_eq!(codes[256], (0x3fffffff, 30));
        let kraft: u64 = CODE_LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
    }

    #[test]
    fn huffman_decodes_the_rfc_7541_examples() {
        for (encoded, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ] {
            assert_eq!(huffman_decode(&hex(encoded)).unwrap(), text.as_bytes());
            assert_eq!(huffman_encode(text.as_bytes()), hex(encoded), "{text}");
        }
    }

    #[test]
    fn huffman_round_trips_every_octet() {
        let all: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        assert_eq!(huffman_decode(&[]).unwrap(), b"");
    }

    #[test]
    fn huffman_refuses_bad_padding_and_eos() {
        // 'a' is 00011: padded with ones it is 0x1f.
        assert_eq!(huffman_decode(&[0x1f]).unwrap(), b"a");
        // Padding of zeros.
        assert_eq!(huffman_decode(&[0x18]), Err(HpackError::Huffman));
        // Padding of 8 bits or more.
        assert_eq!(huffman_decode(&[0x1f, 0xff]), Err(HpackError::Huffman));
        // EOS itself (30 ones), then 2 bits of padding.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::Huffman)
        );
    }

    #[test]
    fn integers_follow_rfc_7541_c1() {
        let read = |bytes: &[u8], prefix| Reader { buf: bytes, pos: 0 }.int(prefix);
        assert_eq!(read(&[0x0a], 5), Ok(10));
        assert_eq!(read(&[0x1f, 0x9a, 0x0a], 5), Ok(1337));
        assert_eq!(read(&[0x2a], 8), Ok(42));
        assert_eq!(read(&[0x1f, 0x9a], 5), Err(HpackError::Truncated));
        assert_eq!(
            read(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 5),
            Err(HpackError::IntegerOverflow)
        );
        for (v, prefix) in [
            (10, 5),
            (1337, 5),
            (30, 5),
            (31, 5),
            (0, 7),
            (127, 7),
            (1 << 20, 4),
        ] {
            let mut out = vec![];
            encode_int(v, prefix, 0, &mut out);
            assert_eq!(read(&out, prefix), Ok(v), "{v} with a {prefix}-bit prefix");
        }
    }

    /// RFC 7541 C.3 and C.4: three requests on one connection, plain and
    /// Huffman-coded. Valid authorities are left alone, and the table's
    /// size follows the RFC's after each block.
    #[test]
    fn rfc_7541_request_examples_pass_unchanged_with_the_rfc_table_sizes() {
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut table = Table::default();
            for (block, size) in blocks.iter().zip([57, 110, 164]) {
                assert_eq!(rewrite_block(&hex(block), &mut table), Ok(None));
                assert_eq!(table.size(), size);
            }
        }
    }

    /// RFC 7541 C.5: responses with a 256-octet table, where entries are
    /// evicted.
    #[test]
    fn rfc_7541_eviction_example_keeps_the_rfc_table_sizes() {
        let mut table = Table::default();
        table.resize(256).unwrap();
        for (block, size) in [
            (
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
                 6c65 2e63 6f6d",
                222,
            ),
            ("4803 3330 37c1 c0bf", 222),
            (
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
                 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
                 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
                 3d31",
                215,
            ),
        ] {
            assert_eq!(rewrite_block(&hex(block), &mut table), Ok(None));
            assert_eq!(table.size(), size);
        }
    }

    #[test]
    fn invalid_authorities_get_a_valid_one_of_the_same_length() {
        for (from, to) in [
            ("tmp%2Fx%2Fcsi.sock", "tmp-2Fx-2Fcsi.sock"),
            ("%2Frun%2Fcsi.sock", "-2Frun-2Fcsi.sock"),
            ("/run/csi/csi.sock", "-run-csi-csi.sock"),
            ("unix:///run/x.sock", "unix----run-x.sock"),
            ("a b", "a-b"),
        ] {
            assert_eq!(
                fix_authority(from.as_bytes()).as_deref(),
                Some(to.as_bytes())
            );
        }
        for ok in [
            "localhost",
            "localhost:50051",
            "[::1]:50051",
            "stowage.csi.dev",
            "x",
        ] {
            assert_eq!(fix_authority(ok.as_bytes()), None, "{ok}");
        }
        assert_eq!(fix_authority(b""), None);
    }

    /// Why the replacement has the value's length: a tight table holds
    /// the client's `:authority` entry and one more; were h2's entry
    /// longer, h2 would have evicted it when the client refers to it.
    #[test]
    fn the_replaced_entry_keeps_its_size_so_later_indexes_still_name_it() {
        let fields = [field(":authority", "a%"), field("x-a", "")];
        let mut client = FullTable::new();
        let mut ours = Table::default();
        let mut h2 = FullTable::new();
        // 44 + 35 octets of entries in a table of 80.
        let first = encode(&fields, Some(80), &mut client, &mut [0u8].into_iter());
        let first = rewrite_block(&first, &mut ours).unwrap().unwrap();
        assert_eq!(decode_full(&first, &mut h2), fixed(&fields));
        // Both entries, by index: 63 is the `:authority`.
        let second = [0x80 | 63, 0x80 | 62];
        assert_eq!(rewrite_block(&second, &mut ours), Ok(None));
        assert_eq!(
            decode_full(&second, &mut h2),
            [field(":authority", "a-"), field("x-a", "")]
        );
    }

    fn field(name: &str, value: &str) -> Field {
        (name.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    /// A header list as a decoder with its own table sees it: what h2 gets.
    /// Static entries used whole decode to a placeholder value (only
    /// comparisons between two decodings are made).
    #[derive(Default, Debug)]
    pub(crate) struct FullTable {
        entries: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max_size: usize,
    }

    pub(crate) type Field = (Vec<u8>, Vec<u8>);

    impl FullTable {
        pub(crate) fn new() -> Self {
            Self {
                max_size: DEFAULT_TABLE_SIZE,
                ..Self::default()
            }
        }

        fn get(&self, index: usize) -> Field {
            match index {
                1..=61 => (
                    STATIC_NAMES[index - 1].as_bytes().to_vec(),
                    format!("<static {index}>").into_bytes(),
                ),
                _ => self.entries[index - 62].clone(),
            }
        }

        fn insert(&mut self, f: Field) {
            let size = f.0.len() + f.1.len() + 32;
            while self.size + size > self.max_size {
                let Some(old) = self.entries.pop_back() else {
                    break;
                };
                self.size -= old.0.len() + old.1.len() + 32;
            }
            if size <= self.max_size {
                self.size += size;
                self.entries.push_front(f);
            }
        }

        fn resize(&mut self, max: usize) {
            self.max_size = max;
            while self.size > max {
                let old = self.entries.pop_back().unwrap();
                self.size -= old.0.len() + old.1.len() + 32;
            }
        }

        fn find(&self, f: &Field) -> Option<usize> {
            self.entries.iter().position(|e| e == f).map(|i| i + 62)
        }

        fn find_name(&self, name: &[u8]) -> Option<usize> {
            STATIC_NAMES
                .iter()
                .position(|n| n.as_bytes() == name)
                .map(|i| i + 1)
                .or_else(|| {
                    self.entries
                        .iter()
                        .position(|e| e.0 == name)
                        .map(|i| i + 62)
                })
        }
    }

    /// Decodes a whole block, panicking on anything malformed.
    pub(crate) fn decode_full(block: &[u8], table: &mut FullTable) -> Vec<Field> {
        let mut r = Reader { buf: block, pos: 0 };
        let mut fields = vec![];
        while let Some(&first) = block.get(r.pos) {
            if first & 0x80 != 0 {
                let i = r.int(7).unwrap();
                assert!(i >= 1 && i <= 61 + table.entries.len(), "index {i}");
                fields.push(table.get(i));
            } else if first & 0xe0 == 0x20 {
                table.resize(r.int(5).unwrap());
            } else {
                let indexing = first & 0x40 != 0;
                let i = r.int(if indexing { 6 } else { 4 }).unwrap();
                let name = if i == 0 {
                    r.string().unwrap().decode().unwrap()
                } else {
                    table.get(i).0
                };
                let f = (name, r.string().unwrap().decode().unwrap());
                if indexing {
                    table.insert(f.clone());
                }
                fields.push(f);
            }
        }
        fields
    }

    /// Encodes like a client might, every choice taken from `choices`:
    /// whole-entry references, literals with or without indexing or never
    /// indexed, names by reference or literal, Huffman or not.
    pub(crate) fn encode(
        fields: &[Field],
        size_update: Option<usize>,
        table: &mut FullTable,
        choices: &mut impl Iterator<Item = u8>,
    ) -> Vec<u8> {
        let mut out = vec![];
        if let Some(max) = size_update {
            encode_int(max, 5, 0x20, &mut out);
            table.resize(max);
        }
        let string = |s: &[u8], huffman: bool, out: &mut Vec<u8>| {
            if huffman {
                let h = huffman_encode(s);
                encode_int(h.len(), 7, 0x80, out);
                out.extend_from_slice(&h);
            } else {
                encode_int(s.len(), 7, 0, out);
                out.extend_from_slice(s);
            }
        };
        for f in fields {
            let c = choices.next().unwrap_or(0);
            if c & 1 != 0
                && let Some(i) = table.find(f)
            {
                encode_int(i, 7, 0x80, &mut out);
                continue;
            }
            let (prefix, flags, indexing) = match (c >> 1) % 3 {
                0 => (6, 0x40, true),
                1 => (4, 0x00, false),
                _ => (4, 0x10, false),
            };
            match table.find_name(&f.0).filter(|_| c & 8 != 0) {
                Some(i) => encode_int(i, prefix, flags, &mut out),
                None => {
                    encode_int(0, prefix, flags, &mut out);
                    string(&f.0, c & 16 != 0, &mut out);
                }
            }
            string(&f.1, c & 32 != 0, &mut out);
            if indexing {
                table.insert(f.clone());
            }
        }
        out
    }

    /// What h2 must see for `fields`: every `:authority` made valid.
    pub(crate) fn fixed(fields: &[Field]) -> Vec<Field> {
        fields
            .iter()
            .map(|(n, v)| {
                let v = match n.as_slice() {
                    AUTHORITY => fix_authority(v).unwrap_or_else(|| v.clone()),
                    _ => v.clone(),
                };
                (n.clone(), v)
            })
            .collect()
    }

    fn any_field() -> impl Strategy<Value = Field> {
        let authority = prop_oneof![
            Just("tmp%2Fx%2Fcsi.sock".to_owned()),
            Just("/run/csi/csi.sock".to_owned()),
            Just("localhost".to_owned()),
            Just("[::1]:50051".to_owned()),
            Just(String::new()),
            "[a-z0-9%/.:_-]{1,40}",
        ]
        .prop_map(|v| (AUTHORITY.to_vec(), v.into_bytes()));
        let other = (
            prop_oneof![
                Just(":path"),
                Just("content-type"),
                Just("user-agent"),
                Just("x-a"),
                Just("x-b"),
            ],
            "[ -~]{0,300}",
        )
            .prop_map(|(n, v)| (n.as_bytes().to_vec(), v.into_bytes()));
        prop_oneof![authority, other]
    }

    type Blocks = Vec<(Option<usize>, Vec<Field>)>;

    fn blocks() -> impl Strategy<Value = Blocks> {
        proptest::collection::vec(
            (
                proptest::option::weighted(0.3, prop_oneof![0usize..=4096, 0usize..=400]),
                proptest::collection::vec(any_field(), 1..8),
            ),
            1..12,
        )
    }

    proptest! {
        /// Whatever the client's encoder does, h2 (a decoder with its own
        /// table) decodes the rewritten blocks to the client's header lists
        /// with every `:authority` made valid: the tables stay in step
        /// through insertions, evictions and size updates.
        #[test]
        fn rewritten_blocks_decode_to_the_client_fields_with_valid_authorities(
            blocks in blocks(),
            choices in proptest::collection::vec(any::<u8>(), 100),
        ) {
            let mut choices = choices.into_iter().cycle();
            let mut client = FullTable::new();
            let mut ours = Table::default();
            let mut h2 = FullTable::new();
            for (size_update, fields) in &blocks {
                let block = encode(fields, *size_update, &mut client, &mut choices);
                let out = rewrite_block(&block, &mut ours).unwrap().unwrap_or(block);
                prop_assert_eq!(decode_full(&out, &mut h2), fixed(fields));
                prop_assert_eq!(ours.size, client.size);
                prop_assert_eq!(ours.entries.len(), client.entries.len());
            }
        }

        /// Garbage never panics; it is an error or a block passed on.
        #[test]
        fn arbitrary_blocks_do_not_panic(block in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = rewrite_block(&block, &mut Table::default());
        }
    }
}
