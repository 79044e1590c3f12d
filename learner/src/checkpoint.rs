//! Checkpoints that are either complete or not there: written under a temporary name, every
//! file fsynced and listed with its sha256 in `manifest.json`, then renamed into place. Loading
//! verifies the manifest first and names any file that does not match.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

const MANIFEST: &str = "manifest.json";
const PREFIX: &str = "ckpt-";

/// The folder name of step `step`'s checkpoint.
pub fn name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// Writes a checkpoint: `fill` writes the files into a temporary folder, then the manifest is
/// added and the folder renamed to `root/ckpt-<step>`. Returns the final path.
pub fn write(root: &Path, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let final_path = root.join(name(step));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = root.join(format!(
        ".{}.tmp-{}-{nonce}",
        name(step),
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // A write that fails (a full disk) leaves nothing behind: the folders before it stay the
    // newest, and the space it took is given back.
    let written = fill_and_seal(&tmp, step, fill).and_then(|()| {
        if final_path.exists() {
            std::fs::remove_dir_all(&final_path)
                .with_context(|| format!("replacing {}", final_path.display()))?;
        }
        std::fs::rename(&tmp, &final_path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), final_path.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing the checkpoint of step {step} into {}",
            root.display()
        )));
    }
    sync_dir(root)?;
    Ok(final_path)
}

/// `fill`, then the manifest, everything fsynced.
fn fill_and_seal(tmp: &Path, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    fill(tmp)?;
    let files = list_files(tmp)?;
    let mut entries = serde_json::Map::new();
    for rel in &files {
        let path = tmp.join(rel);
        entries.insert(rel.clone(), serde_json::json!(sha256_file(&path)?));
        sync_file(&path)?;
    }
    let manifest = serde_json::json!({ "step": step, "files": entries });
    let manifest_path = tmp.join(MANIFEST);
    let mut f = std::fs::File::create(&manifest_path)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    f.write_all(
        serde_json::to_string_pretty(&manifest)
            .expect("JSON")
            .as_bytes(),
    )?;
    f.sync_all()
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    for dir in dirs_of(tmp, &files) {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Writes a folder that appears whole or not at all: `fill` writes it under a temporary name
/// beside `dir`, then every file is fsynced and the folder renamed to `dir`, replacing an
/// earlier one. A `dir` that exists and holds files but no `config.json` is not taken for an
/// earlier export and is left alone (an error says so).
pub fn write_folder(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let Some(name) = dir.file_name() else {
        bail!("{}: not a folder path", dir.display());
    };
    if dir.is_dir()
        && !dir.join("config.json").is_file()
        && std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{}: exists and is not a model folder (no config.json); not replacing it",
            dir.display()
        );
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{nonce}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let filled = fill(&tmp).and_then(|()| {
        let files = list_files(&tmp)?;
        for rel in &files {
            sync_file(&tmp.join(rel))?;
        }
        for d in dirs_of(&tmp, &files) {
            sync_dir(&d)?;
        }
        Ok(())
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    sync_dir(parent)
}

/// Checks every file of the manifest (and that the manifest exists).
pub fn verify(dir: &Path) -> Result<()> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "checkpoint {}: no readable {MANIFEST} (incomplete checkpoint?)",
            dir.display()
        )
    })?;
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", manifest_path.display()))?;
    let Some(files) = manifest["files"].as_object() else {
        bail!("{}: no `files` table", manifest_path.display());
    };
    for (rel, want) in files {
        let path = dir.join(rel);
        if !path.is_file() {
            bail!(
                "checkpoint {}: file {rel} is listed in the manifest but missing",
                dir.display()
            );
        }
        let got = sha256_file(&path)?;
        if Some(got.as_str()) != want.as_str() {
            bail!(
                "checkpoint {}: file {rel} does not match its sha256 in the manifest (corrupted)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The newest checkpoint folder under `root`, if any (by step number).
pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop()
}

/// Checkpoint folders under `root`, oldest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(PREFIX)?.parse::<u64>().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, p)| p).collect()
}

/// Deletes all but the `keep` newest checkpoints (0 keeps all).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(root);
    for old in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                if rel != MANIFEST {
                    out.push(rel);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn dirs_of(root: &Path, files: &[String]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| root.join(f).parent().map(Path::to_path_buf))
        .collect();
    dirs.push(root.to_path_buf());
    dirs.sort();
    dirs.dedup();
    dirs
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

fn sync_dir(path: &Path) -> Result<()> {
    // Directories are fsynced through a read-only handle (POSIX); a no-op where unsupported.
    match std::fs::File::open(path) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("fsync {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_folder_replaces_an_earlier_one_whole_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("export");
        let fill = |files: &'static [&'static str]| {
            move |tmp: &Path| -> Result<()> {
                for f in files {
                    std::fs::write(tmp.join(f), f)?;
                }
                Ok(())
            }
        };
        write_folder(&dir, fill(&["config.json", "a.safetensors"])).unwrap();
        write_folder(&dir, fill(&["config.json", "b.safetensors"])).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["b.safetensors", "config.json"],
            "no file of the first"
        );
        // A failed fill leaves the earlier folder and no temporary one.
        let err = write_folder(&dir, |_| bail!("disk full")).unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(dir.join("b.safetensors").is_file());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        // A folder that is not a model folder is left alone.
        let other = root.path().join("notes");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("todo.txt"), "keep me").unwrap();
        let err = write_folder(&other, fill(&["config.json"])).unwrap_err();
        assert!(err.to_string().contains("not a model folder"), "{err}");
        assert!(other.join("todo.txt").is_file());
    }

    #[test]
    fn write_verify_corrupt_prune() {
        let root = tempfile::tempdir().unwrap();
        for step in [1, 2, 3] {
            let p = write(root.path(), step, |tmp| {
                std::fs::create_dir_all(tmp.join("policy"))?;
                std::fs::write(tmp.join("policy/w.bin"), vec![step as u8; 100])?;
                std::fs::write(tmp.join("state.json"), format!("{{\"step\": {step}}}"))?;
                Ok(())
            })
            .unwrap();
            verify(&p).unwrap();
        }
        assert_eq!(
            latest(root.path()).unwrap().file_name().unwrap(),
            "ckpt-00000003"
        );
        let p = latest(root.path()).unwrap();
        std::fs::write(p.join("policy/w.bin"), vec![9u8; 100]).unwrap();
        let err = verify(&p).unwrap_err().to_string();
        assert!(
            err.contains("policy/w.bin") && err.contains("sha256"),
            "{err}"
        );
        std::fs::write(p.join("policy/w.bin"), vec![3u8; 100]).unwrap();
        verify(&p).unwrap();
        std::fs::remove_file(p.join("state.json")).unwrap();
        assert!(verify(&p).unwrap_err().to_string().contains("state.json"));
        prune(root.path(), 1).unwrap();
        assert_eq!(list(root.path()).len(), 1);
        // A temporary folder left by a crash is not a checkpoint.
        std::fs::create_dir_all(root.path().join(".ckpt-00000009.tmp-1-2")).unwrap();
        assert_eq!(
            latest(root.path()).unwrap().file_name().unwrap(),
            "ckpt-00000003"
        );
    }
}
