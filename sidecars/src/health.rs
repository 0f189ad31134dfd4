//! `GET /healthz`, backed by the plugin's Probe: 200 `ok` when ready, 503
//! with the reason otherwise, 404 elsewhere. Served by [`crate::http`], on
//! its own tasks, so it never blocks the reconciler, which keeps its own
//! clone of the plugin.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::http::Reply;
use crate::plugin::Plugin;

/// How long a Probe may take before the plugin counts as not ready.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves connections on `listener` until the task is dropped.
pub async fn serve<P: Plugin>(listener: TcpListener, plugin: P) {
    crate::http::serve(listener, move |path: String| {
        let mut plugin = plugin.clone();
        async move {
            match path.as_str() {
                "/healthz" => match check(&mut plugin).await {
                    Ok(()) => Reply::text(200, "ok\n"),
                    Err(reason) => Reply::text(503, format!("{reason}\n")),
                },
                _ => Reply::not_found(),
            }
        }
    })
    .await
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
