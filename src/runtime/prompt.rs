//! Turning a user's prompt into token ids, the same way for every command.

use crate::tokenizer::Tokenizer;
use crate::tokenizer::chat::{ChatError, ChatMessage, ChatTemplate};

/// The ids of a prompt: special tokens written in the text (`<|im_start|>`, `<s>`) are parsed,
/// and BOS is put first when the vocabulary asks for it, unless the text already starts with it
/// (a chat template that writes `{{ bos_token }}` must not yield two). EOS is never appended: a
/// prompt is continued, not closed.
pub fn encode_prompt(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    let mut ids = tokenizer.encode(text, false, true);
    if let (true, Some(bos)) = (tokenizer.add_bos(), tokenizer.special().bos)
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    ids
}

/// A one-turn chat rendered with the model's own template (and a system message if given),
/// ending with the assistant's header (`add_generation_prompt`).
pub fn chat_prompt(
    tokenizer: &Tokenizer,
    system: Option<&str>,
    user: &str,
) -> Result<String, ChatError> {
    let template = ChatTemplate::from_tokenizer(tokenizer)?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", user));
    template.render(&messages, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn tokenizer(name: &str) -> Tokenizer {
        let f = GgufFile::open(format!("tests/data/tokenizer/ggml-vocab-{name}.gguf")).unwrap();
        Tokenizer::from_gguf(&f).unwrap()
    }

    #[test]
    fn bos_is_added_once_when_the_vocabulary_wants_it() {
        let spm = tokenizer("llama-spm");
        assert!(spm.add_bos());
        let plain = encode_prompt(&spm, "[INST] hi");
        assert_eq!(plain[0], 1);
        assert_ne!(plain[1], 1);
        // A template that writes the BOS text itself does not get a second one.
        assert_eq!(encode_prompt(&spm, "<s>[INST] hi"), plain);
    }

    #[test]
    fn no_bos_for_vocabularies_without_one() {
        let gpt2 = tokenizer("gpt-2");
        assert!(!gpt2.add_bos());
        assert_eq!(
            encode_prompt(&gpt2, "Hello"),
            gpt2.encode("Hello", false, true)
        );
    }
}
