//! Every TOML example the project shows parses with the real parser it is for.
//!
//! **What is checked**: each fenced ` ```toml ` block of `README.md` and `docs/*.md`, and each
//! `examples/**/*.toml` file.
//!
//! **Which parser** (markdown): the last non-blank line before the opening fence is an HTML
//! comment that names it; a block without one, or with one this test does not know, fails.
//!
//! - `<!-- parser: KIND -->`: the block is a whole file of KIND: `job`
//!   (`JobSpec::from_toml`, what `rlhf run`/`submit` read), `pipeline`
//!   (`PipelineSpec::from_toml`, a file with `[task]`), `reward` (`RewardConfig::from_toml`,
//!   `reward-server --config`), `learner` (`LearnerConfig::from_file`, `learner --config`).
//! - `<!-- fragment: KIND.PATH -->`: a deliberately partial block, checked inside a minimal valid
//!   file of KIND (`job`, `pipeline`, `reward`, `learner`): the block is put at the dotted table
//!   PATH (`job.rollout`, `job.learner.kl`; no PATH: the top level) and merged over the minimal
//!   file (tables key by key, other values replaced); where the minimal file has an array of
//!   tables at PATH (`job.objective`, `reward.objective`), the block is its one entry.
//!
//! **Example files** are whole files: a first line `# parser: KIND` decides, else the rule of
//! `rlhf run`: a `[task]` table makes a pipeline, anything else is a job.
//!
//! **Paths**: the parsers check that model folders hold a `config.json` and that data files
//! exist, and the examples name paths nobody has. So each block is parsed as a file in a fresh
//! temporary folder in which every path the block names is created first: model folders
//! (`policy.model`/`reference`/`critic`, an objective's `model`/`models`, the learner's
//! `policy`/`reference`/`critic`) with a `config.json`, data files (`data.prompts`,
//! `data.eval_prompts`, `learner.sft_regularizer.data`) empty; absolute paths are moved under
//! the temporary folder. Everything else goes through the parsers' full validation.
//!
//! A failure names the file and line of the block (the fence's line) and the parser's errors.

use std::path::{Path, PathBuf};

use rlhf_coordinator::job::JobSpec;
use rlhf_learner::LearnerConfig;
use rlhf_quickstart::PipelineSpec;
use rlhf_reward::RewardConfig;
use toml::{Table, Value};

/// One TOML example: where it is and what it says it is.
#[derive(Debug)]
struct Block {
    file: PathBuf,
    /// 1-based line of the opening fence (of the file's first line for a whole file).
    line: usize,
    /// The marker's text (`parser: job`, `fragment: job.rollout`), if any.
    marker: Option<String>,
    text: String,
}

/// The parsers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Job,
    Pipeline,
    Reward,
    Learner,
}

impl Kind {
    fn parse(name: &str) -> Result<Kind, String> {
        match name {
            "job" => Ok(Kind::Job),
            "pipeline" => Ok(Kind::Pipeline),
            "reward" => Ok(Kind::Reward),
            "learner" => Ok(Kind::Learner),
            other => Err(format!(
                "unknown parser `{other}` (known: job, pipeline, reward, learner)"
            )),
        }
    }

