//! An unmount that meets EBUSY because another process holds a descriptor
//! on the mount for a moment (a child between fork and exec holds copies
//! of its parent's descriptors) tries again; a mount held open stays
//! refused. Real tmpfs mounts, a real holding process.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};

use common::*;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// A small tmpfs at `<scratch>/mnt` (unmounted by the scratch's drop if a
/// test fails first).
fn tmpfs(scratch: &Scratch) -> PathBuf {
    let mnt = scratch.root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs");
    mnt
}

/// `cat` with a file on the mount as its stdout: it holds that file until
/// its stdin (returned) is closed. Our own descriptor is closed at once.
fn holder(mnt: &Path) -> (KillOnDrop, ChildStdin) {
    let file = std::fs::File::create(mnt.join("held")).unwrap();
    let mut child = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let stdin = child.stdin.take().unwrap();
    (KillOnDrop(child), stdin)
}

#[test]
fn an_unmount_waits_out_a_holder_that_lets_go() {
    let scratch = Scratch::new("unmount-busy");
    let mnt = tmpfs(&scratch);
    let (mut cat, stdin) = holder(&mnt);
    let mut stdin = Some(stdin);
    let mut answers = Vec::new();
    let r = stowage::os::mount::while_busy(|| {
        let r = nix::mount::umount2(&mnt, MntFlags::UMOUNT_NOFOLLOW);
        answers.push(r);
        if r == Err(Errno::EBUSY) && stdin.take().is_some() {
            // The holder lets go: cat ends at the end of its input.
            cat.0.wait().expect("cat ends");
        }
        r
    });
    assert_eq!(r, Ok(()), "answers: {answers:?}");
    assert_eq!(
        answers,
        vec![Err(Errno::EBUSY), Ok(())],
        "busy while cat held the file, then unmounted"
    );
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_mount_held_open_is_still_refused() {
    let scratch = Scratch::new("unmount-held");
    let mnt = tmpfs(&scratch);
    let (_cat, _stdin) = holder(&mnt);
    match stowage::os::mount::unmount(&mnt) {
        Err(e) => assert_eq!(e.errno(), Some(Errno::EBUSY), "{e}"),
        Ok(()) => panic!("a mount a process holds open was unmounted"),
    }
    assert!(is_mounted(&mnt), "the refused mount must stay");
}
