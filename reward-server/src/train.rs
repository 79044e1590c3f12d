//! Bradley-Terry reward-model training (`rlhf reward train`).
//!
//! Data: JSONL, one pair per line, `{"prompt": …, "chosen": …, "rejected": …}` with optional
//! `"margin"`. Texts are strings; a prompt may also be a list of chat messages, with `chosen` /
//! `rejected` then either the assistant's reply (a string) or a list of messages that continues
//! the conversation. Each side is tokenised like the reward server does at scoring time
//! ([`reward_model_ids`]), so training and serving see the same ids.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rlhf_model::burn::module::Module;
use rlhf_model::burn::tensor::{Tensor, TensorData};
use rlhf_model::losses::bradley_terry;
use rlhf_model::optim::{Trainer, hold_out, progress_bar};
use rlhf_model::{ChatMessage, DType, HeadKind, Model, SaveOptions, Tokenizer, device};
use serde_json::{Value, json};

use crate::sample::{Prompt, Sample, reward_model_ids};

/// Options of a training run (the CLI flags of `rlhf reward train`).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainOptions {
    /// Base model folder: a causal LM (a new `score` head is added) or a reward model to
    /// continue.
    #[arg(long)]
    pub base: PathBuf,
    /// Preference pairs (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder (an HF `*ForSequenceClassification` checkpoint with its tokenizer).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Peak learning rate (linear warmup over the first 5% of steps, then cosine to 10%).
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Subtracted from r_chosen - r_rejected inside the sigmoid (a pair's own `margin` wins).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Weight of the centring term (r_chosen + r_rejected)^2; 0.01 in "Helping or Herding?".
    #[arg(long, default_value_t = 0.0)]
    pub center_coef: f64,
    /// Share of pairs held out to measure pairwise accuracy.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Pairs with a side longer than this many tokens are skipped (default: the context length).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Skip (and count) malformed lines instead of failing on the first one.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Storage dtype of the saved weights (float32, bfloat16, float16; default: the base's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// No progress bar (logs per epoch only).
    #[arg(long)]
    pub quiet: bool,
}

/// One preference pair, before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: Sample,
    pub rejected: Sample,
    pub margin: Option<f64>,
}

/// What the data file held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub pairs: Vec<PreferencePair>,
    /// (line number, problem) of every skipped line.
    pub skipped: Vec<(usize, String)>,
}

/// Reads a preference JSONL file. A malformed line is an error naming its number, unless
/// `skip_invalid` (then it is counted in [`Loaded::skipped`]).
pub fn load_pairs(path: &Path, skip_invalid: bool) -> Result<Loaded> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut loaded = Loaded::default();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let number = i + 1;
        let line = line.with_context(|| format!("{}:{number}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_pair(&line) {
            Ok(pair) => loaded.pairs.push(pair),
            Err(problem) if skip_invalid => loaded.skipped.push((number, problem)),
            Err(problem) => bail!("{}:{number}: {problem}", path.display()),
        }
    }
    if loaded.pairs.is_empty() {
        bail!("{}: no valid preference pairs", path.display());
    }
    Ok(loaded)
}

fn parse_pair(line: &str) -> Result<PreferencePair, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object".into());
    };
    for key in obj.keys() {
        if !["prompt", "chosen", "rejected", "margin"].contains(&key.as_str()) {
            return Err(format!(
                "unknown field `{key}` (expected prompt, chosen, rejected, margin)"
            ));
        }
    }
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(v @ Value::Array(_)) => Prompt::Messages(messages(v, "prompt")?),
        None => return Err("missing `prompt`".into()),
        Some(v) => {
            return Err(format!(
                "`prompt` must be a string or a message list, found {v}"
            ));
        }
    };
    let side = |key: &str| -> Result<Sample, String> {
        let completion = obj.get(key).ok_or_else(|| format!("missing `{key}`"))?;
        match (&prompt, completion) {
            (_, Value::String(s)) => Ok(Sample {
                prompt: prompt.clone(),
                completion: s.clone(),
                completion_tokens: None,
                metadata: Default::default(),
            }),
            (Prompt::Messages(p), v @ Value::Array(_)) => {
                // The conversation continues; the last message is the completion.
                let mut turns = messages(v, key)?;
                let last = turns
                    .pop()
                    .ok_or_else(|| format!("`{key}` is an empty message list"))?;
                let mut conversation = p.clone();
                conversation.extend(turns);
                Ok(Sample {
                    prompt: Prompt::Messages(conversation),
                    completion: last.content,
                    completion_tokens: None,
                    metadata: Default::default(),
                })
            }
            (Prompt::Text(_), Value::Array(_)) => Err(format!(
                "`{key}` is a message list but `prompt` is a string"
            )),
            (_, v) => Err(format!(
                "`{key}` must be a string or a message list, found {v}"
            )),
        }
    };
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| format!("`margin` must be a number, found {v}"))?,
        ),
    };
    Ok(PreferencePair {
        chosen: side("chosen")?,
        rejected: side("rejected")?,
        margin,
    })
}

