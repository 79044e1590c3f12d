//! Supervised fine-tuning: next-token NLL on prompt/response pairs, with the loss on response
//! tokens only. Used by `rlhf sft` and as the SFT regulariser of the RL loss (REFERENCES.md §6).
//!
//! Data: JSONL, one example per line, either `{"prompt": "...", "response": "..."}` or
//! `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message is the response, the
//! conversation before it the prompt, rendered with the chat template). The prompt is tokenised
//! with special tokens, the response without, and the model's EOS is appended to the response
//! so the policy learns to stop.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rlhf_model::burn::module::Module;
use rlhf_model::burn::tensor::Tensor;
use rlhf_model::optim::{Trainer, hold_out, progress_bar};
use rlhf_model::{ChatMessage, DType, Model, SaveOptions, Tokenizer, device};
use serde_json::Value;

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

/// Reads and tokenises an SFT file. A malformed line is an error with its number unless
/// `skip_invalid`; examples longer than `max_length` tokens are dropped and counted.
pub fn load_examples(
    path: &Path,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
    max_length: usize,
    skip_invalid: bool,
) -> Result<(Vec<SftExample>, usize, usize)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (mut examples, mut skipped, mut too_long) = (Vec::new(), 0usize, 0usize);
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let number = i + 1;
        let line = line.with_context(|| format!("{}:{number}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_example(&line, tokenizer, eos) {
            Ok(ex) if ex.prompt.len() + ex.response.len() > max_length => too_long += 1,
            Ok(ex) => examples.push(ex),
            Err(problem) if skip_invalid => {
                tracing::warn!(line = number, problem, "skipped invalid SFT line");
                skipped += 1;
            }
            Err(problem) => bail!("{}:{number}: {problem}", path.display()),
        }
    }
    if examples.is_empty() {
        bail!(
            "{}: no usable SFT examples ({skipped} invalid, {too_long} too long)",
            path.display()
        );
    }
    Ok((examples, skipped, too_long))
}

fn parse_example(
    line: &str,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
) -> Result<SftExample, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let (prompt, mut response) = match (
        value.get("prompt"),
        value.get("response"),
        value.get("messages"),
    ) {
        (Some(Value::String(p)), Some(Value::String(r)), None) => (
            tokenizer.encode(p, true).map_err(|e| e.to_string())?,
            tokenizer.encode(r, false).map_err(|e| e.to_string())?,
        ),
        (None, None, Some(m)) => {
            let mut messages: Vec<ChatMessage> = serde_json::from_value(m.clone())
                .map_err(|e| format!("`messages` must be a list of {{role, content}}: {e}"))?;
            let last = messages.pop().ok_or("`messages` is empty")?;
            if messages.is_empty() {
                return Err("`messages` needs a prompt turn before the response".into());
            }
            (
                tokenizer
                    .encode_chat(&messages, true)
                    .map_err(|e| e.to_string())?,
                tokenizer
                    .encode(&last.content, false)
                    .map_err(|e| e.to_string())?,
            )
        }
        _ => {
            return Err(
                "expected {\"prompt\", \"response\"} strings or {\"messages\": [...]}".into(),
            );
        }
    };
    if prompt.is_empty() {
        return Err("the prompt tokenises to nothing".into());
    }
    if let Some(eos) = eos
        && response.last() != Some(&eos)
    {
        response.push(eos);
    }
    if response.is_empty() {
        return Err("the response is empty".into());
    }
    Ok(SftExample { prompt, response })
}

/// Mean NLL per response token of a batch (differentiable).
pub fn nll(model: &Model, batch: &[&SftExample]) -> Result<Tensor<1>> {
    let pairs: Vec<(&[u32], &[u32])> = batch
        .iter()
        .map(|e| (e.prompt.as_slice(), e.response.as_slice()))
        .collect();
    let out = model.completion_logprobs(&pairs, 1.0)?;
    Ok(out.logprobs.sum().neg() / out.mask.sum().clamp_min(1.0))
}

/// Options of `rlhf sft`.
#[derive(Debug, Clone, clap::Args)]
pub struct SftOptions {
    /// Base model folder (causal LM).
    #[arg(long)]
    pub model: PathBuf,
    /// SFT data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Output model folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Peak learning rate (warmup over 5% of the steps, then cosine to 10%).
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Examples longer than this many tokens are skipped (default: the context length).
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long)]
    pub skip_invalid: bool,
    /// Storage dtype of the saved weights (default: the base model's).
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long)]
    pub quiet: bool,
}

/// Per-epoch SFT results.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SftEpoch {
    pub epoch: usize,
    pub train_nll: f64,
    pub eval_nll: Option<f64>,
    pub seconds: f64,
}

/// Fine-tunes `opts.model` on `opts.data` and saves the result with its tokenizer.
pub fn train_sft(opts: &SftOptions) -> Result<Vec<SftEpoch>> {
    if opts.batch_size == 0 || opts.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    let dev = device::training_device()?;
    let mut model = Model::load(&opts.model, &dev)
        .with_context(|| format!("loading {}", opts.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&opts.model)?;
    let max_length = opts
        .max_length
        .unwrap_or(model.config.max_position_embeddings);
    let eos = model.config.eos_token_ids.first().copied();
    let (mut examples, skipped, too_long) =
        load_examples(&opts.data, &tokenizer, eos, max_length, opts.skip_invalid)?;
    tracing::info!(
        examples = examples.len(),
        skipped,
        too_long,
        "SFT data loaded"
    );
    let dtype = match &opts.dtype {
        Some(s) => DType::parse(s)
            .with_context(|| format!("--dtype {s}: expected float32, bfloat16 or float16"))?,
        None => model.config.dtype,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    examples.shuffle(&mut rng);
    let eval = hold_out(&mut examples, opts.eval_fraction);
    let steps = (examples.len().div_ceil(opts.batch_size) * opts.epochs) as u64;
    let mut trainer = Trainer::fine_tuning(opts.lr, opts.weight_decay, steps);
    let bar = progress_bar(steps, opts.quiet);
    let mut report = Vec::new();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    for epoch in 1..=opts.epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        let (mut sum, mut count) = (0.0, 0usize);
        for chunk in order.chunks(opts.batch_size) {
            let batch: Vec<&SftExample> = chunk.iter().map(|&i| &examples[i]).collect();
            let loss = nll(&model, &batch)?;
            let (next, stats) = trainer.step(model, loss);
            model = next;
            sum += stats.loss;
            count += 1;
            bar.set_message(format!("epoch {epoch} nll {:.4}", stats.loss));
            bar.inc(1);
        }
        let eval_nll = if eval.is_empty() {
            None
        } else {
            let inference = model.valid();
            let mut total = 0.0;
            let refs: Vec<&SftExample> = eval.iter().collect();
            for chunk in refs.chunks(opts.batch_size) {
                total += rlhf_model::host::to_vec(nll(&inference, chunk)?)[0] as f64
                    * chunk.len() as f64;
            }
            Some(total / eval.len() as f64)
        };
        let e = SftEpoch {
            epoch,
            train_nll: sum / count.max(1) as f64,
            eval_nll,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(epoch, train_nll = e.train_nll, eval_nll = ?e.eval_nll, "SFT epoch");
        report.push(e);
    }
    bar.finish_and_clear();
    let options = SaveOptions {
        dtype,
        ..Default::default()
    };
    model
        .valid()
        .save_with_tokenizer(&opts.out, &options, &opts.model)
        .with_context(|| format!("saving {}", opts.out.display()))?;
    Ok(report)
}
