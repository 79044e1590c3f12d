//! The pipeline's first stage: prompts, the SFT corpus and the preference pairs, as JSONL files
//! under `data/`, all drawn from the synthetic task with the pipeline's seed.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::spec::{Layout, PipelineSpec};
use crate::task::{Property, Request, Verdict, annotate, complete, judge, split_requests};

/// What the data stage wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub train_prompts: usize,
    pub eval_prompts: usize,
    pub held_out_combinations: usize,
    pub sft_examples: usize,
    /// Ground-truth share of SFT responses that are both helpful and harmless.
    pub sft_good_rate: f64,
    pub preference_pairs: usize,
    /// Share of preference labels that agree with the judge (among pairs the judge separates).
    pub helpful_label_agreement: f64,
    pub harmless_label_agreement: f64,
}

fn write_lines(path: &Path, lines: impl Iterator<Item = serde_json::Value>) -> Result<usize> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut n = 0;
    for line in lines {
        writeln!(f, "{line}")?;
        n += 1;
    }
    f.flush()?;
    Ok(n)
}

fn prompt_line(id: String, r: &Request) -> serde_json::Value {
    json!({"id": id, "prompt": r.prompt(), "metadata": {"topic": r.topic(), "tone": r.tone().name}})
}

/// Writes `data/{prompts,eval,sft,prefs-helpful,prefs-harmless}.jsonl`.
pub fn generate(spec: &PipelineSpec, layout: &Layout) -> Result<DataSummary> {
    let t = &spec.task;
    std::fs::create_dir_all(layout.data(""))?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let (train, held) = split_requests(t.held_out_fraction, spec.seed);
    let pick = |rng: &mut ChaCha8Rng| *train.choose(rng).expect("training combinations");

    let prompts: Vec<Request> = (0..t.train_prompts).map(|_| pick(&mut rng)).collect();
    write_lines(
        &layout.data("prompts.jsonl"),
        prompts
            .iter()
            .enumerate()
            .map(|(i, r)| prompt_line(format!("train-{i}"), r)),
    )?;
    // Held-out prompts cycle through every held-out combination evenly.
    write_lines(
        &layout.data("eval.jsonl"),
        (0..t.eval_prompts).map(|i| prompt_line(format!("eval-{i}"), &held[i % held.len()])),
    )?;

    let mut good = 0usize;
    let sft: Vec<serde_json::Value> = (0..t.sft_examples)
        .map(|_| {
            let r = pick(&mut rng);
            let response = complete(&r, t.sft_mix.sample(&mut rng), &mut rng);
            good += judge(&r, &response, true).good() as usize;
            json!({"prompt": r.prompt(), "response": response})
        })
        .collect();
    write_lines(&layout.data("sft.jsonl"), sft.into_iter())?;

    let mut agreement = [0.0; 2];
    for (k, (property, name)) in [
        (Property::Helpful, "helpful"),
        (Property::Harmless, "harmless"),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut agree, mut separable) = (0usize, 0usize);
        let truth = |v: &Verdict| match property {
            Property::Helpful => v.helpful,
            Property::Harmless => v.harmless,
        };
        let mut pairs: Vec<serde_json::Value> = Vec::with_capacity(t.preference_pairs);
        // Pairs the annotators call a tie are drawn again (bounded, in case the mix has only
        // one kind of completion).
        for _ in 0..t.preference_pairs * 50 {
            if pairs.len() == t.preference_pairs {
                break;
            }
            let r = pick(&mut rng);
            let a = complete(&r, t.preference_mix.sample(&mut rng), &mut rng);
            let b = complete(&r, t.preference_mix.sample(&mut rng), &mut rng);
            let (va, vb) = (judge(&r, &a, true), judge(&r, &b, true));
            let Some(a_wins) = annotate(property, &va, &vb, &t.annotators, &mut rng) else {
                continue;
            };
            if truth(&va) != truth(&vb) {
                separable += 1;
                agree += (truth(&va) == a_wins) as usize;
            }
            let (chosen, rejected) = if a_wins { (a, b) } else { (b, a) };
            pairs.push(json!({"prompt": r.prompt(), "chosen": chosen, "rejected": rejected}));
        }
        if pairs.len() < t.preference_pairs {
            bail!(
                "task.preference_mix: too few completions differ in {name} to label {} pairs",
                t.preference_pairs
            );
        }
        write_lines(
            &layout.data(&format!("prefs-{name}.jsonl")),
            pairs.into_iter(),
        )?;
        agreement[k] = agree as f64 / separable.max(1) as f64;
    }
    Ok(DataSummary {
        train_prompts: t.train_prompts,
        eval_prompts: t.eval_prompts,
        held_out_combinations: held.len(),
        sft_examples: t.sft_examples,
        sft_good_rate: good as f64 / t.sft_examples as f64,
        preference_pairs: t.preference_pairs,
        helpful_label_agreement: agreement[0],
        harmless_label_agreement: agreement[1],
    })
}

/// Every text of the corpus (prompts, responses, both sides of each pair): the tokenizer's
/// training data.
pub fn corpus(layout: &Layout) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for file in [
        "sft.jsonl",
        "prefs-helpful.jsonl",
        "prefs-harmless.jsonl",
        "eval.jsonl",
    ] {
        let path = layout.data(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}", path.display(), i + 1))?;
            for key in ["prompt", "response", "chosen", "rejected"] {
                if let Some(s) = v.get(key).and_then(serde_json::Value::as_str) {
                    texts.push(s.to_string());
                }
            }
        }
    }
    Ok(texts)
}
