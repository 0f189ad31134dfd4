//! Validation of staging and target paths taken from requests: absolute,
//! normalised (no `.`, `..`, empty or trailing components), no NUL, bounded.
//! What is on disk at the path is checked later, by the node, without
//! following a final symlink.

use std::path::{Component, Path, PathBuf};

/// Longest path accepted (PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// Checks a request path, returning it as a `PathBuf` or the reason it is
/// refused.
pub fn checked_path(raw: &str) -> Result<PathBuf, String> {
    if raw.len() > MAX_PATH_LEN {
        return Err(format!("path is longer than {MAX_PATH_LEN} bytes"));
    }
    if raw.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    if !raw.starts_with('/') {
        return Err(format!("path {raw:?} is not absolute"));
    }
    if raw == "/" {
        return Err("path is the root directory".into());
    }
    if raw.contains("//") || (raw.len() > 1 && raw.ends_with('/')) {
        return Err(format!("path {raw:?} is not in canonical form"));
    }
    let p = Path::new(raw);
    for c in p.components() {
        match c {
            Component::RootDir | Component::Normal(_) => {}
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path {raw:?} contains '.' or '..'"));
            }
        }
    }
    if raw.split('/').any(|c| c == ".") {
        return Err(format!("path {raw:?} contains '.' or '..'"));
    }
    Ok(p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_kubelet_paths() {
        let p = "/var/lib/kubelet/pods/abc/volumes/kubernetes.io~csi/pvc-1/mount";
        assert_eq!(checked_path(p).unwrap(), PathBuf::from(p));
    }

    #[test]
    fn refuses_relative_dotted_and_odd_paths() {
        for bad in [
            "",
            "some/path",
            "/",
            "/a/../etc",
            "/a/./b",
            "/a//b",
            "/a/b/",
            "/a\0b",
            "./x",
            "/..",
        ] {
            assert!(checked_path(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn accepted_paths_have_only_normal_components(s in "[/a.\\\\\0-]{0,20}") {
            if let Ok(p) = checked_path(&s) {
                prop_assert!(p.is_absolute());
                prop_assert!(p.components().skip(1).all(|c| matches!(c, Component::Normal(_))));
                prop_assert!(!s.contains('\0'));
            }
        }
    }
}
