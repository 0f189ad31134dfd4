//! `--secrets-file PATH`: the CSI `secrets` a command passes (an object
//! volume's S3 credentials, `accessKeyID` and `secretAccessKey`). Secrets
//! never go on the command line, where `ps` and shell history would show
//! them: they are read from a file of `KEY=VALUE` lines, `#` comments and
//! blank lines ignored, which must be a regular file readable by its owner
//! alone. They are never printed, logged, or written to the client's
//! records; an error about the file names its path and a line number,
//! never its contents.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The largest secrets file read: a few credentials, not a data file.
const MAX_LEN: u64 = 64 * 1024;

/// The flag, for the commands that pass secrets.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretsArgs {
    /// A file of KEY=VALUE lines passed as the call's CSI secrets (for
    /// object volumes: accessKeyID=… and secretAccessKey=…); `#` comments
    /// and blank lines are ignored. It must be a regular file readable by
    /// its owner only (chmod 600).
    #[arg(long, value_name = "PATH")]
    pub secrets_file: Option<PathBuf>,
}

impl SecretsArgs {
    /// The secrets in the file given, or none without `--secrets-file`.
    pub fn load(&self) -> Result<Secrets, SecretsError> {
        match &self.secrets_file {
            Some(path) => read(path),
            None => Ok(Secrets::default()),
        }
    }
}

/// CSI secrets, whose Debug shows only the keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    /// The map a CSI request's `secrets` field takes.
    pub fn to_csi(&self) -> HashMap<String, String> {
        self.0.clone().into_iter().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a secrets file was refused. No variant carries the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read the secrets file {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets file {} is not a regular file", .path.display())]
    NotRegular { path: PathBuf },
    #[error(
        "the secrets file {} may be read by group or others (mode {mode:04o}); \
         make it its owner's alone: chmod 600 {}",
        .path.display(), .path.display()
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error("the secrets file {} is larger than {MAX_LEN} bytes", .path.display())]
    TooLarge { path: PathBuf },
    #[error("the secrets file {} is not UTF-8 text", .path.display())]
    NotText { path: PathBuf },
    #[error("the secrets file {} holds no KEY=VALUE line", .path.display())]
    Empty { path: PathBuf },
    #[error("the secrets file {}: {error}", .path.display())]
    Line { path: PathBuf, error: LineError },
}

/// A line that is not `KEY=VALUE`, by number (from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error(
        "line {0} is not KEY=VALUE (KEY made of letters, digits, '.', '_' and '-'; \
         '#' starts a comment line)"
    )]
    Malformed(usize),
    #[error("line {0} repeats the key of an earlier line")]
    Repeated(usize),
}

/// Refuses what is not a regular file, or what group or others may read.
pub fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretsError> {
    if !meta.is_file() {
        return Err(SecretsError::NotRegular {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::Readable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads and parses the secrets file at `path` (a symlink is followed:
/// what it points at is checked).
pub fn read(path: &Path) -> Result<Secrets, SecretsError> {
    let io = |source| SecretsError::Io {
        path: path.to_owned(),
        source,
    };
    // Checked before opening, so that a FIFO is refused, not waited on,
    // and again on the open file, which is what is read.
    check_mode(path, &std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::File::open(path).map_err(io)?;
    check_mode(path, &file.metadata().map_err(io)?)?;
    let mut bytes = Vec::new();
    file.take(MAX_LEN + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_LEN {
        return Err(SecretsError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| SecretsError::NotText {
        path: path.to_owned(),
    })?;
    let secrets = parse(&text).map_err(|error| SecretsError::Line {
        path: path.to_owned(),
        error,
    })?;
    if secrets.is_empty() {
        return Err(SecretsError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(secrets)
}

/// Parses `KEY=VALUE` lines; blank lines and lines starting with `#`
/// (after spaces) are skipped. The value is everything after the first
/// `=`, kept as written (a trailing `\r` aside), so it may hold `=`, `#`
/// or spaces.
pub fn parse(text: &str) -> Result<Secrets, LineError> {
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(LineError::Malformed(n));
        };
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !key_ok {
            return Err(LineError::Malformed(n));
        }
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(LineError::Repeated(n));
        }
    }
    Ok(Secrets(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &Secrets) -> Vec<(&str, &str)> {
        s.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn parses_key_value_lines_skipping_comments_and_blanks() {
        let s = parse(
            "# S3 credentials\n\naccessKeyID=GK31c2\r\n  # indented comment\n\
             secretAccessKey=a=b#c d \n",
        )
        .unwrap();
        assert_eq!(
            map(&s),
            [("accessKeyID", "GK31c2"), ("secretAccessKey", "a=b#c d ")]
        );
        assert_eq!(parse("k=\n").unwrap().0["k"], "");
        assert!(parse("# nothing\n\n").unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_is_named_by_number_only() {
        let cases = [
            ("a=1\nsecretvalue\n", LineError::Malformed(2)),
            ("=hunter2\n", LineError::Malformed(1)),
            ("a=1\n\n key=hunter2\n", LineError::Malformed(3)),
            ("a b=hunter2\n", LineError::Malformed(1)),
            ("a=1\nb=2\na=hunter2\n", LineError::Repeated(3)),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e, want, "{text:?}");
            assert!(!e.to_string().contains("hunter2"));
            assert!(!e.to_string().contains("secretvalue"));
        }
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let s = parse("accessKeyID=GK1\nsecretAccessKey=hunter2\n").unwrap();
        let d = format!("{s:?}");
        assert!(d.contains("secretAccessKey"), "{d}");
        assert!(!d.contains("hunter2") && !d.contains("GK1"), "{d}");
    }

    fn write(dir: &Path, mode: u32, text: &str) -> PathBuf {
        let p = dir.join("creds");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn only_an_owner_only_regular_file_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), 0o600, "secretAccessKey=hunter2\n");
        assert_eq!(map(&read(&p).unwrap()), [("secretAccessKey", "hunter2")]);
        assert!(read(&write(d.path(), 0o400, "k=v\n")).is_ok());
        for mode in [0o640, 0o604, 0o660, 0o644, 0o610] {
            let p = write(d.path(), mode, "secretAccessKey=hunter2\n");
            let e = read(&p).unwrap_err();
            assert!(
                matches!(e, SecretsError::Readable { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            assert!(!e.to_string().contains("hunter2"));
        }
        let e = read(d.path()).unwrap_err();
        assert!(matches!(e, SecretsError::NotRegular { .. }), "{e}");
        let e = read(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, SecretsError::Io { .. }), "{e}");
    }

    #[test]
    fn a_file_of_comments_only_or_a_bad_line_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = read(&write(d.path(), 0o600, "# nothing yet\n")).unwrap_err();
        assert!(matches!(e, SecretsError::Empty { .. }), "{e}");
        let e = read(&write(d.path(), 0o600, "k=v\nhunter2\n")).unwrap_err();
        assert!(
            matches!(
                e,
                SecretsError::Line {
                    error: LineError::Malformed(2),
                    ..
                }
            ),
            "{e}"
        );
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn no_flag_means_no_secrets() {
        assert!(SecretsArgs::default().load().unwrap().is_empty());
    }
}
