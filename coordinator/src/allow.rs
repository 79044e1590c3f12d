//! `rlhf coordinator --allow-path DIR`: the directories a submitted job may read and write
//! (docs/security.md). Paths are compared after symlinks are resolved, so a link inside an
//! allowed directory that points outside it does not let a job out.

use std::path::{Component, Path, PathBuf};

use crate::job::JobSpec;

/// The directories jobs may use; `None`: every path (a loopback-only coordinator without
/// `--allow-path`).
#[derive(Debug, Clone, Default)]
pub struct AllowedPaths {
    roots: Option<Vec<PathBuf>>,
}

/// `path` with symlinks resolved as far as it exists; the rest (which cannot hold symlinks
/// yet) is appended as it is. A `..` after a part that does not exist yet is refused: once the
/// job makes that part, the kernel resolves the `..` against whatever it became (a link made
/// later, or one next to it), which no check now can know.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let path = std::path::absolute(path)?;
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    let mut base = loop {
        match std::fs::canonicalize(existing) {
            Ok(real) => break real,
            Err(_) => {
                let Some(parent) = existing.parent() else {
                    break PathBuf::from("/");
                };
                if let Some(name) = existing.file_name() {
                    rest.push(name.to_owned());
                } else {
                    // `..` as the last component: keep it for the lexical pass.
                    rest.push("..".into());
                }
                existing = parent;
            }
        }
    };
    for part in rest.iter().rev() {
        match Path::new(part).components().next() {
            Some(Component::ParentDir) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "`..` after a part that does not exist yet (write the path without it)",
                ));
            }
            Some(Component::CurDir) | None => {}
            Some(_) => base.push(part),
        }
    }
    Ok(base)
}

impl AllowedPaths {
    /// Every path.
    pub fn any() -> AllowedPaths {
        AllowedPaths { roots: None }
    }

    /// Only under `dirs` (each must exist; resolved now).
    pub fn only(dirs: &[PathBuf]) -> Result<AllowedPaths, String> {
        let roots = dirs
            .iter()
            .map(|d| {
                std::fs::canonicalize(d).map_err(|e| format!("--allow-path {}: {e}", d.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedPaths { roots: Some(roots) })
    }

    /// Whether jobs are limited at all.
    pub fn is_limited(&self) -> bool {
        self.roots.is_some()
    }

    /// Refuses `path` (named by `field`) unless it resolves under an allowed directory.
    pub fn check(&self, field: &str, path: &Path) -> Result<(), String> {
        let Some(roots) = &self.roots else {
            return Ok(());
        };
        let real = resolve(path).map_err(|e| format!("{field}: {}: {e}", path.display()))?;
        if roots.iter().any(|r| real.starts_with(r)) {
            return Ok(());
        }
        let shown = if real == path {
            String::new()
        } else {
            format!(" (resolves to {})", real.display())
        };
        Err(format!(
            "{field}: {}{shown} is outside the directories this coordinator allows jobs to use ({}); \
             see `rlhf coordinator --allow-path`",
            path.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// Every problem of `spec`'s paths, `output` being where it will write.
    pub fn problems(&self, spec: &JobSpec, output: &Path) -> Vec<String> {
        let mut paths = spec.paths();
        if spec.output_dir.is_none() {
            paths.push(("output_dir".into(), output.to_path_buf()));
        }
        paths
            .iter()
            .filter_map(|(field, p)| self.check(field, p).err())
            .collect()
    }

    /// The same limits with `dir` allowed too (the state directory).
    pub fn with(mut self, dir: &Path) -> Result<AllowedPaths, String> {
        if let Some(roots) = &mut self.roots {
            let dir = resolve(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            roots.push(dir);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_judged_after_symlinks_and_dot_dots() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("data");
        std::fs::create_dir_all(allowed.join("models")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("escape")).unwrap();
        let a = AllowedPaths::only(std::slice::from_ref(&allowed)).unwrap();
        assert!(a.check("f", &allowed.join("models")).is_ok());
        assert!(
            a.check("f", &allowed.join("runs/new/deeper")).is_ok(),
            "not yet made"
        );
        let err = a.check("output_dir", Path::new("/etc")).unwrap_err();
        assert!(err.starts_with("output_dir: /etc is outside"), "{err}");
        let err = a
            .check("policy.model", &allowed.join("escape/ssl"))
            .unwrap_err();
        assert!(err.contains("resolves to /etc/ssl"), "{err}");
        assert!(a.check("f", &allowed.join("new/../../outside")).is_err());
        // `new` does not exist yet: once made, `new/../escape` would be the link to /etc.
        let err = a
            .check("output_dir", &allowed.join("new/../escape/out"))
            .unwrap_err();
        assert!(
            err.contains("`..` after a part that does not exist yet"),
            "{err}"
        );
        assert!(a.check("f", &allowed.join("models/../models/x")).is_ok());
        assert!(
            a.check("f", &allowed.join("models/../../data-2")).is_err(),
            "a prefix is not a parent"
        );
        assert!(AllowedPaths::any().check("f", Path::new("/etc")).is_ok());
        assert!(
            AllowedPaths::only(&[dir.path().join("missing")])
                .unwrap_err()
                .contains("--allow-path")
        );
    }

    #[test]
    fn resolve_keeps_what_does_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert!(resolve(&dir.path().join("a/b/../c")).is_err());
        assert_eq!(
            resolve(&dir.path().join("a/./b")).unwrap(),
            real.join("a/b")
        );
    }
}
