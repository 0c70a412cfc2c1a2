//! Pre-tokenizers: how byte-level BPE splits text into words before merging.
//!
//! A pre-tokenizer is a sequence of steps, each splitting every fragment the previous step left
//! (a step's matches become fragments, and so does the text between them). This is the
//! semantics of llama.cpp's `unicode_regex_split` and of HF's `Sequence` of `Split(Isolated)`.
//!
//! The common patterns (GPT-2's, Llama 3's and Qwen 2's) are matched by hand over code-point
//! classes: they need a look-ahead (`\s+(?!\S)`) the `regex` crate has not, and hand matching is
//! several times faster. The others run on the `regex` crate with llama.cpp's semantics: class
//! escapes (`\p{L}`, `\p{N}`, ...) match the Unicode 15.1 classes of `unicode.rs`, and `\s` is
//! White_Space. Where a pattern has no class escape but literal non-ASCII ranges (DeepSeek's),
//! llama.cpp matches it on text whose non-ASCII white space was replaced by U+000B; we do the
//! same, so `　` (U+3000) never matches a literal range that contains it, exactly as there.

use super::unicode::{Class, Flags, flags};
use regex::Regex;

/// One splitting step.
#[derive(Debug)]
enum Step {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// Llama 3's pattern and its relatives:
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,D}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// with D = 3 (Llama 3) or 1 (Qwen 2); `marks` adds `\p{M}` to the letter runs (Qwen 3.5).
    Llama3 { digits: usize, marks: bool },
    /// `[^\n]+|[\n]+`: runs of newlines and runs of anything else.
    Newlines,
    /// Any other pattern, on the `regex` crate.
    Regex(CollapsedRegex),
}

/// A pattern run on a "collapsed" copy of the text: ASCII stays as it is; every other code point
/// becomes one private-use stand-in for its class (or U+000B if it is white space), and the
/// pattern's class escapes are widened to include the stand-ins. Without class escapes only the
/// white-space replacement applies.
#[derive(Debug)]
struct CollapsedRegex {
    re: Regex,
    collapse: bool,
}

/// The stand-in of a non-ASCII code point's class in the collapsed text.
fn stand_in(class: Class) -> char {
    match class {
        Class::Number => '\u{F0001}',
        Class::Letter => '\u{F0002}',
        Class::Punctuation => '\u{F0003}',
        Class::Mark => '\u{F0004}',
        Class::Symbol => '\u{F0005}',
        _ => '\u{F0000}',
    }
}

impl CollapsedRegex {
    fn new(pattern: &str) -> Result<CollapsedRegex, String> {
        const ESCAPES: [(&str, Class); 10] = [
            (r"\p{N}", Class::Number),
            (r"\p{L}", Class::Letter),
            (r"\p{P}", Class::Punctuation),
            (r"\p{M}", Class::Mark),
            (r"\p{S}", Class::Symbol),
            (r"\p{Lu}", Class::Letter),
            (r"\p{Ll}", Class::Letter),
            (r"\p{Lt}", Class::Letter),
            (r"\p{Lm}", Class::Letter),
            (r"\p{Lo}", Class::Letter),
        ];
        let collapse = ESCAPES.iter().any(|(e, _)| pattern.contains(e));
        let mut translated = String::with_capacity(pattern.len() * 2);
        if collapse {
            // Widen each class escape with its stand-in; outside brackets it becomes a bracket.
            // The ASCII members are matched by the regex crate's own class (identical for ASCII).
            let mut inside = false;
            let mut rest = pattern;
            while let Some(c) = rest.chars().next() {
                if c == '\\' {
                    if let Some((esc, class)) = ESCAPES.iter().find(|(e, _)| rest.starts_with(e)) {
                        let widened = format!("{}{}", stand_in(*class), esc);
                        if inside {
                            translated.push_str(&widened);
                        } else {
                            translated.push('[');
                            translated.push_str(&widened);
                            translated.push(']');
                        }
                        rest = &rest[esc.len()..];
                        continue;
                    }
                    // Any other escape: copy it and the escaped character unchanged.
                    let mut it = rest.char_indices().skip(1);
                    let end = it.next().map(|(i, ch)| i + ch.len_utf8()).unwrap_or(1);
                    translated.push_str(&rest[..end]);
                    rest = &rest[end..];
                    continue;
                }
                if c == '[' {
                    inside = true;
                } else if c == ']' {
                    inside = false;
                }
                translated.push(c);
                rest = &rest[c.len_utf8()..];
            }
        } else {
            translated.push_str(pattern);
        }
        let re = Regex::new(&translated).map_err(|e| format!("pattern {pattern:?}: {e}"))?;
        Ok(CollapsedRegex { re, collapse })
    }

