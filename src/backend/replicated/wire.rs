//! What travels between an engine (or the controller) and a voter: one
//! [`protocol::Request`](super::protocol::Request) with the bytes it moves,
//! answered by at most one [`Reply`] with the bytes it returns. The
//! transport (the agent's `Replica` gRPC service over mutual TLS, or a
//! direct call into the store of the engine's own node) hides behind
//! [`Peer`].
//!
//! Bytes by request:
//! - `Write`: `data` is written at `offset` bytes into the region.
//! - `Rebuild`: `data` is the whole region (shorter for a last, partial
//!   region), replacing what it holds.
//! - `Read`: answered with `len` bytes from `offset` into the region, or the
//!   whole region when `len` is 0.
//! - Everything else moves no bytes.

use std::fmt;
use std::sync::Arc;

use crate::volume::id::Uuid;

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
    pub data: Arc<Vec<u8>>,
}

impl Call {
    /// A request that moves no bytes.
    pub fn control(request: Request) -> Self {
        Call {
            request,
            offset: 0,
            len: 0,
            data: Arc::default(),
        }
    }
}

/// A voter's answer: no reply for a `Commit`, bytes for a `ReadData`.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub reply: Option<Reply>,
    pub data: Vec<u8>,
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The node could not be reached or did not answer in time: the caller
    /// may count it as failed now.
    #[error("node {node} unreachable: {why}")]
    Unreachable { node: String, why: String },
    /// The node answered with an error (no such copy, a bad request, a
    /// refused certificate, its disk failed).
    #[error("node {node}: {why}")]
    Failed { node: String, why: String },
}

/// Delivers calls to the voters of a volume, by node id.
#[tonic::async_trait]
pub trait Peer: Send + Sync + fmt::Debug + 'static {
    async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError>;
}
