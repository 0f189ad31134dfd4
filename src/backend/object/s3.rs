//! The S3 calls object volumes need (buckets, small metadata objects,
//! prefix delete, usage and server-side prefix copy), on any S3-compatible
//! store, with errors classified into a few kinds the CSI layer can map.
//!
//! It must never log or put into an error a secret (credentials are
//! redacted in Debug and Display), and never touch a key outside the bucket
//! and prefix it is given: prefixes are validated and must end with '/'.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
    Delete, ObjectIdentifier,
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// Timeout for opening a TCP (and TLS) connection to the store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout for the first response byte after a request was sent.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of one attempt (a large server-side copy is one attempt).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound of one operation, retries included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(900);
/// Attempts per operation (the first one included), with backoff between.
pub const MAX_ATTEMPTS: u32 = 3;
/// `get_object` refuses objects larger than this: it is for metadata.
pub const MAX_METADATA_OBJECT: u64 = 16 << 20;
/// Smallest part S3 accepts in a multipart upload (except the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Largest object a single CopyObject may copy.
pub const MAX_SINGLE_COPY: u64 = 5 << 30;
/// Most parts a multipart upload may have.
const MAX_PARTS: u64 = 10_000;
/// Keys listed (and deleted) per request: the S3 maximum for both.
const PAGE: i32 = 1000;
/// How often a wait checks the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// What went wrong, coarsely, for the caller to map (to a CSI code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3ErrorKind {
    /// AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, HTTP 401/403.
    PermissionDenied,
    /// The store could not be reached or is overloaded: connect, dispatch
    /// and timeout errors, HTTP 5xx, SlowDown.
    Unavailable,
    /// The bucket exists and belongs to someone else (BucketAlreadyExists).
    AlreadyExists,
    /// NoSuchBucket (and other 404s the operation does not absorb).
    NotFound,
    /// BucketNotEmpty: the bucket still holds objects.
    NotEmpty,
    /// A name, prefix or endpoint the store (or this module) refuses.
    InvalidArgument,
    /// The caller's cancel flag was set.
    Cancelled,
    Other,
}

/// An S3 failure. The message names the operation, bucket and key and the
/// S3 error code; never a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct S3Error {
    pub kind: S3ErrorKind,
    pub message: String,
}

impl S3Error {
    fn new(kind: S3ErrorKind, message: impl Into<String>) -> Self {
        S3Error {
            kind,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(S3ErrorKind::InvalidArgument, message)
    }

    fn cancelled(what: &Op<'_>) -> Self {
        Self::new(S3ErrorKind::Cancelled, format!("{what}: cancelled"))
    }
}

/// The kind of an S3 error response from its code (if the body had one)
/// and its HTTP status. The code wins; the status decides for codeless
/// answers (HEAD requests have no body).
pub fn classify(code: Option<&str>, status: Option<u16>) -> S3ErrorKind {
    use S3ErrorKind::*;
    match code {
        Some(
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "AllAccessDisabled"
            | "AccountProblem"
            | "InvalidToken"
            | "ExpiredToken"
            | "Forbidden",
        ) => return PermissionDenied,
        Some(
            "SlowDown"
            | "ServiceUnavailable"
            | "InternalError"
            | "RequestTimeout"
            | "RequestTimeTooSkewed"
            | "OperationAborted"
            | "Throttling"
            | "ThrottlingException",
        ) => return Unavailable,
        Some("BucketAlreadyExists" | "BucketAlreadyOwnedByYou") => return AlreadyExists,
        Some("NoSuchBucket" | "NoSuchKey" | "NoSuchUpload" | "NotFound") => return NotFound,
        Some("BucketNotEmpty") => return NotEmpty,
        Some(
            "InvalidBucketName"
            | "InvalidArgument"
            | "InvalidRequest"
            | "KeyTooLongError"
            | "InvalidLocationConstraint"
            | "IllegalLocationConstraintException"
            | "AuthorizationHeaderMalformed"
            | "EntityTooSmall"
            | "EntityTooLarge"
            | "InvalidPart"
            | "InvalidPartOrder"
            | "InvalidRange"
            | "MalformedXML",
        ) => return InvalidArgument,
        _ => {}
    }
    match status {
        Some(401 | 403) => PermissionDenied,
        Some(404) => NotFound,
        Some(409) => AlreadyExists,
        Some(400) => InvalidArgument,
        Some(429 | 500..=599) => Unavailable,
        _ => Other,
    }
}

/// Names an operation and what it acted on, for error messages.
#[derive(Clone, Copy)]
struct Op<'a> {
    name: &'static str,
    bucket: &'a str,
    key: &'a str,
}

impl fmt::Display for Op<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "S3 {} bucket {:?}", self.name, self.bucket)
        } else {
            write!(
                f,
                "S3 {} {:?} in bucket {:?}",
                self.name, self.key, self.bucket
            )
        }
    }
}

fn op<'a>(name: &'static str, bucket: &'a str, key: &'a str) -> Op<'a> {
    Op { name, bucket, key }
}

/// The S3 code of an error, if the store answered with one.
fn code_of<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

fn sdk_error<E>(what: &Op<'_>, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use S3ErrorKind::*;
    match &e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let code = s.err().code();
            let kind = classify(code, Some(status));
            let detail = s.err().message().unwrap_or("");
            S3Error::new(
                kind,
                format!(
                    "{what}: {} (HTTP {status}){}{detail}",
                    code.unwrap_or("no error code"),
                    if detail.is_empty() { "" } else { ": " },
                ),
            )
        }
        SdkError::ResponseError(r) => {
            let status = r.raw().status().as_u16();
            S3Error::new(
                classify(None, Some(status)).max_unavailable(),
                format!(
                    "{what}: unreadable response (HTTP {status}): {}",
                    DisplayErrorContext(&e)
                ),
            )
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => S3Error::new(
            Unavailable,
            format!("{what}: store unreachable: {}", DisplayErrorContext(&e)),
        ),
        SdkError::ConstructionFailure(_) => S3Error::new(
            InvalidArgument,
            format!("{what}: bad request: {}", DisplayErrorContext(&e)),
        ),
        _ => S3Error::new(Other, format!("{what}: {}", DisplayErrorContext(&e))),
    }
}