    /// The collapsed copy of `cps` and the byte offset of each code point in it (plus the end).
    fn prepare(&self, cps: &[char], fl: &[Flags], buf: &mut String, offs: &mut Vec<usize>) {
        buf.clear();
        offs.clear();
        for (&c, &f) in cps.iter().zip(fl) {
            offs.push(buf.len());
            let out = if c.is_ascii() {
                c
            } else if f.is_whitespace() {
                '\u{0B}'
            } else if self.collapse {
                f.class().map(stand_in).unwrap_or('\u{F0000}')
            } else {
                c
            };
            buf.push(out);
        }
        offs.push(buf.len());
    }
}

/// The named pre-tokenizer of a byte-level BPE vocabulary.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    steps: Vec<Step>,
}

/// DeepSeek's CJK runs: U+4E00..U+9FA5, U+0800..U+4E00 and U+AC00..U+D7FF.
const CJK: &str = r"[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+";

impl PreTokenizer {
    /// The steps of llama.cpp's pre-tokenizer kind `kind` (see `vocab::PreKind`).
    pub(crate) fn new(kind: super::vocab::PreKind) -> Result<PreTokenizer, String> {
        use super::vocab::PreKind as K;
        let re = |p: &str| CollapsedRegex::new(p).map(Step::Regex);
        let steps = match kind {
            K::Default => vec![
                re(r"[\p{P}\$\+<=>\^~\|]+")?,
                Step::Gpt2,
                re(r"\p{N}+")?,
                re("[0-9][0-9][0-9]")?,
            ],
            K::Gpt2 => vec![Step::Gpt2],
            K::Llama3 => vec![Step::Llama3 {
                digits: 3,
                marks: false,
            }],
            K::Qwen2 => vec![Step::Llama3 {
                digits: 1,
                marks: false,
            }],
            K::Qwen35 => vec![Step::Llama3 {
                digits: 1,
                marks: true,
            }],
            K::Starcoder => vec![re(r"\p{N}")?, Step::Gpt2],
            K::Falcon => vec![
                re(r"[\p{P}\$\+<=>\^~\|`]+")?,
                Step::Gpt2,
                re("[0-9][0-9][0-9]")?,
            ],
            K::DeepseekLlm => vec![
                re(r"[\r\n]")?,
                re(concat!(
                    r"\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}",
                    r"\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}",
                    r"\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}",
                    r"\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}",
                    r"\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}",
                    r"\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}",
                    r"\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}",
                    r"\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}",
                    r"\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}",
                    r"\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}",
                    r"\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}",
                    r"\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}",
                    r"\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}",
                    r"\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}",
                    r"\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}",
                    r"\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}",
                    r"\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}",
                    r"\u{1E900}-\u{1E943}]+",
                ))?,
                re(
                    r"\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
                )?,
                re(r"\s+$")?,
                re(CJK)?,
                re(r"\p{N}+")?,
            ],
            K::DeepseekCoder => vec![
                re(r"[\r\n]")?,
                re(r"\s?\p{L}+")?,
                re(r"\s?\p{P}+")?,
                re(CJK)?,
                re(r"\p{N}")?,
            ],
            K::Bloom => vec![re(r" ?[^(\s|.,!?…。，、।۔،)]+")?],
            K::Viking => vec![re(r" ?[^(\s|.,!?…。，、।۔،)]+")?, re(r"\p{N}")?],
            K::Newlines => vec![Step::Newlines],
        };
        Ok(PreTokenizer { steps })
    }

