//! The S3 calls object volumes need (filled in by the S3 layer work).
