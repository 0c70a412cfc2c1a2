//! Numbers for people: byte sizes in binary units.

/// `bytes` in the largest binary unit that keeps the value at least 1, with `decimals` digits:
/// `human_bytes(1536, 1)` is `1.5 KiB`, `human_bytes(98362432, 2)` is `93.81 MiB`. Below 1 KiB
/// the count is exact (`512 B`).
pub fn human_bytes(bytes: u64, decimals: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.decimals$} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human_bytes(512, 1), "512 B");
        assert_eq!(human_bytes(12, 2), "12 B");
        assert_eq!(human_bytes(2048, 1), "2.0 KiB");
        assert_eq!(human_bytes(1536 * 1024 * 1024, 1), "1.5 GiB");
        assert_eq!(human_bytes(98_362_432, 2), "93.81 MiB");
        assert_eq!(human_bytes(u64::MAX, 1), "16777216.0 TiB");
    }
}
