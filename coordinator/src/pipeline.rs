//! The generic parts of a pipeline run: a chain of stages (data, SFT, reward models, RL jobs)
//! in one output folder, each stage run once and remembered, so an interrupted pipeline resumes
//! where it stopped. The quickstart crate builds its demo on these; any other chain (a user's
//! own SFT → reward model → RL sequence) can too.
//!
//! - [`Stages`] runs a stage unless its marker (`stages/<name>.json`, holding the stage's
//!   result and time) says it finished;
//! - [`claim_output`] keeps two different pipelines from sharing an output folder;
//! - [`rl_job`] runs (or resumes, or skips when finished) one RL job of the chain with the
//!   [`runner`](crate::runner), writing the job file it ran next to its outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::controller::Outcome;
use crate::job::JobSpec;
use crate::runner::{JobFile, RunOptions, Sink};

/// The stages of one pipeline run in `root`, and how long each took.
pub struct Stages {
    root: PathBuf,
    /// Seconds per stage (also for stages finished in an earlier run).
    pub timing: BTreeMap<String, f64>,
}

impl Stages {
    pub fn new(root: &Path) -> Stages {
        Stages {
            root: root.to_path_buf(),
            timing: BTreeMap::new(),
        }
    }

    /// The marker of a finished stage.
    pub fn marker(&self, name: &str) -> PathBuf {
        self.root.join("stages").join(format!("{name}.json"))
    }

    /// Runs `f` unless the stage's marker says it finished (then its saved result is
    /// returned); the marker keeps the result and the time. A marker that does not parse (a
    /// crash while writing it) means the stage runs again.
    pub fn run<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let marker = self.marker(name);
        let saved = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|saved| {
                let result = serde_json::from_value::<T>(saved["result"].clone()).ok()?;
                Some((saved["seconds"].as_f64().unwrap_or(0.0), result))
            });
        if let Some((seconds, result)) = saved {
            self.timing.insert(name.into(), seconds);
            eprintln!("[{name}] done earlier");
            return Ok(result);
        }
        eprintln!("[{name}] …");
        let started = Instant::now();
        let result = f().with_context(|| format!("stage `{name}`"))?;
        let seconds = started.elapsed().as_secs_f64();
        self.timing.insert(name.into(), seconds);
        std::fs::create_dir_all(marker.parent().expect("stages/ folder"))?;
        let saved = serde_json::json!({"seconds": seconds, "result": result});
        crate::job::write_atomic(&marker, serde_json::to_string_pretty(&saved)?.as_bytes())?;
        eprintln!("[{name}] done in {seconds:.0} s");
        Ok(result)
    }
}

/// Refuses to mix two pipelines' outputs in one folder: the first run keeps a copy of its
/// pipeline file in `root`; a later run must have the same file and `resume`.
pub fn claim_output(root: &Path, text: &str, resume: bool) -> Result<()> {
    let copy = root.join("pipeline.toml");
    match std::fs::read_to_string(&copy) {
        Ok(previous) if previous != text => bail!(
            "{} was made by a different pipeline file (see {}); use another --out",
            root.display(),
            copy.display()
        ),
        Ok(_) if !resume => bail!(
            "{} already holds this pipeline's run; `--resume` continues it, or use another --out",
            root.display()
        ),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating {}", root.display()))?;
            std::fs::write(&copy, text).with_context(|| format!("writing {}", copy.display()))
        }
    }
}

/// Runs one RL job of a pipeline in its output folder: skipped when its `job.json` says it
/// succeeded, resumed when an earlier run was interrupted, else started. The job file that runs
/// is written to `<out>/job.toml` first (what ran, and a job a user can rerun on its own).
/// `progress` also hears the job's events (a terminal display).
pub async fn rl_job(
    job: &JobSpec,
    stop: watch::Receiver<bool>,
    progress: Option<Box<dyn Sink>>,
) -> Result<Outcome> {
    let dir = job.output_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let record = dir.join("job.json");
    if let Ok(text) = std::fs::read_to_string(&record)
        && serde_json::from_str::<crate::state::JobRecord>(&text)
            .is_ok_and(|r| r.state == crate::state::JobState::Succeeded)
    {
        eprintln!("  done earlier");
        return Ok(Outcome::Succeeded);
    }
    let path = dir.join("job.toml");
    let text = toml::to_string(job).context("writing the RL job's file")?;
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let job = JobSpec::from_file(&path).map_err(|p| {
        anyhow::anyhow!(
            "{}: generated job is invalid:\n  {}",
            path.display(),
            p.join("\n  ")
        )
    })?;
    let resume = record.is_file();
    let (file, record) = JobFile::open(&dir, &job, text, resume)?;
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(file)];
    sinks.extend(progress);
    let options = RunOptions {
        resume,
        stop,
        gang: None,
        exe: rlhf_proto::process::self_exe().context("locating the rlhf binary")?,
    };
    crate::runner::run(&job, record, options, sinks).await.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_stage_is_not_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut stages = Stages::new(dir.path());
        assert_eq!(stages.run("a", || Ok(41)).unwrap(), 41);
        let mut again = Stages::new(dir.path());
        let v: i32 = again.run("a", || bail!("must not run")).unwrap();
        assert_eq!(v, 41);
        assert!(again.timing.contains_key("a"));
        // A broken marker means the stage runs again.
        std::fs::write(again.marker("a"), "{").unwrap();
        assert_eq!(again.run("a", || Ok(7)).unwrap(), 7);
    }

    #[test]
    fn two_pipelines_do_not_share_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        claim_output(dir.path(), "one", false).unwrap();
        assert!(claim_output(dir.path(), "one", false).is_err());
        claim_output(dir.path(), "one", true).unwrap();
        let err = claim_output(dir.path(), "two", true).unwrap_err();
        assert!(err.to_string().contains("different pipeline file"), "{err}");
    }
}
