//! Object volumes: a bucket, or a prefix of a shared bucket, on any
//! S3-compatible store, mounted on nodes through a FUSE mounter. The S3
//! service holds the data, so the volumes carry no node topology and every
//! access mode is served; capacity is recorded, not enforced.
//!
//! Where a volume lives is its [`Location`], kept in its `volume_context`
//! (endpoint, region, bucket, prefix: never credentials), so a node can
//! mount it with nothing but the context and the node-stage secrets.

pub mod mounter;
pub mod remote;
pub mod s3;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::profile::{Profile, SnapshotStrategy, StagingKind};
use super::{Attached, BackendError, Object, VolumeAttacher, VolumeStore};
use crate::volume::capability::{AccessType, Capability};
use crate::volume::{BackendKind, Uuid};

/// StorageClass keys of object volumes.
pub const PARAMETERS: [&str; 5] = ["endpoint", "region", "bucket", "mounter", "onDelete"];

/// The region used when the StorageClass names none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Secret keys holding the S3 credentials (provisioner secrets for the
/// controller, node-stage secrets for mounting).
pub const SECRET_ACCESS_KEY_ID: &str = "accessKeyID";
pub const SECRET_SECRET_ACCESS_KEY: &str = "secretAccessKey";

/// volume_context keys of an object volume's location.
pub const CTX_ENDPOINT: &str = "stowage.csi.dev/endpoint";
pub const CTX_REGION: &str = "stowage.csi.dev/region";
pub const CTX_BUCKET: &str = "stowage.csi.dev/bucket";
pub const CTX_PREFIX: &str = "stowage.csi.dev/prefix";
pub const CTX_MOUNTER: &str = "stowage.csi.dev/mounter";

/// Where the snapshots of volumes in a shared bucket are kept (no volume
/// prefix starts with a dot, so no volume's mount shows them).
pub const SNAPSHOT_PREFIX: &str = ".stowage-snapshots/";

/// volume_context key of the onDelete a ModifyVolume (or the mutable
/// parameters at creation) set, overriding the StorageClass's.
pub const CTX_ON_DELETE: &str = "stowage.csi.dev/on-delete";

/// The FUSE mounters stowage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MounterKind {
    S3fs,
}

impl MounterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MounterKind::S3fs => "s3fs",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "s3fs" => Some(MounterKind::S3fs),
            _ => None,
        }
    }
}

/// What DeleteVolume does with the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    Delete,
    Retain,
}

/// The validated StorageClass parameters of an object volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectParams {
    pub endpoint: String,
    pub region: String,
    /// A shared bucket (each volume a prefix in it); None: a bucket per
    /// volume.
    pub bucket: Option<String>,
    pub mounter: MounterKind,
    pub on_delete: OnDelete,
}

impl ObjectParams {
    /// Parses the object keys of a parameter map (other keys are the
    /// caller's to check).
    pub fn parse(map: &BTreeMap<String, String>) -> Result<Self, String> {
        let endpoint = map
            .get("endpoint")
            .ok_or("object volumes need the parameter \"endpoint\" (the S3 service's URL)")?;
        check_endpoint(endpoint).map_err(|r| format!("parameter endpoint={endpoint:?}: {r}"))?;
        let region = map
            .get("region")
            .cloned()
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        if region.is_empty()
            || region.len() > 63
            || !region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "parameter region={region:?}: 1-63 of [A-Za-z0-9._-]"
            ));
        }
        let bucket = match map.get("bucket") {
            None => None,
            Some(b) if valid_bucket_name(b) => Some(b.clone()),
            Some(b) => {
                return Err(format!(
                    "parameter bucket={b:?}: not a valid S3 bucket name (3-63 of [a-z0-9.-], \
                     starting and ending with a letter or digit)"
                ));
            }
        };
        let mounter = match map.get("mounter") {
            None => MounterKind::S3fs,
            Some(m) => MounterKind::parse(m)
                .ok_or_else(|| format!("parameter mounter={m:?}: expected \"s3fs\""))?,
        };
        let on_delete = match map.get("onDelete").map(String::as_str) {
            None | Some("delete") => OnDelete::Delete,
            Some("retain") => OnDelete::Retain,
            Some(o) => {
                return Err(format!(
                    "parameter onDelete={o:?}: expected \"delete\" or \"retain\""
                ));
            }
        };
        Ok(ObjectParams {
            endpoint: endpoint.clone(),
            region,
            bucket,
            mounter,
            on_delete,
        })
    }

    /// Where the volume `uuid` lives: its own bucket, or its prefix in the
    /// shared one.
    pub fn location(&self, uuid: crate::volume::Uuid) -> Location {
        let (bucket, prefix) = match &self.bucket {
            None => (format!("stowage-{}", uuid.to_hex()), String::new()),
            Some(b) => (b.clone(), format!("{}/", uuid.to_hex())),
        };
        Location {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket,
            prefix,
        }
    }
}

