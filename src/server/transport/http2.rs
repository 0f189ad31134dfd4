//! The HTTP/2 frame layer of the `:authority` rewrite: finds the header
//! blocks in the bytes a client sends (RFC 9113 §3.4, §4.1, §6.2, §6.10),
//! has [`hpack::rewrite_block`] fix each, and re-frames a block it changed.
//! Every other byte passes unchanged and in order. On anything it does not
//! expect (no HTTP/2 preface, a frame out of place, an undecodable block)
//! it passes the rest of the connection unchanged and leaves the verdict
//! to h2.

use super::hpack;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;

/// The largest frame payload written: the least SETTINGS_MAX_FRAME_SIZE
/// a server may set, so every server accepts it.
const MAX_PAYLOAD: usize = 16_384;

/// The most bytes of one header block's frames held back. A longer block
/// (h2 refuses far shorter ones: hyper's header list limit is 16 KiB) ends
/// the rewriting, and the connection passes unchanged.
const MAX_BLOCK: usize = 256 * 1024;

/// A client-to-server HTTP/2 byte stream rewriter, without I/O: bytes go
/// in with [`feed`](Self::feed), the bytes for the server come out.
#[derive(Debug)]
pub(super) struct AuthorityRewriter {
    state: State,
    /// The current unit received so far and not yet passed on: the
    /// preface, a frame header, or a whole HEADERS/CONTINUATION frame.
    pending: Vec<u8>,
    /// The header block being collected (until END_HEADERS).
    block: Option<OpenBlock>,
    table: hpack::Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preface,
    FrameHeader,
    /// This many payload bytes of a frame outside header blocks remain.
    Payload(usize),
    /// A HEADERS or CONTINUATION frame of this many bytes, header
    /// included, is being collected in `pending`.
    HeaderFrame(usize),
    /// Rewriting has ended: everything passes unchanged.
    Passthrough,
}

#[derive(Debug)]
struct OpenBlock {
    /// Its frames as received.
    frames: Vec<u8>,
    /// Its header block fragments, joined.
    fragment: Vec<u8>,
    stream: u32,
    /// The HEADERS frame's flags and priority fields.
    flags: u8,
    priority: Option<[u8; PRIORITY_LEN]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = u32::try_from(self.len).expect("frame payloads are at most MAX_PAYLOAD");
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

impl AuthorityRewriter {
    pub(super) fn new() -> Self {
        Self {
            state: State::Preface,
            pending: Vec::new(),
            block: None,
            table: hpack::Table::default(),
        }
    }

    /// Rewriting has ended and nothing is held back: the rest of the
    /// connection may bypass [`feed`](Self::feed).
    pub(super) fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Takes the next bytes from the client and appends to `out` the bytes
    /// for the server, in order. A partial preface, frame header or header
    /// block is held back until it is complete; everything else is passed
    /// on at once.
    pub(super) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Payload(n) => {
                    let k = n.min(input.len());
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    self.state = if k == n {
                        State::FrameHeader
                    } else {
                        State::Payload(n - k)
                    };
                }
                State::Preface => {
                    self.take(&mut input, PREFACE.len());
                    if !PREFACE.starts_with(&self.pending) {
                        self.give_up(out);
                    } else if self.pending.len() == PREFACE.len() {
                        out.append(&mut self.pending);
                        self.state = State::FrameHeader;
                    }
                }
                State::FrameHeader => {
                    self.take(&mut input, FRAME_HEADER_LEN);
                    if self.pending.len() == FRAME_HEADER_LEN {
                        self.on_frame_header(out);
                    }
                }
                State::HeaderFrame(total) => {
                    self.take(&mut input, total);
                    if self.pending.len() == total {
                        self.on_header_frame(out);
                    }
                }
            }
        }
    }

    /// The client closed its side: passes on whatever is held back (an
    /// incomplete frame, for h2 to judge).
    pub(super) fn finish(&mut self, out: &mut Vec<u8>) {
        self.give_up(out);
    }

    /// Moves bytes from `input` to `pending` until it holds `upto`.
    fn take(&mut self, input: &mut &[u8], upto: usize) {
        let k = (upto - self.pending.len()).min(input.len());
        self.pending.extend_from_slice(&input[..k]);
        *input = &input[k..];
    }

    fn on_frame_header(&mut self, out: &mut Vec<u8>) {
        let h = FrameHeader::parse(&self.pending);
        let in_block = self.block.is_some();
        match h.kind {
            HEADERS if !in_block => {}
            CONTINUATION if in_block => {}
            // A server never receives PUSH_PROMISE; inside a block only
            // CONTINUATION may come (RFC 9113 §6.10). h2 answers these.
            PUSH_PROMISE | HEADERS | CONTINUATION => return self.give_up(out),
            _ if in_block => return self.give_up(out),
            _ => {
                out.append(&mut self.pending);
                self.state = match h.len {
                    0 => State::FrameHeader,
                    n => State::Payload(n),
                };
                return;
            }
        }
        let total = FRAME_HEADER_LEN + h.len;
        let held = self.block.as_ref().map_or(0, |b| b.frames.len());
        if held + total > MAX_BLOCK {
            return self.give_up(out);
        }
        self.state = State::HeaderFrame(total);
        if self.pending.len() == total {
            self.on_header_frame(out);
        }
    }

    fn on_header_frame(&mut self, out: &mut Vec<u8>) {
        let frame = std::mem::take(&mut self.pending);
        let h = FrameHeader::parse(&frame);
        self.state = State::FrameHeader;
        let payload = &frame[FRAME_HEADER_LEN..];
        let block = match self.block.as_mut() {
            Some(block) => {
                block.frames.extend_from_slice(&frame);
                if h.stream != block.stream {
                    return self.give_up(out);
                }
                block.fragment.extend_from_slice(payload);
                block
            }
            None => {
                let Some((fragment, priority)) = headers_fragment(h.flags, payload) else {
                    self.pending = frame;
                    return self.give_up(out);
                };
                self.block.insert(OpenBlock {
                    fragment: fragment.to_vec(),
                    frames: frame,
                    stream: h.stream,
                    flags: h.flags,
                    priority,
                })
            }
        };
        if h.flags & END_HEADERS == 0 {
            return;
        }
        match hpack::rewrite_block(&block.fragment, &mut self.table) {
            Ok(None) => out.append(&mut block.frames),
            Ok(Some(fragment)) => write_headers(block, &fragment, out),
            Err(e) => {
                tracing::debug!(error = %e, "cannot decode a header block; the connection passes unchanged");
                return self.give_up(out);
            }
        }
        self.block = None;
    }

    /// Ends the rewriting: passes on what is held back, in order, and
    /// everything after it unchanged.
    fn give_up(&mut self, out: &mut Vec<u8>) {
        if let Some(mut b) = self.block.take() {
            out.append(&mut b.frames);
        }
        out.append(&mut self.pending);
        self.pending = Vec::new();
        self.state = State::Passthrough;
    }
}

