//! Scoring a request on every objective: the service's logic, free of gRPC (STYLE.md §3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::future::try_join_all;
use rlhf_model::Tokenizer;
use rlhf_proto::v1;
use sha2::{Digest, Sha256};

use crate::batcher::ModelWorker;
use crate::config::{ObjectiveKind, RewardConfig};
use crate::error::ScoreError;
use crate::metrics::Metrics;
use crate::remote::RemoteObjective;
use crate::rules::{Aggregation, Rule, RuleInput};
use crate::sample::{Sample, prepare, reward_model_ids};

/// What `Describe` reports of an objective.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveInfo {
    pub name: String,
    pub kind: &'static str,
    pub content_hash: String,
    pub description: String,
}

enum Compute {
    Model {
        members: Vec<Arc<ModelWorker>>,
        aggregation: Aggregation,
    },
    Rule(Rule),
    Remote(Box<RemoteObjective>),
}

struct Objective {
    info: ObjectiveInfo,
    compute: Compute,
}

/// Every objective of a configuration, ready to score.
pub struct Scorer {
    objectives: Vec<Objective>,
    tokenizer: Option<Tokenizer>,
    pub metrics: Metrics,
}

impl Scorer {
    /// Loads every reward model (once per checkpoint, shared by the objectives that name it) and
    /// prepares rules and remote clients.
    pub fn build(config: &RewardConfig, metrics: Metrics) -> anyhow::Result<Scorer> {
        use anyhow::Context;
        let tokenizer = match &config.tokenizer {
            Some(dir) => Some(
                Tokenizer::from_dir(dir).with_context(|| format!("tokenizer {}", dir.display()))?,
            ),
            None => None,
        };
        let mut workers: HashMap<PathBuf, Arc<ModelWorker>> = HashMap::new();
        let mut objectives = Vec::new();
        for spec in &config.objectives {
            let (compute, description, hash) = match &spec.kind {
                ObjectiveKind::Model {
                    models,
                    aggregation,
                } => {
                    let mut members = Vec::new();
                    let mut hasher = Sha256::new();
                    for dir in models {
                        let key = dir.canonicalize().with_context(|| {
                            format!("objective `{}`: {}", spec.name, dir.display())
                        })?;
                        if !workers.contains_key(&key) {
                            let worker =
                                ModelWorker::spawn(&key, &config.batching, metrics.clone())
                                    .with_context(|| format!("objective `{}`", spec.name))?;
                            workers.insert(key.clone(), Arc::new(worker));
                        }
                        members.push(workers[&key].clone());
                        hash_model_dir(&mut hasher, &key)
                            .with_context(|| format!("hashing {}", key.display()))?;
                    }
                    hasher.update(format!("{aggregation:?}").as_bytes());
                    let description = if models.len() == 1 {
                        format!("reward model {}", models[0].display())
                    } else {
                        format!("{aggregation:?} of {} reward models", models.len())
                    };
                    let compute = Compute::Model {
                        members,
                        aggregation: *aggregation,
                    };
                    (compute, description, hex::encode(hasher.finalize()))
                }
                ObjectiveKind::Rule(rule) => {
                    let d = rule.describe();
                    let hash = hex::encode(Sha256::digest(d.as_bytes()));
                    (Compute::Rule(rule.clone()), d, hash)
                }
                ObjectiveKind::Remote {
                    address,
                    objective,
                    timeout,
                } => {
                    let remote = RemoteObjective::new(address, objective.clone(), *timeout)
                        .map_err(|e| anyhow::anyhow!("objective `{}`: {e}", spec.name))?;
                    let d = match objective {
                        Some(o) => format!("remote {address} objective {o}"),
                        None => format!("remote {address}"),
                    };
                    let hash = hex::encode(Sha256::digest(d.as_bytes()));
                    (Compute::Remote(Box::new(remote)), d, hash)
                }
            };
            objectives.push(Objective {
                info: ObjectiveInfo {
                    name: spec.name.clone(),
                    kind: spec.kind.label(),
                    content_hash: hash,
                    description,
                },
                compute,
            });
        }
        Ok(Scorer {
            objectives,
            tokenizer,
            metrics,
        })
    }

    /// The objectives, in the order `score` returns their values.
    pub fn describe(&self) -> Vec<ObjectiveInfo> {
        self.objectives.iter().map(|o| o.info.clone()).collect()
    }

    /// One vector per sample with one value per objective.
    #[tracing::instrument(name = "score", skip_all, fields(samples = samples.len()))]
    pub async fn score(
        &self,
        samples: Vec<v1::Sample>,
        deadline: Instant,
    ) -> Result<Vec<Vec<f32>>, ScoreError> {
        let samples = prepare(samples, self.tokenizer.as_ref())?;
        let per_objective = try_join_all(self.objectives.iter().map(|o| async {
            self.score_objective(o, &samples, deadline)
                .await
                .map_err(|e| e.in_objective(&o.info.name))
        }))
        .await?;
        Ok((0..samples.len())
            .map(|i| per_objective.iter().map(|values| values[i]).collect())
            .collect())
    }

    async fn score_objective(
        &self,
        o: &Objective,
        samples: &[Sample],
        deadline: Instant,
    ) -> Result<Vec<f32>, ScoreError> {
        match &o.compute {
            Compute::Model { members, aggregation } => {
                let member_scores = try_join_all(members.iter().map(|m| score_with_model(m, samples, deadline))).await?;
                Ok((0..samples.len())
                    .map(|i| {
                        let row: Vec<f32> = member_scores.iter().map(|s| s[i]).collect();
                        aggregation.apply(&row)
                    })
                    .collect())
            }
            Compute::Rule(rule) => samples
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if rule.needs_tokens() && s.completion_tokens.is_none() {
                        return Err(ScoreError::InvalidArgument(format!(
                            "sample {i}: objective `{}` needs the completion's token count: send completion ids or configure `tokenizer`",
                            o.info.name
                        )));
                    }
                    let input = RuleInput {
                        completion: &s.completion,
                        completion_tokens: s.completion_tokens,
                        metadata: &s.metadata,
                    };
                    rule.score(&input).map_err(|m| {
                        ScoreError::InvalidArgument(format!("sample {i}: objective `{}`: {m}", o.info.name))
                    })
                })
                .collect(),
            Compute::Remote(remote) => remote.score(samples, deadline).await,
        }
    }
}

async fn score_with_model(
    worker: &ModelWorker,
    samples: &[Sample],
    deadline: Instant,
) -> Result<Vec<f32>, ScoreError> {
    let sequences = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            reward_model_ids(worker.tokenizer(), s).map_err(|m| {
                ScoreError::InvalidArgument(format!(
                    "sample {i}: cannot tokenise for {}: {m}",
                    worker.dir().display()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    worker.score(sequences, |i| i, deadline).await
}

/// Hashes `config.json` and the weight files of a model folder.
fn hash_model_dir(hasher: &mut Sha256, dir: &Path) -> std::io::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name == "config.json"
                || name.ends_with(".safetensors")
                || name == "model.safetensors.index.json"
        })
        .collect();
    files.sort();
    for f in files {
        hasher.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        let mut file = std::fs::File::open(&f)?;
        std::io::copy(&mut file, hasher)?;
    }
    Ok(())
}
