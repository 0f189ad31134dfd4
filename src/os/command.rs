//! The one typed runner for external programs (mkfs, blkid, ...). Errors
//! carry the command line, the exit status and the program's stderr.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

/// An external program that could not be run or that failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {err}")]
    Spawn {
        program: String,
        #[source]
        err: std::io::Error,
    },
    #[error("{command} exited with {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

impl CommandError {
    /// The exit code of a program that ran and failed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            CommandError::Failed { status, .. } => status.code(),
            CommandError::Spawn { .. } => None,
        }
    }
}

/// Runs `program` with `args`, no stdin, capturing output. A non-zero exit
/// is an error carrying stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<Output, CommandError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    #[allow(clippy::disallowed_methods)] // this is the one place allowed to spawn
    let mut cmd = Command::new(program);
    cmd.args(&args).stdin(Stdio::null());
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl(2) and getppid(2), which are async-signal-safe. It ties
    // the child's life to ours: a killed server leaves no mkfs writing to a
    // device that a restarted server may hand out again. A server killed
    // between the fork and the prctl would not signal the child, so the
    // child checks that its parent is still the server (else it was
    // reparented) and gives up before running anything.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other(
                    "the server died before the program started",
                ));
            }
            Ok(())
        });
    }
    let output = cmd.output().map_err(|err| CommandError::Spawn {
        program: program.to_owned(),
        err,
    })?;
    if output.status.success() {
        return Ok(output);
    }
    let mut command = program.to_owned();
    for a in &args {
        command.push(' ');
        command.push_str(&a.to_string_lossy());
    }
    Err(CommandError::Failed {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}
