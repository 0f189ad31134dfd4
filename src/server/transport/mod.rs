//! Unix-socket connections as the gRPC server reads them.
//!
//! gRPC clients disagree on the HTTP/2 `:authority` of a unix socket:
//! grpc-go and grpc-js send `localhost`, gRPC C-core (Python, C++, Ruby…)
//! the percent-encoded socket path (`tmp%2Fcsi%2Fcsi.sock`), grpc-java the
//! raw path. h2 (under hyper and tonic) requires a URI authority and resets
//! every stream of the others with PROTOCOL_ERROR, with no option to relax
//! it (hyperium/h2#487). So each unix connection's incoming bytes pass
//! through an [`http2::AuthorityRewriter`], which replaces an invalid
//! `:authority` by a valid one of the same length before h2 parses it.
//! Nothing else the client sends changes, the server's replies are not
//! touched, and TCP connections do not use this.

mod hpack;
mod http2;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use http2::AuthorityRewriter;

/// The connections accepted on `listener`, each reading through the
/// `:authority` rewrite.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixConnection>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|r| r.map(UnixConnection::new))
}

/// A connection whose client-to-server bytes have every invalid HTTP/2
/// `:authority` made valid (see the module doc); writes go to the stream
/// unchanged.
#[derive(Debug)]
pub struct UnixConnection<S = UnixStream> {
    inner: S,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet read, from `ready_pos` on.
    ready: Vec<u8>,
    ready_pos: usize,
    eof: bool,
}

impl<S> UnixConnection<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: AuthorityRewriter::new(),
            ready: Vec::new(),
            ready_pos: 0,
            eof: false,
        }
    }
}

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 16 * 1024;

impl<S: AsyncRead + Unpin> AsyncRead for UnixConnection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_pos < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_pos);
                buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
                this.ready_pos += n;
                if this.ready_pos == this.ready.len() {
                    this.ready.clear();
                    this.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf))?;
            if chunk_buf.filled().is_empty() {
                this.eof = true;
                this.rewriter.finish(&mut this.ready);
            } else {
                this.rewriter.feed(chunk_buf.filled(), &mut this.ready);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UnixConnection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for UnixConnection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::http2::tests::{capture, rewrite};
    use super::*;

    /// Through a real socket, in small writes: the server reads the
    /// rewritten stream and then EOF; its writes reach the client as they
    /// are.
    #[tokio::test]
    async fn reads_are_rewritten_and_writes_pass_unchanged() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut conn = UnixConnection::new(server);
        let (mut client_read, mut client_write) = client.into_split();
        let input = capture();
        let writer = tokio::spawn({
            let input = input.clone();
            async move {
                for chunk in input.chunks(7) {
                    client_write.write_all(chunk).await.unwrap();
                }
                client_write.shutdown().await.unwrap();
            }
        });
        let mut got = vec![];
        conn.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, rewrite(&input));
        assert_ne!(got, input);

        conn.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut reply = vec![];
        client_read.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"\0\0\0\x04\x01\0\0\0\0");
    }

    /// Once the rewriting has ended, reads go straight to the stream.
    #[tokio::test]
    async fn a_client_that_is_not_http2_reads_unchanged() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut conn = UnixConnection::new(server);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = vec![];
        conn.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
    }
}
