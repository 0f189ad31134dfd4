//! The controller's S3 steps for object volumes and snapshots, as blocking
//! calls (the domain runs on the blocking pool): each makes a client from
//! a [`Location`] and the request's credentials, used for that call only.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::Location;
use super::s3::{CopyOptions, CopyProgress, CopyStats, Credentials, S3Client, S3Config, S3Error};

/// Runs `f` to completion from a blocking thread: on the runtime that
/// spawned the thread, or a small one of its own where there is none
/// (unit tests, tools).
pub fn block_on<F: Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(f),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(f),
    }
}

fn client(loc: &Location, creds: &Credentials) -> Result<S3Client, S3Error> {
    S3Client::new(
        &S3Config {
            endpoint: loc.endpoint.clone(),
            region: loc.region.clone(),
        },
        creds.clone(),
    )
}

/// Makes the location usable: its bucket when it owns one (a bucket the
/// same credentials own already is success: the create is retried), or
/// checks that the shared bucket exists.
pub fn create(loc: &Location, creds: &Credentials) -> Result<(), S3Error> {
    let c = client(loc, creds)?;
    block_on(async {
        if loc.owns_bucket() {
            c.create_bucket(&loc.bucket).await.map(drop)
        } else if c.bucket_exists(&loc.bucket).await? {
            Ok(())
        } else {
            Err(S3Error {
                kind: super::s3::S3ErrorKind::NotFound,
                message: format!(
                    "the shared bucket {:?} does not exist at {}; create it first",
                    loc.bucket, loc.endpoint
                ),
            })
        }
    })
}

/// Removes everything at the location, and its bucket when it owns one.
/// Idempotent: a missing bucket is success.
pub fn delete(loc: &Location, creds: &Credentials) -> Result<(), S3Error> {
    let c = client(loc, creds)?;
    block_on(async {
        match c.delete_prefix(&loc.bucket, &loc.prefix).await {
            Ok(_) => {}
            Err(e) if e.kind == super::s3::S3ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if loc.owns_bucket() {
            c.delete_bucket(&loc.bucket).await?;
        }
        Ok(())
    })
}

/// Objects and bytes at the location.
pub fn usage(loc: &Location, creds: &Credentials) -> Result<(u64, u64), S3Error> {
    let c = client(loc, creds)?;
    block_on(c.usage(&loc.bucket, &loc.prefix))
}

/// Copies every object of `from` to `to` server-side (creating `to`'s
/// bucket when it owns one). Objects already copied (a copy restarted
/// after a cancel or a crash) are skipped. `cancel` stops it.
pub fn copy(
    from: &Location,
    to: &Location,
    creds: &Credentials,
    cancel: Arc<AtomicBool>,
    progress: Option<Arc<dyn Fn(CopyProgress) + Send + Sync>>,
) -> Result<CopyStats, S3Error> {
    create(to, creds)?;
    let c = client(from, creds)?;
    let options = CopyOptions {
        cancel,
        progress,
        ..CopyOptions::default()
    };
    block_on(c.copy_prefix(&from.bucket, &from.prefix, &to.bucket, &to.prefix, &options))
}
