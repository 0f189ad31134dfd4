//! TLS 1.3 record protection for the data link, done here after rustls's
//! handshake: what kTLS does in the kernel (these kernels have no `tls`
//! module), in user space.
//!
//! Why: rustls's buffered connection copies every received byte three
//! times (the socket's bytes into its deframer, each decrypted record into
//! a plaintext queue, out of that into the caller's buffer) and zero-fills
//! the room it reads into, 4 KiB at a time. On a 3-copy sequential write
//! those copies were a fifth of all CPU time on this 2-core machine (perf
//! during the `replicated` bench), and that job is bound by CPU. Here a
//! record is decrypted in place in the buffer the socket was read into and
//! its content copied once, into the frame it belongs to; a frame is
//! sealed record by record straight into the buffer written to the socket.
//!
//! rustls still does everything else: the handshake (certificates, mutual
//! authentication, the key schedule) is rustls's, driven one whole record
//! at a time ([`handshake`]) so that nothing past the handshake is read
//! into rustls and lost with it, and then rustls hands over the traffic
//! keys ([`establish`], `dangerous_into_kernel_connection`) and keeps the
//! secrets that derive the next keys at a key update ([`Keys`]). This
//! module follows RFC 8446 §5: records of at most 2^14 bytes of content,
//! the per-record nonce (the IV XOR the sequence number), the record
//! header as additional data, the inner content type after the content and
//! zero padding (stripped), close_notify as the end of the stream, and
//! KeyUpdate in both directions (ours before the cipher's confidentiality
//! limit, the peer's whenever it sends one). Every record that fails to
//! decrypt, comes out of order or breaks the format ends the connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

#[cfg(test)]
use bytes::BytesMut;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};

/// The record types of TLS 1.3 (RFC 8446 §5.1).
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

