//! Job states and their history.

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Placing,
    Calibrating,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Placing => "placing",
            JobState::Calibrating => "calibrating",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        if self.is_terminal() {
            return false;
        }
        match next {
            Queued => false,
            Placing => matches!(self, Queued | Placing | Running | Calibrating),
            Calibrating => matches!(self, Placing | Running),
            Running => matches!(self, Placing | Calibrating | Running),
            Succeeded => matches!(self, Running),
            Failed | Cancelled => true,
        }
    }
}

/// One state change, with when and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub state: JobState,
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub reason: String,
}

/// A job's record: its spec's location, state and history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub spec_toml: String,
    pub priority: i32,
    pub state: JobState,
    pub history: Vec<Transition>,
    pub last_step: u64,
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl JobRecord {
    pub fn new(id: String, name: String, spec_toml: String, priority: i32) -> Self {
        JobRecord {
            id,
            name,
            spec_toml,
            priority,
            state: JobState::Queued,
            history: vec![Transition {
                state: JobState::Queued,
                at: now(),
                reason: "submitted".into(),
            }],
            last_step: 0,
        }
    }

    /// Moves to `state`, recording the time and reason; an illegal transition is an error.
    pub fn transition(&mut self, state: JobState, reason: impl Into<String>) -> Result<(), String> {
        if !self.state.can_become(state) {
            return Err(format!(
                "job {}: cannot go from {} to {}",
                self.id,
                self.state.as_str(),
                state.as_str()
            ));
        }
        self.state = state;
        self.history.push(Transition {
            state,
            at: now(),
            reason: reason.into(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_life_cycle() {
        let mut j = JobRecord::new("j1".into(), "x".into(), String::new(), 0);
        for s in [
            JobState::Placing,
            JobState::Calibrating,
            JobState::Running,
            JobState::Succeeded,
        ] {
            j.transition(s, "ok").unwrap();
        }
        assert_eq!(j.history.len(), 5);
        assert!(
            j.transition(JobState::Running, "again")
                .unwrap_err()
                .contains("succeeded")
        );
        let mut k = JobRecord::new("j2".into(), "x".into(), String::new(), 0);
        assert!(k.transition(JobState::Succeeded, "too early").is_err());
        k.transition(JobState::Cancelled, "user").unwrap();
    }
}
