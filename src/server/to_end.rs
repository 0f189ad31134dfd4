//! Each CSI call runs to its end, even when its caller stops waiting.
//!
//! A CO gives every call a deadline (gRPC's `grpc-timeout`; the
//! provisioner's default is 10 s) and tonic drops a handler's future when
//! the deadline passes or the caller goes away. A handler that is
//! `async` all the way (the cluster controller's: a replicated volume's
//! create, publish or delete are rounds of calls to several nodes) would
//! then stop at whichever `.await` it had reached, its volume's in-flight
//! guard released with it. The CO's retry would start over beside calls
//! of the dropped one still landing on the nodes, instead of being told
//! ABORTED while the first one runs, as the spec asks.
//!
//! [`RunToEndLayer`] spawns each call's future as a task of its own and
//! waits for it: the caller may go, the task (and the guard it holds)
//! finishes. The local server's handlers do their work on the blocking
//! pool, which ends on its own; the layer is on its CSI server too, so
//! that no handler there has to remember to.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunToEndLayer;

impl<S> tower::Layer<S> for RunToEndLayer {
    type Service = RunToEnd<S>;

    fn layer(&self, inner: S) -> RunToEnd<S> {
        RunToEnd { inner }
    }
}

/// See [`RunToEndLayer`].
#[derive(Debug, Clone)]
pub struct RunToEnd<S> {
    inner: S,
}

type Answer<S, R> = Result<<S as tower::Service<R>>::Response, <S as tower::Service<R>>::Error>;

impl<S, R> tower::Service<R> for RunToEnd<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Answer<S, R>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let task = tokio::spawn(self.inner.call(request));
        Box::pin(async move {
            match task.await {
                Ok(answer) => answer,
                // The handler panicked: so does its call, as without the
                // task (the task is never aborted).
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tower::{Layer, Service, ServiceExt};

    /// A call whose caller stops waiting still runs to its end; without the
    /// layer, it stops where it was.
    #[tokio::test]
    async fn a_call_dropped_by_its_caller_still_ends() {
        for (layered, ends) in [(true, true), (false, false)] {
            let ended = Arc::new(AtomicBool::new(false));
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
            let flag = Arc::clone(&ended);
            let handler = tower::service_fn(move |()| {
                let (flag, wait) = (Arc::clone(&flag), Arc::clone(&wait));
                async move {
                    let wait = wait.lock().await.take().expect("one call");
                    let _ = wait.await;
                    flag.store(true, Ordering::SeqCst);
                    Ok::<_, Infallible>(())
                }
            });
            let call: Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>> = if layered {
                Box::pin(RunToEndLayer.layer(handler).oneshot(()))
            } else {
                Box::pin(handler.oneshot(()))
            };
            // The caller gives up before the handler can end.
            assert!(
                tokio::time::timeout(Duration::from_millis(20), call)
                    .await
                    .is_err()
            );
            let _ = go.send(());
            // A hang guard, far above the handler's remaining step.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while ends && !ended.load(Ordering::SeqCst) && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::task::yield_now().await;
            assert_eq!(ended.load(Ordering::SeqCst), ends, "layered: {layered}");
        }
    }

    /// The answer of a call that runs to its end is the handler's.
    #[tokio::test]
    async fn the_answer_is_the_handlers() {
        let mut s = RunToEndLayer.layer(tower::service_fn(|n: u32| async move {
            Ok::<_, Infallible>(n + 1)
        }));
        let answer = s.ready().await.unwrap().call(41).await.unwrap();
        assert_eq!(answer, 42);
    }

    #[tokio::test]
    async fn a_panic_in_the_handler_is_the_calls() {
        let s = RunToEndLayer.layer(tower::service_fn(|()| async move {
            if true {
                panic!("handler panicked");
            }
            Ok::<(), Infallible>(())
        }));
        let caught = tokio::spawn(s.oneshot(())).await;
        let panic = caught.expect_err("the call panicked").into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"handler panicked"));
    }
}
