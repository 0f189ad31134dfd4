//! The data link: the data requests of replicated volumes (`Write`,
//! `Rebuild`, `Read`, `Flush`) from an engine to a copy on another node,
//! over a TCP connection of their own instead of the agent's gRPC port.
//!
//! Why: a 4 KiB replicated write is one round trip to each remote copy, and
//! over gRPC that round trip crossed about ten task and thread hand-offs
//! (tonic's channel buffer, the HTTP/2 connection tasks at both ends, a
//! task per stream) plus HTTP/2 framing, about 300 µs here on top of the
//! copy's own disk write. The link frames each call itself and pipelines
//! them on one connection: the engine's FUSE worker writes the frame
//! ([`LinkClient::send_now`], once connected; a task with
//! [`LinkClient::calls`] otherwise; under load the connection's reading
//! thread sends the next batch when the last one's answers come in,
//! never waiting on the socket), a thread of the copy's node reads it,
//! stores the bytes and writes the answer on the same thread, and the
//! connection's reading thread on the engine's node hands the answer to
//! the engine. Going through a task instead cost about 50 µs more per 4 KiB
//! write to two copies at once here (`cargo bench --bench link`).
//!
//! Security is that of the agent port: mutual TLS 1.3 under the cluster CA
//! ([`TlsMaterial::link_server_config`](super::tls::TlsMaterial::link_server_config)),
//! and a node certificate acts only on volumes whose record on this node
//! names that node (`replica::authorize`). rustls makes the
//! handshake; `record.rs` then seals and opens the records itself,
//! decrypting each where the socket was read into, the frame buffer a
//! frame handed out keeps (rustls's buffered connection copied each byte
//! three times, a fifth of the CPU time of a 3-copy sequential write
//! here). Only with
//! `--replication-tls=off` (benchmarks) does the link run in plaintext,
//! unauthenticated, as the README says. Record changes, attaches and
//! everything the controller sends stay on the agent's gRPC port; an agent
//! tells engines its link address in its answer to an `Attach`.
//!
//! Frames (little endian), each after a `u32` length of what follows:
//! - call: id `u64`, volume (32 hex digits), offset `u32`, len `u32`,
//!   request JSON length `u32`, the request as JSON, the data;
//! - answer: id `u64`, gRPC code `u32` (0: answered), reply JSON (or the
//!   error message) length `u32`, that text, the data.
//!
//! A frame longer than [`MAX_FRAME`] ends the connection. Calls on one
//! connection may be served concurrently (up to [`SERVER_THREADS`] threads
//! per connection, each reading the next frame in turn, with the frames
//! that arrived with it, and serving them); the
//! engine never has two writes to one region of a copy in flight, so their
//! order does not matter. Threads start as calls overlap, and a thread
//! that has waited [`THREAD_IDLE`] for its turn to read (no call came
//! meanwhile) ends: an idle connection keeps one.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::oneshot;
use tonic::{Code, Status};

use super::record;
use super::tls::PeerIdentity;
use crate::backend::replicated::REGION_BYTES;
use crate::backend::replicated::store::ReplicaStore;
use crate::backend::replicated::wire::{Answer, BatchDone, Call, PeerError};
use crate::volume::id::Uuid;

/// The longest frame either end takes: a whole region's bytes and the
/// request or reply around them.
pub const MAX_FRAME: usize = REGION_BYTES as usize + (64 << 10);
/// Threads serving one connection at most (more calls wait for a turn).
pub const SERVER_THREADS: usize = 8;
/// A connection's thread that has waited this long for the reading turn
/// ends (the thread reading stays).
pub const THREAD_IDLE: Duration = Duration::from_secs(30);
/// A thread serves at most this many frames that arrived together.
const FRAMES_AT_ONCE: usize = 64;
/// [`LinkClient::calls`] writes a batch of at most this many bytes on the
/// runtime's thread, and a larger one on the blocking pool.
const SEND_ON_THIS_THREAD: usize = 64 << 10;
/// A peer that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted whose TLS handshake has not finished yet, at most
/// (each holds a thread until it ends, for up to [`HANDSHAKE_TIMEOUT`]):
/// a new one beyond is closed at once. Established links are not counted.
pub const MAX_HANDSHAKING: usize = 64;

/// How the threads serving the data link come and go.
#[derive(Debug, Clone)]
pub struct ServeThreads {
    /// See [`THREAD_IDLE`].
    pub idle: Duration,
    /// Serving threads alive, over every connection.
    pub live: Arc<AtomicUsize>,
    /// Connections still in their TLS handshake.
    pub handshaking: Arc<AtomicUsize>,
    /// See [`MAX_HANDSHAKING`].
    pub max_handshaking: usize,
}

impl Default for ServeThreads {
    fn default() -> Self {
        ServeThreads {
            idle: THREAD_IDLE,
            live: Arc::default(),
            handshaking: Arc::default(),
            max_handshaking: MAX_HANDSHAKING,
        }
    }
}

/// One connection counted in [`ServeThreads::handshaking`] until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Appends the frame of a call (length prefix included) to `f`: what
/// [`LinkClient`] sends for it, as the tests build it.
#[cfg(test)]
fn encode_call(
    f: &mut Vec<u8>,
    id: u64,
    volume: Uuid,
    call: &Call,
) -> Result<(), serde_json::Error> {
    encode_call_head(f, id, volume, call)?;
    f.put_slice(&call.data);
    Ok(())
}

/// A call's frame up to its data (which follows it on the wire).
fn encode_call_head(
    f: &mut Vec<u8>,
    id: u64,
    volume: Uuid,
    call: &Call,
) -> Result<(), serde_json::Error> {
    let json = serde_json::to_vec(&call.request)?;
    let body = 8 + 32 + 4 + 4 + 4 + json.len() + call.data.len();
    f.reserve(4 + body - call.data.len());
    f.put_u32_le(body as u32);
    f.put_u64_le(id);
    f.put_slice(volume.to_hex().as_bytes());
    f.put_u32_le(call.offset);
    f.put_u32_le(call.len);
    f.put_u32_le(json.len() as u32);
    f.put_slice(&json);
    Ok(())
}

/// The id of a call frame's body, if it has one.
fn call_id(body: &[u8]) -> Option<u64> {
    body.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// A call frame's body: its id, volume and call.
fn decode_call(mut body: Bytes) -> Result<(u64, Uuid, Call), String> {
    if body.len() < 8 + 32 + 12 {
        return Err(format!("a call frame of {} bytes", body.len()));
    }
    let id = body.get_u64_le();
    let hex = body.split_to(32);
    let volume = std::str::from_utf8(&hex)
        .ok()
        .and_then(Uuid::parse_hex)
        .ok_or_else(|| "invalid volume".to_owned())?;
    let offset = body.get_u32_le();
    let len = body.get_u32_le();
    let json_len = body.get_u32_le() as usize;
    if json_len > body.len() {
        return Err(format!("a request of {json_len} bytes in {}", body.len()));
    }
    let json = body.split_to(json_len);
    let request = serde_json::from_slice(&json).map_err(|e| format!("request: {e}"))?;
    Ok((
        id,
        volume,
        Call {
            request,
            offset,
            len,
            data: body.into(),
        },
    ))
}

/// The frame of an answer up to its data (length prefix included), and
/// the data, which follows it on the wire.
fn answer_parts(id: u64, result: &Result<Answer, Status>) -> (Vec<u8>, &[u8]) {
    let (code, text, data): (u32, Vec<u8>, &[u8]) = match result {
        Ok(a) => {
            let reply = match &a.reply {
                Some(r) => serde_json::to_vec(r),
                None => Ok(Vec::new()),
            };
            match reply {
                Ok(j) => (0, j, &a.data),
                Err(e) => (Code::Internal as u32, e.to_string().into_bytes(), &[]),
            }
        }
        Err(s) => (s.code() as u32, s.message().as_bytes().to_vec(), &[]),
    };
    let body = 8 + 4 + 4 + text.len() + data.len();
    let mut f = Vec::with_capacity(4 + body - data.len());
    f.put_u32_le(body as u32);
    f.put_u64_le(id);
    f.put_u32_le(code);
    f.put_u32_le(text.len() as u32);
    f.put_slice(&text);
    (f, data)
}

/// The whole frame of an answer, as the tests build it.
#[cfg(test)]
fn encode_answer(id: u64, result: &Result<Answer, Status>) -> Vec<u8> {
    let (mut f, data) = answer_parts(id, result);
    f.extend_from_slice(data);
    f
}

/// An answer frame's body: its id, and the answer or the failure's code
/// and message.
type Decoded = (u64, Result<Answer, (Code, String)>);

fn decode_answer(mut body: Bytes) -> Result<Decoded, String> {
    if body.len() < 16 {
        return Err(format!("an answer frame of {} bytes", body.len()));
    }
    let id = body.get_u64_le();
    let code = body.get_u32_le();
    let text_len = body.get_u32_le() as usize;
    if text_len > body.len() {
        return Err(format!("a reply of {text_len} bytes in {}", body.len()));
    }
    let text = body.split_to(text_len);
    if code != 0 {
        return Ok((
            id,
            Err((
                Code::from(code as i32),
                String::from_utf8_lossy(&text).into_owned(),
            )),
        ));
    }
    let reply = if text.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&text).map_err(|e| format!("reply: {e}"))?)
    };
    Ok((id, Ok(Answer { reply, data: body })))
}

/// The length a frame's prefix announces, checked against [`MAX_FRAME`].
fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    Ok(len)
}

// ---------------------------------------------------------------------
// Serving: threads per connection, blocking I/O.

/// The room a connection makes for one read from its socket.
const READ_BYTES: usize = 256 << 10;
/// The size of a connection's buffers: the most they ever need to hold, a
/// frame not yet whole (its length prefix included), a record not yet
/// whole after it and what one read adds, so any buffer whose frames are
/// gone can be taken again.
const PLAIN_BYTES: usize = 4 + MAX_FRAME + record::MAX_RECORD + READ_BYTES;
/// Buffers a connection keeps for frame bytes besides the one it fills:
/// enough for the whole-region frames in flight at once (one or two per
/// thread serving them). They are let go when the connection is quiet
/// for [`QUIET`] (or, on the engine's side, for its reader's check), so a
/// connection holds them only while large frames stream.
const SPARE_BUFFERS: usize = 2 * SERVER_THREADS;
/// A served connection nothing came on for this long lets its spare
/// buffers go.
const QUIET: Duration = Duration::from_secs(1);

