//! Object volumes: a bucket, or a prefix of a shared bucket, on any
//! S3-compatible store, mounted on nodes through a FUSE mounter.

pub mod mounter;
pub mod s3;