/// Checks an endpoint URL: http or https, a host, no credentials, query or
/// fragment.
fn check_endpoint(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("expected an http:// or https:// URL")?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err("the URL has no host");
    }
    if rest.contains(['@', '?', '#']) || url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("credentials, queries, fragments and spaces are not allowed in the URL");
    }
    if url.len() > 256 {
        return Err("longer than 256 bytes");
    }
    Ok(())
}

/// S3 bucket naming rules: 3-63 of lowercase letters, digits, '-' and
/// '.', starting and ending with a letter or digit, no "..", not shaped
/// like an IPv4 address.
pub fn valid_bucket_name(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !s.contains("..")
        && s.parse::<std::net::Ipv4Addr>().is_err()
}

/// Where an object volume or snapshot lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// "" for a whole bucket, else `<something>/`.
    pub prefix: String,
}

impl Location {
    /// Whether the location is a bucket of its own (removed with it).
    pub fn owns_bucket(&self) -> bool {
        self.prefix.is_empty()
    }

    /// Where a snapshot `uuid` of this volume is kept: a bucket of its own
    /// for a volume with its own bucket, a prefix of the shared bucket
    /// otherwise.
    pub fn snapshot(&self, uuid: crate::volume::Uuid) -> Location {
        let (bucket, prefix) = if self.owns_bucket() {
            (format!("stowage-snap-{}", uuid.to_hex()), String::new())
        } else {
            (
                self.bucket.clone(),
                format!("{SNAPSHOT_PREFIX}{}/", uuid.to_hex()),
            )
        };
        Location {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket,
            prefix,
        }
    }

    /// The location's volume_context entries.
    pub fn to_context(&self, mounter: MounterKind) -> BTreeMap<String, String> {
        BTreeMap::from([
            (CTX_ENDPOINT.to_owned(), self.endpoint.clone()),
            (CTX_REGION.to_owned(), self.region.clone()),
            (CTX_BUCKET.to_owned(), self.bucket.clone()),
            (CTX_PREFIX.to_owned(), self.prefix.clone()),
            (CTX_MOUNTER.to_owned(), mounter.as_str().to_owned()),
        ])
    }

    /// The location and mounter in a volume_context, validated as the
    /// parameters were (the context comes from the CO, so it is input).
    pub fn from_context(ctx: &BTreeMap<String, String>) -> Result<(Location, MounterKind), String> {
        let get = |k: &str| {
            ctx.get(k).cloned().ok_or_else(|| {
                format!("volume_context lacks {k:?} (not an object volume's context)")
            })
        };
        let endpoint = get(CTX_ENDPOINT)?;
        check_endpoint(&endpoint).map_err(|r| format!("{CTX_ENDPOINT}={endpoint:?}: {r}"))?;
        let bucket = get(CTX_BUCKET)?;
        if !valid_bucket_name(&bucket) {
            return Err(format!("{CTX_BUCKET}={bucket:?}: not a bucket name"));
        }
        let prefix = get(CTX_PREFIX)?;
        if !prefix.is_empty() && !valid_prefix(&prefix) {
            return Err(format!("{CTX_PREFIX}={prefix:?}: not a volume prefix"));
        }
        let mounter = get(CTX_MOUNTER)?;
        let mounter = MounterKind::parse(&mounter)
            .ok_or_else(|| format!("{CTX_MOUNTER}={mounter:?}: unknown mounter"))?;
        let region = get(CTX_REGION)?;
        Ok((
            Location {
                endpoint,
                region,
                bucket,
                prefix,
            },
            mounter,
        ))
    }
}

