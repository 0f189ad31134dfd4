//! Byte sizes as people write them (`1Gi`, `512Mi`, `4096`): the one parser,
//! shared with the headless reconciler's volumes file.

pub use stowage_sidecars::size::{SizeError, format_size, human_size, parse_size};
