//! Stop strings over streamed text.
//!
//! A generator produces text a piece at a time (one token's worth), and a stop string may span
//! several pieces. [`StopMatcher`] sits between the generator and the user:
//!
//! - text that could be the start of a stop string is held back, so the user never sees part
//!   of a stop string;
//! - held text is released as soon as it can no longer become a stop string;
//! - when a stop string completes, the text before it is released, the stop string and anything
//!   after it are dropped, and the matcher reports which stop string it was.
//!
//! The visible output depends only on the whole text, never on how it was cut into pieces: the
//! stop is the occurrence that completes first (the smallest end offset; among occurrences that
//! complete together, the one that starts first), exactly what a reader scanning the text left to
//! right would find. [`StopMatcher::push_bytes`] accepts raw bytes (token pieces may split a UTF-8
//! character) and never releases part of a character.
//!
//! ```
//! use m40_llm::runtime::stop::StopMatcher;
//!
//! let mut m = StopMatcher::new(["<|im_end|>"])?;
//! assert_eq!(m.push("Hello<|im").text, "Hello"); // "<|im" is held back
//! let out = m.push("_end|> ignored");
//! assert_eq!((out.text.as_str(), out.stop), ("", Some(0)));
//! # Ok::<(), m40_llm::runtime::stop::StopError>(())
//! ```

/// A stop string list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// An empty stop string would match before any text.
    #[error("stop string {index} is empty; stop strings must contain at least one character")]
    EmptyStop { index: usize },
}

/// What one push (or [`finish`](StopMatcher::finish)) releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Text the user may see now.
    pub text: String,
    /// The index of the stop string that completed in this push, if one did. `text` is then the
    /// rest of the text before it, and the matcher accepts no more text.
    pub stop: Option<usize>,
}

/// Finds stop strings in streamed text; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Length in bytes of the longest stop string.
    longest: usize,
    /// Text held back because it could be the start of a stop string. Never contains a whole one.
    held: String,
    /// The start of a UTF-8 character whose other bytes have not arrived (`push_bytes`).
    partial_char: Vec<u8>,
    /// The stop string that ended the text, once one has.
    stopped: Option<usize>,
}

