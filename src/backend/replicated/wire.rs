//! What travels between an engine (or the controller) and a voter: one
//! [`protocol::Request`](super::protocol::Request) with the bytes it moves,
//! answered by at most one [`Reply`] with the bytes it returns. The
//! transport (the agent's `Replica` gRPC service over mutual TLS, its
//! data link for data requests, or a direct call into the store of the
//! engine's own node) hides behind [`Peer`].
//!
//! Bytes by request:
//! - `Write`: `data` is written at `offset` bytes into the region.
//! - `Rebuild`: `data` is the whole region (shorter for a last, partial
//!   region), replacing what it holds.
//! - `Read`: answered with `len` bytes from `offset` into the region, or the
//!   whole region when `len` is 0.
//! - Everything else moves no bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use crate::volume::id::Uuid;
use bytes::Bytes;

use super::protocol::{Reply, Request};

/// One request to one voter.
#[derive(Debug, Clone)]
pub struct Call {
    pub request: Request,
    /// Offset into the region (`Write`, `Read`).
    pub offset: u32,
    /// Bytes to read (`Read`; 0 = the whole region).
    pub len: u32,
    /// Bytes to store (`Write`, `Rebuild`).
    pub data: Payload,
}

/// The bytes a call carries: shared, never copied on the way to a voter
/// (each copy's call and its resends hold the same buffer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload(Bytes);

impl Payload {
    /// The bytes as a [`Bytes`] (no copy), e.g. for a gRPC message.
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload(b)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload(v.into())
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// `call.data.as_ref().clone()` is a [`Bytes`], without a copy.
impl AsRef<Bytes> for Payload {
    fn as_ref(&self) -> &Bytes {
        &self.0
    }
}

impl Call {
    /// A request that moves no bytes.
    pub fn control(request: Request) -> Self {
        Call {
            request,
            offset: 0,
            len: 0,
            data: Payload::default(),
        }
    }
}

/// A voter's answer: no reply for a `Commit`, bytes for a `ReadData`.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub reply: Option<Reply>,
    pub data: Bytes,
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The node could not be reached or did not answer in time: the caller
    /// may count it as failed now.
    #[error("node {node} unreachable: {why}")]
    Unreachable { node: String, why: String },
    /// The node answered with an error (a bad request, a refused
    /// certificate, its disk failed).
    #[error("node {node}: {why}")]
    Failed { node: String, why: String },
    /// The node answered that it holds nothing of the volume: never made
    /// there, or deleted since a membership change removed it.
    #[error("node {node}: {why}")]
    NoCopy { node: String, why: String },
}

/// [`Peer::call_batch`] made of single calls, one after the other.
pub async fn one_by_one<P: Peer + ?Sized>(
    peer: &P,
    node: &str,
    volume: Uuid,
    calls: Vec<Call>,
) -> Vec<Result<Answer, PeerError>> {
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        out.push(peer.call(node, volume, c).await);
    }
    out
}

/// Called once with one result per call of a batch, in order.
pub type BatchDone = Box<dyn FnOnce(Vec<Result<Answer, PeerError>>) + Send>;

/// Delivers calls to the voters of a volume, by node id.
#[tonic::async_trait]
pub trait Peer: Send + Sync + fmt::Debug + 'static {
    async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError>;

    /// Several data calls to one node ([`Request::is_data`](super::protocol::Request::is_data)),
    /// applied there in order; one result per call. By default one call
    /// after the other.
    async fn call_batch(
        &self,
        node: &str,
        volume: Uuid,
        calls: Vec<Call>,
    ) -> Vec<Result<Answer, PeerError>> {
        one_by_one(self, node, volume, calls).await
    }

    /// Sends data calls to `node` from the caller's thread without waiting
    /// for them, when that can be done at once (a connection to it is
    /// open): `done` then gets one result per call, in order, from another
    /// thread, and every call fails once the peer's deadline passes. Gives
    /// the calls and `done` back otherwise (use [`Peer::call_batch`]),
    /// which is all the default does.
    fn send_now(
        &self,
        _node: &str,
        _volume: Uuid,
        calls: Vec<Call>,
        done: BatchDone,
    ) -> Result<(), (Vec<Call>, BatchDone)> {
        Err((calls, done))
    }

    /// Learns the addresses (node id -> host:port) of voters that joined,
    /// keeping what it holds for the others: their connections and the
    /// calls in flight on them. Nothing by default (a peer that reaches
    /// nodes by other means needs no address).
    fn learn(&self, _addresses: &BTreeMap<String, String>) {}

    /// Whether `node` is the one whose store this peer holds, so
    /// [`Peer::call_here`] serves it.
    fn is_here(&self, _node: &str) -> bool {
        false
    }

    /// Runs `call` on the caller's thread, blocking, when `node` is the one
    /// whose store this peer holds (the engine's own node), so block I/O
    /// that stays on this node needs no task and no hop; `None` when it is
    /// another node (use [`Peer::call`]).
    fn call_here(
        &self,
        _node: &str,
        _volume: Uuid,
        _call: Call,
    ) -> Option<Result<Answer, PeerError>> {
        None
    }
}
