//! A small HTTP/1.1 server for plain-text endpoints such as `/healthz` and
//! `/metrics`, on hyper. It owns the protocol (parsing, keep-alive, HEAD,
//! timeouts); callers own only the answer to a path. It never blocks the
//! caller's other work: every connection runs on its own task.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// `Content-Type` of a plain-text reply.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// A client that has not sent its request head within this long is
/// disconnected.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to a GET (or HEAD, which hyper sends without the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    /// A plain-text reply.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: TEXT,
            body: body.into(),
        }
    }

    /// 404 for a path the caller does not serve.
    pub fn not_found() -> Self {
        Reply::text(404, "not found\n")
    }
}

/// Serves connections on `listener` until the task is dropped. GET and
/// HEAD of any path are answered by `handler(path)`; other methods get 405.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(respond(req, handler).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "http: connection failed");
            }
        });
    }
}

async fn respond<H, F>(req: Request<Incoming>, handler: H) -> Response<Full<Bytes>>
where
    H: Fn(String) -> F,
    F: Future<Output = Reply>,
{
    let reply = if req.method() == Method::GET || req.method() == Method::HEAD {
        handler(req.uri().path().to_owned()).await
    } else {
        Reply::text(405, "only GET and HEAD\n")
    };
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Sends `request` on a fresh connection and reads until the server
    /// closes it.
    async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, |path: String| async move {
            match path.as_str() {
                "/hello" => Reply::text(200, "hi\n"),
                "/down" => Reply::text(503, "because\n"),
                _ => Reply::not_found(),
            }
        }));
        addr
    }

    #[tokio::test]
    async fn answers_get_head_and_refuses_other_methods() {
        let addr = server().await;
        let get = exchange(
            addr,
            "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(
            get.contains("content-type: text/plain; charset=utf-8\r\n"),
            "{get}"
        );
        assert!(get.contains("content-length: 3\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\nhi\n"), "{get}");

        let head = exchange(
            addr,
            "HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

        let down = exchange(
            addr,
            "GET /down HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            down.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{down}"
        );
        assert!(down.ends_with("because\n"), "{down}");

        let other = exchange(
            addr,
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");

        let post = exchange(
            addr,
            "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.contains("allow: GET, HEAD\r\n"), "{post}");
    }

    #[tokio::test]
    async fn keeps_a_connection_alive_across_requests() {
        let addr = server().await;
        let out = exchange(
            addr,
            "GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /down HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(out.matches("HTTP/1.1 ").count(), 2, "{out}");
        assert!(out.contains("hi\n") && out.ends_with("because\n"), "{out}");
    }

    #[tokio::test]
    async fn a_garbled_request_gets_400() {
        let addr = server().await;
        let out = exchange(addr, "NOT HTTP AT ALL\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    }
}