    /// The smallest valid file of this kind.
    fn minimal(self) -> Table {
        let text = match self {
            Kind::Job => {
                "name = \"docs-example\"\n[policy]\nmodel = \"models/policy\"\n[data]\nprompts = \"data/prompts.jsonl\"\n[[objective]]\nname = \"ok\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \".\"\n"
            }
            Kind::Pipeline => "name = \"docs-example\"\n[task]\n[evaluation]\nevery_steps = 1\n",
            Kind::Reward => {
                "[[objective]]\nname = \"ok\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \".\"\n"
            }
            Kind::Learner => {
                "policy = \"models/policy\"\noutput_dir = \"out\"\n[rewards]\nobjectives = [{ name = \"ok\", transform = \"identity\", weight = 1.0 }]\n"
            }
        };
        toml::from_str(text).expect("the minimal file is TOML")
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The fenced TOML blocks of a markdown text, with the marker before each.
fn markdown_blocks(file: &Path, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let Some(fence) = ["```", "~~~"].into_iter().find(|f| trimmed.starts_with(f)) else {
            i += 1;
            continue;
        };
        let indent = lines[i].len() - trimmed.len();
        let ticks = trimmed.len()
            - trimmed
                .trim_start_matches(fence.chars().next().unwrap())
                .len();
        let info = trimmed[ticks..].trim();
        let language = info
            .split(|c: char| c.is_whitespace() || c == ',' || c == '{')
            .next()
            .unwrap_or("");
        let start = i;
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() {
            let t = lines[i].trim();
            if t.starts_with(&fence[..1].repeat(ticks))
                && t.trim_start_matches(&fence[..1]).is_empty()
            {
                break;
            }
            let l = lines[i];
            let cut = l.len() - l.trim_start().len();
            body.push(&l[cut.min(indent)..]);
            i += 1;
        }
        i += 1; // the closing fence
        if language != "toml" {
            continue;
        }
        let marker = lines[..start]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| {
                l.trim()
                    .strip_prefix("<!--")?
                    .strip_suffix("-->")
                    .map(|m| m.trim().to_string())
            });
        blocks.push(Block {
            file: file.to_path_buf(),
            line: start + 1,
            marker,
            text: body.join("\n") + "\n",
        });
    }
    blocks
}

/// Every example: the markdown blocks and the example files, paths relative to the root.
fn all_blocks() -> Vec<Block> {
    let root = root();
    let mut markdown = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    markdown.extend(docs);
    let mut blocks = Vec::new();
    for file in markdown {
        let text = std::fs::read_to_string(&file).unwrap();
        let relative = file.strip_prefix(&root).unwrap();
        blocks.extend(markdown_blocks(relative, &text));
    }
    let mut examples = Vec::new();
    toml_files(&root.join("examples"), &mut examples);
    examples.sort();
    for file in examples {
        let text = std::fs::read_to_string(&file).unwrap();
        let marker = text
            .lines()
            .next()
            .and_then(|l| l.trim().strip_prefix('#'))
            .map(str::trim)
            .filter(|m| m.starts_with("parser:"))
            .map(str::to_string)
            .or_else(|| {
                let pipeline = rlhf_quickstart::is_pipeline(&text);
                Some(format!(
                    "parser: {}",
                    if pipeline { "pipeline" } else { "job" }
                ))
            });
        blocks.push(Block {
            file: file.strip_prefix(&root).unwrap().to_path_buf(),
            line: 1,
            marker,
            text,
        });
    }
    blocks
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "toml") {
            out.push(path);
        }
    }
}

