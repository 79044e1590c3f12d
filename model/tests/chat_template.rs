//! Chat templates rendered by the crate against what `transformers` renders: the fixture in
//! model/tests/fixtures/chat-template (Qwen2.5's ChatML template, conversations rendered with
//! `AutoTokenizer.apply_chat_template`, see the README there) must come out byte for byte, and
//! tokenise to the same ids.

use rlhf_model::testing::crate_fixtures_dir;
use rlhf_model::{ChatMessage, Tokenizer};
use serde_json::Value;

#[test]
fn qwen25_chat_template_renders_and_tokenises_as_transformers_does() {
    let dir = crate_fixtures_dir().join("chat-template");
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    assert!(tokenizer.has_chat_template());
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8, "{} cases", cases.len());
    let mut generation_prompt = [false, false];
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())
            .unwrap_or_else(|e| panic!("{name}: messages: {e}"));
        let add = case["add_generation_prompt"].as_bool().unwrap();
        generation_prompt[add as usize] = true;
        let rendered = tokenizer
            .apply_chat_template(&messages, add)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}: text");
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tokenizer.encode_chat(&messages, add).unwrap(),
            ids,
            "{name}: ids"
        );
    }
    assert_eq!(
        generation_prompt,
        [true, true],
        "both add_generation_prompt values"
    );
}