impl StopMatcher {
    /// A matcher for these stop strings (in the order their indices refer to). An empty list
    /// is fine: text then passes straight through. An empty stop string is an error.
    pub fn new<I, S>(stops: I) -> Result<Self, StopError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(StopError::EmptyStop { index });
        }
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Ok(Self {
            stops,
            longest,
            held: String::new(),
            partial_char: Vec::new(),
            stopped: None,
        })
    }

    /// The stop strings, in index order.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// The index of the stop string that ended the text, if one has.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// The text held back so far (a possible start of a stop string).
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next piece of text. After a stop, pieces are ignored and release nothing.
    ///
    /// Bytes of an unfinished character from [`push_bytes`](Self::push_bytes) are flushed
    /// first, as U+FFFD: a `&str` piece cannot finish them.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stopped.is_some() {
            return Released::default();
        }
        let mut out = self.flush_partial_char();
        if out.stop.is_some() {
            return out;
        }
        let more = self.push_str(piece);
        out.text.push_str(&more.text);
        out.stop = more.stop;
        out
    }

    /// Feeds the next piece as bytes, which may start or end in the middle of a UTF-8 character
    /// (as token pieces of a byte-level vocabulary do). An unfinished character waits for its
    /// remaining bytes; invalid bytes become U+FFFD, as [`String::from_utf8_lossy`] would
    /// replace them in the whole text.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Released {
        if self.stopped.is_some() {
            return Released::default();
        }
        self.partial_char.extend_from_slice(bytes);
        let pending = std::mem::take(&mut self.partial_char);
        let mut text = String::new();
        let mut rest = pending.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8, so this never fails.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // The text ends inside a character: wait for the rest of it.
                        None => {
                            self.partial_char = after.to_vec();
                            break;
                        }
                        Some(len) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[len..];
                        }
                    }
                }
            }
        }
        self.push_str(&text)
    }

    /// Ends the text (end of sequence, token limit, ...): releases whatever is held, since no
    /// stop string can complete any more. Unfinished character bytes become U+FFFD, which is
    /// still matched against the stop strings.
    pub fn finish(&mut self) -> Released {
        if self.stopped.is_some() {
            return Released::default();
        }
        let mut out = self.flush_partial_char();
        if out.stop.is_none() {
            out.text.push_str(&self.held);
        }
        self.held.clear();
        out
    }

    /// Pushes the replacement character for an unfinished character from `push_bytes`, if any.
    fn flush_partial_char(&mut self) -> Released {
        if self.partial_char.is_empty() {
            return Released::default();
        }
        self.partial_char.clear();
        self.push_str("\u{FFFD}")
    }

    fn push_str(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        if let Some((start, index)) = self.first_complete_stop() {
            self.held.truncate(start);
            self.stopped = Some(index);
            return Released {
                text: std::mem::take(&mut self.held),
                stop: Some(index),
            };
        }
        let keep_from = self.possible_stop_start();
        let text = self.held.drain(..keep_from).collect();
        Released { text, stop: None }
    }

    /// The stop occurrence in `held` that completes first: smallest end, then smallest start,
    /// then lowest index. Returns its start and the stop's index.
    fn first_complete_stop(&self) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (index, stop) in self.stops.iter().enumerate() {
            // The first occurrence of a string is also the one that ends first.
            if let Some(start) = self.held.find(stop.as_str()) {
                let end = start + stop.len();
                if best.is_none_or(|(e, s, _)| (end, start) < (e, s)) {
                    best = Some((end, start, index));
                }
            }
        }
        best.map(|(_, start, index)| (start, index))
    }

    /// Where the longest suffix of `held` that begins some stop string starts (`held.len()` if
    /// none does). Only suffixes shorter than the longest stop string can qualify.
    fn possible_stop_start(&self) -> usize {
        let len = self.held.len();
        let first = len.saturating_sub(self.longest.saturating_sub(1));
        (first..len)
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the pieces and then finishes; returns every release's text and the stop.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, Option<usize>) {
        let mut m = StopMatcher::new(stops.iter().copied()).unwrap();
        let mut texts = Vec::new();
        let mut stop = None;
        for piece in pieces {
            let out = m.push(piece);
            texts.push(out.text);
            stop = stop.or(out.stop);
        }
        let out = m.finish();
        texts.push(out.text);
        (texts, stop.or(out.stop))
    }

    #[test]
    fn no_stops_pass_text_straight_through() {
        let (texts, stop) = run(&[], &["a", "bc", ""]);
        assert_eq!(texts, ["a", "bc", "", ""]);
        assert_eq!(stop, None);
    }

    #[test]
    fn stop_spanning_pieces_is_found_and_never_shown() {
        let (texts, stop) = run(&["STOP"], &["hello S", "T", "O", "P world"]);
        assert_eq!(texts, ["hello ", "", "", "", ""]);
        assert_eq!(stop, Some(0));
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let (texts, stop) = run(&["STOP"], &["a ST", "OX b"]);
        assert_eq!(texts, ["a ", "STOX b", ""]);
        assert_eq!(stop, None);
    }

    #[test]
    fn held_text_is_released_at_finish() {
        let (texts, stop) = run(&["STOP"], &["a ST"]);
        assert_eq!(texts, ["a ", "ST"]);
        assert_eq!(stop, None);
    }

    #[test]
    fn text_after_the_stop_is_dropped_and_later_pushes_ignored() {
        let mut m = StopMatcher::new(["\n\n"]).unwrap();
        let out = m.push("one\n\ntwo");
        assert_eq!(
            out,
            Released {
                text: "one".into(),
                stop: Some(0)
            }
        );
        assert_eq!(m.push("three"), Released::default());
        assert_eq!(m.finish(), Released::default());
        assert_eq!(m.stopped(), Some(0));
    }

    #[test]
    fn the_stop_that_completes_first_wins() {
        // "bc" completes before "abcd" does, though "abcd" starts earlier.
        let (texts, stop) = run(&["abcd", "bc"], &["xabcd"]);
        assert_eq!(texts, ["xa", ""]);
        assert_eq!(stop, Some(1));
        // Completing together: the one that starts first.
        let (texts, stop) = run(&["cd", "bcd"], &["abcde"]);
        assert_eq!(texts, ["a", ""]);
        assert_eq!(stop, Some(1));
    }

    #[test]
    fn a_self_overlapping_stop_holds_only_what_can_still_match() {
        let mut m = StopMatcher::new(["aab"]).unwrap();
        assert_eq!(m.push("xaa").text, "x");
        assert_eq!(m.held(), "aa");
        // "aaa": the first "a" can no longer start "aab", the last two still can.
        assert_eq!(m.push("a").text, "a");
        assert_eq!(m.held(), "aa");
        assert_eq!(
            m.push("b"),
            Released {
                text: String::new(),
                stop: Some(0)
            }
        );
    }

    #[test]
    fn multibyte_stops_hold_whole_characters() {
        let (texts, stop) = run(&["é!"], &["café", "?"]);
        assert_eq!(texts, ["caf", "é?", ""]);
        assert_eq!(stop, None);
    }

    #[test]
    fn bytes_of_a_split_character_wait_for_the_rest() {
        let mut m = StopMatcher::new(["<end>"]).unwrap();
        let euro = "€".as_bytes(); // e2 82 ac
        assert_eq!(m.push_bytes(&euro[..1]).text, "");
        assert_eq!(m.push_bytes(&euro[1..2]).text, "");
        assert_eq!(m.push_bytes(&[euro[2], b'5']).text, "€5");
        assert_eq!(m.push_bytes(b"<e").text, "");
        assert_eq!(
            m.push_bytes(b"nd>"),
            Released {
                text: String::new(),
                stop: Some(0)
            }
        );
    }

    #[test]
    fn invalid_and_unfinished_bytes_become_replacement_characters() {
        let mut m = StopMatcher::new(["zz"]).unwrap();
        assert_eq!(m.push_bytes(b"a\xffb").text, "a\u{FFFD}b");
        assert_eq!(m.push_bytes(b"\xe2\x82").text, "");
        // A &str piece cannot finish the character: it is flushed first.
        assert_eq!(m.push("c").text, "\u{FFFD}c");
        assert_eq!(m.push_bytes(b"\xe2").text, "");
        assert_eq!(m.finish().text, "\u{FFFD}");
    }

    #[test]
    fn a_replacement_character_can_complete_a_stop() {
        let mut m = StopMatcher::new(["x\u{FFFD}"]).unwrap();
        assert_eq!(m.push_bytes(b"ax\xe2").text, "a");
        assert_eq!(
            m.finish(),
            Released {
                text: String::new(),
                stop: Some(0)
            }
        );
    }

    #[test]
    fn empty_stop_strings_are_rejected() {
        assert_eq!(
            StopMatcher::new(["ok", ""]).unwrap_err(),
            StopError::EmptyStop { index: 1 }
        );
    }
}
