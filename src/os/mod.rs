//! Every syscall and external program the driver uses, behind small typed
//! wrappers. Nothing outside this module mounts, attaches loop devices or
//! spawns processes (clippy's `disallowed-methods` enforces it). Functions
//! here never decide policy: they do one step and report exactly which step
//! failed.

pub mod command;
pub mod cow;
pub mod filesystem;
pub mod freeze;
pub mod fs;
pub mod fuse_file;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod pool;
pub mod pool_image;
pub mod quota;
pub mod resize;
