//! `GET /healthz`: a tiny HTTP/1.1 responder backed by the plugin's Probe
//! (200 `ok` when ready, 503 with the reason otherwise, 404 elsewhere).
//! One request per connection; it never blocks the reconciler, which keeps
//! its own clone of the plugin.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::plugin::Plugin;

/// How long a Probe may take before the plugin counts as not ready.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves connections on `listener` until the task is dropped.
pub async fn serve<P: Plugin>(listener: TcpListener, plugin: P) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "healthz: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let plugin = plugin.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, plugin).await {
                tracing::debug!(error = %e, "healthz: connection failed");
            }
        });
    }
}

/// Whether the plugin is ready, and if not, why.
pub async fn check<P: Plugin>(plugin: &mut P) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, plugin.probe()).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err("the plugin's Probe says it is not ready".into()),
        Ok(Err(e)) => Err(format!("Probe failed: {}", crate::error_chain(&e))),
        Err(_) => Err(format!(
            "Probe did not answer within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

async fn answer<P: Plugin>(mut conn: TcpStream, mut plugin: P) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => match check(&mut plugin).await {
            Ok(()) => ("200 OK", "ok\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", format!("{reason}\n")),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "only GET\n".to_owned()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    conn.write_all(out.as_bytes()).await?;
    conn.shutdown().await
}
