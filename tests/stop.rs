//! Stop-string matching over streamed text: however the text is cut into pieces (or bytes),
//! the user sees the same output, and never part of a stop string.

use m40_llm::runtime::stop::StopMatcher;
use proptest::prelude::*;

/// What the user should see of `text`, computed on the whole text: everything before the stop
/// occurrence that completes first (smallest end, then smallest start, then lowest index).
fn reference(text: &str, stops: &[String]) -> (String, Option<usize>) {
    let first = stops
        .iter()
        .enumerate()
        .filter_map(|(index, stop)| {
            let start = text.find(stop.as_str())?;
            Some((start + stop.len(), start, index))
        })
        .min();
    match first {
        Some((_, start, index)) => (text[..start].to_string(), Some(index)),
        None => (text.to_string(), None),
    }
}

/// Cuts `text` at the given byte offsets, each moved down to a character boundary.
fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            let mut c = c.min(text.len());
            while !text.is_char_boundary(c) {
                c -= 1;
            }
            c
        })
        .collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for c in cuts.into_iter().chain([text.len()]) {
        pieces.push(&text[from..c]);
        from = c;
    }
    pieces
}

/// Small alphabets (with multi-byte characters) so stop strings occur often.
const TEXT: &str = "[abé😀]{0,24}";
const STOP: &str = "[abé😀]{1,4}";

/// A text, stop strings (half of them cut from the text, so they occur and overlap), and byte
/// offsets to cut the text at.
fn case() -> impl Strategy<Value = (String, Vec<String>, Vec<usize>)> {
    TEXT.prop_flat_map(|text| {
        let chars: Vec<char> = text.chars().collect();
        let random = STOP.boxed();
        let stop = if chars.is_empty() {
            random
        } else {
            let n = chars.len();
            let cut = (0..n, 1..=4usize).prop_map(move |(start, len)| {
                chars[start..(start + len).min(n)]
                    .iter()
                    .collect::<String>()
            });
            prop_oneof![random, cut].boxed()
        };
        let stops = prop::collection::vec(stop, 0..4);
        let cuts = prop::collection::vec(0..=text.len(), 0..12);
        (Just(text), stops, cuts)
    })
}

/// Bytes (mostly of the alphabet's characters, some arbitrary, so characters are cut and some
/// sequences are invalid), stop strings (half cut from the lossy text, which may include
/// U+FFFD), and byte offsets to cut at.
fn byte_case() -> impl Strategy<Value = (Vec<u8>, Vec<String>, Vec<usize>)> {
    let byte = prop_oneof![
        4 => prop::sample::select("abé😀".as_bytes().to_vec()),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..32).prop_flat_map(|bytes| {
        let chars: Vec<char> = String::from_utf8_lossy(&bytes).chars().collect();
        let random = STOP.boxed();
        let stop = if chars.is_empty() {
            random
        } else {
            let n = chars.len();
            let cut = (0..n, 1..=4usize).prop_map(move |(start, len)| {
                chars[start..(start + len).min(n)]
                    .iter()
                    .collect::<String>()
            });
            prop_oneof![random, cut].boxed()
        };
        let stops = prop::collection::vec(stop, 0..4);
        let cuts = prop::collection::vec(0..=bytes.len(), 0..12);
        (Just(bytes), stops, cuts)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_split_gives_the_output_of_the_whole_text((text, stops, cuts) in case()) {
        let (want, want_stop) = reference(&text, &stops);
        let mut m = StopMatcher::new(stops.clone()).unwrap();
        let mut seen = String::new();
        let mut pushed = String::new();
        let mut stop = None;
        for piece in split(&text, &cuts) {
            let out = m.push(piece);
            seen.push_str(&out.text);
            pushed.push_str(piece);
            stop = stop.or(out.stop);
            // Nothing shown is ever taken back: it is a prefix of the final output.
            prop_assert!(want.starts_with(&seen), "shown {:?}, final {:?}", seen, want);
            if stop.is_none() {
                // Nothing lost: shown + held is everything pushed, and what is held could
                // still become a stop string.
                prop_assert_eq!(format!("{}{}", seen, m.held()), pushed.clone());
                prop_assert!(
                    m.held().is_empty() || stops.iter().any(|s| s.starts_with(m.held())),
                    "held {:?} starts no stop string", m.held()
                );
            }
        }
        let out = m.finish();
        seen.push_str(&out.text);
        stop = stop.or(out.stop);
        prop_assert_eq!(&seen, &want);
        prop_assert_eq!(stop, want_stop);
        prop_assert_eq!(m.stopped(), want_stop);
        for s in &stops {
            prop_assert!(!seen.contains(s.as_str()), "output {:?} shows stop {:?}", seen, s);
        }
    }

    #[test]
    fn any_byte_split_gives_the_output_of_the_lossy_whole_text(
        (bytes, stops, cuts) in byte_case()
    ) {
        let whole = String::from_utf8_lossy(&bytes);
        let (want, want_stop) = reference(&whole, &stops);
        let mut cuts = cuts;
        cuts.sort_unstable();
        let mut m = StopMatcher::new(stops.clone()).unwrap();
        let mut seen = String::new();
        let mut stop = None;
        let mut from = 0;
        for c in cuts.into_iter().chain([bytes.len()]) {
            let out = m.push_bytes(&bytes[from..c]);
            seen.push_str(&out.text);
            stop = stop.or(out.stop);
            prop_assert!(want.starts_with(&seen), "shown {:?}, final {:?}", seen, want);
            from = c;
        }
        let out = m.finish();
        seen.push_str(&out.text);
        stop = stop.or(out.stop);
        prop_assert_eq!(&seen, &want);
        prop_assert_eq!(stop, want_stop);
    }
}

#[test]
fn chatml_end_token_streamed_token_by_token() {
    let mut m = StopMatcher::new(["<|im_end|>", "\nUser:"]).unwrap();
    let pieces = [
        "The", " answer", " is", " 42", ".", "<|", "im", "_", "end", "|>", "\n",
    ];
    let shown: Vec<String> = pieces.iter().map(|p| m.push(p).text).collect();
    assert_eq!(
        shown,
        ["The", " answer", " is", " 42", ".", "", "", "", "", "", ""]
    );
    assert_eq!(m.stopped(), Some(0));
}

#[test]
fn a_false_start_is_released_as_soon_as_it_diverges() {
    let mut m = StopMatcher::new(["<|im_end|>"]).unwrap();
    assert_eq!(m.push("a <|im").text, "a ");
    assert_eq!(m.push("_start|>").text, "<|im_start|>");
    assert_eq!(m.push("<").text, "");
    assert_eq!(m.finish().text, "<");
    assert_eq!(m.stopped(), None);
}
