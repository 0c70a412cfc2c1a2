//! Unicode facts the tokenizers need: the general-category class of a code point (the
//! `\p{L}`/`\p{N}`/... of the pre-tokenizer regexes), White_Space, and GPT-2's byte-level
//! alphabet (each byte shown as a printable character).
//!
//! The classes come from Unicode 15.1 (see `unicode_data.rs`), the version llama.cpp's tables use.

use super::unicode_data::CLASS_RANGES;
use std::sync::OnceLock;

/// The general-category class of a code point (Unicode's major categories, with unassigned
/// code points apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Class {
    Unassigned = 0,
    Number = 1,
    Letter = 2,
    Separator = 3,
    Mark = 4,
    Punctuation = 5,
    Symbol = 6,
    Control = 7,
}

/// A code point's class and whether it is White_Space, packed for table lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags(u8);

const WHITESPACE_BIT: u8 = 0x10;

impl Flags {
    /// The flags of a position past the end of a fragment: no class matches.
    pub(crate) const NONE: Flags = Flags(0xFF);

    pub(crate) fn class(self) -> Option<Class> {
        match self.0 & 0x0F {
            0 => Some(Class::Unassigned),
            1 => Some(Class::Number),
            2 => Some(Class::Letter),
            3 => Some(Class::Separator),
            4 => Some(Class::Mark),
            5 => Some(Class::Punctuation),
            6 => Some(Class::Symbol),
            7 => Some(Class::Control),
            _ => None,
        }
    }
    pub(crate) fn is_none(self) -> bool {
        self == Flags::NONE
    }
    pub(crate) fn is_letter(self) -> bool {
        self.0 & 0x0F == Class::Letter as u8
    }
    pub(crate) fn is_number(self) -> bool {
        self.0 & 0x0F == Class::Number as u8
    }
    pub(crate) fn is_mark(self) -> bool {
        self.0 & 0x0F == Class::Mark as u8
    }
    pub(crate) fn is_whitespace(self) -> bool {
        !self.is_none() && self.0 & WHITESPACE_BIT != 0
    }
}

/// Unicode's White_Space property (PropList.txt; unchanged since Unicode 6.3).
pub(crate) fn is_white_space(c: u32) -> bool {
    matches!(
        c,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

fn class_by_search(c: u32) -> Class {
    // The last range starting at or before c.
    let i = CLASS_RANGES.partition_point(|&(start, _)| start <= c);
    CLASS_RANGES[i.saturating_sub(1)].1
}

/// The flags of a code point. The Basic Multilingual Plane is served from a table built once
/// (64 KiB); the rest by binary search over the ranges.
pub(crate) fn flags(c: char) -> Flags {
    static BMP: OnceLock<Box<[u8]>> = OnceLock::new();
    let c = c as u32;
    if c < 0x10000 {
        let table = BMP.get_or_init(|| (0..0x10000u32).map(|c| compute(c).0).collect());
        Flags(table[c as usize])
    } else {
        compute(c)
    }
}

fn compute(c: u32) -> Flags {
    let ws = if is_white_space(c) { WHITESPACE_BIT } else { 0 };
    Flags(class_by_search(c) as u8 | ws)
}

/// GPT-2's byte-level alphabet: byte → the printable character that stands for it in the vocab.
pub(crate) fn byte_to_char(b: u8) -> char {
    BYTE_CHARS.get_or_init(build_byte_chars)[b as usize]
}

/// The byte a byte-level character stands for, if it is one of the 256.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    // Printable Latin-1 stands for itself; the rest were moved to U+0100.. in byte order.
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        0x100..=0x143 => CHAR_BYTES.get_or_init(build_char_bytes)[(c - 0x100) as usize],
        _ => None,
    }
}

static BYTE_CHARS: OnceLock<[char; 256]> = OnceLock::new();
static CHAR_BYTES: OnceLock<[Option<u8>; 0x44]> = OnceLock::new();

fn is_printable_latin1(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

fn build_byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        out[b as usize] = if is_printable_latin1(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    out
}

fn build_char_bytes() -> [Option<u8>; 0x44] {
    let mut out = [None; 0x44];
    let mut next = 0usize;
    for b in 0..=255u8 {
        if !is_printable_latin1(b) {
            out[next] = Some(b);
            next += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b), "byte {b}");
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn classes() {
        assert!(flags('a').is_letter());
        assert!(flags('ß').is_letter());
        assert!(flags('日').is_letter());
        assert!(flags('5').is_number());
        assert!(flags('½').is_number());
        assert!(flags('\u{301}').is_mark());
        assert_eq!(flags('!').class(), Some(Class::Punctuation));
        assert_eq!(flags('$').class(), Some(Class::Symbol));
        assert_eq!(flags('🦙').class(), Some(Class::Symbol));
        assert!(flags(' ').is_whitespace());
        assert!(flags('\u{3000}').is_whitespace());
        assert!(!flags('\u{1C}').is_whitespace());
        // Unicode 15.1 tables: U+1C89 was assigned only in 16.0.
        assert_eq!(flags('\u{1C89}').class(), Some(Class::Unassigned));
        assert_eq!(flags('\u{31EF}').class(), Some(Class::Symbol));
        assert!(!Flags::NONE.is_letter() && !Flags::NONE.is_whitespace());
    }
}