fn messages(v: &Value, key: &str) -> Result<Vec<ChatMessage>, String> {
    serde_json::from_value::<Vec<ChatMessage>>(v.clone())
        .map_err(|e| format!("`{key}` must be a list of {{\"role\", \"content\"}} messages: {e}"))
}

/// A pair ready for the model.
struct TokenPair {
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    margin: f32,
}

/// Per-epoch results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub eval_accuracy: Option<f64>,
    pub seconds: f64,
}

/// The whole run's results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainReport {
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub skipped_lines: usize,
    pub skipped_too_long: usize,
    pub epochs: Vec<EpochReport>,
}

/// Trains a reward model and saves it to `opts.out`.
pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    if opts.batch_size == 0 || opts.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&opts.eval_fraction) {
        bail!(
            "--eval-fraction must be in [0, 1), got {}",
            opts.eval_fraction
        );
    }
    let loaded = load_pairs(&opts.data, opts.skip_invalid)?;
    for (line, problem) in &loaded.skipped {
        tracing::warn!(line, problem, "skipped invalid line");
    }
    let dev = device::training_device()?;
    let mut model = Model::load_with_head(&opts.base, HeadKind::Score, &dev, opts.seed)
        .with_context(|| format!("loading base model {}", opts.base.display()))?;
    let tokenizer = Tokenizer::from_dir(&opts.base)?;
    let max_length = opts
        .max_length
        .unwrap_or(model.config.max_position_embeddings);
    let dtype = match &opts.dtype {
        Some(s) => DType::parse(s)
            .with_context(|| format!("--dtype {s}: expected float32, bfloat16 or float16"))?,
        None => model.config.dtype,
    };

    let mut pairs = Vec::with_capacity(loaded.pairs.len());
    let mut too_long = 0;
    for (i, p) in loaded.pairs.iter().enumerate() {
        let ids = |s: &Sample| {
            reward_model_ids(&tokenizer, s).map_err(|e| anyhow::anyhow!("pair {i}: {e}"))
        };
        let (chosen, rejected) = (ids(&p.chosen)?, ids(&p.rejected)?);
        if chosen.len().max(rejected.len()) > max_length || chosen.is_empty() || rejected.is_empty()
        {
            too_long += 1;
            continue;
        }
        pairs.push(TokenPair {
            chosen,
            rejected,
            margin: p.margin.unwrap_or(opts.margin) as f32,
        });
    }
    if too_long > 0 {
        tracing::warn!(
            too_long,
            max_length,
            "skipped pairs longer than the maximum length"
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    pairs.shuffle(&mut rng);
    let eval = hold_out(&mut pairs, opts.eval_fraction);
    let train_set = pairs;

    let steps_per_epoch = train_set.len().div_ceil(opts.batch_size);
    let total = (steps_per_epoch * opts.epochs) as u64;
    let mut trainer = Trainer::fine_tuning(opts.lr, opts.weight_decay, total);
    let bar = progress_bar(total, opts.quiet);
    let mut report = TrainReport {
        train_pairs: train_set.len(),
        eval_pairs: eval.len(),
        skipped_lines: loaded.skipped.len(),
        skipped_too_long: too_long,
        epochs: Vec::new(),
    };
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    for epoch in 1..=opts.epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for batch in order.chunks(opts.batch_size) {
            let loss = pair_loss(&model, &train_set, batch, opts.center_coef)?;
            let (next, stats) = trainer.step(model, loss);
            model = next;
            loss_sum += stats.loss * batch.len() as f64;
            bar.set_message(format!("epoch {epoch} loss {:.4}", stats.loss));
            bar.inc(1);
        }
        let eval_accuracy = if eval.is_empty() {
            None
        } else {
            Some(pairwise_accuracy(&model.valid(), &eval, opts.batch_size)?)
        };
        let epoch_report = EpochReport {
            epoch,
            train_loss: loss_sum / train_set.len() as f64,
            eval_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            epoch,
            train_loss = epoch_report.train_loss,
            eval_accuracy = ?epoch_report.eval_accuracy,
            "reward model epoch"
        );
        report.epochs.push(epoch_report);
    }
    bar.finish_and_clear();

    let options = SaveOptions {
        dtype,
        ..Default::default()
    };
    model
        .valid()
        .save_with_tokenizer(&opts.out, &options, &opts.base)
        .with_context(|| format!("saving {}", opts.out.display()))?;
    let summary = serde_json::to_string_pretty(&json!(report)).expect("the report serialises");
    std::fs::write(opts.out.join("train_report.json"), summary)
        .with_context(|| format!("writing {}", opts.out.join("train_report.json").display()))?;
    Ok(report)
}