/// What a connection has read and not yet handed out as frames.
///
/// The socket is read straight into `plain`, and over TLS each record is
/// opened where it lies, its bytes moving as they are decrypted to follow
/// the frame bytes before them ([`record::Opener::open_within`]): a
/// frame's bytes are written once, by the decryption, where the frame
/// handed out holds them. (Opening records in a buffer of their own and
/// copying their bytes into the frames cost about 5 % of the CPU time of
/// a 3-copy sequential write here.)
struct Inbound {
    /// Frame bytes in the clear, the next frame first, then the last
    /// `sealed` bytes: records not yet whole (over TLS).
    plain: BytesMut,
    sealed: usize,
    /// Buffers `plain` filled before, set aside while frames split from
    /// them were still being served, and taken again once those are gone
    /// (at most [`SPARE_BUFFERS`]). Without them, each whole-region frame
    /// got a new buffer whose pages the kernel had to fault in and zero
    /// (2.7 faults per MiB in `cargo bench --bench link`'s `link-bulk`,
    /// and about 3 % of the CPU time of a 3-copy sequential write here).
    spare: Vec<BytesMut>,
    /// Buffers made for frame bytes so far, the first one included.
    #[cfg(test)]
    made: usize,
    /// Over TLS: opens the peer's records.
    opener: Option<record::Opener>,
    /// The peer sent close_notify: no frame follows what `plain` holds.
    closed: bool,
}

impl Inbound {
    fn new(opener: Option<record::Opener>) -> Self {
        Inbound {
            plain: BytesMut::with_capacity(PLAIN_BYTES),
            sealed: 0,
            spare: Vec::new(),
            #[cfg(test)]
            made: 1,
            opener,
            closed: false,
        }
    }

    /// The next frame's body when `plain` holds all of it (otherwise room
    /// for the rest of it).
    fn frame(&mut self) -> io::Result<Option<Bytes>> {
        let clear = self.plain.len() - self.sealed;
        if clear >= 4 {
            let len = frame_len(self.plain[..4].try_into().expect("4 bytes"))?;
            if clear >= 4 + len {
                self.plain.advance(4);
                return Ok(Some(self.plain.split_to(len).freeze()));
            }
            self.room(4 + len - clear);
        }
        Ok(None)
    }

    /// Reads what the socket has into `plain` (room for [`READ_BYTES`]
    /// made first, not zeroed) and, over TLS, opens the records that are
    /// whole; how many bytes came (0: the end of the stream).
    fn read(&mut self, wire: &Wire) -> io::Result<usize> {
        self.room(READ_BYTES);
        let room = self.plain.spare_capacity_mut();
        // SAFETY: recv writes at most `room.len()` bytes at `room`'s
        // start: capacity of `plain` past its bytes, which only `plain`
        // refers to (frames split from it end before it).
        let got = unsafe {
            libc::recv(
                wire.sock.as_raw_fd(),
                room.as_mut_ptr().cast(),
                room.len(),
                0,
            )
        };
        let n = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        // SAFETY: recv wrote those `n` bytes of the room just now.
        unsafe { self.plain.set_len(self.plain.len() + n) };
        let Some(opener) = &mut self.opener else {
            return Ok(n);
        };
        self.sealed += n;
        loop {
            let at = self.plain.len() - self.sealed;
            let within = opener.open_within(&mut self.plain, at)?;
            let left = self.plain.len() - within.used;
            self.plain.copy_within(within.used.., within.plain);
            self.plain.truncate(within.plain + left);
            self.sealed = left;
            match within.opened {
                record::Opened::More => return Ok(n),
                record::Opened::Closed => {
                    self.closed = true;
                    return Ok(n);
                }
                record::Opened::KeyUpdate { requested } => {
                    opener.update_key(&mut wire.keys())?;
                    if requested {
                        wire.answer_key_update()?;
                    }
                }
            }
        }
    }

    /// Makes room in `plain` for `more` bytes: in its own buffer when no
    /// frame split from it is still held (or there is room anyway), else
    /// in a spare one whose frames are all gone, else in a new one; the
    /// buffer left keeps its frames' bytes until they are gone and is kept
    /// as a spare if there is room for it.
    fn room(&mut self, more: usize) {
        if self.plain.capacity() - self.plain.len() >= more || self.plain.try_reclaim(more) {
            return;
        }
        let need = self.plain.len() + more;
        let next = match self.spare.iter_mut().position(|b| b.try_reclaim(need)) {
            Some(i) => self.spare.swap_remove(i),
            None => {
                #[cfg(test)]
                {
                    self.made += 1;
                }
                BytesMut::with_capacity(need.max(PLAIN_BYTES))
            }
        };
        let mut left = std::mem::replace(&mut self.plain, next);
        self.plain.extend_from_slice(&left);
        left.clear();
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(left);
        }
    }
}

/// What a connection is about to write.
struct Outbound {
    /// Over TLS: seals our records.
    sealer: Option<record::Sealer>,
    /// The sealed records of the frame being written (kept for the next).
    buf: Vec<u8>,
    /// Bytes a send that could not wait left unwritten (the socket was
    /// full): whoever sends next writes them first, and a thread started
    /// for them does if nobody comes ([`ClientConn::send`]).
    tail: Vec<u8>,
}

/// Where `send` may wait: anywhere but on a data link's reading thread
/// (see [`ClientConn::send`]).
fn may_block() -> bool {
    !ON_READER.with(std::cell::Cell::get)
}

