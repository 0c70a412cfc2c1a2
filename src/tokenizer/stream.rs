//! Streaming detokenization: text out as ids come in, never a broken character.
//!
//! A token's bytes may end inside a UTF-8 character (byte-fallback tokens, or byte-level BPE
//! splitting an emoji); those bytes are held back until the character is complete. Where the
//! vocabulary cleans up spaces on decoding (`" ,"` → `","`), the last few bytes are held back
//! too, since a later token can still change them. The concatenation of everything `push` and
//! `finish` return equals [`Tokenizer::decode`] of all the ids.
//!
//! Cost: constant per token, except with the space clean-up, where each push re-cleans the text
//! so far (linear in it: microseconds for a generation of thousands of tokens).

use super::{Tokenizer, TokenizerError, clean_up_spaces};

/// How many cleaned bytes at the end may still change when more text arrives: the clean-up
/// looks at most two bytes ahead in each of its three passes.
const CLEANUP_HOLD: usize = 8;

/// Turns token ids into text incrementally; see the module docs.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    special: bool,
    first: bool,
    /// Bytes received and not yet returned (without clean-up).
    pending: Vec<u8>,
    /// With clean-up: all bytes received, the cleaned copy, and how much of it was returned.
    raw: Vec<u8>,
    cleaned: Vec<u8>,
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tok: &'a Tokenizer, special: bool) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            special,
            first: true,
            pending: Vec::new(),
            raw: Vec::new(),
            cleaned: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one token; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let mut piece = self.tok.piece_for_stream(id, self.special)?;
        if self.first && self.tok.strips_first_space() {
            piece = piece.strip_prefix(b" ").unwrap_or(piece);
        }
        self.first = false;
        if !self.tok.cleans_spaces() {
            self.pending.extend_from_slice(piece);
            let (text, used) = complete_text(&self.pending, false);
            self.pending.drain(..used);
            return Ok(text);
        }
        self.raw.extend_from_slice(piece);
        self.cleaned.clear();
        self.cleaned.extend_from_slice(&self.raw);
        clean_up_spaces(&mut self.cleaned);
        let stable = self.cleaned.len().saturating_sub(CLEANUP_HOLD);
        if stable <= self.emitted {
            return Ok(String::new());
        }
        let (text, used) = complete_text(&self.cleaned[self.emitted..stable], false);
        self.emitted += used;
        Ok(text)
    }

    /// Everything still held back (an incomplete character becomes U+FFFD).
    pub fn finish(self) -> String {
        if !self.tok.cleans_spaces() {
            return complete_text(&self.pending, true).0;
        }
        let mut cleaned = self.raw;
        clean_up_spaces(&mut cleaned);
        complete_text(cleaned.get(self.emitted..).unwrap_or_default(), true).0
    }
}

/// The text of `bytes` up to an incomplete character at the end (all of it when `last`), and
/// how many bytes that used. Invalid bytes become U+FFFD.
fn complete_text(bytes: &[u8], last: bool) -> (String, usize) {
    let mut out = String::new();
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return (out, bytes.len());
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // Safe: from_utf8 vouched for this prefix.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        rest = &after[bad..];
                    }
                    None if last => {
                        out.push('\u{FFFD}');
                        return (out, bytes.len());
                    }
                    None => return (out, bytes.len() - after.len()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::complete_text;

    #[test]
    fn holds_back_incomplete_characters() {
        let smile = "🙂".as_bytes();
        assert_eq!(complete_text(&smile[..2], false), (String::new(), 0));
        assert_eq!(complete_text(smile, false), ("🙂".to_string(), 4));
        assert_eq!(complete_text(b"a\xF0\x9F", false), ("a".to_string(), 1));
        assert_eq!(
            complete_text(b"a\xF0\x9F", true),
            ("a\u{FFFD}".to_string(), 3)
        );
        assert_eq!(complete_text(b"\xFFb", false), ("\u{FFFD}b".to_string(), 2));
    }
}