/// Puts `patch` into `base` key by key (tables merge, other values replace).
fn merge(base: &mut Table, patch: Table) {
    for (key, value) in patch {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(p)) => merge(b, p),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `fragment` placed at `path` of `base` (see the module's doc).
fn place(base: &mut Table, path: &[&str], fragment: Table) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        merge(base, fragment);
        return Ok(());
    };
    let mut table = base;
    for p in parents {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` of the minimal file is not a table"))?;
    }
    match table.get_mut(*last) {
        Some(Value::Array(_)) => {
            table.insert(last.to_string(), Value::Array(vec![Value::Table(fragment)]));
        }
        Some(Value::Table(existing)) => merge(existing, fragment),
        None => {
            table.insert(last.to_string(), Value::Table(fragment));
        }
        Some(_) => return Err(format!("`{last}` of the minimal file is not a table")),
    }
    Ok(())
}

/// The file a block stands for, as a table, and its parser.
fn document(block: &Block) -> Result<(Kind, Table), String> {
    let Some(marker) = &block.marker else {
        return Err("no parser for this TOML block: put `<!-- parser: job|pipeline|reward|learner -->` or `<!-- fragment: job.TABLE -->` on the line before it (see tests/tests/docs.rs)".into());
    };
    let table: Table = toml::from_str(&block.text).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                block.text[..s.start.min(block.text.len())]
                    .matches('\n')
                    .count()
                    + 1
            })
            .unwrap_or(0);
        format!("not TOML (line {line} of the block): {}", e.message())
    })?;
    if let Some(kind) = marker.strip_prefix("parser:") {
        return Ok((Kind::parse(kind.trim())?, table));
    }
    if let Some(at) = marker.strip_prefix("fragment:") {
        let mut parts = at.trim().split('.');
        let kind = Kind::parse(parts.next().unwrap_or(""))?;
        let path: Vec<&str> = parts.collect();
        let mut doc = kind.minimal();
        place(&mut doc, &path, table)?;
        return Ok((kind, doc));
    }
    Err(format!(
        "unknown marker `<!-- {marker} -->` before a TOML block (expected `parser: KIND` or `fragment: KIND.PATH`)"
    ))
}

/// A path value the parser will check: a model folder or a data file.
#[derive(Clone, Copy)]
enum Needs {
    ModelDir,
    File,
}

/// Where each kind names paths that must exist.
fn path_fields(kind: Kind) -> &'static [(&'static str, Needs)] {
    match kind {
        Kind::Job => &[
            ("policy.model", Needs::ModelDir),
            ("policy.reference", Needs::ModelDir),
            ("policy.critic", Needs::ModelDir),
            ("data.prompts", Needs::File),
            ("data.eval_prompts", Needs::File),
            ("learner.sft_regularizer.data", Needs::File),
            ("objective[].model", Needs::ModelDir),
            ("objective[].models[]", Needs::ModelDir),
        ],
        Kind::Reward => &[
            ("objective[].model", Needs::ModelDir),
            ("objective[].models[]", Needs::ModelDir),
        ],
        Kind::Learner => &[
            ("policy", Needs::ModelDir),
            ("reference", Needs::ModelDir),
            ("critic", Needs::ModelDir),
            ("sft_regularizer.data", Needs::File),
        ],
        Kind::Pipeline => &[],
    }
}

/// Every string at a `a.b[].c[]` path of `value` (missing parts: none).
fn strings_at<'a>(value: &'a mut Value, path: &[&str], out: &mut Vec<&'a mut String>) {
    let Some((first, rest)) = path.split_first() else {
        if let Value::String(s) = value {
            out.push(s);
        }
        return;
    };
    let (key, each) = match first.strip_suffix("[]") {
        Some(key) => (key, true),
        None => (*first, false),
    };
    let Some(child) = value.as_table_mut().and_then(|t| t.get_mut(key)) else {
        return;
    };
    match (each, child) {
        (true, Value::Array(items)) => {
            for item in items {
                strings_at(item, rest, out);
            }
        }
        (true, _) => {}
        (false, child) => strings_at(child, rest, out),
    }
}

/// Creates what the document's paths name under `dir` (absolute ones moved there).
fn provide_paths(kind: Kind, doc: &mut Table, dir: &Path) {
    let mut value = Value::Table(std::mem::take(doc));
    for (field, needs) in path_fields(kind) {
        let path: Vec<&str> = field.split('.').collect();
        let mut found = Vec::new();
        strings_at(&mut value, &path, &mut found);
        for s in found {
            let p = Path::new(s.as_str());
            let target = match p.strip_prefix("/") {
                Ok(inside) => dir.join(inside),
                Err(_) => dir.join(p),
            };
            *s = target.display().to_string();
            match needs {
                Needs::ModelDir => {
                    std::fs::create_dir_all(&target).unwrap();
                    std::fs::write(target.join("config.json"), "{}").unwrap();
                }
                Needs::File => {
                    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                    std::fs::write(&target, "").unwrap();
                }
            }
        }
    }
    let Value::Table(t) = value else {
        unreachable!()
    };
    *doc = t;
}

/// Parses one block with its parser; the parser's errors on failure.
fn check(block: &Block) -> Result<Kind, String> {
    let (kind, mut doc) = document(block)?;
    let dir = tempfile::tempdir().unwrap();
    provide_paths(kind, &mut doc, dir.path());
    let text = toml::to_string(&doc).map_err(|e| format!("re-serialising: {e}"))?;
    let file = dir.path().join("example.toml");
    let hide = |e: String| e.replace(&file.display().to_string(), "<block>");
    let result = match kind {
        Kind::Job => JobSpec::from_toml(&text, &file)
            .map(|_| ())
            .map_err(|p| p.join("; ")),
        Kind::Pipeline => PipelineSpec::from_toml(&text, &file)
            .map(|_| ())
            .map_err(|p| p.join("; ")),
        Kind::Reward => RewardConfig::from_toml(&text, &file)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Kind::Learner => {
            std::fs::write(&file, &text).unwrap();
            LearnerConfig::from_file(&file)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        }
    };
    result
        .map(|()| kind)
        .map_err(|e| format!("{kind:?} parser: {}", hide(e)))
}

#[test]
fn every_toml_example_parses_with_its_parser() {
    let blocks = all_blocks();
    // The examples this test was written against are found (a broken scan checks nothing).
    for (file, kind) in [
        ("docs/job-config.md", Kind::Job),
        ("docs/reward-server.md", Kind::Reward),
        ("examples/quickstart/job.toml", Kind::Pipeline),
    ] {
        assert!(
            blocks
                .iter()
                .any(|b| b.file == Path::new(file) && document(b).is_ok_and(|(k, _)| k == kind)),
            "no {kind:?} example found in {file}"
        );
    }
    let failures: Vec<String> = blocks
        .iter()
        .filter_map(|b| {
            check(b)
                .err()
                .map(|e| format!("{}:{}: {e}", b.file.display(), b.line))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} TOML examples do not parse:\n{}",
        failures.len(),
        blocks.len(),
        failures.join("\n")
    );
}

#[test]
fn a_bad_or_unmarked_block_is_named_with_its_file_and_line() {
    let md = r#"# Title

<!-- fragment: job.objective -->
```toml
name = "judge"
kind = "remote"
address = "http://10.0.0.5:50061"
```

The key the docs once had:

<!-- fragment: job.objective -->
```toml
name = "judge"
kind = "remote"
url = "http://10.0.0.5:50061"
```

```toml
steps = 3
```

<!-- parser: job -->
```toml
name = "x"
[policy
```

<!-- fragment: job.rollout -->
```toml
steps = 0
```

<!-- parser: ini -->
```toml
a = 1
```

- in a list:

  <!-- parser: reward -->
  ```toml
  [[objective]]
  name = "m"
  kind = "model"
  model = "/models/rm"
  ```
"#;
    let blocks = markdown_blocks(Path::new("x.md"), md);
    let results: Vec<(usize, Result<Kind, String>)> =
        blocks.iter().map(|b| (b.line, check(b))).collect();
    assert_eq!(results.len(), 7, "{results:?}");
    assert_eq!(results[0], (4, Ok(Kind::Job)));
    let err = |i: usize| {
        results[i]
            .1
            .clone()
            .expect_err(&format!("block {i} should fail"))
    };
    assert_eq!(results[1].0, 13);
    assert!(err(1).contains("unknown field `url`"), "{}", err(1));
    assert_eq!(results[2].0, 19);
    assert!(err(2).contains("no parser"), "{}", err(2));
    assert!(err(3).contains("not TOML (line "), "{}", err(3));
    assert!(err(4).contains("rollout.steps"), "{}", err(4));
    assert!(err(5).contains("unknown parser `ini`"), "{}", err(5));
    // An absolute model path: created in the sandbox, so the indented block parses.
    assert_eq!(results[6].1, Ok(Kind::Reward));
}