impl S3ErrorKind {
    /// A garbled answer means a broken store or proxy: retryable at best.
    fn max_unavailable(self) -> Self {
        match self {
            S3ErrorKind::Other => S3ErrorKind::Unavailable,
            k => k,
        }
    }
}

/// Where the store is. Checked by [`S3Config::validate`] (and by
/// [`S3Client::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http://host[:port][/path]` or `https://...`: no credentials in it,
    /// no query, no fragment.
    pub endpoint: String,
    /// The store's signing region (`us-east-1`, Garage's `garage`, ...).
    pub region: String,
}

impl S3Config {
    /// Refuses an endpoint that is not a plain http(s) URL, or one that
    /// carries userinfo (credentials belong in [`Credentials`]), a query or
    /// a fragment, and an empty or odd region.
    pub fn validate(&self) -> Result<(), S3Error> {
        let e = &self.endpoint;
        // Never echo a URL with userinfo back: it may hold a password.
        let bad = |why: &str| S3Error::invalid(format!("S3 endpoint: {why}"));
        if e.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("contains whitespace or control characters"));
        }
        let uri: http::Uri = e.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("scheme must be http or https")),
        }
        let Some(authority) = uri.authority() else {
            return Err(bad("no host"));
        };
        if authority.as_str().contains('@') {
            return Err(bad(
                "must not contain credentials (user@host); pass them as secrets",
            ));
        }
        if authority.host().is_empty() {
            return Err(bad("no host"));
        }
        if uri.query().is_some() || e.contains('?') {
            return Err(bad("must not contain a query"));
        }
        if e.contains('#') {
            return Err(bad("must not contain a fragment"));
        }
        let r = &self.region;
        if r.is_empty()
            || r.len() > 64
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(S3Error::invalid(format!("S3 region {r:?} is not valid")));
        }
        Ok(())
    }
}

/// An access key. Debug and Display show the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "access key {} (secret redacted)", self.access_key_id)
    }
}

/// What `create_bucket` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketCreated {
    /// The bucket did not exist and was made.
    Created,
    /// It existed already and these credentials own it (or may write it).
    AlreadyOwned,
}

/// Counts reported while `copy_prefix` runs. `objects_done` includes the
/// skipped ones; bytes count whole objects, or parts of multipart copies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyProgress {
    pub objects_done: u64,
    pub objects_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What `copy_prefix` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Objects copied by this call.
    pub copied: u64,
    /// Objects already at the destination (see `copy_prefix`), left alone.
    pub skipped: u64,
    /// Bytes copied by this call (skipped objects not counted).
    pub bytes_copied: u64,
    /// How many of `copied` went through a multipart upload.
    pub multipart: u64,
}

/// Progress callback: called from the task running `copy_prefix`, one call
/// at a time, with growing counts.
pub type ProgressFn = Arc<dyn Fn(CopyProgress) + Send + Sync>;

/// How `copy_prefix` copies.
#[derive(Clone)]
pub struct CopyOptions {
    /// Requests in flight at most (object copies and part copies together).
    pub concurrency: usize,
    /// Objects larger than this are copied with a multipart upload (at most
    /// [`MAX_SINGLE_COPY`], which a single CopyObject cannot exceed).
    pub multipart_threshold: u64,
    /// Part size of multipart copies: at least [`MIN_PART_SIZE`], raised so
    /// that no object needs more than 10 000 parts.
    pub part_size: u64,
    pub progress: Option<ProgressFn>,
    /// Set it to stop the copy: in-flight requests are dropped, multipart
    /// uploads aborted, and the call returns a `Cancelled` error promptly.
    pub cancel: Arc<AtomicBool>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            concurrency: 16,
            multipart_threshold: 64 << 20,
            part_size: 64 << 20,
            progress: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyOptions")
            .field("concurrency", &self.concurrency)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel.load(Ordering::Relaxed))
            .finish()
    }
}

/// Whether `name` is a valid S3 bucket name (the general-purpose bucket
/// rules, which every S3-compatible store accepts): 3–63 characters of
/// lowercase letters, digits, '-' and '.'; starting and ending with a
/// letter or digit; no `..`, `.-` or `-.`; not an IPv4 address; none of
/// the reserved prefixes (`xn--`, `sthree-`) or suffixes (`-s3alias`,
/// `--ol-s3`).
pub fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=63).contains(&b.len())
        && b.iter().all(|&c| alnum(c) || c == b'-' || c == b'.')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.")
        && !looks_like_ipv4(name)
        && !name.starts_with("xn--")
        && !name.starts_with("sthree-")
        && !name.ends_with("-s3alias")
        && !name.ends_with("--ol-s3")
}

fn looks_like_ipv4(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()))
}

/// Longest prefix a volume may have.
pub const MAX_PREFIX: usize = 512;

/// Whether `prefix` is a valid volume prefix: non-empty, at most 512
/// bytes, ending with '/', not starting with '/', with no empty, `.` or
/// `..` segment and no control character.
pub fn valid_prefix(prefix: &str) -> bool {
    let Some(body) = prefix.strip_suffix('/') else {
        return false;
    };
    prefix.len() <= MAX_PREFIX
        && !prefix.chars().any(char::is_control)
        && body
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

fn check_bucket(name: &'static str, bucket: &str) -> Result<(), S3Error> {
    if valid_bucket_name(bucket) {
        Ok(())
    } else {
        Err(S3Error::invalid(format!(
            "S3 {name}: {bucket:?} is not a valid bucket name"
        )))
    }
}

/// The empty prefix (the whole bucket) or a valid one.
fn check_prefix(name: &'static str, prefix: &str) -> Result<(), S3Error> {
    if prefix.is_empty() || valid_prefix(prefix) {
        Ok(())
    } else {
        Err(S3Error::invalid(format!(
            "S3 {name}: {prefix:?} is not a valid prefix (no leading '/', no '.' or '..' \
             segments, ends with '/', at most {MAX_PREFIX} bytes)"
        )))
    }
}

fn check_key(name: &'static str, key: &str) -> Result<(), S3Error> {
    if key.is_empty()
        || key.len() > 1024
        || key.starts_with('/')
        || key.chars().any(char::is_control)
    {
        Err(S3Error::invalid(format!(
            "S3 {name}: {key:?} is not a valid object key"
        )))
    } else {
        Ok(())
    }
}

/// `bucket/key` as x-amz-copy-source wants it: the key percent-encoded
/// (RFC 3986 unreserved characters and '/' kept).
fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 1);
    out.push_str(bucket);
    out.push('/');
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One listed object.
#[derive(Debug, Clone)]
struct Listed {
    key: String,
    size: u64,
    etag: String,
    modified: Option<DateTime>,
}