    /// Splits `text` into words, returned as byte ranges of `text` in order.
    pub(crate) fn split(&self, text: &str) -> Vec<(usize, usize)> {
        let cps: Vec<char> = text.chars().collect();
        let fl: Vec<Flags> = cps.iter().map(|&c| flags(c)).collect();
        let mut frags = vec![(0usize, cps.len())];
        let mut next = Vec::with_capacity(cps.len() / 3 + 1);
        let mut buf = String::new();
        let mut offs = Vec::new();
        for step in &self.steps {
            next.clear();
            for &(s, e) in &frags {
                if s == e {
                    continue;
                }
                match step {
                    Step::Gpt2 => split_by(&cps, &fl, s, e, &mut next, gpt2_match),
                    Step::Llama3 { digits, marks } => {
                        split_by(&cps, &fl, s, e, &mut next, |cps, fl, p, end| {
                            llama3_match(cps, fl, p, end, *digits, *marks)
                        })
                    }
                    Step::Newlines => split_by(&cps, &fl, s, e, &mut next, |cps, _, p, end| {
                        let nl = cps[p] == '\n';
                        let mut q = p + 1;
                        while q < end && (cps[q] == '\n') == nl {
                            q += 1;
                        }
                        q
                    }),
                    Step::Regex(r) => {
                        r.prepare(&cps[s..e], &fl[s..e], &mut buf, &mut offs);
                        let to_cp = |byte: usize| s + offs.partition_point(|&o| o < byte);
                        let mut prev = s;
                        for m in r.re.find_iter(&buf) {
                            if m.start() == m.end() {
                                continue;
                            }
                            let (ms, me) = (to_cp(m.start()), to_cp(m.end()));
                            if ms > prev {
                                next.push((prev, ms));
                            }
                            next.push((ms, me));
                            prev = me;
                        }
                        if prev < e {
                            next.push((prev, e));
                        }
                    }
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        // Code-point ranges to byte ranges.
        let mut byte_at = Vec::with_capacity(cps.len() + 1);
        let mut b = 0;
        for c in &cps {
            byte_at.push(b);
            b += c.len_utf8();
        }
        byte_at.push(b);
        frags
            .into_iter()
            .filter(|(s, e)| s < e)
            .map(|(s, e)| (byte_at[s], byte_at[e]))
            .collect()
    }
}

/// Splits `[s, e)` into consecutive matches of `m` (which returns the end of the word starting
/// at `p`, always past `p`).
fn split_by(
    cps: &[char],
    fl: &[Flags],
    s: usize,
    e: usize,
    out: &mut Vec<(usize, usize)>,
    m: impl Fn(&[char], &[Flags], usize, usize) -> usize,
) {
    let mut p = s;
    while p < e {
        let q = m(cps, fl, p, e).clamp(p + 1, e);
        out.push((p, q));
        p = q;
    }
}

/// The flags at `p`, or [`Flags::NONE`] past the fragment's end.
#[inline]
fn at(fl: &[Flags], p: usize, end: usize) -> Flags {
    if p < end { fl[p] } else { Flags::NONE }
}

/// `'s|'t|'re|'ve|'m|'ll|'d`, ASCII case-folded when `fold`: the end of the contraction at `p`.
#[inline]
fn contraction(cps: &[char], p: usize, end: usize, fold: bool) -> Option<usize> {
    if cps[p] != '\'' || p + 1 >= end {
        return None;
    }
    let low = |c: char| if fold { c.to_ascii_lowercase() } else { c };
    let c1 = low(cps[p + 1]);
    if matches!(c1, 's' | 't' | 'm' | 'd') {
        return Some(p + 2);
    }
    if p + 2 < end {
        let c2 = low(cps[p + 2]);
        if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
            return Some(p + 3);
        }
    }
    None
}

/// White space at `p`: `\s+(?!\S)` (all but the last of a run that a non-space follows) or
/// `\s+`; with `newline_runs`, `\s*[\r\n]+` first (up to the run's last CR/LF).
#[inline]
fn whitespace_run(cps: &[char], fl: &[Flags], p: usize, end: usize, newline_runs: bool) -> usize {
    let mut q = p;
    let mut last_newline = None;
    while at(fl, q, end).is_whitespace() {
        if newline_runs && matches!(cps[q], '\r' | '\n') {
            last_newline = Some(q + 1);
        }
        q += 1;
    }
    if let Some(e) = last_newline {
        return e;
    }
    let n = q - p;
    if n > 1 && q < end {
        q - 1
    } else if n > 0 {
        q
    } else {
        p + 1
    }
}

fn gpt2_match(cps: &[char], fl: &[Flags], p: usize, end: usize) -> usize {
    if let Some(e) = contraction(cps, p, end, false) {
        return e;
    }
    let (start, f) = if cps[p] == ' ' {
        (p + 1, at(fl, p + 1, end))
    } else {
        (p, fl[p])
    };
    let run = |pred: fn(Flags) -> bool| {
        let mut q = start;
        while pred(at(fl, q, end)) {
            q += 1;
        }
        q
    };
    if f.is_letter() {
        return run(Flags::is_letter);
    }
    if f.is_number() {
        return run(Flags::is_number);
    }
    if is_other(f, false) {
        return run(|f| is_other(f, false));
    }
    whitespace_run(cps, fl, p, end, false)
}

/// `[^\s\p{L}\p{N}]` (with `marks`, also not `\p{M}`), and inside the fragment.
#[inline]
fn is_other(f: Flags, marks: bool) -> bool {
    !(f.is_none() || f.is_whitespace() || f.is_letter() || f.is_number() || (marks && f.is_mark()))
}

fn llama3_match(
    cps: &[char],
    fl: &[Flags],
    p: usize,
    end: usize,
    digits: usize,
    marks: bool,
) -> usize {
    if let Some(e) = contraction(cps, p, end, true) {
        return e;
    }
    let c = cps[p];
    let f = fl[p];
    let word = |f: Flags| f.is_letter() || (marks && f.is_mark());
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !(c == '\r' || c == '\n' || f.is_number()) && (word(f) || word(at(fl, p + 1, end))) {
        let mut q = p + 1;
        while word(at(fl, q, end)) {
            q += 1;
        }
        return q;
    }
    // \p{N}{1,digits}
    if f.is_number() {
        let mut q = p + 1;
        while q - p < digits && at(fl, q, end).is_number() {
            q += 1;
        }
        return q;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let (start, f2) = if c == ' ' {
        (p + 1, at(fl, p + 1, end))
    } else {
        (p, f)
    };
    if is_other(f2, marks) {
        let mut q = start;
        while is_other(at(fl, q, end), marks) {
            q += 1;
        }
        while q < end && matches!(cps[q], '\r' | '\n') {
            q += 1;
        }
        return q;
    }
    whitespace_run(cps, fl, p, end, true)
}

#[cfg(test)]
mod tests {
    use super::super::vocab::PreKind;
    use super::*;

    fn words(kind: PreKind, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(kind).unwrap();
        p.split(text)
            .into_iter()
            .map(|(s, e)| text[s..e].to_string())
            .collect()
    }

    #[test]
    fn gpt2_splits_like_its_regex() {
        assert_eq!(
            words(PreKind::Gpt2, "Hello world's  end\n\n x 123!?"),
            [
                "Hello", " world", "'s", " ", " end", "\n\n", " x", " 123", "!?"
            ]
        );
        assert_eq!(words(PreKind::Gpt2, "a   "), ["a", "   "]);
        assert_eq!(words(PreKind::Gpt2, "\tA"), ["\t", "A"]);
    }

    #[test]
    fn llama3_splits_like_its_regex() {
        assert_eq!(
            words(PreKind::Llama3, "I'M 12345 ok \n\n  x(!)\n"),
            [
                "I", "'M", " ", "123", "45", " ok", " \n\n", " ", " x", "(!)\n"
            ]
        );
        assert_eq!(words(PreKind::Qwen2, "x123"), ["x", "1", "2", "3"]);
    }

    #[test]
    fn regex_steps_use_class_stand_ins() {
        // Falcon: punctuation runs first, then GPT-2, then groups of three ASCII digits.
        assert_eq!(
            words(PreKind::Falcon, "a, «b» 12345"),
            ["a", ",", " ", "«", "b", "»", " ", "123", "45"]
        );
        // deepseek-llm: U+3000 is white space, so it never matches the literal range.
        assert_eq!(
            words(PreKind::DeepseekLlm, "x\u{3000}。"),
            ["x", "\u{3000}", "。"]
        );
    }

    #[test]
    fn newline_runs() {
        assert_eq!(
            words(PreKind::Newlines, "a b\n\nc\n"),
            ["a b", "\n\n", "c", "\n"]
        );
    }
}