/// Post-handshake handshake messages (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// The most content one record carries.
const MAX_CONTENT: usize = 1 << 14;
/// The longest encrypted record body TLS 1.3 allows (content, type,
/// padding and tag).
const MAX_CIPHERTEXT: usize = MAX_CONTENT + 256;
/// The longest record the handshake may send in plaintext (RFC 8446 §5.1:
/// at most 2^14 bytes; rustls allows a little more for TLS 1.2 peers, which
/// the link never has).
const MAX_HANDSHAKE_RECORD: usize = MAX_CONTENT + 2048;
const HEADER: usize = 5;
const TAG: usize = 16;
/// The longest record on the wire, header included: room a reader keeps.
pub(super) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// One direction's traffic key: the AEAD key, its IV and the sequence
/// number of the next record.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("TLS: a cipher suite the data link does not seal")),
        };
        Self::from_parts(alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn from_parts(
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> io::Result<Self> {
        let key =
            UnboundKey::new(alg, key).map_err(|_| invalid("TLS: a key of the wrong length"))?;
        let iv = iv
            .try_into()
            .map_err(|_| invalid("TLS: an IV of the wrong length"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3); advances the sequence
    /// number, refusing to wrap it.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS: record sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals what this end sends.
pub(super) struct Sealer {
    dir: Direction,
    /// Records sealed under one key before this end updates it.
    update_after: u64,
}

impl Sealer {
    /// Appends `data` to `out` as application-data records.
    #[cfg(test)]
    fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.seal_parts(&[data], out)
    }

    /// Appends the bytes of `parts`, one after the other, to `out` as
    /// application-data records: each part is copied once, straight into
    /// the records it falls in.
    pub(super) fn seal_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        out.reserve(total + total.div_ceil(MAX_CONTENT).max(1) * (HEADER + 1 + TAG));
        if total == 0 {
            return self.seal_record(APPLICATION_DATA, &[], out);
        }
        let mut parts = parts.iter().copied();
        let mut part: &[u8] = &[];
        let mut left = total;
        while left > 0 {
            let n = left.min(MAX_CONTENT);
            let at = self.begin_record(n, out);
            let mut need = n;
            while need > 0 {
                if part.is_empty() {
                    part = parts.next().expect("the parts hold `total` bytes");
                }
                let k = need.min(part.len());
                out.extend_from_slice(&part[..k]);
                part = &part[k..];
                need -= k;
            }
            self.finish_record(APPLICATION_DATA, at, out)?;
            left -= n;
        }
        Ok(())
    }

    fn seal_record(&mut self, typ: u8, content: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let at = self.begin_record(content.len(), out);
        out.extend_from_slice(content);
        self.finish_record(typ, at, out)
    }

    /// Appends the header of a record of `len` bytes of content to `out`;
    /// where its content starts.
    fn begin_record(&self, len: usize, out: &mut Vec<u8>) -> usize {
        debug_assert!(len <= MAX_CONTENT);
        let len = u16::try_from(len + 1 + TAG).expect("a record's length fits");
        let [hi, lo] = len.to_be_bytes();
        out.extend_from_slice(&[APPLICATION_DATA, 3, 3, hi, lo]);
        out.len()
    }

    /// Seals the record whose content starts at `out[at..]`: its type
    /// after the content, then the tag.
    fn finish_record(&mut self, typ: u8, at: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let header: [u8; HEADER] = out[at - HEADER..at].try_into().expect("a header");
        let nonce = self.dir.next_nonce()?;
        out.push(typ);
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[at..])
            .map_err(|_| invalid("TLS: sealing a record failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Makes the next seal update the key first.
    #[cfg(test)]
    pub(super) fn update_key_next(&mut self) {
        self.update_after = self.dir.seq;
    }

    /// True once this key has sealed as many records as it should.
    pub(super) fn wants_key_update(&self) -> bool {
        self.dir.seq >= self.update_after
    }

    /// Appends a KeyUpdate (sealed with the current key) to `out` and
    /// switches to the next key, which `keys` derives.
    pub(super) fn update_key(&mut self, keys: &mut Keys, out: &mut Vec<u8>) -> io::Result<()> {
        // update_not_requested: our own receiving key is the peer's choice.
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        let (seq, secrets) = keys.next_tx().map_err(io::Error::other)?;
        self.dir = Direction::new(seq, &secrets)?;
        Ok(())
    }
}

/// What [`Opener::open`] found, after the data it appended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// The buffer holds no further whole record.
    More,
    /// The peer sent close_notify: the stream ends here.
    Closed,
    /// The peer updated its key (and asks us to update ours when
    /// `requested`): [`Opener::update_key`] before opening more.
    KeyUpdate { requested: bool },
}

/// What [`Opener::open_within`] did to a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Within {
    /// The buffer's data ends here.
    pub plain: usize,
    /// What was not opened starts here.
    pub used: usize,
    pub opened: Opened,
}

/// Opens what the peer sends.
pub(super) struct Opener {
    dir: Direction,
}

impl Opener {
    /// Opens the whole records of `buf[at..]` in place, until no whole
    /// record is left or something other than data came: each record's
    /// application data moves, as it is decrypted, to follow the data
    /// before it, `buf[..at]` first, so no byte is copied twice. Returns
    /// where the data ends (`buf[..plain]`), where what was not opened
    /// starts (`buf[used..]`; the bytes between are spent), and what
    /// stopped it.
    pub(super) fn open_within(&mut self, buf: &mut [u8], at: usize) -> io::Result<Within> {
        let (mut plain, mut used) = (at, at);
        while let Some(len) = record_len(&buf[used..])? {
            let (typ, n) = self.open_record(buf, plain, used, len)?;
            used += len;
            let content = &buf[plain..plain + n];
            let opened = match typ {
                APPLICATION_DATA => {
                    plain += n;
                    continue;
                }
                ALERT => match content {
                    [_, 0] => Opened::Closed,
                    [_, what] => return Err(invalid(format!("TLS: alert {what} from the peer"))),
                    _ => return Err(invalid("TLS: a malformed alert")),
                },
                HANDSHAKE => match post_handshake(content)? {
                    Some(requested) => Opened::KeyUpdate { requested },
                    None => continue,
                },
                t => {
                    return Err(invalid(format!(
                        "TLS: a record of type {t} after the handshake"
                    )));
                }
            };
            return Ok(Within {
                plain,
                used,
                opened,
            });
        }
        Ok(Within {
            plain,
            used,
            opened: Opened::More,
        })
    }

    /// Opens the whole records at the start of `buf` as
    /// [`Opener::open_within`] does, appending their application data to
    /// `plain`; how many bytes of `buf` it used and what stopped it.
    #[cfg(test)]
    fn open(&mut self, buf: &mut [u8], plain: &mut BytesMut) -> io::Result<(usize, Opened)> {
        let w = self.open_within(buf, 0)?;
        plain.extend_from_slice(&buf[..w.plain]);
        Ok((w.used, w.opened))
    }

    /// Decrypts the whole record `buf[at..at + len]`, its inner plaintext
    /// landing at `buf[to..]` (`to <= at`) as it is decrypted; its inner
    /// type and the length of its content there.
    fn open_record(
        &mut self,
        buf: &mut [u8],
        to: usize,
        at: usize,
        len: usize,
    ) -> io::Result<(u8, usize)> {
        let header: [u8; HEADER] = buf[at..at + HEADER].try_into().expect("a whole header");
        let nonce = self.dir.next_nonce()?;
        let inner = self
            .dir
            .key
            .open_within(
                nonce,
                Aad::from(header),
                &mut buf[to..at + len],
                at - to + HEADER..,
            )
            .map_err(|_| invalid("TLS: a record failed authentication"))?;
        // The content, its type, then zero padding (RFC 8446 §5.4).
        let Some(end) = inner.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS: a record with no content type"));
        };
        if end > MAX_CONTENT {
            return Err(invalid("TLS: a record with too much content"));
        }
        Ok((inner[end], end))
    }

    /// Switches to the peer's next key, after its KeyUpdate.
    pub(super) fn update_key(&mut self, keys: &mut Keys) -> io::Result<()> {
        let (seq, secrets) = keys.next_rx().map_err(io::Error::other)?;
        self.dir = Direction::new(seq, &secrets)?;
        Ok(())
    }
}

/// The length of the record at the start of `buf` (header included) when
/// the whole record is there; an error for anything but a well-formed
/// protected record.
fn record_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(header) = buf.get(..HEADER) else {
        return Ok(None);
    };
    if header[0] != APPLICATION_DATA || header[1..3] != [3, 3] {
        return Err(invalid(format!(
            "TLS: a record of outer type {} version {:02x}{:02x} after the handshake",
            header[0], header[1], header[2]
        )));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if !(1 + TAG..=MAX_CIPHERTEXT).contains(&len) {
        return Err(invalid(format!("TLS: a record of {len} bytes")));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

/// The handshake messages of one record after the handshake: a KeyUpdate
/// (`Some(requested)`, which must end the record), or session tickets,
/// which the link ignores (it never resumes). Anything else, or a message
/// split over records, ends the connection.
fn post_handshake(mut content: &[u8]) -> io::Result<Option<bool>> {
    if content.is_empty() {
        return Err(invalid("TLS: an empty handshake record"));
    }
    while let [typ, a, b, c, rest @ ..] = content {
        let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
        let Some(body) = rest.get(..len) else {
            return Err(invalid("TLS: a handshake message split over records"));
        };
        content = &rest[len..];
        match (*typ, body) {
            (KEY_UPDATE, [r @ (0 | 1)]) if content.is_empty() => return Ok(Some(*r == 1)),
            (KEY_UPDATE, _) => return Err(invalid("TLS: a malformed key update")),
            (NEW_SESSION_TICKET, _) => {}
            (t, _) => {
                return Err(invalid(format!(
                    "TLS: handshake message {t} after the handshake"
                )));
            }
        }
    }
    if !content.is_empty() {
        return Err(invalid("TLS: a handshake message split over records"));
    }
    Ok(None)
}

/// rustls's side of an established connection: the secrets that derive
/// the next traffic keys at a key update.
pub(super) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        }
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        }
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// A connection in its handshake, run by rustls's unbuffered API (whose
/// incoming bytes stay in a buffer of ours).
pub(super) enum Handshaking {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

impl Handshaking {
    fn state(&self) -> &rustls::CommonState {
        match self {
            Handshaking::Client(c) => c,
            Handshaking::Server(c) => c,
        }
    }

    /// The peer's certificate chain, once the handshake has verified it.
    pub(super) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.state().peer_certificates()
    }

    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> Status<'c, 'i> {
        match self {
            Handshaking::Client(c) => Status::Client(c.process_tls_records(incoming)),
            Handshaking::Server(c) => Status::Server(c.process_tls_records(incoming)),
        }
    }
}

enum Status<'c, 'i> {
    Client(UnbufferedStatus<'c, 'i, ClientConnectionData>),
    Server(UnbufferedStatus<'c, 'i, ServerConnectionData>),
}

/// What the handshake needs next.
enum Step {
    /// Go on processing.
    Again,
    /// A record from the peer.
    Read,
    /// rustls lets us send data: done, unless it is still handshaking.
    Traffic,
}

/// Does what one [`UnbufferedStatus`] asks: encodes rustls's handshake
/// messages into `out` and writes them to `sock`. Returns how many bytes
/// of the incoming buffer rustls is done with, and what comes next.
fn step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    out: &mut Vec<u8>,
    sock: &TcpStream,
) -> io::Result<(usize, Step)> {
    let UnbufferedStatus { discard, state } = status;
    let state = state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let next = match state {
        ConnectionState::EncodeTlsData(mut e) => {
            let mut room = MAX_RECORD;
            loop {
                let at = out.len();
                out.resize(at + room, 0);
                match e.encode(&mut out[at..]) {
                    Ok(n) => {
                        out.truncate(at + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(need)) => {
                        out.truncate(at);
                        room = need.required_size;
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            Step::Again
        }
        ConnectionState::TransmitTlsData(t) => {
            (&mut &*sock).write_all(out)?;
            out.clear();
            t.done();
            Step::Again
        }
        ConnectionState::BlockedHandshake => Step::Read,
        ConnectionState::WriteTraffic(_) => Step::Traffic,
        ConnectionState::PeerClosed | ConnectionState::Closed => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "TLS: the peer closed during the handshake",
            ));
        }
        _ => return Err(invalid("TLS: data from the peer during the handshake")),
    };
    Ok((discard, next))
}

/// Runs the TLS handshake of `conn` on `sock`, reading one whole record at
/// a time, so that nothing the peer sends after the handshake is read
/// here. Reading ends at `until` (the socket's read timeout is left unset
/// after a handshake that finished); the caller bounds writes with the
/// socket's write timeout.
pub(super) fn handshake(
    conn: &mut Handshaking,
    sock: &TcpStream,
    until: Instant,
) -> io::Result<()> {
    let mut incoming = Vec::with_capacity(HEADER + MAX_HANDSHAKE_RECORD);
    let mut out = Vec::new();
    loop {
        let done = match conn.process(&mut incoming) {
            Status::Client(s) => step(s, &mut out, sock),
            Status::Server(s) => step(s, &mut out, sock),
        };
        let (discard, next) = match done {
            Ok(d) => d,
            Err(e) => {
                send_alert(conn, sock);
                return Err(e);
            }
        };
        incoming.drain(..discard);
        match next {
            Step::Again => continue,
            Step::Traffic if !conn.state().is_handshaking() => {
                if !incoming.is_empty() {
                    return Err(invalid("TLS: bytes past the handshake"));
                }
                sock.set_read_timeout(None)?;
                return Ok(());
            }
            Step::Traffic | Step::Read => {}
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake not done in time",
            ));
        }
        sock.set_read_timeout(Some(left))?;
        let at = incoming.len();
        incoming.resize(at + HEADER, 0);
        (&mut &*sock).read_exact(&mut incoming[at..])?;
        let typ = incoming[at];
        let len = usize::from(u16::from_be_bytes([incoming[at + 3], incoming[at + 4]]));
        if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&typ) || len > MAX_HANDSHAKE_RECORD {
            send_alert(conn, sock);
            return Err(invalid(format!(
                "TLS handshake: a record of type {typ} and {len} bytes"
            )));
        }
        if incoming.len() + len > 4 * MAX_HANDSHAKE_RECORD {
            return Err(invalid("TLS handshake: messages too long"));
        }
        incoming.resize(at + HEADER + len, 0);
        (&mut &*sock).read_exact(&mut incoming[at + HEADER..])?;
    }
}