/// The part size for an object of `size` bytes: at least `wanted` and
/// [`MIN_PART_SIZE`], and large enough for at most 10 000 parts.
fn part_size_for(size: u64, wanted: u64) -> u64 {
    wanted.max(MIN_PART_SIZE).max(size.div_ceil(MAX_PARTS))
}

/// Whether an object already at the destination counts as copied: the
/// same size, and the same ETag or else written no earlier than the
/// source's last change. ETags match after a single CopyObject (it keeps
/// the content's MD5) but never after a multipart copy (its ETag is the MD5
/// of the parts' MD5s), hence the LastModified fallback: the destination
/// is written by the copy, after the source was. Both times come from the
/// same store (clock skew between its nodes can only cause a needless
/// re-copy, unless the source changes while it is being copied, which a
/// snapshot's source does not).
fn already_copied(src: &Listed, dst: &Listed) -> bool {
    src.size == dst.size
        && (src.etag == dst.etag
            || matches!((&src.modified, &dst.modified), (Some(s), Some(d)) if d >= s))
}

fn trim_etag(e: Option<&str>) -> String {
    e.unwrap_or("").trim_matches('"').to_owned()
}

/// Stops a copy: the caller's flag, or a failure elsewhere in the copy.
#[derive(Clone)]
struct Stop {
    user: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
}

impl Stop {
    fn is_set(&self) -> bool {
        self.user.load(Ordering::Relaxed) || self.failed.load(Ordering::Relaxed)
    }

    /// Runs `fut` unless stopped first; drops it (aborting the request)
    /// as soon as the stop is seen.
    async fn run<T>(
        &self,
        what: &Op<'_>,
        fut: impl Future<Output = Result<T, S3Error>>,
    ) -> Result<T, S3Error> {
        if self.is_set() {
            return Err(S3Error::cancelled(what));
        }
        let watch = async {
            while !self.is_set() {
                tokio::time::sleep(CANCEL_POLL).await;
            }
        };
        tokio::select! {
            r = fut => r,
            () = watch => Err(S3Error::cancelled(what)),
        }
    }
}

/// A client for one store and one access key. Cheap to clone.
#[derive(Clone, Debug)]
pub struct S3Client {
    inner: aws_sdk_s3::Client,
    region: String,
}

