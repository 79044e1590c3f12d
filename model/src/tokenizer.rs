//! Tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`).
//!
//! The chat template is rendered with minijinja as `transformers` renders it: `trim_blocks` and
//! `lstrip_blocks` on, Python string methods available (`.strip()`, `.startswith()`, ...),
//! `raise_exception` and `strftime_now` defined, special tokens passed as variables. The rendered
//! text is then tokenised without adding special tokens, because the template already wrote them.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::{ModelError, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special tokens named in `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A model folder's tokenizer and, when it has one, its chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    special: SpecialTokens,
    dir: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!(
                "{}: file not found",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let (chat_template, special) = read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        Ok(Tokenizer {
            inner,
            chat_template,
            special,
            dir: dir.to_path_buf(),
        })
    }

    /// Wraps an in-memory tokenizer (e.g. one just trained), without a chat template.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Self {
        Tokenizer {
            inner,
            chat_template: None,
            special,
            dir: PathBuf::new(),
        }
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The special tokens of `tokenizer_config.json`.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Whether a chat template is available.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (e.g. adds BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(format!("encode: {e}")))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("decode: {e}")))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders the chat template over `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(ModelError::ChatTemplate(format!(
                "{}: the model has no chat_template in tokenizer_config.json; pass plain text instead",
                self.dir.display()
            )));
        };
        render_chat_template(template, messages, add_generation_prompt, &self.special)
    }

    /// Renders the chat template and tokenises the result (without adding special tokens again).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// Reads the chat template and special tokens; a missing file means neither.
fn read_tokenizer_config(path: &Path) -> Result<(Option<String>, SpecialTokens)> {
    if !path.exists() {
        return Ok((None, SpecialTokens::default()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let json: Json = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let token = |field: &str| -> Result<Option<String>> {
        match json.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            // AddedToken form: {"content": "<s>", ...}
            Some(Json::Object(o)) => match o.get("content") {
                Some(Json::String(s)) => Ok(Some(s.clone())),
                _ => Err(ModelError::config(
                    path,
                    field,
                    "expected a string or {\"content\": ...}",
                )),
            },
            Some(v) => Err(ModelError::config(
                path,
                field,
                format!("expected a string, found {v}"),
            )),
        }
    };
    let special = SpecialTokens {
        bos: token("bos_token")?,
        eos: token("eos_token")?,
        pad: token("pad_token")?,
        unk: token("unk_token")?,
    };
    let template = match json.get("chat_template") {
        None | Some(Json::Null) => read_template_file(path)?,
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: use "default".
        Some(Json::Array(items)) => {
            let named = items
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
            match named.and_then(|t| t.get("template")).and_then(Json::as_str) {
                Some(t) => Some(t.to_string()),
                None => {
                    return Err(ModelError::config(
                        path,
                        "chat_template",
                        "a list of templates without one named \"default\"",
                    ));
                }
            }
        }
        Some(v) => {
            return Err(ModelError::config(
                path,
                "chat_template",
                format!("expected a string, found {v}"),
            ));
        }
    };
    Ok((template, special))
}

/// transformers ≥ 4.43 may store the template beside the config as `chat_template.jinja`.
fn read_template_file(config_path: &Path) -> Result<Option<String>> {
    let jinja = config_path.with_file_name("chat_template.jinja");
    if jinja.exists() {
        std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| ModelError::io(&jinja, e))
    } else {
        Ok(None)
    }
}

/// Renders an HF chat template (pure function: template and inputs in, text out).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    special: &SpecialTokens,
) -> Result<String> {
    use minijinja::{Environment, Error, ErrorKind, Value};

    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |_format: String| -> String {
        // Templates use this to print today's date; a fixed date keeps rendering reproducible.
        "26 Nov 2026".to_string()
    });
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| ModelError::ChatTemplate(format!("cannot parse: {e}")))?;
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            Value::from_pairs([
                ("role", Value::from(m.role.clone())),
                ("content", Value::from(m.content.clone())),
            ])
        })
        .collect();
    let opt = |s: &Option<String>| s.clone().map(Value::from).unwrap_or(Value::from(""));
    let ctx = Value::from_pairs([
        ("messages", Value::from(messages)),
        ("add_generation_prompt", Value::from(add_generation_prompt)),
        ("bos_token", opt(&special.bos)),
        ("eos_token", opt(&special.eos)),
        ("pad_token", opt(&special.pad)),
        ("unk_token", opt(&special.unk)),
    ]);
    tmpl.render(ctx)
        .map_err(|e| ModelError::ChatTemplate(format!("cannot render: {e}")))
}

/// Files that make up a model folder's tokenizer, copied next to saved weights so the folder is
/// complete for `transformers` and for us.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    // The slow tokenizer's files, for tools that read them instead of tokenizer.json.
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Copies the tokenizer files that exist in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| ModelError::io(to, e))?;
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            let dst = to.join(name);
            std::fs::copy(&src, &dst).map_err(|e| ModelError::io(&dst, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_LIKE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn special() -> SpecialTokens {
        SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            ..Default::default()
        }
    }

    #[test]
    fn renders_messages_and_generation_prompt() {
        let msgs = [ChatMessage::new("user", " hi ")];
        let out = render_chat_template(LLAMA3_LIKE, &msgs, true, &special()).unwrap();
        assert_eq!(
            out,
            "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let out = render_chat_template(LLAMA3_LIKE, &msgs, false, &special()).unwrap();
        assert!(!out.ends_with("\n\n"));
    }

    #[test]
    fn python_methods_and_block_trimming() {
        let t = "{% for m in messages %}\n  {% if m.role.startswith('u') %}{{ m.content.strip() }}{% endif %}\n{% endfor %}";
        let out = render_chat_template(t, &[ChatMessage::new("user", "  x  ")], false, &special())
            .unwrap();
        assert_eq!(out, "x");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{{ raise_exception('only user and assistant roles') }}";
        let err = render_chat_template(t, &[], false, &special()).unwrap_err();
        assert!(
            err.to_string().contains("only user and assistant roles"),
            "{err}"
        );
    }
}
