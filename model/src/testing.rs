//! Helpers shared by the tests and benchmarks of every crate: where the reference fixtures are.

use std::path::{Path, PathBuf};

/// The folder of reference model fixtures: `RLHF_FIXTURES_DIR`, else `../shared/fixtures` beside
/// the workspace.
///
/// # Panics
/// When the folder does not exist: a test that compares against reference data must fail, not
/// pass vacuously, when the data is missing.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("RLHF_FIXTURES_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "fixtures folder {} not found: set RLHF_FIXTURES_DIR to the folder of reference fixtures",
        dir.display()
    );
    dir
}

/// Every model folder under [`fixtures_dir`] that has a `reference.json`, sorted.
pub fn fixture_models() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures folder is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").is_file() && p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no model folders with reference.json in the fixtures folder"
    );
    dirs
}

/// The model crate's own reference fixtures, `model/tests/fixtures` (made with `transformers`
/// by the scripts in that folder; see its README).
pub fn crate_fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every model folder with a `config.json` and a `reference.json` under [`fixtures_dir`] and
/// under [`crate_fixtures_dir`], sorted.
pub fn all_fixture_models() -> Vec<PathBuf> {
    let mut dirs = fixture_models();
    let own = crate_fixtures_dir();
    assert!(own.is_dir(), "{} not found", own.display());
    dirs.extend(
        std::fs::read_dir(&own)
            .expect("model/tests/fixtures is readable")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("reference.json").is_file() && p.join("config.json").is_file()),
    );
    dirs.sort();
    dirs
}

/// Reads a fixture's `reference.json`.
pub fn reference(dir: &Path) -> serde_json::Value {
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