thread_local! {
    /// Set on a connection's reading thread for its whole life.
    static ON_READER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A sealed frame this large is not kept for the next one.
const KEEP_OUTBOUND: usize = MAX_FRAME + (256 << 10);

/// A connection's socket and TLS state, shared by the threads that write
/// frames and the one reading at a time (either end). Over TLS, rustls
/// made the handshake and `record.rs` seals and opens the records.
struct Wire {
    sock: TcpStream,
    /// Held while a frame is sealed and written, so frames go out whole
    /// and in the order they were sealed.
    send: Mutex<Outbound>,
    /// Held by the thread reading the next frame.
    inbound: Mutex<Inbound>,
    /// Over TLS: rustls's key schedule, for key updates. Taken after
    /// `send` or `inbound`, never before.
    keys: Option<Mutex<record::Keys>>,
}

/// One accepted connection.
struct ServerConn {
    wire: Wire,
    /// The reading turn: true while a thread reads the next frame;
    /// `turn_free` wakes a thread waiting for it.
    turn: Mutex<bool>,
    turn_free: Condvar,
    identity: Option<PeerIdentity>,
    store: Arc<ReplicaStore>,
    threads: AtomicUsize,
    /// Threads waiting for the reading turn or holding it.
    readers: AtomicUsize,
    closed: AtomicBool,
    spawn: ServeThreads,
}

impl Wire {
    fn new(sock: TcpStream, tls: Option<record::Established>) -> Self {
        let (sealer, opener, keys) = match tls {
            None => (None, None, None),
            Some(e) => (Some(e.sealer), Some(e.opener), Some(Mutex::new(e.keys))),
        };
        Wire {
            sock,
            send: Mutex::new(Outbound {
                sealer,
                buf: Vec::new(),
                tail: Vec::new(),
            }),
            inbound: Mutex::new(Inbound::new(opener)),
            keys,
        }
    }

    /// Whether the connection runs over TLS.
    fn tls(&self) -> bool {
        self.keys.is_some()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, record::Keys> {
        self.keys
            .as_ref()
            .expect("a TLS connection has keys")
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn outbound(&self) -> std::sync::MutexGuard<'_, Outbound> {
        self.send.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what a send that could not wait left (before anything else).
    fn write_tail(&self, out: &mut Outbound) -> io::Result<()> {
        if !out.tail.is_empty() {
            (&self.sock).write_all(&out.tail)?;
            out.tail = Vec::new();
        }
        Ok(())
    }

    /// Writes the bytes of `parts`, one after the other (sealed when over
    /// TLS): whole frames, or a frame's parts.
    fn send_parts(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut out = self.outbound();
        self.write_tail(&mut out)?;
        self.seal_and_write(&mut out, parts, true)
    }

    /// Seals `parts` (over TLS) and writes them; when not `wait`, writes
    /// what the socket takes at once and keeps the rest in `out.tail`.
    fn seal_and_write(&self, out: &mut Outbound, parts: &[&[u8]], wait: bool) -> io::Result<()> {
        let Outbound { sealer, buf, tail } = out;
        buf.clear();
        match sealer {
            None if parts.len() == 1 && wait => return (&self.sock).write_all(parts[0]),
            None => parts.iter().for_each(|p| buf.extend_from_slice(p)),
            Some(sealer) => {
                if sealer.wants_key_update() {
                    sealer.update_key(&mut self.keys(), buf)?;
                }
                sealer.seal_parts(parts, buf)?;
            }
        }
        let sent = if wait {
            (&self.sock).write_all(buf)
        } else {
            self.write_at_once(buf).map(|n| {
                if n < buf.len() {
                    *tail = buf[n..].to_vec();
                }
            })
        };
        if buf.capacity() > KEEP_OUTBOUND {
            *buf = Vec::new();
        }
        sent
    }

    /// Writes as much of `bytes` as the socket takes without waiting.
    fn write_at_once(&self, bytes: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{MsgFlags, send};
        let mut done = 0;
        while done < bytes.len() {
            match send(
                self.sock.as_raw_fd(),
                &bytes[done..],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Updates our key, as the peer asked in its key update.
    fn answer_key_update(&self) -> io::Result<()> {
        let mut out = self.outbound();
        self.write_tail(&mut out)?;
        let Outbound { sealer, buf, .. } = &mut *out;
        let Some(sealer) = sealer else {
            return Ok(());
        };
        buf.clear();
        sealer.update_key(&mut self.keys(), buf)?;
        (&self.sock).write_all(buf)
    }

    /// The next frame's body, read by the one thread holding `inbound`;
    /// `None` at the end of the stream.
    fn next_frame(&self) -> io::Result<Option<Bytes>> {
        let mut frames = self.next_frames(1)?;
        Ok(frames.pop())
    }

    /// The next frame's body and those of the frames after it that were
    /// read with it, up to `most` in all (none at the end of the stream):
    /// what a peer sent in one go is taken in one go, with no read more.
    fn next_frames(&self, most: usize) -> io::Result<Vec<Bytes>> {
        let mut inb = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let inb = &mut *inb;
        loop {
            if let Some(frame) = inb.frame()? {
                let mut frames = vec![frame];
                while frames.len() < most {
                    match inb.frame()? {
                        Some(f) => frames.push(f),
                        None => break,
                    }
                }
                return Ok(frames);
            }
            if inb.closed {
                return Ok(Vec::new());
            }
            match inb.read(self) {
                Ok(0) => return Ok(Vec::new()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if quiet(&e) {
                        inb.spare = Vec::new();
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Whether a read failed only because nothing came within the socket's
/// read timeout.
fn quiet(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl ServerConn {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.wire.sock.shutdown(Shutdown::Both);
    }

    /// Waits for the reading turn and takes it; false when another thread
    /// has held it for [`ServeThreads::idle`] meanwhile (this one is not
    /// needed: that one stays).
    fn take_turn(&self) -> bool {
        let deadline = Instant::now() + self.spawn.idle;
        let mut taken = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        while *taken {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            taken = self
                .turn_free
                .wait_timeout(taken, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *taken = true;
        true
    }

    fn give_turn(&self) {
        *self.turn.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.turn_free.notify_one();
    }

    /// Writes the answers of `served` in one go; false (the connection
    /// closed) when it cannot.
    fn answer(&self, served: &[(u64, Result<Answer, Status>)]) -> bool {
        let heads: Vec<_> = served
            .iter()
            .map(|(id, result)| answer_parts(*id, result))
            .collect();
        let parts: Vec<&[u8]> = heads
            .iter()
            .flat_map(|(head, data)| [&head[..], data])
            .collect();
        if let Err(e) = self.wire.send_parts(&parts) {
            tracing::debug!(identity = ?self.identity, error = %e, "data link: cannot answer");
            self.close();
            return false;
        }
        true
    }

    /// Serves one call: its id and its answer.
    fn serve(&self, body: Bytes) -> Option<(u64, Result<Answer, Status>)> {
        let id = call_id(&body)?;
        let result = decode_call(body)
            .map_err(Status::invalid_argument)
            .and_then(|(_, volume, call)| {
                if !call.request.is_data() {
                    return Err(Status::invalid_argument(
                        "the data link takes data requests only (Write, Rebuild, Read, Flush)",
                    ));
                }
                if self.wire.tls() {
                    super::replica::authorize(&self.store, self.identity.as_ref(), volume)?;
                }
                self.store
                    .call(volume, call)
                    .map_err(super::replica::status_of)
            });
        Some((id, result))
    }
}

/// One of a connection's threads: takes the reading turn, reads the next
/// frame and those read with it (up to [`FRAMES_AT_ONCE`]), passes the
/// turn on (starting another thread when none waits for it), serves the
/// frames one after the other and writes their answers in one go; until
/// the connection ends, or until it has waited long for the turn.
///
/// The turn passes on before serving, even for 4 KiB writes the page
/// cache takes in a few µs: a write far ahead of its copy's disk is held
/// back (`store/writeback.rs`, up to about its `TARGET`), and a thread
/// serving it with the turn held would stop the whole connection
/// meanwhile, where now only the frames taken with it wait. Frames that
/// arrived together are the engine's batch (`driver.rs`, `NodeQueue`),
/// whose answers it takes together anyway: serving them on one thread and
/// answering them in one write saves a hand-off and a wake-up per call.
fn server_thread(conn: Arc<ServerConn>) {
    loop {
        conn.readers.fetch_add(1, Ordering::SeqCst);
        if !conn.take_turn() {
            conn.readers.fetch_sub(1, Ordering::SeqCst);
            break;
        }
        if conn.closed.load(Ordering::SeqCst) {
            conn.give_turn();
            conn.readers.fetch_sub(1, Ordering::SeqCst);
            break;
        }
        // A read timeout (the connection quiet for QUIET) only lets the
        // spare buffers go: this thread keeps the turn and reads on.
        let frames = loop {
            match conn.wire.next_frames(FRAMES_AT_ONCE) {
                Err(e) if quiet(&e) && !conn.closed.load(Ordering::SeqCst) => {}
                read => break read,
            }
        };
        conn.give_turn();
        conn.readers.fetch_sub(1, Ordering::SeqCst);
        let bodies = match frames {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => {
                tracing::debug!(identity = ?conn.identity, "data link connection closed by the peer");
                conn.close();
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "data link connection ended");
                conn.close();
                break;
            }
        };
        if conn.readers.load(Ordering::SeqCst) == 0
            && conn.threads.load(Ordering::SeqCst) < SERVER_THREADS
        {
            conn.threads.fetch_add(1, Ordering::SeqCst);
            conn.spawn.live.fetch_add(1, Ordering::SeqCst);
            let next = Arc::clone(&conn);
            if std::thread::Builder::new()
                .name("stowage-link".into())
                .spawn(move || server_thread(next))
                .is_err()
            {
                conn.threads.fetch_sub(1, Ordering::SeqCst);
                conn.spawn.live.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let (mut served, mut bytes) = (Vec::with_capacity(bodies.len()), 0);
        let last = bodies.len() - 1;
        for (i, body) in bodies.into_iter().enumerate() {
            let Some(answer) = conn.serve(body) else {
                tracing::debug!(identity = ?conn.identity, "data link: a frame without an id");
                conn.close();
                break;
            };
            bytes += answer.1.as_ref().map_or(0, |a| a.data.len());
            served.push(answer);
            // Answers carrying data (reads) leave a region's worth at a time.
            if i == last || bytes >= REGION_BYTES as usize {
                if !conn.answer(&served) {
                    break;
                }
                (served, bytes) = (Vec::new(), 0);
            }
        }
        if conn.closed.load(Ordering::SeqCst) {
            break;
        }
    }
    conn.threads.fetch_sub(1, Ordering::SeqCst);
    conn.spawn.live.fetch_sub(1, Ordering::SeqCst);
}

/// Finishes the TLS handshake of an accepted connection (bounded by
/// [`HANDSHAKE_TIMEOUT`]) and reads who the peer is.
fn handshake(
    sock: &TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<(record::Established, Option<PeerIdentity>)> {
    let conn = rustls::server::UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut conn = record::Handshaking::Server(conn);
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    record::handshake(&mut conn, sock, Instant::now() + HANDSHAKE_TIMEOUT)?;
    sock.set_write_timeout(None)?;
    let identity = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| super::tls::certificate_identity(c));
    Ok((record::establish(conn)?, identity))
}

/// Sets TCP keepalive probes on `sock`, so a connection whose peer
/// vanished ends (and its threads with it).
fn keepalive(sock: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(sock, sockopt::KeepAlive, &true);
    let _ = setsockopt(sock, sockopt::TcpKeepIdle, &30);
    let _ = setsockopt(sock, sockopt::TcpKeepInterval, &10);
    let _ = setsockopt(sock, sockopt::TcpKeepCount, &3);
}

/// Serves one accepted connection on threads of its own; `handshaking`
/// counts it until its handshake ended.
fn accept(
    sock: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    store: Arc<ReplicaStore>,
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    key: u64,
    spawn: ServeThreads,
    handshaking: Handshaking,
) {
    let _ = sock.set_nodelay(true);
    keepalive(&sock);
    let (tls, identity) = match tls {
        None => (None, None),
        Some(config) => match handshake(&sock, config) {
            Ok((c, id)) => {
                if id.is_none() {
                    tracing::warn!("data link: a certificate naming no stowage identity");
                    let _ = sock.shutdown(Shutdown::Both);
                    open.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    return;
                }
                (Some(c), id)
            }
            Err(e) => {
                tracing::debug!(error = %e, "data link handshake failed");
                let _ = sock.shutdown(Shutdown::Both);
                open.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                return;
            }
        },
    };
    drop(handshaking);
    if let Err(e) = sock.set_read_timeout(Some(QUIET)) {
        tracing::debug!(error = %e, "data link: no read timeout, spare buffers kept while idle");
    }
    let conn = Arc::new(ServerConn {
        wire: Wire::new(sock, tls),
        turn: Mutex::new(false),
        turn_free: Condvar::new(),
        identity,
        store,
        threads: AtomicUsize::new(1),
        readers: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        spawn,
    });
    conn.spawn.live.fetch_add(1, Ordering::SeqCst);
    server_thread(conn);
    open.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
}

/// Serves the data link on `listener` until `stop` turns true: mutual TLS
/// with `tls`, plaintext without (replication TLS off), each connection on
/// threads as `threads` says. Connections still open then are shut down.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    store: Arc<ReplicaStore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    threads: ServeThreads,
) {
    let open: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
    let mut next = 0u64;
    // Connections closed for too many handshakes at once, since the last
    // warning (at most one a minute).
    let mut refused = 0u64;
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let sock = match accepted.and_then(|(s, _)| s.into_std()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "data link: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = sock.set_nonblocking(false) {
            tracing::warn!(error = %e, "data link: cannot serve a connection");
            continue;
        }
        // Anyone who can reach the port may connect and say nothing; each
        // such connection holds a thread until its handshake times out.
        if threads.handshaking.fetch_add(1, Ordering::SeqCst) >= threads.max_handshaking {
            threads.handshaking.fetch_sub(1, Ordering::SeqCst);
            drop(sock);
            refused += 1;
            if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(
                    refused,
                    limit = threads.max_handshaking,
                    "data link: connections closed at once, as that many others have not finished their TLS handshake"
                );
                warned = Some(std::time::Instant::now());
                refused = 0;
            }
            continue;
        }
        let handshaking = Handshaking(Arc::clone(&threads.handshaking));
        next += 1;
        let key = next;
        if let Ok(c) = sock.try_clone() {
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, c);
        }
        let (tls, store, open2) = (tls.clone(), Arc::clone(&store), Arc::clone(&open));
        let spawn = threads.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("stowage-link".into())
            .spawn(move || accept(sock, tls, store, open2, key, spawn, handshaking))
        {
            // The closure, with the socket and the count, is dropped.
            open.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            tracing::warn!(error = %e, "data link: no thread for a connection");
        }
    }
    for (_, s) in open.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        let _ = s.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------
// Calling: one connection per link, written by the callers, its answers
// read by a thread of its own.

/// What becomes of a call's answer: called once, on the connection's
/// reading thread, never on a thread that sends or closes (which may hold
/// a lock the waiter takes: an engine drops its old peers, and so their
/// links, under its task's lock).
type Waiter = Box<dyn FnOnce(Result<Answer, PeerError>) + Send>;

struct Pending {
    sent: Instant,
    done: Waiter,
}

type Waiters = HashMap<u64, Pending>;

/// An open connection of a [`LinkClient`].
struct ClientConn {
    wire: Wire,
    node: String,
    /// Calls waiting for their answer; `None` once the connection ended.
    waiting: Mutex<Option<Waiters>>,
    /// Why the connection is closing, once [`ClientConn::close`] was called:
    /// its reading thread then ends it.
    closing: Mutex<Option<String>>,
    /// Its client let it go ([`ClientConn::retire`]): it takes no new calls
    /// and ends once none waits.
    retiring: AtomicBool,
    next: AtomicU64,
}

impl ClientConn {
    fn alive(&self) -> bool {
        !self.retiring.load(Ordering::SeqCst)
            && self
                .closing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
            && self
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Closes the connection from any thread: new calls are refused at
    /// once, and the reading thread, woken by the socket's shutdown, fails
    /// every waiting call with `why` (the first reason given wins).
    fn close(&self, why: &str) {
        self.closing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_owned());
        let _ = self.wire.sock.shutdown(Shutdown::Both);
    }

    /// Its client let it go: the calls already sent are answered as if it
    /// were still there, and the connection closes once none waits (at
    /// once when none does). A client goes when its peer forgets the link
    /// (a call failed, the node's address changed) or goes itself (its
    /// engine stopped); the writes it had in flight were sent, and failing
    /// them would count a copy that took them as failed. The wait is
    /// bounded: the reading thread ends a connection with a call overdue.
    fn retire(&self, why: &str) {
        let idle = {
            let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            self.retiring.store(true, Ordering::SeqCst);
            waiting.as_ref().is_none_or(HashMap::is_empty)
        };
        if idle {
            self.close(why);
        }
    }

    /// Whether its client let it go and no call waits any more.
    fn retired_idle(&self) -> bool {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        self.retiring.load(Ordering::SeqCst) && waiting.as_ref().is_none_or(HashMap::is_empty)
    }

    /// Ends the connection, on its reading thread: every waiting call
    /// fails (with the reason given to `close`, if it was called, else
    /// `why`), and new ones are refused.
    fn end(&self, why: &str) {
        let why = self
            .closing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_owned())
            .clone();
        let gone = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let _ = self.wire.sock.shutdown(Shutdown::Both);
        let waiters = gone.into_iter().flatten().map(|(_, p)| p.done);
        fail(waiters, &self.unreachable(&why));
    }

    fn is_closing(&self) -> bool {
        self.closing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn unreachable(&self, why: &str) -> PeerError {
        PeerError::Unreachable {
            node: self.node.clone(),
            why: why.to_owned(),
        }
    }

    /// Sends `calls` for `volume`, each answer going to its waiter; the
    /// ids given to them (to forget them again). The waiters come back,
    /// uncalled, with the error when the calls cannot be sent at all (the
    /// connection has ended, a call does not encode) or not at once from a
    /// reading thread. A write that fails closes the connection: its
    /// reading thread fails the calls.
    ///
    /// On a connection's reading thread (an engine sends the next batch
    /// when a batch's answers come in) this never waits: not for the
    /// connection's send lock (another sender may be waiting on a full
    /// socket), nor on the socket (its peer may be waiting for us to read
    /// its answers, and its peer's reading thread, for this thread to read
    /// them, while this one would wait for it). What the socket does not
    /// take at once stays in the connection's tail, and a thread started
    /// here writes it unless a sender comes first.
    fn send(
        self: &Arc<Self>,
        volume: Uuid,
        calls: &[Call],
        waiters: Vec<Waiter>,
    ) -> Result<Vec<u64>, (Vec<Waiter>, PeerError)> {
        // The calls' frames up to their data, one after the other; sealed
        // with the data between them (not copied into one frame first).
        let mut heads = Vec::new();
        let mut ends = Vec::with_capacity(calls.len());
        let mut ids = Vec::with_capacity(calls.len());
        for c in calls {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let head = encode_call_head(&mut heads, id, volume, c);
            ends.push(heads.len());
            if let Err(e) = head {
                let failed = PeerError::Failed {
                    node: self.node.clone(),
                    why: e.to_string(),
                };
                return Err((waiters, failed));
            }
            ids.push(id);
        }
        let wait = may_block();
        let mut out = if wait {
            self.wire.outbound()
        } else {
            match self.wire.send.try_lock() {
                Ok(out) if out.tail.is_empty() => out,
                _ => return Err((waiters, self.unreachable("data link busy"))),
            }
        };
        // Waiting before the frames leave: an answer may come back at once.
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let Some(w) = waiting.as_mut() else {
                return Err((waiters, self.unreachable("data link closed")));
            };
            let sent = Instant::now();
            for (id, done) in ids.iter().zip(waiters) {
                w.insert(*id, Pending { sent, done });
            }
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * calls.len());
        let mut from = 0;
        for (c, &end) in calls.iter().zip(&ends) {
            parts.extend([&heads[from..end], &c.data[..]]);
            from = end;
        }
        let sent = self
            .wire
            .write_tail(&mut out)
            .and_then(|()| self.wire.seal_and_write(&mut out, &parts, wait));
        if let Err(e) = sent {
            self.close(&format!("data link: {e}"));
        } else if !out.tail.is_empty() {
            let conn = Arc::clone(self);
            let started = std::thread::Builder::new()
                .name("stowage-link-tail".into())
                .spawn(move || {
                    let mut out = conn.wire.outbound();
                    if let Err(e) = conn.wire.write_tail(&mut out) {
                        conn.close(&format!("data link: {e}"));
                    }
                });
            if started.is_err() {
                self.close("data link: cannot start a thread to finish a write");
            }
        }
        Ok(ids)
    }

    /// Forgets calls whose caller no longer waits.
    fn forget(&self, ids: &[u64]) {
        if let Some(w) = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            for id in ids {
                w.remove(id);
            }
        }
    }

    /// Whether a call has waited longer than `deadline` for its answer.
    fn overdue(&self, deadline: Duration) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|w| w.values().any(|p| p.sent.elapsed() > deadline))
    }
}

/// Calls every one of `waiters` with `e`.
fn fail(waiters: impl IntoIterator<Item = Waiter>, e: &PeerError) {
    for w in waiters {
        w(Err(e.clone()));
    }
}

/// How often a connection's reader looks for calls past their deadline
/// while no answer comes.
fn overdue_check(deadline: Duration) -> Duration {
    (deadline / 8).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// A connection's reading thread: hands each answer to its call, until
/// the connection ends. A connection that lets a call go unanswered past
/// `deadline` is ended (like a gRPC deadline; and a peer that vanished
/// without a word sends no reset), so the next call connects anew.
fn read_answers(conn: Arc<ClientConn>, deadline: Duration) {
    ON_READER.with(|r| r.set(true));
    let check = overdue_check(deadline);
    let _ = conn.wire.sock.set_read_timeout(Some(check));
    let mut checked = Instant::now();
    let why = loop {
        if checked.elapsed() >= check {
            checked = Instant::now();
            if conn.overdue(deadline) {
                break format!("data link: no answer within {deadline:?}");
            }
        }
        let body = match conn.wire.next_frame() {
            Ok(Some(b)) => b,
            Ok(None) => break "data link closed by the peer".to_owned(),
            Err(e) if quiet(&e) => {
                if conn.is_closing() || conn.retired_idle() {
                    break "data link closed".to_owned();
                }
                continue;
            }
            Err(e) => break format!("data link closed: {e}"),
        };
        let (id, result) = match decode_answer(body) {
            Ok(d) => d,
            Err(e) => break format!("data link: {e}"),
        };
        let waiter = conn
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|w| w.remove(&id));
        if let Some(p) = waiter {
            (p.done)(result.map_err(|(code, why)| status_error(&conn.node, code, why)));
        }
        if conn.retired_idle() {
            break "data link closed".to_owned();
        }
    };
    conn.end(&why);
}

/// A failure a copy answered, as the engine counts it: gone for the codes
/// of a connection or a deadline, no copy for NOT_FOUND (the store's
/// answer for a volume it holds nothing of), an error of that copy
/// otherwise.
pub fn status_error(node: &str, code: Code, message: String) -> PeerError {
    let why = format!("{code:?}: {message}");
    match code {
        Code::NotFound => PeerError::NoCopy {
            node: node.to_owned(),
            why,
        },
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            PeerError::Unreachable {
                node: node.to_owned(),
                why,
            }
        }
        _ => PeerError::Failed {
            node: node.to_owned(),
            why,
        },
    }
}

/// Removes calls that no longer wait (their future was dropped, e.g. at
/// a deadline) from the connection's table.
struct Forget<'a> {
    conn: &'a ClientConn,
    ids: Vec<u64>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.conn.forget(&self.ids);
    }
}

/// Connects to `addr` and finishes the TLS handshake (with `tls`), all
/// within `deadline`, then checks the server may answer as `server`
/// ([`ServerRole::check`](super::tls::ServerRole::check)) before anything
/// is sent; blocking.
fn dial(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server: &super::tls::ServerRole,
    deadline: Duration,
) -> io::Result<Wire> {
    use std::net::ToSocketAddrs;
    let until = Instant::now() + deadline;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut sock = None;
    for a in addr.to_socket_addrs()? {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let sock = sock.ok_or(last)?;
    sock.set_nodelay(true)?;
    keepalive(&sock);
    // A write the peer does not take within the deadline ends the
    // connection, rather than hold its caller.
    sock.set_write_timeout(Some(deadline))?;
    let Some(config) = tls else {
        return Ok(Wire::new(sock, None));
    };
    let name = rustls::pki_types::ServerName::try_from(super::tls::SERVER_NAME)
        .map_err(io::Error::other)?;
    let c = rustls::client::UnbufferedClientConnection::new(Arc::clone(config), name)
        .map_err(io::Error::other)?;
    let mut c = record::Handshaking::Client(c);
    record::handshake(&mut c, &sock, until)?;
    if let Err(wrong) = server.check(c.peer_certificates()) {
        tracing::warn!(address = addr, error = %wrong, "refused a data link server that answered as another");
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the server {wrong}"),
        ));
    }
    Ok(Wire::new(sock, Some(record::establish(c)?)))
}

/// The data link to one node: connects on first use (and again after the
/// connection ended), then pipelines calls on that connection. Calls are
/// written by their callers; a thread of the connection reads the answers
/// and hands each to its call.
pub struct LinkClient {
    node: String,
    addr: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    deadline: Duration,
    conn: Mutex<Option<Arc<ClientConn>>>,
    /// Held while connecting, so one connection is dialled at a time.
    dialling: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for LinkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkClient")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for LinkClient {
    /// The connection ends with its client (its reading thread then too),
    /// once the calls it had sent are answered ([`ClientConn::retire`]).
    fn drop(&mut self) {
        if let Some(c) = self
            .conn
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            c.retire("data link closed");
        }
    }
}

impl LinkClient {
    /// The link to `node` at `addr` (host:port), over mutual TLS with `tls`
    /// or in plaintext without; connecting is bounded by `deadline`, and
    /// so is every call.
    pub fn new(
        node: &str,
        addr: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        deadline: Duration,
    ) -> Self {
        LinkClient {
            node: node.to_owned(),
            addr: addr.to_owned(),
            tls,
            deadline,
            conn: Mutex::new(None),
            dialling: tokio::sync::Mutex::new(()),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    fn unreachable(&self, why: String) -> PeerError {
        PeerError::Unreachable {
            node: self.node.clone(),
            why,
        }
    }

    /// The open connection, if there is one.
    fn open(&self) -> Option<Arc<ClientConn>> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|c| c.alive())
            .cloned()
    }

    async fn connected(&self) -> Result<Arc<ClientConn>, PeerError> {
        if let Some(c) = self.open() {
            return Ok(c);
        }
        let _dialling = self.dialling.lock().await;
        if let Some(c) = self.open() {
            return Ok(c);
        }
        let (addr, tls, deadline) = (self.addr.clone(), self.tls.clone(), self.deadline);
        let server = super::tls::ServerRole::Node(self.node.clone());
        let dialled =
            tokio::task::spawn_blocking(move || dial(&addr, tls.as_ref(), &server, deadline)).await;
        let wire = match dialled {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => return Err(self.unreachable(format!("data link {}: {e}", self.addr))),
            Err(e) => return Err(self.unreachable(format!("data link {}: {e}", self.addr))),
        };
        let conn = Arc::new(ClientConn {
            wire,
            node: self.node.clone(),
            waiting: Mutex::new(Some(Waiters::new())),
            closing: Mutex::new(None),
            retiring: AtomicBool::new(false),
            next: AtomicU64::new(1),
        });
        let reader = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("stowage-link-in".into())
            .spawn(move || read_answers(reader, deadline))
            .map_err(|e| self.unreachable(format!("data link {}: no thread: {e}", self.addr)))?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// Sends `calls` (data requests) for `volume` and waits for their
    /// answers, one result per call, in order.
    pub async fn calls(&self, volume: Uuid, calls: &[Call]) -> Vec<Result<Answer, PeerError>> {
        let n = calls.len();
        let conn = match self.connected().await {
            Ok(c) => c,
            Err(e) => return vec![Err(e); n],
        };
        let (waiters, waits): (Vec<Waiter>, Vec<_>) = (0..n)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                let w: Waiter = Box::new(move |r| {
                    let _ = tx.send(r);
                });
                (w, rx)
            })
            .unzip();
        // A large batch (a rebuild's regions) may wait for the peer to
        // read before it is all written: not on the runtime's threads.
        let bytes: usize = calls.iter().map(|c| c.data.len()).sum();
        let sent = if bytes > SEND_ON_THIS_THREAD {
            let (c, calls) = (Arc::clone(&conn), calls.to_vec());
            tokio::task::spawn_blocking(move || c.send(volume, &calls, waiters).map_err(|(_, e)| e))
                .await
                .unwrap_or_else(|e| Err(self.unreachable(format!("data link: {e}"))))
        } else {
            conn.send(volume, calls, waiters).map_err(|(_, e)| e)
        };
        let ids = match sent {
            Ok(ids) => ids,
            Err(e) => return vec![Err(e); n],
        };
        let _forget = Forget { conn: &conn, ids };
        let answers = async {
            let mut out = Vec::with_capacity(n);
            for rx in waits {
                out.push(
                    rx.await
                        .unwrap_or_else(|_| Err(self.unreachable("data link closed".to_owned()))),
                );
            }
            out
        };
        // The reading thread ends a connection with a call overdue; this
        // bounds the wait even if it could not.
        match tokio::time::timeout(self.deadline + overdue_check(self.deadline), answers).await {
            Ok(out) => out,
            Err(_) => {
                let why = format!(
                    "data link {}: no answer within {:?}",
                    self.addr, self.deadline
                );
                conn.close(&why);
                vec![Err(self.unreachable(why)); n]
            }
        }
    }

    /// Sends `calls` (data requests) for `volume` on this thread when a
    /// connection is open, without waiting: `done` gets their results
    /// from the connection's reading thread (every call fails once the
    /// deadline passes), never on this one. Gives `done` back, uncalled,
    /// when no connection is open or the calls cannot be sent on it (then
    /// [`LinkClient::calls`] connects, or says why).
    pub fn send_now(&self, volume: Uuid, calls: &[Call], done: BatchDone) -> Result<(), BatchDone> {
        let Some(conn) = self.open() else {
            return Err(done);
        };
        let n = calls.len();
        let gather = Arc::new(Mutex::new(Gather {
            results: vec![None; n],
            left: n,
            done: Some(done),
        }));
        let waiters = (0..n)
            .map(|i| {
                let g = Arc::clone(&gather);
                Box::new(move |r| Gather::put(&g, i, r)) as Waiter
            })
            .collect();
        match conn.send(volume, calls, waiters) {
            Ok(_) => Ok(()),
            // The waiters came back uncalled (and are dropped so): `done`
            // is still there.
            Err(_) => match gather.lock().unwrap_or_else(|e| e.into_inner()).done.take() {
                Some(done) => Err(done),
                None => Ok(()),
            },
        }
    }
}

/// The results of a batch sent by [`LinkClient::send_now`] as they come.
struct Gather {
    results: Vec<Option<Result<Answer, PeerError>>>,
    left: usize,
    done: Option<BatchDone>,
}

impl Gather {
    fn put(g: &Mutex<Gather>, i: usize, r: Result<Answer, PeerError>) {
        let finished = {
            let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
            if g.results[i].replace(r).is_none() {
                g.left -= 1;
            }
            if g.left == 0 {
                g.done.take().map(|d| (d, std::mem::take(&mut g.results)))
            } else {
                None
            }
        };
        if let Some((done, results)) = finished {
            done(
                results
                    .into_iter()
                    .map(|r| r.expect("every call answered"))
                    .collect(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::replicated::protocol::{Io, Reply, Request, Tag};
    use std::io::Read;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn write_call() -> Call {
        Call {
            request: Request::Write {
                io: Io {
                    epoch: 3,
                    boot: 1,
                    conn: 7,
                },
                region: 5,
                tag: Tag { epoch: 3, seq: 11 },
            },
            offset: 4096,
            len: 0,
            data: vec![0xab; 8192].into(),
        }
    }

    #[test]
    fn a_call_frame_decodes_to_the_call_it_encodes() {
        let volume = Uuid::new_random();
        let call = write_call();
        let mut f = Vec::new();
        encode_call(&mut f, 42, volume, &call).unwrap();
        let len = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - 4);
        let (id, v, back) = decode_call(Bytes::from(f).slice(4..)).unwrap();
        assert_eq!((id, v), (42, volume));
        assert_eq!(back.offset, 4096);
        assert_eq!(&back.data[..], &call.data[..]);
        assert_eq!(
            serde_json::to_string(&back.request).unwrap(),
            serde_json::to_string(&call.request).unwrap()
        );
    }

    #[test]
    fn answers_and_failures_decode_to_what_was_encoded() {
        let reply = Reply::Flushed { conn: 7, id: 9 };
        let ok = Ok(Answer {
            reply: Some(reply.clone()),
            data: Bytes::from_static(b"bytes"),
        });
        let f = encode_answer(3, &ok);
        let (id, got) = decode_answer(Bytes::from(f).slice(4..)).unwrap();
        assert_eq!(id, 3);
        let got = got.unwrap();
        assert_eq!(
            serde_json::to_string(&got.reply).unwrap(),
            serde_json::to_string(&Some(reply)).unwrap()
        );
        assert_eq!(&got.data[..], b"bytes");

        let f = encode_answer(4, &Err(Status::permission_denied("not yours")));
        let (id, got) = decode_answer(Bytes::from(f).slice(4..)).unwrap();
        assert_eq!(id, 4);
        let (code, why) = got.unwrap_err();
        assert_eq!((code, why.as_str()), (Code::PermissionDenied, "not yours"));
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused() {
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()).is_err());
        assert!(frame_len((MAX_FRAME as u32).to_le_bytes()).is_ok());
        assert!(decode_call(Bytes::from_static(&[0u8; 20])).is_err());
        assert!(decode_answer(Bytes::from_static(&[0u8; 10])).is_err());
        let mut f = Vec::new();
        encode_call(&mut f, 1, Uuid::new_random(), &write_call()).unwrap();
        // A request length past the end of the frame.
        let at = 4 + 8 + 32 + 8;
        f[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_call(Bytes::from(f).slice(4..)).is_err());
    }

    // The link itself, end to end: a real server on loopback (mutual TLS
    // under a CA made for the test, or plaintext), a real store in a
    // temporary directory, LinkClient calls.

    use crate::backend::replicated::protocol::Ballot;
    use crate::backend::replicated::record::{Member, ReplicaRecord};
    use crate::cluster::tls::{self, TlsMaterial};

    const SIZE: u64 = 4 * REGION_BYTES;

    struct Setup {
        _dir: tempfile::TempDir,
        volume: Uuid,
        addr: String,
        certs: std::path::PathBuf,
        stop: tokio::sync::watch::Sender<bool>,
        served: tokio::task::JoinHandle<()>,
        threads: ServeThreads,
    }

    impl Setup {
        /// A copy of a volume whose only member is node n1, served by the
        /// link over TLS (`tls`) or in plaintext.
        async fn start(tls_on: bool) -> Setup {
            Self::start_with(tls_on, ServeThreads::default()).await
        }

        async fn start_with(tls_on: bool, threads: ServeThreads) -> Setup {
            Self::start_as(tls_on, threads, None).await
        }

        /// As [`Setup::start_with`], the link presenting node `server`'s
        /// certificate (the shared cluster certificate for `None`).
        async fn start_as(tls_on: bool, threads: ServeThreads, server: Option<&str>) -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let certs = dir.path().join("ca");
            tls::init(&certs).unwrap();
            let pool = dir.path().join("pool");
            std::fs::create_dir(&pool).unwrap();
            let store = Arc::new(ReplicaStore::open(&pool, "n1").unwrap());
            let volume = Uuid::new_random();
            let boots = std::collections::BTreeMap::from([("n1".to_owned(), 1)]);
            let mut r = ReplicaRecord::new(volume, SIZE, vec![Member::copy("n1")], &boots).unwrap();
            r.epoch = 3;
            store.create(&r).unwrap();
            let server_tls = tls_on.then(|| {
                TlsMaterial::load(&cert_dir(dir.path(), &certs, server))
                    .unwrap()
                    .link_server_config()
                    .unwrap()
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let (stop, rx) = tokio::sync::watch::channel(false);
            let served = tokio::spawn(serve(
                listener,
                server_tls,
                Arc::clone(&store),
                rx,
                threads.clone(),
            ));
            Setup {
                _dir: dir,
                volume,
                addr,
                certs,
                stop,
                served,
                threads,
            }
        }

        /// A client with a certificate for node `node` (the CA's own
        /// cluster certificate for `None`).
        fn client(&self, node: Option<&str>) -> LinkClient {
            let dir = cert_dir(self._dir.path(), &self.certs, node);
            let config = TlsMaterial::load(&dir)
                .unwrap()
                .link_client_config()
                .unwrap();
            LinkClient::new("n1", &self.addr, Some(config), Duration::from_secs(5))
        }

        fn plain_client(&self) -> LinkClient {
            LinkClient::new("n1", &self.addr, None, Duration::from_secs(5))
        }
    }

    /// The directory of node `node`'s certificate under the CA in `certs`
    /// (issued on first use), or `certs` itself (the shared certificate)
    /// for `None`.
    fn cert_dir(
        dir: &std::path::Path,
        certs: &std::path::Path,
        node: Option<&str>,
    ) -> std::path::PathBuf {
        match node {
            None => certs.to_owned(),
            Some(n) => {
                let out = dir.join(format!("node-{n}"));
                if !out.exists() {
                    tls::issue_node(certs, n, &out).unwrap();
                }
                out
            }
        }
    }

    fn io() -> Io {
        Io {
            epoch: 3,
            boot: 1,
            conn: 1,
        }
    }

    fn write(region: u32, seq: u64, fill: u8) -> Call {
        Call {
            request: Request::Write {
                io: io(),
                region,
                tag: Tag { epoch: 3, seq },
            },
            offset: 8192,
            len: 0,
            data: vec![fill; 4096].into(),
        }
    }

    fn read(region: u32) -> Call {
        Call {
            request: Request::Read {
                io: io(),
                region,
                id: 1,
            },
            offset: 8192,
            len: 4096,
            data: Default::default(),
        }
    }

    /// A batch mixing whole-region reads (answered a region's worth at a
    /// time) and writes: every answer comes back in its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_region_reads_and_writes_is_answered_in_place() {
        let s = Setup::start(true).await;
        let c = s.client(Some("n1"));
        let writes: Vec<Call> = (0..4).map(|r| write(r, 1, r as u8 + 20)).collect();
        assert!(c.calls(s.volume, &writes).await.iter().all(Result::is_ok));
        let whole = |r| Call {
            len: 0,
            offset: 0,
            ..read(r)
        };
        let batch = vec![
            whole(0),
            write(1, 2, 31),
            whole(2),
            whole(3),
            read(1),
            whole(1),
        ];
        let answers: Vec<Answer> = c
            .calls(s.volume, &batch)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        for (i, r) in [(0, 0u8), (2, 2), (3, 3)] {
            let a = &answers[i];
            assert_eq!(a.data.len() as u64, REGION_BYTES, "answer {i}");
            assert!(a.data[8192..8192 + 4096].iter().all(|b| *b == r + 20));
        }
        assert!(matches!(
            answers[1].reply,
            Some(Reply::Written { region: 1, .. })
        ));
        assert_eq!(&answers[4].data[..], &[31u8; 4096][..]);
        assert_eq!(&answers[5].data[8192..8192 + 4096], &[31u8; 4096][..]);
        let _ = s.stop.send(true);
        s.served.await.unwrap();
    }

    /// A send from a connection's reading thread never waits: while
    /// another sender holds the connection it comes back unsent (the
    /// engine then sends on a task), and once free it goes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reading_thread_does_not_wait_for_a_busy_connection() {
        let s = Setup::start(true).await;
        let c = Arc::new(s.client(Some("n1")));
        assert!(c.calls(s.volume, &[write(0, 1, 7)]).await[0].is_ok());
        let conn = c.open().expect("connected");
        let (tx, rx) = std::sync::mpsc::channel();
        let send = |seq: u64| {
            let (c, tx, volume) = (Arc::clone(&c), tx.clone(), s.volume);
            let (sent_tx, sent) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                ON_READER.with(|r| r.set(true));
                let done: BatchDone = Box::new(move |r| {
                    let _ = tx.send(r);
                });
                let _ = sent_tx.send(c.send_now(volume, &[write(0, seq, 8)], done).is_ok());
            });
            sent.recv_timeout(Duration::from_secs(10))
                .expect("a reading thread waited to send")
        };
        let held = conn.wire.outbound();
        assert!(!send(2), "sent while the connection was busy");
        drop(held);
        assert!(send(3), "not sent on a free connection");
        let answers = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(answers[..], [Ok(_)]), "{answers:?}");
        let _ = s.stop.send(true);
        s.served.await.unwrap();
    }

    /// Frame bytes land in a few buffers taken again once the frames
    /// split from them are gone, and never in one a frame still holds:
    /// whole-region frames served one after the other need no new buffer
    /// each, and frames kept meanwhile keep their bytes.
    #[test]
    fn frame_buffers_are_taken_again_once_their_frames_are_gone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let wire = Wire::new(sock, None);
        // Whole regions and, between them, small frames: the buffers'
        // bytes shift against the frames.
        let frame = |i: usize| {
            let len = if i % 3 == 2 { 4096 + i } else { MAX_FRAME - i };
            let mut f = (len as u32).to_le_bytes().to_vec();
            f.extend((0..len).map(|b| (b + i) as u8));
            f
        };
        let check = |i: usize, body: &[u8]| {
            assert_eq!(body, &frame(i)[4..], "frame {i}");
        };
        let frames = 60;
        let sender = std::thread::spawn(move || {
            for i in 0..frames {
                peer.write_all(&frame(i)).unwrap();
            }
            peer
        });
        // The first 30 served one at a time and dropped.
        for i in 0..30 {
            check(i, &wire.next_frame().unwrap().expect("a frame"));
        }
        let made = wire.inbound.lock().unwrap().made;
        assert!(made <= 3, "{made} buffers for 30 frames dropped as served");
        // The next 30 all kept: no buffer a kept frame holds is written
        // again.
        let kept: Vec<Bytes> = (30..frames)
            .map(|_| wire.next_frame().unwrap().expect("a frame"))
            .collect();
        for (i, body) in (30..).zip(&kept) {
            check(i, body);
        }
        let spares = wire.inbound.lock().unwrap().spare.len();
        assert!(spares <= SPARE_BUFFERS, "{spares} spares");
        assert!(spares > 0, "no spare kept while frames stream");
        // Quiet for the socket's read timeout: the spares are let go.
        drop(kept);
        wire.sock
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let e = wire.next_frame().expect_err("no frame came");
        assert!(quiet(&e), "{e}");
        let spares = wire.inbound.lock().unwrap().spare.len();
        assert_eq!(spares, 0, "spares kept on a quiet connection");
        drop(sender.join().unwrap());
    }

    /// A send that may not wait, on a socket its peer does not read,
    /// writes what fits and keeps the rest; the next sender writes that
    /// first, so the peer gets every frame whole and in order.
    #[test]
    fn what_a_full_socket_did_not_take_goes_first_and_whole() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let wire = Arc::new(Wire::new(sock, None));
        let frame = |i: u8| {
            let mut f = vec![i; 256 << 10];
            f[..4].copy_from_slice(&((256u32 << 10) - 4).to_le_bytes());
            f
        };
        // Frames until the socket is full (bounded: loopback buffers hold
        // a few MiB), on a thread that may not wait.
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Arc::clone(&wire);
        std::thread::spawn(move || {
            let mut out = w.outbound();
            let mut sent = 0u8;
            while out.tail.is_empty() && sent < 200 {
                w.seal_and_write(&mut out, &[&frame(sent)], false).unwrap();
                sent += 1;
            }
            let _ = tx.send((sent, !out.tail.is_empty()));
        });
        let (sent, kept) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a send that may not wait waited");
        assert!(kept, "{sent} frames of 256 KiB and the socket never filled");
        let w = Arc::clone(&wire);
        let last = std::thread::spawn(move || w.send_parts(&[&frame(sent)]));
        let mut got = vec![0u8; (sent as usize + 1) * (256 << 10)];
        peer.read_exact(&mut got).unwrap();
        last.join().unwrap().unwrap();
        for (i, f) in got.chunks(256 << 10).enumerate() {
            assert_eq!(f, &frame(i as u8)[..], "frame {i}");
        }
        assert!(wire.outbound().tail.is_empty());
    }

    /// A served connection that nothing comes on for [`QUIET`] only lets
    /// its spare buffers go: the same connection serves the next calls
    /// (a quiet connection is not a closed one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_connection_serves_on() {
        let s = Setup::start(true).await;
        let c = s.client(Some("n1"));
        let written = |a: &[Result<Answer, PeerError>]| {
            matches!(
                a,
                [Ok(Answer {
                    reply: Some(Reply::Written { .. }),
                    ..
                })]
            )
        };
        let a = c.calls(s.volume, &[write(1, 1, 7)]).await;
        assert!(written(&a), "{a:?}");
        let before = c.open().expect("connected");
        tokio::time::sleep(QUIET * 2 + Duration::from_millis(500)).await;
        let a = c.calls(s.volume, &[write(1, 2, 8)]).await;
        assert!(written(&a), "{a:?}");
        let after = c.open().expect("connected");
        assert!(
            Arc::ptr_eq(&before, &after),
            "the connection was made anew after a quiet spell"
        );
        drop((before, after, c));
        s.stop.send(true).unwrap();
        s.served.await.unwrap();
    }

    /// Connections that never finish their TLS handshake (anyone who can
    /// reach the port can open them) hold at most `max_handshaking`
    /// threads: those beyond are closed at once. Once they go, a real
    /// client is served. Before, each held a thread for up to 10 s, with
    /// no bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_stuck_before_their_handshake_hold_a_bounded_number_of_threads() {
        use std::io::Read;
        let threads = ServeThreads {
            max_handshaking: 4,
            ..ServeThreads::default()
        };
        let s = Setup::start_with(true, threads).await;
        let handshaking = Arc::clone(&s.threads.handshaking);
        let silent: Vec<TcpStream> = (0..12)
            .map(|_| TcpStream::connect(&s.addr).unwrap())
            .collect();
        // Each beyond the first four is closed by the server: it reads EOF
        // (a reset counts too), well before the handshake's 10 s.
        let closed = tokio::task::spawn_blocking(move || {
            let mut closed = 0;
            for mut c in silent.iter().skip(4) {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut b = [0u8; 1];
                match c.read(&mut b) {
                    Ok(0) => closed += 1,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => closed += 1,
                    other => panic!("a connection over the limit was kept: {other:?}"),
                }
            }
            (closed, silent)
        });
        let (closed, silent) = closed.await.unwrap();
        assert_eq!(closed, 8);
        assert_eq!(handshaking.load(Ordering::SeqCst), 4);
        drop(silent);
        let deadline = Instant::now() + Duration::from_secs(20);
        while handshaking.load(Ordering::SeqCst) != 0 {
            assert!(Instant::now() < deadline, "handshakes left counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let a = s.client(Some("n1")).calls(s.volume, &[read(0)]).await;
        assert!(a[0].is_ok(), "{a:?}");
        let _ = s.stop.send(true);
        s.served.await.unwrap();
    }

    /// A connection's threads grow as calls come, and those that wait long
    /// for a turn to read end: an idle connection keeps one thread, which
    /// still serves, and more start again with the next calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_threads_of_a_connection_end_and_one_stays() {
        let threads = ServeThreads {
            idle: Duration::from_millis(300),
            ..ServeThreads::default()
        };
        let s = Setup::start_with(true, threads).await;
        let counter = Arc::clone(&s.threads.live);
        let live = move || counter.load(Ordering::SeqCst);
        let c = Arc::new(s.client(Some("n1")));
        let settle_at_one = || async {
            let deadline = Instant::now() + Duration::from_secs(20);
            while live() != 1 {
                assert!(Instant::now() < deadline, "{} threads stay", live());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        for round in 0..2 {
            // The thread that reads a call starts another (none waited).
            let a = c.calls(s.volume, &[write(1, round + 1, 7)]).await;
            assert!(
                matches!(
                    a[0],
                    Ok(Answer {
                        reply: Some(Reply::Written { .. }),
                        ..
                    })
                ),
                "{a:?}"
            );
            assert!(live() >= 2, "{} threads after a call", live());
            settle_at_one().await;
        }
        // Many at once: served, never by more than SERVER_THREADS.
        let reads: Vec<_> = (0..64)
            .map(|i| {
                let (c, v) = (Arc::clone(&c), s.volume);
                tokio::spawn(async move { c.calls(v, &[read(i % 4)]).await })
            })
            .collect();
        for t in reads {
            let a = t.await.unwrap().pop().unwrap().unwrap();
            assert!(matches!(a.reply, Some(Reply::ReadData { .. })), "{a:?}");
            assert!(live() <= SERVER_THREADS, "{} threads", live());
        }
        settle_at_one().await;
        drop(c);
        s.stop.send(true).unwrap();
        s.served.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while live() != 0 {
            assert!(
                Instant::now() < deadline,
                "{} threads after the end",
                live()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The engine updates its key between calls (here before each): the
    /// copy opens the records after each update with the next key, where
    /// it opens them in its frame buffers, and every write lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_after_key_updates_land_in_the_copy() {
        let s = Setup::start(true).await;
        let c = s.client(Some("n1"));
        let a = c.calls(s.volume, &[write(0, 1, 1)]).await;
        assert!(a[0].is_ok(), "{a:?}");
        let conn = c.open().expect("connected");
        for i in 0..4u8 {
            conn.wire
                .outbound()
                .sealer
                .as_mut()
                .expect("over TLS")
                .update_key_next();
            // A whole region, so the update's record and the call's
            // records arrive over several reads.
            let call = Call {
                offset: 0,
                data: vec![i + 20; REGION_BYTES as usize].into(),
                ..write(u32::from(i), u64::from(i) + 2, 0)
            };
            let a = c.calls(s.volume, &[call]).await;
            assert!(a[0].is_ok(), "write {i} after a key update: {a:?}");
        }
        for i in 0..4u8 {
            let whole = Call {
                len: 0,
                offset: 0,
                ..read(u32::from(i))
            };
            let a = c.calls(s.volume, &[whole]).await.pop().unwrap().unwrap();
            assert!(a.data.iter().all(|b| *b == i + 20), "region {i}");
        }
        assert!(
            Arc::ptr_eq(&conn, &c.open().expect("connected")),
            "the connection was made anew"
        );
        drop((conn, c));
        s.stop.send(true).unwrap();
        s.served.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_over_mutual_tls_land_in_the_copy_and_read_back() {
        let s = Setup::start(true).await;
        let c = s.client(Some("n1"));
        // One batch of writes to every region, pipelined.
        let writes: Vec<Call> = (0..4)
            .map(|r| write(r, u64::from(r) + 1, r as u8 + 10))
            .collect();
        for (i, r) in c.calls(s.volume, &writes).await.into_iter().enumerate() {
            let a = r.unwrap();
            assert!(
                matches!(a.reply, Some(Reply::Written { region, .. }) if region == i as u32),
                "{a:?}"
            );
        }
        // Many concurrent single calls: every one answered, in its place.
        let c = Arc::new(c);
        let reads: Vec<_> = (0..64)
            .map(|i| {
                let (c, v) = (Arc::clone(&c), s.volume);
                tokio::spawn(async move { c.calls(v, &[read(i % 4)]).await })
            })
            .collect();
        for (i, t) in reads.into_iter().enumerate() {
            let a = t.await.unwrap().pop().unwrap().unwrap();
            assert!(matches!(a.reply, Some(Reply::ReadData { .. })), "{a:?}");
            assert_eq!(&a.data[..], &vec![(i % 4) as u8 + 10; 4096][..]);
        }
        // A whole region's bytes in one answer (as a rebuild reads them).
        let whole = Call {
            len: 0,
            offset: 0,
            ..read(2)
        };
        let a = c.calls(s.volume, &[whole]).await.pop().unwrap().unwrap();
        assert_eq!(a.data.len() as u64, REGION_BYTES);
        assert_eq!(&a.data[8192..8192 + 4096], &vec![12u8; 4096][..]);
        assert!(a.data[..8192].iter().all(|b| *b == 0));
        let flushed = c
            .calls(
                s.volume,
                &[Call::control(Request::Flush { io: io(), id: 5 })],
            )
            .await;
        assert!(
            matches!(
                flushed[0],
                Ok(Answer {
                    reply: Some(Reply::Flushed { id: 5, .. }),
                    ..
                })
            ),
            "{flushed:?}"
        );
        // The bytes are in the copy's data file.
        let data = std::fs::read(
            s._dir
                .path()
                .join("pool/replicas")
                .join(s.volume.to_hex())
                .join("data"),
        )
        .unwrap();
        let at = 2 * REGION_BYTES as usize + 8192;
        assert_eq!(&data[at..at + 4096], &vec![12u8; 4096][..]);
        let _ = s.stop.send(true);
        s.served.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_the_record_does_not_name_and_requests_that_are_not_data_are_refused() {
        let s = Setup::start(true).await;
        let other = s.client(Some("n9"));
        let got = other.calls(s.volume, &[write(0, 1, 1)]).await;
        match &got[0] {
            Err(PeerError::Failed { why, .. }) => {
                assert!(
                    why.contains("PermissionDenied") && why.contains("n9"),
                    "{why}"
                )
            }
            r => panic!("n9 wrote: {r:?}"),
        }
        // The cluster certificate may, but only data requests.
        let cluster = s.client(None);
        let prepare = Call::control(Request::Prepare {
            ballot: Ballot {
                round: 9,
                proposer: "n1".into(),
            },
        });
        match &cluster.calls(s.volume, &[prepare]).await[0] {
            Err(PeerError::Failed { why, .. }) => assert!(why.contains("InvalidArgument"), "{why}"),
            r => panic!("a Prepare over the link: {r:?}"),
        }
        assert!(cluster.calls(s.volume, &[write(0, 1, 1)]).await[0].is_ok());
        // An unknown volume: the store's error, not a dead link.
        match &cluster.calls(Uuid::new_random(), &[write(0, 1, 1)]).await[0] {
            Err(PeerError::NoCopy { why, .. }) => assert!(why.contains("NotFound"), "{why}"),
            r => panic!("a write to no volume: {r:?}"),
        }
        // Nothing was written by n9: region 0 holds the cluster's write.
        let back = cluster
            .calls(s.volume, &[read(0)])
            .await
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(&back.data[..], &vec![1u8; 4096][..]);
        let _ = s.stop.send(true);
        s.served.await.unwrap();
    }

    /// An engine checks which node answered, not only that its certificate
    /// is under the cluster CA: node n9's certificate may not answer for
    /// n1 (refused before any request is sent, whichever certificate the
    /// engine holds); n1's own certificate or the shared one may.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_node_dialled_or_the_shared_certificate_may_answer_for_it() {
        let s = Setup::start_as(true, ServeThreads::default(), Some("n9")).await;
        for client in [s.client(Some("n1")), s.client(None)] {
            match &client.calls(s.volume, &[write(0, 1, 1)]).await[0] {
                Err(PeerError::Unreachable { node, why }) => {
                    assert_eq!(node, "n1");
                    assert!(
                        why.contains(&s.addr)
                            && why.contains("presented the certificate of node n9")
                            && why.contains("may answer as node n1"),
                        "{why}"
                    );
                }
                r => panic!("n9's certificate answered for n1: {r:?}"),
            }
        }
        let data = s
            ._dir
            .path()
            .join("pool/replicas")
            .join(s.volume.to_hex())
            .join("data");
        let written = std::fs::read(&data).unwrap_or_default();
        assert!(written.iter().all(|b| *b == 0), "a write reached the copy");
        let _ = s.stop.send(true);
        s.served.await.unwrap();

        for server in [Some("n1"), None] {
            let s = Setup::start_as(true, ServeThreads::default(), server).await;
            for (client, seq) in [s.client(Some("n1")), s.client(None)].into_iter().zip(1..) {
                let got = client.calls(s.volume, &[write(0, seq, 1)]).await;
                assert!(got[0].is_ok(), "served as {server:?}: {got:?}");
            }
            let _ = s.stop.send(true);
            s.served.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plaintext_client_gets_nothing_from_a_tls_link_and_plaintext_links_work() {
        let s = Setup::start(true).await;
        let got = s.plain_client().calls(s.volume, &[write(0, 1, 1)]).await;
        assert!(
            matches!(got[0], Err(PeerError::Unreachable { .. })),
            "{got:?}"
        );
        let _ = s.stop.send(true);
        s.served.await.unwrap();

        let p = Setup::start(false).await;
        let c = p.plain_client();
        assert!(c.calls(p.volume, &[write(1, 1, 7)]).await[0].is_ok());
        let back = c.calls(p.volume, &[read(1)]).await.pop().unwrap().unwrap();
        assert_eq!(&back.data[..], &vec![7u8; 4096][..]);
        let _ = p.stop.send(true);
        p.served.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_frame_ends_the_connection_and_stopping_ends_the_rest() {
        let s = Setup::start(false).await;
        let mut raw = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        raw.write_all(&((MAX_FRAME + 1) as u32).to_le_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
            .await
            .expect("the server ends the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "an answer to an oversized frame");

        // A working connection, then the server stops: the next call
        // finds the link gone, and a new connection is refused.
        let c = s.plain_client();
        assert!(c.calls(s.volume, &[write(0, 1, 1)]).await[0].is_ok());
        let _ = s.stop.send(true);
        s.served.await.unwrap();
        let got = c.calls(s.volume, &[write(0, 2, 2)]).await;
        assert!(
            matches!(got[0], Err(PeerError::Unreachable { .. })),
            "{got:?}"
        );
        let got = c.calls(s.volume, &[write(0, 3, 3)]).await;
        assert!(
            matches!(got[0], Err(PeerError::Unreachable { .. })),
            "{got:?}"
        );
    }

    /// What [`LinkClient::send_now`] was sent, as its `done` got it.
    fn sent_now(
        c: &LinkClient,
        volume: Uuid,
        calls: &[Call],
    ) -> Option<std::sync::mpsc::Receiver<Vec<Result<Answer, PeerError>>>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let done: BatchDone = Box::new(move |r| {
            let _ = tx.send(r);
        });
        c.send_now(volume, calls, done).ok().map(|()| rx)
    }

    /// Sending on the caller's thread needs an open connection (the first
    /// call connects); then every call of a batch is answered, in order,
    /// from the connection's reading thread, and the copy has the bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_sent_at_once_are_answered_in_order_once_connected() {
        let s = Setup::start(true).await;
        let c = s.client(Some("n1"));
        assert!(
            sent_now(&c, s.volume, &[write(0, 1, 1)]).is_none(),
            "sent with no connection open"
        );
        assert!(c.calls(s.volume, &[write(0, 1, 1)]).await[0].is_ok());
        let writes: Vec<Call> = (0..4)
            .map(|r| write(r, u64::from(r) + 2, r as u8 + 20))
            .collect();
        let rx = sent_now(&c, s.volume, &writes).expect("a connection is open");
        let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("no answers");
        assert_eq!(got.len(), 4);
        for (i, r) in got.into_iter().enumerate() {
            let a = r.unwrap();
            assert!(
                matches!(a.reply, Some(Reply::Written { region, .. }) if region == i as u32),
                "{a:?}"
            );
        }
        for r in 0..4u32 {
            let back = c.calls(s.volume, &[read(r)]).await.pop().unwrap().unwrap();
            assert_eq!(&back.data[..], &vec![r as u8 + 20; 4096][..]);
        }
    }

    /// A copy that takes one connection and never answers, until `stop`
    /// is sent: its address, the stop, its thread.
    fn silent_copy() -> (
        String,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let held = std::thread::spawn(move || {
            let conns: Vec<_> = listener.incoming().take(1).collect();
            let _ = stopped.recv();
            drop(conns);
        });
        (addr, stop, held)
    }

    /// Calls sent at once to a copy that holds the connection open and
    /// never answers fail at the deadline (the reading thread ends the
    /// connection), and the next call dials anew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_sent_at_once_to_a_silent_copy_fail_at_the_deadline() {
        let (addr, stop, held) = silent_copy();
        let deadline = Duration::from_millis(400);
        let c = Arc::new(LinkClient::new("n1", &addr, None, deadline));
        let volume = Uuid::new_random();
        // A first call connects, and waits.
        let first = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.calls(volume, &[write(0, 1, 1)]).await })
        };
        let t = Instant::now();
        while c.open().is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "never connected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rx = sent_now(&c, volume, &[write(1, 1, 1), write(2, 1, 1)]).expect("open");
        let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("no results");
        assert_eq!(got.len(), 2);
        for r in &got {
            match r {
                Err(PeerError::Unreachable { why, .. }) => {
                    assert!(why.contains("no answer"), "{why}")
                }
                r => panic!("an answer from a silent peer: {r:?}"),
            }
        }
        assert!(matches!(
            first.await.unwrap()[0],
            Err(PeerError::Unreachable { .. })
        ));
        assert!(
            c.open().is_none(),
            "the connection stayed open past a deadline"
        );
        assert!(sent_now(&c, volume, &[write(0, 2, 1)]).is_none());
        let _ = stop.send(());
        held.join().unwrap();
    }

    /// A link dropped by a thread that holds a lock its waiting calls take
    /// (an engine drops its peer under its task's lock when it stops) does
    /// not call them there: dropping returns at once, and a call the copy
    /// never answers fails on the connection's reading thread, at the
    /// deadline, once the lock is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_link_never_runs_its_waiting_calls_on_the_dropping_thread() {
        let (addr, stop, held) = silent_copy();
        let c = LinkClient::new("n1", &addr, None, Duration::from_millis(500));
        let volume = Uuid::new_random();
        let conn = c.connected().await.unwrap();
        let engine = Arc::new(Mutex::new(()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (e, on) = (Arc::clone(&engine), std::thread::current().id());
        let done: BatchDone = Box::new(move |r| {
            let _locked = e.lock().unwrap();
            let _ = tx.send((std::thread::current().id() != on, r));
        });
        assert!(c.send_now(volume, &[write(0, 1, 1)], done).is_ok());
        let dropped = std::thread::scope(|scope| {
            let (dropped_tx, dropped_rx) = std::sync::mpsc::channel();
            let locked = engine.lock().unwrap();
            scope.spawn(move || {
                drop(c);
                let _ = dropped_tx.send(());
            });
            let dropped = dropped_rx.recv_timeout(Duration::from_secs(10));
            drop(locked);
            dropped
        });
        assert!(dropped.is_ok(), "dropping the link waited for the lock");
        let (elsewhere, got) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiting call was never failed");
        assert!(elsewhere, "the waiter ran on the thread that sent it");
        assert!(
            matches!(&got[0], Err(PeerError::Unreachable { why, .. }) if why.contains("no answer")),
            "{got:?}"
        );
        assert!(!conn.alive());
        assert!(conn.is_closing(), "the connection did not end");
        let _ = stop.send(());
        held.join().unwrap();
    }

    /// A forwarder between a link client and its copy that holds the
    /// copy's answers back until `release` is sent: its address, the
    /// release, its thread.
    fn answers_held_back(
        copy: &str,
    ) -> (
        String,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let copy = copy.to_owned();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let held = std::thread::spawn(move || {
            let (mut client, _) = listener.accept().unwrap();
            let mut server = TcpStream::connect(&copy).unwrap();
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let calls = std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let _ = released.recv_timeout(Duration::from_secs(30));
            let _ = std::io::copy(&mut server, &mut client);
            let _ = client.shutdown(Shutdown::Both);
            let _ = calls.join();
        });
        (addr, release, held)
    }

    /// Writes sent at once and then left by their client (an engine that
    /// learned of new members used to replace its peer, and with it the
    /// link, while its writes were in flight) are answered as if it were
    /// still there: each gets the copy's answer, the copy has the bytes,
    /// and the connection closes once the last was answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_let_go_of_answers_the_calls_it_had_sent_then_closes() {
        let s = Setup::start(false).await;
        let (addr, release, held) = answers_held_back(&s.addr);
        let c = LinkClient::new("n1", &addr, None, Duration::from_secs(10));
        let conn = c.connected().await.unwrap();
        let writes: Vec<Call> = (0..3)
            .map(|r| write(r, u64::from(r) + 1, r as u8 + 40))
            .collect();
        let rx = sent_now(&c, s.volume, &writes).expect("a connection is open");
        drop(c);
        assert!(!conn.alive(), "a connection let go of took new calls");
        let _ = release.send(());
        let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("no answers");
        for (i, r) in got.into_iter().enumerate() {
            match r {
                Ok(a) => assert!(
                    matches!(a.reply, Some(Reply::Written { region, .. }) if region == i as u32),
                    "{a:?}"
                ),
                Err(e) => panic!("write {i} failed when its link was let go of: {e}"),
            }
        }
        let t = Instant::now();
        while !conn.is_closing() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the connection stayed open once nothing waited"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        held.join().unwrap();
        let c = s.plain_client();
        for r in 0..3u32 {
            let back = c.calls(s.volume, &[read(r)]).await.pop().unwrap().unwrap();
            assert_eq!(&back.data[..], &vec![r as u8 + 40; 4096][..]);
        }
    }

    /// A copy that takes the connection and never answers: the call fails
    /// at the deadline, and the next one dials a new connection rather
    /// than wait on the silent one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_connection_times_out_and_is_replaced() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (accepted, count) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let held = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for c in listener.incoming().take(2) {
                conns.push(c.unwrap());
                let _ = accepted.send(conns.len());
            }
            // Silent, connections open, until the test is done.
            let _ = stopped.recv();
        });
        let c = LinkClient::new("n1", &addr, None, Duration::from_millis(300));
        let volume = Uuid::new_random();
        for round in 1..=2 {
            let got = c.calls(volume, &[write(0, 1, 1)]).await;
            match &got[0] {
                Err(PeerError::Unreachable { why, .. }) => {
                    assert!(why.contains("no answer"), "{why}")
                }
                r => panic!("an answer from a silent peer: {r:?}"),
            }
            assert_eq!(
                count.recv_timeout(Duration::from_secs(10)),
                Ok(round),
                "call {round} did not dial a connection of its own"
            );
        }
        let _ = stop.send(());
        held.join().unwrap();
    }
}
