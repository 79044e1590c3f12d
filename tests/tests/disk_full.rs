//! A checkpoint written while the disk fills up: the job's output folder on a small tmpfs that
//! the test fills mid-run. The checkpoint's write fails cleanly (no partial folder left), the
//! job fails saying why, the previous checkpoint stays loadable, and once space is freed the
//! job resumes from it and records every step once. Needs root for the mount: skipped with a
//! message otherwise, a failure with `RLHF_REQUIRE_NETNS=1` (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rlhf_tests::{bin, metric_steps, tiny_job, wait_for};

const STEPS: u64 = 30;

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes free on the file system of `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

fn rlhf_run(job: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin("rlhf"))
        .args([
            "run",
            job.to_str().unwrap(),
            "--steps",
            &STEPS.to_string(),
            "--quiet",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_checkpoint_that_fills_the_disk_fails_cleanly_and_the_job_resumes_once_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&disk)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var(rlhf_tests::netns::REQUIRE_ENV).as_deref() != Ok("1"),
            "cannot mount a tmpfs (root is needed)"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    }
    let _mount = Mount(disk.clone());
    let job = tiny_job(&disk, "disk-full", "");
    let run = disk.join("run");
    let child = rlhf_run(&job, &[]);
    wait_for("step 2", Duration::from_secs(120), || {
        metric_steps(&run).len() >= 2
    });
    // The disk fills up, all but 256 KiB: less than a checkpoint (about 1.7 MB), more than a
    // metrics line.
    let filler = disk.join("filler");
    let size = free_bytes(&disk).saturating_sub(256 << 10);
    std::fs::write(&filler, vec![0u8; size as usize]).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the job cannot go on without checkpoints: {err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("checkpoint of step"), "{err}");
    // Nothing half-written is left, and the newest checkpoint is whole.
    let root = run.join("learner/checkpoints");
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    let latest = rlhf_learner::checkpoint::latest(&root).expect("an earlier checkpoint");
    rlhf_learner::checkpoint::verify(&latest).unwrap();
    let failed_at = metric_steps(&run).last().copied().unwrap();
    assert!(failed_at < STEPS, "the job stopped at step {failed_at}");

    // Space again: the job resumes from that checkpoint and ends with every step once.
    std::fs::remove_file(&filler).unwrap();
    let out = rlhf_run(&job, &["--resume"]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(metric_steps(&run), (1..=STEPS).collect::<Vec<u64>>());
}