/// A HEADERS frame's header block fragment and priority fields, without
/// its padding (RFC 9113 §6.2); `None` if the padding or priority do not
/// fit in the payload.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(&[u8], Option<[u8; PRIORITY_LEN]>)> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first()?;
        pad = usize::from(n);
        p = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, rest) = p.split_first_chunk::<PRIORITY_LEN>()?;
        priority = Some(*fields);
        p = rest;
    }
    let end = p.len().checked_sub(pad)?;
    Some((&p[..end], priority))
}

/// Writes a rewritten header block as a HEADERS frame (with the original's
/// END_STREAM and priority, without padding) and as many CONTINUATION
/// frames as needed.
fn write_headers(block: &OpenBlock, fragment: &[u8], out: &mut Vec<u8>) {
    let prio_len = block.priority.map_or(0, |_| PRIORITY_LEN);
    let (first, mut rest) = fragment.split_at(fragment.len().min(MAX_PAYLOAD - prio_len));
    let end = |rest: &[u8]| if rest.is_empty() { END_HEADERS } else { 0 };
    FrameHeader {
        len: prio_len + first.len(),
        kind: HEADERS,
        flags: block.flags & (END_STREAM | PRIORITY) | end(rest),
        stream: block.stream,
    }
    .write(out);
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_PAYLOAD));
        rest = tail;
        FrameHeader {
            len: chunk.len(),
            kind: CONTINUATION,
            flags: end(rest),
            stream: block.stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::hpack::tests::{Field, FullTable, decode_full, encode, fixed};
    use super::*;
    use proptest::prelude::*;

    /// What grpcio 1.85 (gRPC C-core 58) sent on `unix:///tmp/x/tap.sock`
    /// for GetPluginInfo, Probe and GetPluginInfo on one channel: preface,
    /// SETTINGS, WINDOW_UPDATE, then per call HEADERS (literals with
    /// incremental indexing, `:authority` `tmp%2Fx%2Ftap.sock`; the later
    /// calls refer to the table), DATA and acknowledgements.
    const GRPCIO_CAPTURE: [&str; 17] = [
        "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a0000240400000000",
        "00000200000000000300000000000400400000000500400000000600004000fe",
        "0300000001000004080000000000003f00010000000401000000000000ef0104",
        "0000000140053a706174681e2f6373692e76312e4964656e746974792f476574",
        "506c7567696e496e666f400a3a617574686f7269747912746d70253246782532",
        "467461702e736f636b8386400c636f6e74656e742d74797065106170706c6963",
        "6174696f6e2f677270634002746508747261696c6572734014677270632d6163",
        "636570742d656e636f64696e67176964656e746974792c206465666c6174652c",
        "20677a6970400c677270632d74696d656f7574023553400a757365722d616765",
        "6e7430677270632d707974686f6e2f312e38352e3320677270632d632f35382e",
        "302e3020286c696e75783b206368747470322900000408000000000100000005",
        "0000050001000000010000000000000004080000000000000000050000390104",
        "0000000340053a70617468162f6373692e76312e4964656e746974792f50726f",
        "6265c48386c3c2c1400c677270632d74696d656f757405353031306dc0000004",
        "0800000000030000000500000500010000000300000000000000090104000000",
        "05c6c58386c4c3c2bec000000408000000000500000005000005000100000005",
        "0000000000",
    ];

    pub(crate) fn capture() -> Vec<u8> {
        let s = GRPCIO_CAPTURE.concat();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    pub(crate) fn rewrite(input: &[u8]) -> Vec<u8> {
        let mut r = AuthorityRewriter::new();
        let mut out = vec![];
        r.feed(input, &mut out);
        r.finish(&mut out);
        out
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        FrameHeader {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    /// The frames after the preface.
    fn frames(bytes: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut frames = vec![];
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest);
            frames.push((h, rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len].to_vec()));
            rest = &rest[FRAME_HEADER_LEN + h.len..];
        }
        frames
    }

    /// Each header block's stream and fields, decoded as h2 would.
    fn header_lists(bytes: &[u8]) -> Vec<(u32, Vec<Field>)> {
        let mut table = FullTable::new();
        let mut lists = vec![];
        let mut block = vec![];
        for (h, payload) in frames(bytes) {
            match h.kind {
                HEADERS => block = headers_fragment(h.flags, &payload).unwrap().0.to_vec(),
                CONTINUATION => block.extend_from_slice(&payload),
                _ => continue,
            }
            if h.flags & END_HEADERS != 0 {
                lists.push((h.stream, decode_full(&block, &mut table)));
            }
        }
        lists
    }

    fn authorities(lists: &[(u32, Vec<Field>)]) -> Vec<String> {
        lists
            .iter()
            .flat_map(|(_, fields)| fields)
            .filter(|(n, _)| n == b":authority")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    fn field(name: &str, value: &str) -> Field {
        (name.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    fn request(authority: &str) -> Vec<Field> {
        vec![
            field(":method", "POST"),
            field(":scheme", "http"),
            field(":path", "/csi.v1.Identity/Probe"),
            field(":authority", authority),
            field("content-type", "application/grpc"),
            field("te", "trailers"),
        ]
    }

    /// The captured C-core connection: its first block's `:authority`
    /// literal is replaced; the later blocks, which refer to the table
    /// entry, and every other frame pass byte for byte; h2 decodes all
    /// three requests with the valid authority.
    #[test]
    fn grpcio_authority_is_made_valid_and_nothing_else_changes() {
        let input = capture();
        let out = rewrite(&input);

        let (before, after) = (header_lists(&input), header_lists(&out));
        assert_eq!(authorities(&before), ["tmp%2Fx%2Ftap.sock"; 3]);
        assert_eq!(after.len(), 3);
        for ((s1, f1), (s2, f2)) in before.iter().zip(&after) {
            assert_eq!(s1, s2);
            assert_eq!(&fixed(f1), f2);
        }
        assert_eq!(authorities(&after), ["tmp-2Fx-2Ftap.sock"; 3]);

        let (fin, fout) = (frames(&input), frames(&out));
        assert_eq!(fin.len(), fout.len());
        let mut changed = 0;
        for ((h1, p1), (h2, p2)) in fin.iter().zip(&fout) {
            assert_eq!(
                (h1.kind, h1.flags, h1.stream),
                (h2.kind, h2.flags, h2.stream)
            );
            changed += usize::from(p1 != p2);
        }
        assert_eq!(changed, 1, "only the first HEADERS frame changes");
    }

    #[test]
    fn valid_authorities_pass_byte_for_byte() {
        let mut client = FullTable::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        for (stream, authority) in [(1, "localhost"), (3, "[::1]:50051"), (5, "localhost")] {
            let block = encode(
                &request(authority),
                None,
                &mut client,
                &mut [0u8].into_iter().cycle(),
            );
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        assert_eq!(rewrite(&input), input);
    }

    /// A padded HEADERS with priority fields, continued in a CONTINUATION:
    /// re-framed as one HEADERS (priority and END_STREAM kept, padding
    /// dropped).
    #[test]
    fn padded_prioritised_and_continued_blocks_are_reframed() {
        let block = encode(
            &request("/run/csi/csi.sock"),
            None,
            &mut FullTable::new(),
            &mut [0u8].into_iter().cycle(),
        );
        let (a, b) = block.split_at(10);
        let mut payload = vec![3];
        payload.extend_from_slice(&[0x80, 0, 0, 0, 7]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x6, 0, 0, &[1; 8]));

        let out = rewrite(&input);
        let f = frames(&out);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].0.kind, HEADERS);
        assert_eq!(f[0].0.flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(f[0].1[..5], [0x80, 0, 0, 0, 7]);
        assert_eq!(f[1], frames(&input)[2]);
        assert_eq!(header_lists(&out), [(1, request("-run-csi-csi.sock"))]);
    }

    /// A rewritten block longer than a frame may be goes out as HEADERS
    /// and CONTINUATION frames of at most 16 KiB.
    #[test]
    fn long_rewritten_blocks_are_split_into_continuations() {
        let mut fields = request("%2Frun%2Fcsi.sock");
        for i in 0..40 {
            fields.push(field(&format!("x-{i}"), &"v".repeat(1000)));
        }
        let block = encode(
            &fields,
            None,
            &mut FullTable::new(),
            &mut [2u8].into_iter().cycle(),
        );
        let mut input = PREFACE.to_vec();
        for chunk in block.chunks(MAX_PAYLOAD).enumerate() {
            let (kind, last) = (
                if chunk.0 == 0 { HEADERS } else { CONTINUATION },
                (chunk.0 + 1) * MAX_PAYLOAD >= block.len(),
            );
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, chunk.1));
        }
        let out = rewrite(&input);
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|(h, _)| h.len <= MAX_PAYLOAD));
        assert_eq!(f[0].0.len, MAX_PAYLOAD);
        assert_eq!(header_lists(&out), [(1, fixed(&fields))]);
    }

    /// Whatever it cannot follow, it passes on unchanged from there on.
    #[test]
    fn what_it_does_not_understand_passes_unchanged() {
        let http1 = b"POST /csi.v1.Identity/Probe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let undecodable = [PREFACE, &frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f])].concat();
        let interleaved = [
            PREFACE,
            &frame(HEADERS, 0, 1, &[0x82]),
            &frame(0x0, 0, 1, &[0; 3]),
            &frame(CONTINUATION, END_HEADERS, 1, &[0x84]),
        ]
        .concat();
        let other_stream = [
            PREFACE,
            &frame(HEADERS, 0, 1, &[0x82]),
            &frame(CONTINUATION, END_HEADERS, 3, &[0x84]),
        ]
        .concat();
        let bad_padding = [
            PREFACE,
            &frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
        ]
        .concat();
        let push_promise = [PREFACE, &frame(PUSH_PROMISE, END_HEADERS, 1, &[0; 5])].concat();
        for input in [
            http1,
            undecodable,
            interleaved,
            other_stream,
            bad_padding,
            push_promise,
        ] {
            let mut r = AuthorityRewriter::new();
            let mut out = vec![];
            r.feed(&input, &mut out);
            assert!(r.is_passthrough());
            assert_eq!(out, input);
        }
    }

    #[test]
    fn an_oversized_block_passes_unchanged() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82; MAX_PAYLOAD]));
        while input.len() < MAX_BLOCK + 2 * MAX_PAYLOAD {
            input.extend(frame(CONTINUATION, 0, 1, &[0x82; MAX_PAYLOAD]));
        }
        let mut r = AuthorityRewriter::new();
        let mut out = vec![];
        r.feed(&input, &mut out);
        assert!(r.is_passthrough());
        assert_eq!(out, input);
    }

    #[test]
    fn a_partial_frame_is_held_until_complete_or_closed() {
        let input = capture();
        // Preface, SETTINGS, WINDOW_UPDATE, SETTINGS ack, then HEADERS.
        let first_headers =
            PREFACE.len() + (FRAME_HEADER_LEN + 36) + (FRAME_HEADER_LEN + 4) + FRAME_HEADER_LEN;
        let mut r = AuthorityRewriter::new();
        let mut out = vec![];
        r.feed(&input[..first_headers + 20], &mut out);
        assert_eq!(out, input[..first_headers]);
        r.finish(&mut out);
        assert_eq!(out, input[..first_headers + 20]);
    }

    proptest! {
        /// However the bytes arrive, the output is the same.
        #[test]
        fn any_split_of_the_input_gives_the_same_output(
            cuts in proptest::collection::vec(0usize..600, 0..40),
        ) {
            let input = capture();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.push(0);
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut r = AuthorityRewriter::new();
            let mut out = vec![];
            for w in cuts.windows(2) {
                r.feed(&input[w[0]..w[1]], &mut out);
            }
            r.finish(&mut out);
            prop_assert_eq!(out, rewrite(&input));
        }
    }
}