/// The BT loss of a batch of pairs: chosen and rejected go through one forward pass.
fn pair_loss(
    model: &Model,
    pairs: &[TokenPair],
    batch: &[usize],
    center_coef: f64,
) -> Result<Tensor<1>> {
    let mut seqs: Vec<&[u32]> = batch.iter().map(|&i| pairs[i].chosen.as_slice()).collect();
    seqs.extend(batch.iter().map(|&i| pairs[i].rejected.as_slice()));
    let n = batch.len();
    let scores = model.sequence_scores(&seqs)?.reshape([2 * n]);
    let chosen = scores.clone().narrow(0, 0, n);
    let rejected = scores.narrow(0, n, n);
    let margin: Vec<f32> = batch.iter().map(|&i| pairs[i].margin).collect();
    let margin = Tensor::<1>::from_data(TensorData::new(margin, [n]), &chosen.device());
    Ok(bradley_terry(chosen, rejected, margin, center_coef))
}

/// Share of pairs whose chosen side scores higher.
fn pairwise_accuracy(model: &Model, pairs: &[TokenPair], batch_size: usize) -> Result<f64> {
    let mut correct = 0usize;
    let all: Vec<usize> = (0..pairs.len()).collect();
    for batch in all.chunks(batch_size) {
        let mut seqs: Vec<&[u32]> = batch.iter().map(|&i| pairs[i].chosen.as_slice()).collect();
        seqs.extend(batch.iter().map(|&i| pairs[i].rejected.as_slice()));
        let scores = rlhf_model::host::to_vec(model.sequence_scores(&seqs)?);
        let n = batch.len();
        correct += (0..n).filter(|&k| scores[k] > scores[n + k]).count();
    }
    Ok(correct as f64 / pairs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_and_chat_pairs() {
        let p =
            parse_pair(r#"{"prompt": "Q", "chosen": " good", "rejected": " bad", "margin": 1}"#)
                .unwrap();
        assert_eq!(p.chosen.completion, " good");
        assert_eq!(p.margin, Some(1.0));
        let p = parse_pair(
            r#"{"prompt": [{"role":"user","content":"hi"}], "chosen": [{"role":"assistant","content":"hello"}], "rejected": "go away"}"#,
        )
        .unwrap();
        assert_eq!(p.chosen.completion, "hello");
        assert!(matches!(&p.chosen.prompt, Prompt::Messages(m) if m.len() == 1));
        assert_eq!(p.rejected.completion, "go away");
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        assert!(parse_pair("{").unwrap_err().contains("invalid JSON"));
        assert!(
            parse_pair(r#"{"prompt": "x", "chosen": "y"}"#)
                .unwrap_err()
                .contains("missing `rejected`")
        );
        assert!(
            parse_pair(r#"{"prompt": "x", "chosen": 3, "rejected": "z"}"#)
                .unwrap_err()
                .contains("`chosen`")
        );
        assert!(
            parse_pair(r#"{"prompt": "x", "chosen": "y", "rejected": "z", "extra": 1}"#)
                .unwrap_err()
                .contains("`extra`")
        );
    }

    #[test]
    fn load_reports_line_numbers_or_skips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n\nnot json\n",
        )
        .unwrap();
        let err = load_pairs(&path, false).unwrap_err().to_string();
        assert!(
            err.contains("p.jsonl:3") && err.contains("invalid JSON"),
            "{err}"
        );
        let loaded = load_pairs(&path, true).unwrap();
        assert_eq!(loaded.pairs.len(), 1);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].0, 3);
    }
}