/// A prefix stowage made: segments of [A-Za-z0-9._-] (not "." or ".."),
/// each followed by '/'.
pub fn valid_prefix(p: &str) -> bool {
    p.len() <= 512
        && p.ends_with('/')
        && p[..p.len() - 1].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

pub use s3::Credentials;

/// The S3 credentials in a CSI secrets map; `which` names the secrets in
/// the error (e.g. "provisioner", "node-stage").
pub fn credentials_from_secrets(
    secrets: &BTreeMap<String, String>,
    which: &str,
) -> Result<Credentials, String> {
    let get = |k: &str| {
        secrets
            .get(k)
            .filter(|v| {
                !v.is_empty() && v.len() <= 1024 && !v.bytes().any(|b| b.is_ascii_control())
            })
            .cloned()
            .ok_or_else(|| {
                format!(
                    "object volumes need {which} secrets with {SECRET_ACCESS_KEY_ID:?} and \
                     {SECRET_SECRET_ACCESS_KEY:?} ({k:?} is missing or not a single line)"
                )
            })
    };
    Ok(Credentials {
        access_key_id: get(SECRET_ACCESS_KEY_ID)?,
        secret_access_key: get(SECRET_SECRET_ACCESS_KEY)?,
    })
}

/// The object backend's decisions.
#[derive(Debug)]
pub struct ObjectProfile;

impl Profile for ObjectProfile {
    fn kind(&self) -> BackendKind {
        BackendKind::Object
    }

    fn check_capability(&self, cap: &Capability) -> Result<(), String> {
        // Every access mode: the S3 service serves many nodes at once.
        match &cap.access_type {
            AccessType::Block => Err("object volumes cannot be used as raw block devices".into()),
            AccessType::Mount { fs_type, .. } => match fs_type.as_deref() {
                None | Some("") => Ok(()),
                Some(fs) => Err(format!(
                    "object volumes are buckets mounted through FUSE; fs_type {fs:?} cannot be chosen"
                )),
            },
        }
    }

    fn staging(&self) -> StagingKind {
        StagingKind::Fuse
    }

    fn snapshots(&self) -> SnapshotStrategy {
        SnapshotStrategy::ServerSideCopy
    }

    fn node_local(&self) -> bool {
        false
    }

    fn parameters(&self) -> &'static [&'static str] {
        &PARAMETERS
    }

    fn mutable_parameters(&self) -> &'static [&'static str] {
        &["onDelete"]
    }
}

/// The object backend as the pool-side traits see it: nothing of an object
/// volume is in the pool, so there is nothing to list, repair or attach
/// there. Creating, copying and deleting go to the S3 service, with the
/// request's credentials, through the controller's object path, never
/// through these pool calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct ObjectBackend;

fn remote_only(uuid: Uuid, what: &'static str) -> BackendError {
    BackendError::Io {
        backend: BackendKind::Object,
        uuid,
        what,
        path: std::path::PathBuf::from("<s3>"),
        err: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "object volumes live in the S3 service, not in the pool",
        ),
    }
}

impl VolumeStore for ObjectBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Object
    }

    fn round_size(&self, requested: u64) -> u64 {
        requested
    }

    fn create(&self, uuid: Uuid, _size: u64) -> Result<(), BackendError> {
        Err(remote_only(uuid, "create in the pool"))
    }

    fn delete(&self, _uuid: Uuid) -> Result<(), BackendError> {
        Ok(())
    }

    /// The store cannot be asked without credentials: the node reports a
    /// volume's condition from its mount.
    fn exists(&self, _uuid: Uuid) -> bool {
        true
    }

    fn repair(&self, _uuid: Uuid, _size: u64) -> Result<bool, BackendError> {
        Ok(false)
    }

    fn list(&self) -> Result<Vec<Uuid>, BackendError> {
        Ok(Vec::new())
    }

    fn list_snapshots(&self) -> Result<Vec<Uuid>, BackendError> {
        Ok(Vec::new())
    }

    fn snapshot_exists(&self, _uuid: Uuid) -> bool {
        true
    }

    fn copy(
        &self,
        _from: Object,
        to: Object,
        _progress: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), BackendError> {
        let (Object::Volume(u) | Object::Snapshot(u)) = to;
        Err(remote_only(u, "copy in the pool"))
    }

    fn delete_snapshot(&self, _uuid: Uuid) -> Result<(), BackendError> {
        Ok(())
    }

    /// Capacity is recorded, not enforced.
    fn expand(&self, _uuid: Uuid, _size: u64) -> Result<(), BackendError> {
        Ok(())
    }

    fn copies_are_constant_time(&self) -> bool {
        false
    }

    fn capacity_enforced(&self) -> bool {
        false
    }

    fn reserve(&self, uuid: Uuid) -> Result<bool, BackendError> {
        Err(remote_only(uuid, "reserve in the pool"))
    }
}

