//! The scheduling pass as a pure function: from the jobs in the store, the jobs this
//! coordinator runs and its slot count to a [`Plan`] of what to do now. The coordinator carries
//! the plan out (stops, cancels, placements); placing is left to it because it asks the pool.
//!
//! Rules: cancel requests reach running jobs as a stop, and end at once jobs nobody runs;
//! orphans (jobs found placing, calibrating or running that no live coordinator runs: the
//! previous active one died) go first, resumed from their checkpoint, then queued jobs; each
//! group by priority (higher first), then submission order. At most the free slots start; the
//! first job beyond them is told it waits for a slot.

use crate::state::JobState;

/// What the pass needs to know of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    pub priority: i32,
    /// Submission time (seconds since the epoch).
    pub submitted: f64,
    pub cancel_requested: bool,
    pub last_step: u64,
}

/// A job to start, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub id: String,
    /// An orphan: its workers restore the last checkpoint.
    pub resume: bool,
}

/// What one pass does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Running here with a cancel request: stop them (they checkpoint).
    pub stop: Vec<String>,
    /// Cancel requested and run by nobody: cancelled now, after the step they last finished.
    pub cancel: Vec<(String, u64)>,
    /// Jobs to place and start, in this order. The coordinator stops at the first that cannot
    /// be placed (strict order: a job waiting for workers is not overtaken).
    pub start: Vec<Start>,
    /// The first job that does not fit in a slot.
    pub slot_wait: Option<String>,
}

/// The plan of one pass. `running(id)`: whether this coordinator runs job `id`; `busy`: how
/// many jobs it runs (each holds a slot, whether or not its record is still listed).
pub fn plan(jobs: &[JobView], running: impl Fn(&str) -> bool, busy: usize, slots: usize) -> Plan {
    let mut plan = Plan::default();
    for job in jobs.iter().filter(|j| running(&j.id)) {
        if job.cancel_requested && !job.state.is_terminal() {
            plan.stop.push(job.id.clone());
        }
    }
    for job in jobs.iter().filter(|j| !running(&j.id)) {
        if job.cancel_requested && !job.state.is_terminal() {
            plan.cancel.push((job.id.clone(), job.last_step));
        }
    }
    let mut waiting: Vec<&JobView> = jobs
        .iter()
        .filter(|j| !j.state.is_terminal() && !j.cancel_requested && !running(&j.id))
        .collect();
    // Orphans first, then by priority, then by submission.
    waiting.sort_by(|a, b| {
        (a.state == JobState::Queued)
            .cmp(&(b.state == JobState::Queued))
            .then(b.priority.cmp(&a.priority))
            .then(a.submitted.total_cmp(&b.submitted))
    });
    let free = slots.max(1).saturating_sub(busy);
    plan.start = waiting
        .iter()
        .take(free)
        .map(|j| Start {
            id: j.id.clone(),
            resume: j.state != JobState::Queued,
        })
        .collect();
    plan.slot_wait = waiting.get(free).map(|j| j.id.clone());
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: JobState, priority: i32, submitted: f64) -> JobView {
        JobView {
            id: id.into(),
            state,
            priority,
            submitted,
            cancel_requested: false,
            last_step: 0,
        }
    }

    fn ids(plan: &Plan) -> Vec<&str> {
        plan.start.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn higher_priority_first_then_submission_order() {
        let jobs = [
            job("a", JobState::Queued, 0, 1.0),
            job("b", JobState::Queued, 5, 3.0),
            job("c", JobState::Queued, 0, 2.0),
        ];
        let p = plan(&jobs, |_| false, 0, 10);
        assert_eq!(ids(&p), ["b", "a", "c"]);
        assert!(p.start.iter().all(|s| !s.resume));
        assert_eq!(p.slot_wait, None);
    }

    #[test]
    fn orphans_are_resumed_before_queued_jobs() {
        let jobs = [
            job("q", JobState::Queued, 9, 1.0),
            job("o", JobState::Running, 0, 2.0),
            job("p", JobState::Calibrating, 0, 3.0),
        ];
        let p = plan(&jobs, |_| false, 0, 10);
        assert_eq!(ids(&p), ["o", "p", "q"]);
        assert_eq!(
            p.start[0],
            Start {
                id: "o".into(),
                resume: true
            }
        );
        assert!(!p.start[2].resume);
    }

    #[test]
    fn slots_taken_by_running_jobs_limit_the_starts() {
        let jobs = [
            job("r", JobState::Running, 0, 0.0),
            job("a", JobState::Queued, 0, 1.0),
            job("b", JobState::Queued, 0, 2.0),
        ];
        let p = plan(&jobs, |id| id == "r", 1, 2);
        assert_eq!(ids(&p), ["a"]);
        assert_eq!(p.slot_wait.as_deref(), Some("b"));
        let full = plan(&jobs, |id| id == "r", 1, 1);
        assert!(full.start.is_empty());
        assert_eq!(full.slot_wait.as_deref(), Some("a"));
    }

    #[test]
    fn cancels_stop_running_jobs_and_end_the_others() {
        let mut running = job("r", JobState::Running, 0, 0.0);
        running.cancel_requested = true;
        let mut orphan = job("o", JobState::Running, 0, 1.0);
        orphan.cancel_requested = true;
        orphan.last_step = 4;
        let mut done = job("d", JobState::Succeeded, 0, 2.0);
        done.cancel_requested = true;
        let p = plan(&[running, orphan, done], |id| id == "r", 1, 4);
        assert_eq!(p.stop, ["r"]);
        assert_eq!(p.cancel, [("o".to_string(), 4)]);
        assert!(p.start.is_empty(), "a cancelled orphan is not resumed");
    }

    #[test]
    fn a_running_job_without_a_record_still_holds_its_slot() {
        let jobs = [job("a", JobState::Queued, 0, 1.0)];
        let p = plan(&jobs, |id| id == "gone", 1, 1);
        assert!(p.start.is_empty());
        assert_eq!(p.slot_wait.as_deref(), Some("a"));
    }

    #[test]
    fn finished_jobs_are_ignored() {
        let jobs = [
            job("s", JobState::Succeeded, 0, 0.0),
            job("f", JobState::Failed, 0, 1.0),
            job("c", JobState::Cancelled, 0, 2.0),
        ];
        assert_eq!(plan(&jobs, |_| false, 0, 1), Plan::default());
    }
}
