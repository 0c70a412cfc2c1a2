//! Stable seeds from names: FNV-1a, 64-bit. Test inputs (the per-op parity cases, the tiny
//! models) and synthetic weights (`m40-llm synth`) seed their random numbers from a tensor's or a
//! case's name, so a value does not depend on which others are generated, or in what order.
//! std's hasher may change between Rust releases; this does not.

/// The FNV-1a hash of `s`.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_the_published_fnv1a_vectors() {
        assert_eq!(super::fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }
}