impl VolumeAttacher for ObjectBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Object
    }

    fn attach(&self, uuid: Uuid, _read_only: bool) -> Result<Attached, BackendError> {
        Err(remote_only(uuid, "attach from the pool"))
    }

    fn attached(&self, _uuid: Uuid) -> Result<Vec<Attached>, BackendError> {
        Ok(Vec::new())
    }

    fn detach(&self, _attached: &Attached) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_are_validated() {
        let p = ObjectParams::parse(&params(&[("endpoint", "http://127.0.0.1:3900")])).unwrap();
        assert_eq!(p.region, DEFAULT_REGION);
        assert_eq!(p.bucket, None);
        assert_eq!(p.on_delete, OnDelete::Delete);
        assert!(ObjectParams::parse(&params(&[])).is_err());
        for bad in [
            "ftp://x",
            "http://",
            "http://user:pw@host",
            "http://h/?a=b",
            "http://h x",
        ] {
            assert!(
                ObjectParams::parse(&params(&[("endpoint", bad)])).is_err(),
                "{bad}"
            );
        }
        let e = ("endpoint", "https://s3.example.com");
        for (k, v) in [
            ("bucket", "UPPER"),
            ("bucket", "a"),
            ("bucket", "192.168.1.1"),
            ("bucket", "a..b"),
            ("mounter", "goofys"),
            ("onDelete", "keep"),
            ("region", "bad region"),
        ] {
            assert!(
                ObjectParams::parse(&params(&[e, (k, v)])).is_err(),
                "{k}={v}"
            );
        }
        let p = ObjectParams::parse(&params(&[
            e,
            ("bucket", "shared-1"),
            ("onDelete", "retain"),
        ]))
        .unwrap();
        assert_eq!(p.on_delete, OnDelete::Retain);
        let u = crate::volume::Uuid::parse_hex(&"ab".repeat(16)).unwrap();
        let loc = p.location(u);
        assert_eq!(loc.bucket, "shared-1");
        assert_eq!(loc.prefix, format!("{}/", "ab".repeat(16)));
        assert!(!loc.owns_bucket());
        assert!(loc.snapshot(u).prefix.starts_with(SNAPSHOT_PREFIX));
    }

    #[test]
    fn bucket_per_volume_names_are_valid() {
        let p = ObjectParams::parse(&params(&[("endpoint", "http://h:1")])).unwrap();
        let u = crate::volume::Uuid::new_random();
        let loc = p.location(u);
        assert!(valid_bucket_name(&loc.bucket), "{}", loc.bucket);
        assert!(loc.owns_bucket());
        assert!(valid_bucket_name(&loc.snapshot(u).bucket));
    }

    #[test]
    fn context_round_trips_and_is_checked() {
        let p =
            ObjectParams::parse(&params(&[("endpoint", "http://h:1"), ("bucket", "b-1")])).unwrap();
        let loc = p.location(crate::volume::Uuid::new_random());
        let ctx = loc.to_context(MounterKind::S3fs);
        assert_eq!(
            Location::from_context(&ctx).unwrap(),
            (loc.clone(), MounterKind::S3fs)
        );
        for (k, v) in [
            (CTX_PREFIX, "../x/"),
            (CTX_PREFIX, "/abs/"),
            (CTX_BUCKET, "Bad"),
            (CTX_ENDPOINT, "file:///etc"),
        ] {
            let mut bad = ctx.clone();
            bad.insert(k.to_owned(), v.to_owned());
            assert!(Location::from_context(&bad).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn credentials_never_show_the_secret() {
        let c = credentials_from_secrets(
            &params(&[
                (SECRET_ACCESS_KEY_ID, "GK123"),
                (SECRET_SECRET_ACCESS_KEY, "very-secret-value"),
            ]),
            "node-stage",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("very-secret-value"));
        let e = credentials_from_secrets(&params(&[(SECRET_ACCESS_KEY_ID, "GK")]), "provisioner")
            .unwrap_err();
        assert!(e.contains("provisioner") && e.contains(SECRET_SECRET_ACCESS_KEY));
    }
}