impl S3Client {
    /// A client for `config` signing with `credentials`: path-style
    /// addressing, TLS through rustls with the ring provider and the
    /// system's roots, [`CONNECT_TIMEOUT`], [`READ_TIMEOUT`], bounded
    /// attempts and operation time, and checksums only where S3 requires
    /// them (stores other than AWS often lack the newer checksum headers).
    /// Makes no request.
    pub fn new(config: &S3Config, credentials: Credentials) -> Result<S3Client, S3Error> {
        config.validate()?;
        if credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty() {
            return Err(S3Error::invalid(
                "S3 credentials: empty access key id or secret",
            ));
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let creds = aws_sdk_s3::config::Credentials::new(
            credentials.access_key_id,
            credentials.secret_access_key,
            None,
            None,
            "stowage",
        );
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .credentials_provider(creds)
            .region(Region::new(config.region.clone()))
            .endpoint_url(config.endpoint.trim_end_matches('/'))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(2)),
            )
            .build();
        Ok(S3Client {
            inner: aws_sdk_s3::Client::from_conf(conf),
            region: config.region.clone(),
        })
    }

    /// Makes `bucket`. Idempotent: `AlreadyOwned` when it exists and these
    /// credentials may write it (stores differ: AWS answers
    /// BucketAlreadyOwnedByYou, or 200 in us-east-1; Garage answers 200,
    /// hence the HeadBucket first to tell the cases apart). A bucket of
    /// another account is an `AlreadyExists` error.
    pub async fn create_bucket(&self, bucket: &str) -> Result<BucketCreated, S3Error> {
        check_bucket("CreateBucket", bucket)?;
        let existed = match self.bucket_exists(bucket).await {
            Ok(e) => e,
            // Someone else's bucket, most likely: CreateBucket says which.
            Err(e) if e.kind == S3ErrorKind::PermissionDenied => false,
            Err(e) => return Err(e),
        };
        let what = op("CreateBucket", bucket, "");
        let mut req = self.inner.create_bucket().bucket(bucket);
        if self.region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) if existed => Ok(BucketCreated::AlreadyOwned),
            Ok(_) => Ok(BucketCreated::Created),
            Err(e) if code_of(&e) == Some("BucketAlreadyOwnedByYou") => {
                Ok(BucketCreated::AlreadyOwned)
            }
            Err(e) => Err(sdk_error(&what, e)),
        }
    }

    /// Whether `bucket` exists and these credentials may access it. A
    /// bucket that exists but is not accessible (or wrong credentials) is a
    /// `PermissionDenied` error, not `false`.
    pub async fn bucket_exists(&self, bucket: &str) -> Result<bool, S3Error> {
        check_bucket("HeadBucket", bucket)?;
        match self.inner.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let err = sdk_error(&op("HeadBucket", bucket, ""), e);
                if err.kind == S3ErrorKind::NotFound {
                    Ok(false)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Deletes the (empty) `bucket`. Idempotent: a missing bucket is Ok. A
    /// bucket that still holds objects is a `NotEmpty` error: empty it with
    /// `delete_prefix(bucket, "")` first.
    pub async fn delete_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        check_bucket("DeleteBucket", bucket)?;
        match self.inner.delete_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = sdk_error(&op("DeleteBucket", bucket, ""), e);
                if err.kind == S3ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Writes a (small) object, replacing any object at `key`.
    pub async fn put_object(&self, bucket: &str, key: &str, data: Vec<u8>) -> Result<(), S3Error> {
        check_bucket("PutObject", bucket)?;
        check_key("PutObject", key)?;
        self.inner
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(data))
            .send()
            .await
            .map(drop)
            .map_err(|e| sdk_error(&op("PutObject", bucket, key), e))
    }

    /// Reads a small object: None when there is no object at `key`; a
    /// missing bucket is a `NotFound` error; an object larger than
    /// [`MAX_METADATA_OBJECT`] is refused.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        check_bucket("GetObject", bucket)?;
        check_key("GetObject", key)?;
        let what = op("GetObject", bucket, key);
        let out = match self.inner.get_object().bucket(bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) if code_of(&e) == Some("NoSuchKey") => return Ok(None),
            Err(e) => return Err(sdk_error(&what, e)),
        };
        let len = out.content_length().unwrap_or(0).max(0) as u64;
        if len > MAX_METADATA_OBJECT {
            return Err(S3Error::invalid(format!(
                "{what}: {len} bytes, more than the {MAX_METADATA_OBJECT} a metadata object may have"
            )));
        }
        let body = out.body.collect().await.map_err(|e| {
            S3Error::new(
                S3ErrorKind::Unavailable,
                format!("{what}: reading the body: {}", DisplayErrorContext(&e)),
            )
        })?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// Lists every object under `prefix`, one page (≤ 1000) at a time,
    /// calling `page` with each.
    async fn list_pages(
        &self,
        name: &'static str,
        bucket: &str,
        prefix: &str,
        mut page: impl AsyncFnMut(Vec<Listed>) -> Result<(), S3Error>,
    ) -> Result<(), S3Error> {
        let what = op(name, bucket, prefix);
        let mut token: Option<String> = None;
        loop {
            let mut req = self.inner.list_objects_v2().bucket(bucket).max_keys(PAGE);
            if !prefix.is_empty() {
                req = req.prefix(prefix);
            }
            if let Some(t) = token.take() {
                req = req.continuation_token(t);
            }
            let out = req.send().await.map_err(|e| sdk_error(&what, e))?;
            let items = out
                .contents()
                .iter()
                .filter_map(|o| {
                    Some(Listed {
                        key: o.key()?.to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: trim_etag(o.e_tag()),
                        modified: o.last_modified().copied(),
                    })
                })
                .collect();
            page(items).await?;
            match (out.is_truncated(), out.next_continuation_token()) {
                (Some(true), Some(t)) if !t.is_empty() => token = Some(t.to_owned()),
                (Some(true), _) => {
                    return Err(S3Error::new(
                        S3ErrorKind::Other,
                        format!("{what}: truncated listing without a continuation token"),
                    ));
                }
                _ => return Ok(()),
            }
        }
    }

    async fn list_all(
        &self,
        name: &'static str,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<Listed>, S3Error> {
        let mut all = Vec::new();
        self.list_pages(name, bucket, prefix, async |items| {
            all.extend(items);
            Ok(())
        })
        .await?;
        Ok(all)
    }

    /// The multipart uploads under `prefix` (the whole bucket for "")
    /// that were neither completed nor aborted: (key, upload id).
    async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        let what = op("ListMultipartUploads", bucket, prefix);
        let mut out = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let mut req = self.inner.list_multipart_uploads().bucket(bucket);
            if !prefix.is_empty() {
                req = req.prefix(prefix);
            }
            let page = req
                .set_key_marker(markers.0.take())
                .set_upload_id_marker(markers.1.take())
                .send()
                .await
                .map_err(|e| sdk_error(&what, e))?;
            out.extend(
                page.uploads()
                    .iter()
                    .filter_map(|u| Some((u.key()?.to_owned(), u.upload_id()?.to_owned()))),
            );
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            let next = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            if next.0.is_none() && next.1.is_none() {
                return Err(S3Error::new(
                    S3ErrorKind::Other,
                    format!("{what}: truncated listing without markers"),
                ));
            }
            markers = next;
        }
    }

    /// How many multipart uploads under `prefix` (the whole bucket for "")
    /// are still open (neither completed nor aborted).
    pub async fn incomplete_uploads(&self, bucket: &str, prefix: &str) -> Result<u64, S3Error> {
        check_bucket("ListMultipartUploads", bucket)?;
        check_prefix("ListMultipartUploads", prefix)?;
        Ok(self.list_uploads(bucket, prefix).await?.len() as u64)
    }

    /// Deletes every object under `prefix` (the whole bucket for ""), a
    /// listed page at a time with DeleteObjects, and aborts the multipart
    /// uploads left open there (by a copy that was killed, say), whose
    /// parts would otherwise keep using space; returns how many objects it
    /// deleted. Idempotent: nothing to delete, or no bucket, is Ok(0).
    pub async fn delete_prefix(&self, bucket: &str, prefix: &str) -> Result<u64, S3Error> {
        check_bucket("DeleteObjects", bucket)?;
        check_prefix("DeleteObjects", prefix)?;
        let deleted = self.delete_objects_under(bucket, prefix).await?;
        let uploads = match self.list_uploads(bucket, prefix).await {
            Ok(u) => u,
            Err(e) if e.kind == S3ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for (key, id) in uploads {
            let what = op("AbortMultipartUpload", bucket, &key);
            match self
                .inner
                .abort_multipart_upload()
                .bucket(bucket)
                .key(&key)
                .upload_id(id)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    let err = sdk_error(&what, e);
                    if err.kind != S3ErrorKind::NotFound {
                        return Err(err);
                    }
                }
            }
        }
        Ok(deleted)
    }

    async fn delete_objects_under(&self, bucket: &str, prefix: &str) -> Result<u64, S3Error> {
        let what = op("DeleteObjects", bucket, prefix);
        let mut deleted = 0u64;
        let listed = self
            .list_pages("ListObjectsV2", bucket, prefix, async |items| {
                if items.is_empty() {
                    return Ok(());
                }
                let keys: Vec<&str> = items.iter().map(|o| o.key.as_str()).collect();
                self.delete_keys(&what, bucket, keys).await?;
                deleted += items.len() as u64;
                Ok(())
            })
            .await;
        match listed {
            Ok(()) => Ok(deleted),
            Err(e) if e.kind == S3ErrorKind::NotFound && deleted == 0 => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Deletes `keys` (at most a page) with DeleteObjects. A store that
    /// answers 200 but names keys it could not delete for a passing reason
    /// (ServiceUnavailable, SlowDown, InternalError: Garage under load
    /// answers "database is locked" this way) gets those keys again, up to
    /// [`MAX_ATTEMPTS`] requests with backoff: the SDK's own retries only
    /// see whole failed requests. Any other key error ends it at once.
    async fn delete_keys(
        &self,
        what: &Op<'_>,
        bucket: &str,
        keys: Vec<&str>,
    ) -> Result<(), S3Error> {
        let total = keys.len();
        let mut pending = keys;
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ids = pending
                .iter()
                .map(|k| ObjectIdentifier::builder().key(*k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| S3Error::invalid(format!("{what}: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| S3Error::invalid(format!("{what}: {e}")))?;
            let out = self
                .inner
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| sdk_error(what, e))?;
            let Some(first) = out.errors().first() else {
                return Ok(());
            };
            let passing = out
                .errors()
                .iter()
                .all(|e| classify(e.code(), None) == S3ErrorKind::Unavailable);
            if !passing || attempt == MAX_ATTEMPTS {
                let code = first.code();
                return Err(S3Error::new(
                    classify(code, None).max_unavailable(),
                    format!(
                        "{what}: {} of {total} objects not deleted after {attempt} \
                         request(s), first {:?}: {} {}",
                        out.errors().len(),
                        first.key().unwrap_or(""),
                        code.unwrap_or("no error code"),
                        first.message().unwrap_or(""),
                    ),
                ));
            }
            let failed: std::collections::HashSet<&str> =
                out.errors().iter().filter_map(|e| e.key()).collect();
            pending.retain(|k| failed.contains(k));
            if pending.is_empty() {
                // Errors naming none of the keys sent: nothing to send
                // again, and the store said it did not delete them all.
                return Err(S3Error::new(
                    S3ErrorKind::Unavailable,
                    format!("{what}: the store reported errors naming no key"),
                ));
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    /// How many objects and bytes are under `prefix` (the whole bucket for
    /// ""), by listing. A missing bucket is a `NotFound` error.
    pub async fn usage(&self, bucket: &str, prefix: &str) -> Result<(u64, u64), S3Error> {
        check_bucket("ListObjectsV2", bucket)?;
        check_prefix("ListObjectsV2", prefix)?;
        let (mut objects, mut bytes) = (0u64, 0u64);
        self.list_pages("ListObjectsV2", bucket, prefix, async |items| {
            objects += items.len() as u64;
            bytes += items.iter().map(|o| o.size).sum::<u64>();
            Ok(())
        })
        .await?;
        Ok((objects, bytes))
    }

    /// Copies every object under `src_prefix` of `src_bucket` to the same
    /// relative key under `dst_prefix` of `dst_bucket`, server-side:
    /// CopyObject, or for objects above `multipart_threshold` a multipart
    /// upload of UploadPartCopy ranges (aborted on failure or cancel). Up
    /// to `concurrency` requests in flight.
    ///
    /// Resumable: a destination object of the same size with the same ETag,
    /// or written no earlier than the source's last change, is skipped (see
    /// `already_copied`), so running it again after a failure or a cancel
    /// copies only what is missing. It never deletes: destination objects
    /// that have no source stay. Source and destination must not overlap.
    /// The source is listed once at the start; objects added later are not
    /// copied, and an object changed during its multipart copy fails it
    /// (the parts are pinned to the ETag listed).
    pub async fn copy_prefix(
        &self,
        src_bucket: &str,
        src_prefix: &str,
        dst_bucket: &str,
        dst_prefix: &str,
        options: &CopyOptions,
    ) -> Result<CopyStats, S3Error> {
        check_bucket("CopyObject", src_bucket)?;
        check_bucket("CopyObject", dst_bucket)?;
        check_prefix("CopyObject", src_prefix)?;
        check_prefix("CopyObject", dst_prefix)?;
        if src_bucket == dst_bucket
            && (src_prefix.starts_with(dst_prefix) || dst_prefix.starts_with(src_prefix))
        {
            return Err(S3Error::invalid(format!(
                "S3 copy: {src_prefix:?} and {dst_prefix:?} overlap in bucket {src_bucket:?}"
            )));
        }
        let stop = Stop {
            user: options.cancel.clone(),
            failed: Arc::new(AtomicBool::new(false)),
        };
        let what = op("copy", src_bucket, src_prefix);
        let sources = stop
            .run(
                &what,
                self.list_all("ListObjectsV2", src_bucket, src_prefix),
            )
            .await?;
        let existing: HashMap<String, Listed> = stop
            .run(
                &what,
                self.list_all("ListObjectsV2", dst_bucket, dst_prefix),
            )
            .await?
            .into_iter()
            .filter_map(|o| Some((o.key.strip_prefix(dst_prefix)?.to_owned(), o)))
            .collect();

        let mut progress = CopyProgress {
            objects_total: sources.len() as u64,
            bytes_total: sources.iter().map(|o| o.size).sum(),
            ..Default::default()
        };
        let mut stats = CopyStats::default();
        let report = |p: &CopyProgress| {
            if let Some(f) = &options.progress {
                f(*p);
            }
        };
        let mut todo = Vec::new();
        for src in sources {
            let rel = src.key[src_prefix.len()..].to_owned();
            if existing.get(&rel).is_some_and(|d| already_copied(&src, d)) {
                stats.skipped += 1;
                progress.objects_done += 1;
                progress.bytes_done += src.size;
            } else {
                todo.push((src, format!("{dst_prefix}{rel}")));
            }
        }
        report(&progress);

        let threshold = options.multipart_threshold.min(MAX_SINGLE_COPY);
        let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
        let (part_tx, mut part_rx) = mpsc::unbounded_channel::<u64>();
        let mut tasks: JoinSet<Result<ObjectCopied, S3Error>> = JoinSet::new();
        let mut todo = todo.into_iter().peekable();
        let mut first_error: Option<S3Error> = None;
        loop {
            if first_error.is_none() && stop.is_set() {
                first_error = Some(S3Error::cancelled(&what));
            }
            if first_error.is_some() {
                stop.failed.store(true, Ordering::Relaxed);
            }
            let more = first_error.is_none() && todo.peek().is_some();
            if !more && tasks.is_empty() {
                break;
            }
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        Ok(Ok(c)) => {
                            stats.copied += 1;
                            stats.bytes_copied += c.size;
                            stats.multipart += u64::from(c.multipart);
                            progress.objects_done += 1;
                            if !c.multipart {
                                progress.bytes_done += c.size;
                            }
                            report(&progress);
                        }
                        Ok(Err(e)) => {
                            // The first real error wins over the cancels it causes.
                            if first_error.as_ref().is_none_or(|f| {
                                f.kind == S3ErrorKind::Cancelled && e.kind != S3ErrorKind::Cancelled
                                    && !options.cancel.load(Ordering::Relaxed)
                            }) {
                                first_error = Some(e);
                            }
                        }
                        Err(join) => {
                            first_error.get_or_insert(S3Error::new(
                                S3ErrorKind::Other,
                                format!("{what}: a copy task failed: {join}"),
                            ));
                        }
                    }
                }
                Some(bytes) = part_rx.recv() => {
                    progress.bytes_done += bytes;
                    report(&progress);
                }
                permit = permits.clone().acquire_owned(), if more => {
                    let permit = permit.expect("the semaphore is never closed");
                    let (src, dst_key) = todo.next().expect("peeked");
                    let job = CopyJob {
                        client: self.clone(),
                        src_bucket: src_bucket.to_owned(),
                        dst_bucket: dst_bucket.to_owned(),
                        src,
                        dst_key,
                        part_size: options.part_size,
                        stop: stop.clone(),
                        permits: permits.clone(),
                        parts_done: part_tx.clone(),
                    };
                    if job.src.size > threshold {
                        tasks.spawn(job.multipart(permit));
                    } else {
                        tasks.spawn(job.single(permit));
                    }
                }
                () = tokio::time::sleep(CANCEL_POLL) => {}
            }
        }
        // Parts of a multipart copy that finished before its completion.
        while let Ok(bytes) = part_rx.try_recv() {
            progress.bytes_done += bytes;
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                report(&progress);
                Ok(stats)
            }
        }
    }
}

/// One copied object, as its task reports it.
struct ObjectCopied {
    size: u64,
    multipart: bool,
}

/// Everything a task needs to copy one object.
struct CopyJob {
    client: S3Client,
    src_bucket: String,
    dst_bucket: String,
    src: Listed,
    dst_key: String,
    part_size: u64,
    stop: Stop,
    permits: Arc<Semaphore>,
    parts_done: mpsc::UnboundedSender<u64>,
}

impl CopyJob {
    /// CopyObject, holding `permit` for the request.
    async fn single(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<ObjectCopied, S3Error> {
        let what = op("CopyObject", &self.dst_bucket, &self.dst_key);
        let s3 = &self.client.inner;
        self.stop
            .run(&what, async {
                s3.copy_object()
                    .bucket(&self.dst_bucket)
                    .key(&self.dst_key)
                    .copy_source(copy_source(&self.src_bucket, &self.src.key))
                    .send()
                    .await
                    .map_err(|e| sdk_error(&what, e))
            })
            .await?;
        drop(permit);
        Ok(ObjectCopied {
            size: self.src.size,
            multipart: false,
        })
    }

    /// CreateMultipartUpload (with the source's headers and metadata),
    /// UploadPartCopy of every range, each holding a permit (never one
    /// while waiting for another, so parts cannot deadlock), then
    /// CompleteMultipartUpload; AbortMultipartUpload on any failure.
    async fn multipart(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<ObjectCopied, S3Error> {
        let job = Arc::new(self);
        let what = op("CreateMultipartUpload", &job.dst_bucket, &job.dst_key);
        let s3 = &job.client.inner;
        let source = copy_source(&job.src_bucket, &job.src.key);
        let head = job
            .stop
            .run(&what, async {
                s3.head_object()
                    .bucket(&job.src_bucket)
                    .key(&job.src.key)
                    .send()
                    .await
                    .map_err(|e| sdk_error(&op("HeadObject", &job.src_bucket, &job.src.key), e))
            })
            .await?;
        let created = job
            .stop
            .run(&what, async {
                s3.create_multipart_upload()
                    .bucket(&job.dst_bucket)
                    .key(&job.dst_key)
                    .set_content_type(head.content_type().map(str::to_owned))
                    .set_content_encoding(head.content_encoding().map(str::to_owned))
                    .set_content_disposition(head.content_disposition().map(str::to_owned))
                    .set_content_language(head.content_language().map(str::to_owned))
                    .set_cache_control(head.cache_control().map(str::to_owned))
                    .set_metadata(head.metadata().cloned())
                    .send()
                    .await
                    .map_err(|e| sdk_error(&what, e))
            })
            .await?;
        drop(permit);
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(S3Error::new(
                S3ErrorKind::Other,
                format!("{what}: no upload id in the answer"),
            ));
        };
        let result = job.clone().copy_parts(&source, &upload_id).await;
        if result.is_err() {
            // Best effort, and not cancellable: it releases the parts.
            let _ = s3
                .abort_multipart_upload()
                .bucket(&job.dst_bucket)
                .key(&job.dst_key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result.map(|()| ObjectCopied {
            size: job.src.size,
            multipart: true,
        })
    }

    async fn copy_parts(self: Arc<Self>, source: &str, upload_id: &str) -> Result<(), S3Error> {
        let size = self.src.size;
        let part = part_size_for(size, self.part_size);
        let mut parts: JoinSet<Result<CompletedPart, S3Error>> = JoinSet::new();
        let mut number = 0i32;
        let mut start = 0u64;
        while start < size {
            let end = (start + part).min(size) - 1;
            number += 1;
            let job = self.clone();
            let (source, upload_id) = (source.to_owned(), upload_id.to_owned());
            let n = number;
            parts.spawn(async move {
                let what = op("UploadPartCopy", &job.dst_bucket, &job.dst_key);
                let permit = job
                    .stop
                    .run(&what, async {
                        Ok(job
                            .permits
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("never closed"))
                    })
                    .await?;
                let mut req = job
                    .client
                    .inner
                    .upload_part_copy()
                    .bucket(&job.dst_bucket)
                    .key(&job.dst_key)
                    .upload_id(upload_id)
                    .part_number(n)
                    .copy_source(source)
                    .copy_source_range(format!("bytes={start}-{end}"));
                if !job.src.etag.is_empty() {
                    req = req.copy_source_if_match(format!("\"{}\"", job.src.etag));
                }
                let out = job
                    .stop
                    .run(&what, async {
                        req.send().await.map_err(|e| sdk_error(&what, e))
                    })
                    .await?;
                drop(permit);
                let etag = out
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .ok_or_else(|| {
                        S3Error::new(S3ErrorKind::Other, format!("{what}: part {n}: no ETag"))
                    })?
                    .to_owned();
                let _ = job.parts_done.send(end + 1 - start);
                Ok(CompletedPart::builder().part_number(n).e_tag(etag).build())
            });
            start = end + 1;
        }
        let mut done = Vec::with_capacity(number as usize);
        let mut first_error = None;
        while let Some(r) = parts.join_next().await {
            match r {
                Ok(Ok(p)) => done.push(p),
                Ok(Err(e)) => {
                    self.stop.failed.store(true, Ordering::Relaxed);
                    if first_error
                        .as_ref()
                        .is_none_or(|f: &S3Error| f.kind == S3ErrorKind::Cancelled)
                    {
                        first_error = Some(e);
                    }
                }
                Err(join) => {
                    self.stop.failed.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(S3Error::new(
                        S3ErrorKind::Other,
                        format!("UploadPartCopy {:?}: task failed: {join}", self.dst_key),
                    ));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        done.sort_by_key(|p| p.part_number());
        let what = op("CompleteMultipartUpload", &self.dst_bucket, &self.dst_key);
        let permit = self
            .stop
            .run(&what, async {
                Ok(self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed"))
            })
            .await?;
        self.stop
            .run(&what, async {
                self.client
                    .inner
                    .complete_multipart_upload()
                    .bucket(&self.dst_bucket)
                    .key(&self.dst_key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(done))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| sdk_error(&what, e))
            })
            .await?;
        drop(permit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_the_s3_rules() {
        for ok in [
            "abc",
            "my-bucket",
            "my.bucket.name",
            "a1b2c3",
            "123bucket",
            "pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            &"a".repeat(63),
        ] {
            assert!(valid_bucket_name(ok), "{ok:?} should be valid");
        }
        for bad in [
            "",
            "ab",
            &"a".repeat(64),
            "MyBucket",
            "my_bucket",
            "-bucket",
            "bucket-",
            ".bucket",
            "bucket.",
            "my..bucket",
            "my.-bucket",
            "my-.bucket",
            "192.168.5.4",
            "10.0.0.1",
            "xn--bucket",
            "sthree-bucket",
            "bucket-s3alias",
            "bucket--ol-s3",
            "bück",
            "my bucket",
            "bucket/x",
        ] {
            assert!(!valid_bucket_name(bad), "{bad:?} should be invalid");
        }
        // Looks numeric but is not an IPv4 address.
        assert!(valid_bucket_name("1.2.3"));
        assert!(valid_bucket_name("1.2.3.4.5"));
    }

    #[test]
    fn prefixes_are_relative_clean_and_end_with_a_slash() {
        for ok in ["a/", "vol-1/", "tenants/a/vol-1/", "a b/", "ünïcode/"] {
            assert!(valid_prefix(ok), "{ok:?} should be valid");
        }
        let long_ok = format!("{}/", "a".repeat(MAX_PREFIX - 1));
        assert!(valid_prefix(&long_ok));
        let too_long = format!("{}/", "a".repeat(MAX_PREFIX));
        for bad in [
            "",
            "/",
            "a",
            "/a/",
            "a//",
            "a//b/",
            "./",
            "a/./",
            "../",
            "a/../b/",
            "a/..",
            "a\n/",
            "a\0/",
            "a\u{7f}/",
            too_long.as_str(),
        ] {
            assert!(!valid_prefix(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn error_codes_and_statuses_map_to_kinds() {
        use S3ErrorKind::*;
        let cases: &[(Option<&str>, Option<u16>, S3ErrorKind)] = &[
            (Some("AccessDenied"), Some(403), PermissionDenied),
            (Some("InvalidAccessKeyId"), Some(403), PermissionDenied),
            (Some("SignatureDoesNotMatch"), Some(403), PermissionDenied),
            (None, Some(403), PermissionDenied),
            (None, Some(401), PermissionDenied),
            (Some("SlowDown"), Some(503), Unavailable),
            (None, Some(503), Unavailable),
            (Some("InternalError"), Some(500), Unavailable),
            (None, Some(502), Unavailable),
            (None, Some(429), Unavailable),
            (Some("BucketAlreadyExists"), Some(409), AlreadyExists),
            (Some("NoSuchBucket"), Some(404), NotFound),
            (Some("NoSuchKey"), Some(404), NotFound),
            (None, Some(404), NotFound),
            (Some("BucketNotEmpty"), Some(409), NotEmpty),
            (Some("InvalidBucketName"), Some(400), InvalidArgument),
            (None, Some(400), InvalidArgument),
            (Some("SomethingNew"), Some(418), Other),
            (None, None, Other),
            // The code wins over a surprising status.
            (Some("AccessDenied"), Some(400), PermissionDenied),
            (Some("NoSuchBucket"), Some(400), NotFound),
        ];
        for &(code, status, kind) in cases {
            assert_eq!(classify(code, status), kind, "{code:?} {status:?}");
        }
    }

    #[test]
    fn endpoints_are_plain_http_urls() {
        let cfg = |e: &str| S3Config {
            endpoint: e.into(),
            region: "garage".into(),
        };
        for ok in [
            "http://127.0.0.1:3900",
            "https://s3.example.com",
            "https://s3.example.com/",
            "http://[::1]:9000",
            "https://gw.example.com/s3",
        ] {
            assert!(cfg(ok).validate().is_ok(), "{ok:?} should be valid");
        }
        for bad in [
            "",
            "127.0.0.1:3900",
            "ftp://host",
            "file:///etc/passwd",
            "http://user:pass@host",
            "http://user@host",
            "http://host/?x=1",
            "http://host/#frag",
            "http://host /",
            "http://",
        ] {
            let err = cfg(bad).validate().unwrap_err();
            assert_eq!(err.kind, S3ErrorKind::InvalidArgument, "{bad:?}");
            assert!(!err.message.contains("pass@"), "{}", err.message);
        }
        for bad_region in ["", "a b", "x/y", &"r".repeat(65)] {
            let c = S3Config {
                endpoint: "http://h".into(),
                region: bad_region.into(),
            };
            assert!(c.validate().is_err(), "{bad_region:?}");
        }
    }

    #[test]
    fn credentials_never_show_the_secret() {
        let c = Credentials {
            access_key_id: "GKabc".into(),
            secret_access_key: "s3cr3t-value".into(),
        };
        for shown in [format!("{c:?}"), format!("{c}"), format!("{c:#?}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains("GKabc"), "{shown}");
        }
    }

    #[test]
    fn a_client_never_shows_its_secret() {
        let c = S3Client::new(
            &S3Config {
                endpoint: "http://127.0.0.1:9".into(),
                region: "garage".into(),
            },
            Credentials {
                access_key_id: "GKabc".into(),
                secret_access_key: "s3cr3t-value".into(),
            },
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let err = S3Client::new(
            &S3Config {
                endpoint: "http://GKabc:s3cr3t-value@host".into(),
                region: "garage".into(),
            },
            Credentials {
                access_key_id: "GKabc".into(),
                secret_access_key: "x".into(),
            },
        )
        .unwrap_err();
        assert_eq!(err.kind, S3ErrorKind::InvalidArgument);
        assert!(!err.message.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn copy_source_encodes_the_key_but_keeps_slashes() {
        assert_eq!(copy_source("b", "a/b c/d+e"), "b/a/b%20c/d%2Be");
        assert_eq!(copy_source("b", "ü?#%"), "b/%C3%BC%3F%23%25");
        assert_eq!(copy_source("b", "x-y_z.~/"), "b/x-y_z.~/");
    }

    #[test]
    fn part_size_respects_the_minimum_and_the_part_limit() {
        assert_eq!(part_size_for(100 << 20, 1), MIN_PART_SIZE);
        assert_eq!(part_size_for(100 << 20, 64 << 20), 64 << 20);
        let huge = 5u64 << 40; // 5 TiB: needs parts above 500 MiB.
        let p = part_size_for(huge, 64 << 20);
        assert!(huge.div_ceil(p) <= MAX_PARTS);
        assert!(p >= 64 << 20);
    }

    #[test]
    fn resume_skips_only_objects_that_match() {
        let t = |s: i64| Some(DateTime::from_secs(s));
        let src = Listed {
            key: "a/x".into(),
            size: 10,
            etag: "e1".into(),
            modified: t(100),
        };
        let same_etag = Listed {
            etag: "e1".into(),
            modified: t(50),
            ..src.clone()
        };
        let newer = Listed {
            etag: "mp-2".into(),
            modified: t(100),
            ..src.clone()
        };
        let older = Listed {
            etag: "mp-2".into(),
            modified: t(99),
            ..src.clone()
        };
        let other_size = Listed {
            size: 11,
            ..same_etag.clone()
        };
        assert!(already_copied(&src, &same_etag));
        assert!(already_copied(&src, &newer));
        assert!(!already_copied(&src, &older));
        assert!(!already_copied(&src, &other_size));
        let undated = Listed {
            etag: "mp-2".into(),
            modified: None,
            ..src.clone()
        };
        assert!(!already_copied(&src, &undated));
    }

    /// A one-thread HTTP/1.1 answerer for DeleteObjects: it answers the
    /// n-th request with the n-th body of `script` (200, XML) and closes
    /// the connection; the bodies it was sent come back from the join.
    fn scripted_store(script: Vec<&'static str>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in script {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen.push(String::from_utf8(body).unwrap());
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .unwrap();
            }
            seen
        });
        (endpoint, handle)
    }

    fn client_of(endpoint: String) -> S3Client {
        let config = S3Config {
            endpoint,
            region: "garage".into(),
        };
        let credentials = Credentials {
            access_key_id: "GK0000".into(),
            secret_access_key: "secret".into(),
        };
        S3Client::new(&config, credentials).unwrap()
    }

    const KEY_LOCKED: &str = "<DeleteResult><Error><Key>b</Key><Code>ServiceUnavailable</Code>\
        <Message>database is locked</Message></Error></DeleteResult>";
    const ALL_DELETED: &str = "<DeleteResult></DeleteResult>";

    /// Deletes `keys` from bucket "bkt" of a store answering DeleteObjects
    /// from `script`: the result, and the request bodies the store got.
    async fn delete_scripted(
        script: Vec<&'static str>,
        keys: Vec<&str>,
    ) -> (Result<(), S3Error>, Vec<String>) {
        let (endpoint, store) = scripted_store(script);
        let result = client_of(endpoint)
            .delete_keys(&op("DeleteObjects", "bkt", ""), "bkt", keys)
            .await;
        (result, store.join().unwrap())
    }

    #[tokio::test]
    async fn keys_the_store_could_not_delete_for_now_are_sent_again_alone() {
        let (result, seen) = delete_scripted(vec![KEY_LOCKED, ALL_DELETED], vec!["a", "b"]).await;
        result.unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].contains("<Key>a</Key>") && seen[0].contains("<Key>b</Key>"));
        assert!(seen[1].contains("<Key>b</Key>"), "{}", seen[1]);
        assert!(!seen[1].contains("<Key>a</Key>"), "{}", seen[1]);
    }

    #[tokio::test]
    async fn keys_refused_for_good_or_too_often_end_the_delete_with_their_code() {
        let denied = "<DeleteResult><Error><Key>a</Key><Code>AccessDenied</Code>\
            <Message>no</Message></Error></DeleteResult>";
        let (result, seen) = delete_scripted(vec![denied], vec!["a"]).await;
        let err = result.unwrap_err();
        assert_eq!(err.kind, S3ErrorKind::PermissionDenied, "{err}");
        assert_eq!(seen.len(), 1);

        let script = vec![KEY_LOCKED; MAX_ATTEMPTS as usize];
        let (result, seen) = delete_scripted(script, vec!["a", "b"]).await;
        let err = result.unwrap_err();
        assert_eq!(err.kind, S3ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("database is locked"), "{err}");
        assert_eq!(seen.len(), MAX_ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn passing_errors_that_name_no_key_sent_end_the_delete_unavailable() {
        // One error names a key that was not sent, one names none: there is
        // nothing to send again, and the store said not all were deleted.
        let stray = "<DeleteResult><Error><Key>zz</Key><Code>SlowDown</Code>\
            <Message>later</Message></Error><Error><Code>ServiceUnavailable</Code>\
            <Message>busy</Message></Error></DeleteResult>";
        let (result, seen) = delete_scripted(vec![stray], vec!["a", "b"]).await;
        let err = result.unwrap_err();
        assert_eq!(err.kind, S3ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("naming no key"), "{err}");
        assert_eq!(seen.len(), 1, "nothing is sent again");
    }
}