/// Writes the alert rustls queued after a failed handshake, if any; the
/// connection ends anyway.
fn send_alert(conn: &mut Handshaking, sock: &TcpStream) {
    let mut out = Vec::new();
    for _ in 0..4 {
        let r = match conn.process(&mut []) {
            Status::Client(s) => step(s, &mut out, sock),
            Status::Server(s) => step(s, &mut out, sock),
        };
        if !matches!(r, Ok((_, Step::Again))) {
            break;
        }
    }
}

/// A connection past its handshake: both directions' keys and rustls's
/// key schedule.
pub(super) struct Established {
    pub(super) sealer: Sealer,
    pub(super) opener: Opener,
    pub(super) keys: Keys,
}

/// Takes the traffic keys of `conn`, whose [`handshake`] has finished (its
/// configuration must allow secret extraction).
pub(super) fn establish(conn: Handshaking) -> io::Result<Established> {
    let (secrets, keys) = match conn {
        Handshaking::Client(c) => {
            let (s, k) = c
                .dangerous_into_kernel_connection()
                .map_err(io::Error::other)?;
            (s, Keys::Client(k))
        }
        Handshaking::Server(c) => {
            let (s, k) = c
                .dangerous_into_kernel_connection()
                .map_err(io::Error::other)?;
            (s, Keys::Server(k))
        }
    };
    let SupportedCipherSuite::Tls13(suite) = keys.suite() else {
        return Err(invalid("TLS: the data link runs only TLS 1.3"));
    };
    // Well before the cipher's limit (2^24.5 records for AES-GCM, RFC
    // 8446 §5.5): a key update costs one small record.
    let update_after = suite.common.confidentiality_limit / 2;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    Ok(Established {
        sealer: Sealer {
            dir: Direction::new(tx_seq, &tx)?,
            update_after,
        },
        opener: Opener {
            dir: Direction::new(rx_seq, &rx)?,
        },
        keys,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::cluster::tls::{self, TlsMaterial};

    const KEY: [u8; 32] = [7; 32];
    const IV: [u8; 12] = [9; 12];

    fn pair() -> (Sealer, Opener) {
        let dir = || Direction::from_parts(&aead::AES_256_GCM, &KEY, &IV, 0).unwrap();
        let sealer = Sealer {
            dir: dir(),
            update_after: u64::MAX,
        };
        (sealer, Opener { dir: dir() })
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// A record of `inner` (content, type, padding) sealed with `sealer`'s
    /// key as it stands, whatever `inner` holds.
    fn seal_inner(sealer: &mut Sealer, inner: &[u8]) -> Vec<u8> {
        let len = u16::try_from(inner.len() + TAG).unwrap().to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, len[0], len[1]];
        let nonce = sealer.dir.next_nonce().unwrap();
        let mut out = inner.to_vec();
        sealer
            .dir
            .key
            .seal_in_place_append_tag(nonce, Aad::from(header), &mut out)
            .unwrap();
        [header.to_vec(), out].concat()
    }

    #[test]
    fn sealed_records_open_to_the_same_bytes_in_order_only() {
        let (mut sealer, mut opener) = pair();
        let data = pattern(40_000, 1);
        let mut wire = Vec::new();
        sealer.seal(&data, &mut wire).unwrap();
        sealer.seal(&[], &mut wire).unwrap();
        // 3 records for 40 000 bytes, one empty one.
        assert_eq!(wire.len(), data.len() + 4 * (HEADER + 1 + TAG));
        let copy = wire.clone();
        let mut plain = BytesMut::new();
        let (used, opened) = opener.open(&mut wire, &mut plain).unwrap();
        assert_eq!((used, opened), (copy.len(), Opened::More));
        assert_eq!(&plain[..], &data[..]);

        // Replayed: the sequence number has moved on.
        let mut again = copy.clone();
        assert!(opener.open(&mut again, &mut BytesMut::new()).is_err());
        // Reordered or altered: refused.
        let (_, mut opener) = pair();
        let first = HEADER + MAX_CIPHERTEXT.min(MAX_CONTENT + 1 + TAG);
        let mut swapped = [&copy[first..2 * first], &copy[..first]].concat();
        assert!(opener.open(&mut swapped, &mut BytesMut::new()).is_err());
        for at in [0, 3, HEADER, 1000, first - 1] {
            let (_, mut opener) = pair();
            let mut bad = copy.clone();
            bad[at] ^= 0x10;
            let mut plain = BytesMut::new();
            assert!(
                opener.open(&mut bad, &mut plain).is_err(),
                "a flipped bit at {at} went unnoticed"
            );
            assert!(plain.is_empty());
        }
    }

    /// Records open where they lie: their data follows the data before
    /// them (a frame begun earlier), a record not yet whole stays as it
    /// came, and a control record stops the opening after the data before
    /// it.
    #[test]
    fn records_open_in_place_after_the_data_before_them() {
        let (mut sealer, mut opener) = pair();
        let data = pattern(40_000, 3);
        let mut wire = b"earlier".to_vec();
        sealer.seal(&data, &mut wire).unwrap();
        let whole = wire.len();
        let mut more = Vec::new();
        sealer.seal(&pattern(100, 4), &mut more).unwrap();
        wire.extend_from_slice(&more[..HEADER + 50]);
        let w = opener.open_within(&mut wire, 7).unwrap();
        assert_eq!(
            (w.used, w.opened),
            (whole, Opened::More),
            "the last record is not whole"
        );
        assert_eq!(&wire[..7], b"earlier");
        assert_eq!(&wire[7..w.plain], &data[..]);
        assert_eq!(
            &wire[w.used..],
            &more[..HEADER + 50],
            "an unopened record moved"
        );

        // Data, then close_notify, then data that must not be opened.
        let (mut sealer, mut opener) = pair();
        let mut wire = Vec::new();
        sealer.seal(b"last", &mut wire).unwrap();
        let inner = [1, 0, ALERT];
        wire.extend(seal_inner(&mut sealer, &inner));
        let closed_at = wire.len();
        sealer.seal(b"after", &mut wire).unwrap();
        let w = opener.open_within(&mut wire, 0).unwrap();
        assert_eq!((w.plain, w.used, w.opened), (4, closed_at, Opened::Closed));
        assert_eq!(&wire[..4], b"last");
    }

    #[test]
    fn parts_seal_as_the_bytes_they_make_together() {
        let data = pattern(50_000, 5);
        // Parts cut across record boundaries, empty ones among them.
        let cuts = [0, 0, 1, 16_383, 16_384, 16_385, 20_000, 50_000, 50_000];
        let parts: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
        let (mut a, _) = pair();
        let (mut b, mut opener) = pair();
        let (mut whole, mut gathered) = (Vec::new(), Vec::new());
        a.seal(&data, &mut whole).unwrap();
        b.seal_parts(&parts, &mut gathered).unwrap();
        assert_eq!(gathered, whole);
        let mut plain = BytesMut::new();
        opener.open(&mut gathered, &mut plain).unwrap();
        assert_eq!(&plain[..], &data[..]);
    }

    #[test]
    fn a_record_opens_only_once_it_is_whole() {
        let (mut sealer, mut opener) = pair();
        let data = pattern(20_000, 2);
        let mut wire = Vec::new();
        sealer.seal(&data, &mut wire).unwrap();
        let mut plain = BytesMut::new();
        let first = HEADER + MAX_CONTENT + 1 + TAG;
        for cut in [0, 3, HEADER, first - 1] {
            let (used, opened) = opener.open(&mut wire[..cut], &mut plain).unwrap();
            assert_eq!((used, opened), (0, Opened::More));
        }
        let (used, _) = opener.open(&mut wire[..first + 10], &mut plain).unwrap();
        assert_eq!(used, first);
        assert_eq!(&plain[..], &data[..MAX_CONTENT]);
        let (used, _) = opener.open(&mut wire[first..], &mut plain).unwrap();
        assert_eq!(used, wire.len() - first);
        assert_eq!(&plain[..], &data[..]);
    }

    #[test]
    fn padding_is_stripped_and_control_records_are_told_apart() {
        // The inner plaintext, what opening it gives, the data it gave.
        type Case = (Vec<u8>, Result<Opened, &'static str>, &'static [u8]);
        let cases: Vec<Case> = vec![
            (
                vec![b'h', b'i', APPLICATION_DATA, 0, 0, 0],
                Ok(Opened::More),
                b"hi",
            ),
            (vec![0, 0, 0], Err("no content type"), b""),
            (vec![1, 0, ALERT], Ok(Opened::Closed), b""),
            (vec![2, 40, ALERT], Err("alert 40"), b""),
            (vec![0, ALERT], Err("malformed alert"), b""),
            (
                vec![KEY_UPDATE, 0, 0, 1, 1, HANDSHAKE],
                Ok(Opened::KeyUpdate { requested: true }),
                b"",
            ),
            (
                vec![KEY_UPDATE, 0, 0, 1, 0, HANDSHAKE, 0],
                Ok(Opened::KeyUpdate { requested: false }),
                b"",
            ),
            (
                vec![KEY_UPDATE, 0, 0, 1, 2, HANDSHAKE],
                Err("malformed key update"),
                b"",
            ),
            (
                vec![NEW_SESSION_TICKET, 0, 0, 2, 9, 9, HANDSHAKE],
                Ok(Opened::More),
                b"",
            ),
            (
                vec![NEW_SESSION_TICKET, 0, 0, 9, 9, HANDSHAKE],
                Err("split over records"),
                b"",
            ),
            (vec![1, 0, 0, 0, HANDSHAKE], Err("handshake message 1"), b""),
            (vec![1, CHANGE_CIPHER_SPEC], Err("type 20"), b""),
        ];
        for (inner, want, content) in cases {
            let (mut sealer, mut opener) = pair();
            let mut record = seal_inner(&mut sealer, &inner);
            let mut plain = BytesMut::new();
            match (opener.open(&mut record, &mut plain), want) {
                (Ok((used, got)), Ok(want)) => {
                    assert_eq!(got, want, "{inner:?}");
                    assert_eq!(used, record.len());
                    assert_eq!(&plain[..], content, "{inner:?}");
                }
                (Err(e), Err(want)) => {
                    assert!(e.to_string().contains(want), "{inner:?}: {e}")
                }
                (got, want) => panic!("{inner:?}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn malformed_headers_are_refused_before_any_decryption() {
        for header in [
            [HANDSHAKE, 3, 3, 0, 20],
            [APPLICATION_DATA, 3, 1, 0, 20],
            [APPLICATION_DATA, 3, 3, 0, 5],
            [APPLICATION_DATA, 3, 3, 0x41, 1],
        ] {
            let mut buf = header.to_vec();
            buf.resize(HEADER + 64, 0);
            let (_, mut opener) = pair();
            assert!(
                opener.open(&mut buf, &mut BytesMut::new()).is_err(),
                "{header:?}"
            );
        }
    }

    /// One end of a connection run by this module, as the link runs it.
    struct Ours {
        sock: TcpStream,
        est: Established,
        raw: Vec<u8>,
        plain: BytesMut,
    }

    impl Ours {
        fn new(conn: Handshaking, sock: TcpStream) -> Ours {
            let mut conn = conn;
            handshake(&mut conn, &sock, Instant::now() + Duration::from_secs(10)).unwrap();
            Ours {
                est: establish(conn).unwrap(),
                sock,
                raw: Vec::new(),
                plain: BytesMut::new(),
            }
        }

        /// Seals and writes `data` as the link writes a frame.
        fn send(&mut self, data: &[u8]) {
            let mut out = Vec::new();
            let est = &mut self.est;
            if est.sealer.wants_key_update() {
                est.sealer.update_key(&mut est.keys, &mut out).unwrap();
            }
            est.sealer.seal(data, &mut out).unwrap();
            (&self.sock).write_all(&out).unwrap();
        }

        fn update_key(&mut self) {
            let mut out = Vec::new();
            let est = &mut self.est;
            est.sealer.update_key(&mut est.keys, &mut out).unwrap();
            (&self.sock).write_all(&out).unwrap();
        }

        /// Reads until `n` bytes of data came or something else did.
        fn recv(&mut self, n: usize) -> Opened {
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                let (used, opened) = self
                    .est
                    .opener
                    .open(&mut self.raw, &mut self.plain)
                    .unwrap();
                self.raw.drain(..used);
                match opened {
                    Opened::KeyUpdate { requested } => {
                        let est = &mut self.est;
                        est.opener.update_key(&mut est.keys).unwrap();
                        if requested {
                            self.update_key();
                        }
                        continue;
                    }
                    Opened::Closed => return Opened::Closed,
                    Opened::More if self.plain.len() >= n => return Opened::More,
                    Opened::More => {}
                }
                let got = (&self.sock).read(&mut chunk).unwrap();
                assert!(got > 0, "the peer closed early");
                self.raw.extend_from_slice(&chunk[..got]);
            }
        }
    }

    fn configs() -> (
        tempfile::TempDir,
        Arc<rustls::ServerConfig>,
        Arc<rustls::ClientConfig>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        tls::init(dir.path()).unwrap();
        let m = TlsMaterial::load(dir.path()).unwrap();
        let (s, c) = (
            m.link_server_config().unwrap(),
            m.link_client_config().unwrap(),
        );
        (dir, s, c)
    }

    fn client_conn(c: &Arc<rustls::ClientConfig>) -> rustls::ClientConnection {
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
        rustls::ClientConnection::new(Arc::clone(c), name).unwrap()
    }

    /// The suite rustls's end agreed on with ours: the one the link
    /// prefers.
    fn assert_link_suite(theirs: &rustls::CommonState) {
        assert_eq!(
            theirs.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "the link prefers AES-128-GCM"
        );
    }

    /// Our end against rustls's own record layer, both ways, through key
    /// updates from either end and close_notify.
    fn talk_to_rustls<P: Read + Write>(
        ours: &mut Ours,
        theirs: &mut P,
        close: impl FnOnce(&mut P),
    ) {
        let up = pattern(300_000, 3);
        theirs.write_all(&up).unwrap();
        theirs.flush().unwrap();
        assert_eq!(ours.recv(up.len()), Opened::More);
        assert_eq!(&ours.plain.split_to(up.len())[..], &up[..]);

        let down = pattern(200_000, 4);
        ours.send(&down);
        let mut got = vec![0u8; down.len()];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, down);

        // Our key update, then data under the new key; then one because
        // the key has sealed as many records as it should.
        ours.update_key();
        ours.send(&down[..5000]);
        let mut got = vec![0u8; 5000];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, down[..5000]);
        ours.est.sealer.update_after = ours.est.sealer.dir.seq;
        ours.send(&down[5000..7000]);
        assert_eq!(ours.est.sealer.dir.seq, 1, "no key update came first");
        theirs.read_exact(&mut got[..2000]).unwrap();
        assert_eq!(got[..2000], down[5000..7000]);
        close(theirs);
        assert_eq!(ours.recv(usize::MAX), Opened::Closed);
    }

    #[test]
    fn the_record_layer_speaks_tls_with_a_rustls_client() {
        let (_dir, server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let theirs = std::thread::spawn(move || {
            let sock = TcpStream::connect(addr).unwrap();
            let mut s = rustls::StreamOwned::new(client_conn(&client), sock);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            s
        });
        let (sock, _) = listener.accept().unwrap();
        let conn = UnbufferedServerConnection::new(server).unwrap();
        let mut ours = Ours::new(Handshaking::Server(conn), sock);
        let mut theirs = theirs.join().unwrap();
        assert_link_suite(&theirs.conn);
        // The client updates its key (and asks for ours) mid-stream.
        theirs.write_all(b"before").unwrap();
        theirs.conn.refresh_traffic_keys().unwrap();
        theirs.write_all(b"after").unwrap();
        theirs.flush().unwrap();
        assert_eq!(ours.recv(11), Opened::More);
        assert_eq!(&ours.plain.split_to(11)[..], b"beforeafter");
        talk_to_rustls(&mut ours, &mut theirs, |t| {
            t.conn.send_close_notify();
            t.flush().unwrap();
        });
    }

    #[test]
    fn the_record_layer_speaks_tls_with_a_rustls_server() {
        let (_dir, server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let theirs = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut s =
                rustls::StreamOwned::new(rustls::ServerConnection::new(server).unwrap(), sock);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            s
        });
        let sock = TcpStream::connect(addr).unwrap();
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
        let conn = UnbufferedClientConnection::new(client, name).unwrap();
        let mut ours = Ours::new(Handshaking::Client(conn), sock);
        let mut theirs = theirs.join().unwrap();
        assert_link_suite(&theirs.conn);
        talk_to_rustls(&mut ours, &mut theirs, |t| {
            t.conn.send_close_notify();
            t.flush().unwrap();
        });
    }

    #[test]
    fn a_handshake_that_stalls_ends_at_its_deadline() {
        let (_dir, _server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _silent = listener.accept().unwrap();
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
        let mut conn = Handshaking::Client(UnbufferedClientConnection::new(client, name).unwrap());
        let started = Instant::now();
        let e = handshake(&mut conn, &sock, started + Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{e}"
        );
        assert!(conn.state().is_handshaking());
    }
}
