//! Offsets in one activation arena: a best-fit free list that merges neighbours (the idea of
//! ggml-alloc's dynamic allocator). The arena has no fixed size: it grows at the top when no free
//! block fits, and its high-water mark is the arena the plan needs.

/// A free range of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    offset: u64,
    size: u64,
}

impl Block {
    fn end(&self) -> u64 {
        self.offset + self.size
    }
}

/// The allocator. Sizes are rounded up to `alignment`, so every offset is aligned.
#[derive(Clone, Debug)]
pub struct Arena {
    alignment: u64,
    /// Free blocks below `top`, sorted by offset, never touching each other or `top`.
    free: Vec<Block>,
    /// The end of the highest allocated byte: everything above is free.
    top: u64,
    /// The highest `top` ever reached: the arena size needed.
    peak: u64,
}

impl Arena {
    /// An empty arena; `alignment` must be a power of two.
    pub fn new(alignment: u64) -> Arena {
        debug_assert!(alignment.is_power_of_two());
        Arena {
            alignment,
            free: Vec::new(),
            top: 0,
            peak: 0,
        }
    }

    /// `bytes` rounded up to the alignment (at least one alignment unit); `None` on overflow.
    pub fn aligned(&self, bytes: u64) -> Option<u64> {
        bytes.max(1).checked_next_multiple_of(self.alignment)
    }

    /// Reserves `bytes` and returns the offset: the smallest free block that fits (the lowest
    /// of equal ones), else the top of the arena. `None` if the arena would overflow `u64`.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let size = self.aligned(bytes)?;
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.size >= size)
            .min_by_key(|(_, b)| (b.size, b.offset))
            .map(|(i, _)| i);
        if let Some(i) = best {
            let block = &mut self.free[i];
            let offset = block.offset;
            block.offset += size;
            block.size -= size;
            if block.size == 0 {
                self.free.remove(i);
            }
            return Some(offset);
        }
        let offset = self.top;
        self.top = self.top.checked_add(size)?;
        self.peak = self.peak.max(self.top);
        Some(offset)
    }

    /// Returns the range `alloc` gave for `bytes` at `offset` to the free list, merging it with
    /// free neighbours; a free range reaching the top lowers the top instead.
    pub fn free(&mut self, offset: u64, bytes: u64) {
        let Some(size) = self.aligned(bytes) else {
            return;
        };
        let i = self.free.partition_point(|b| b.offset < offset);
        let mut block = Block { offset, size };
        if i < self.free.len() && block.end() == self.free[i].offset {
            block.size += self.free.remove(i).size;
        }
        if i > 0 && self.free[i - 1].end() == block.offset {
            let prev = self.free.remove(i - 1);
            block = Block {
                offset: prev.offset,
                size: prev.size + block.size,
            };
        }
        if block.end() == self.top {
            self.top = block.offset;
        } else {
            let at = self.free.partition_point(|b| b.offset < block.offset);
            self.free.insert(at, block);
        }
    }

    /// The arena size needed so far.
    pub fn peak(&self) -> u64 {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ranges_are_reused_best_fit_first() {
        let mut a = Arena::new(16);
        let x = a.alloc(100).unwrap(); // 0..112
        let y = a.alloc(16).unwrap(); // 112..128
        let z = a.alloc(40).unwrap(); // 128..176
        let _w = a.alloc(16).unwrap(); // 176..192 keeps z's hole below the top
        assert_eq!((x, y, z), (0, 112, 128));
        a.free(x, 100);
        a.free(z, 40);
        // 48 bytes fit both holes (112 and 48 bytes): the smaller one wins.
        assert_eq!(a.alloc(33).unwrap(), 128);
        assert_eq!(a.peak(), 192);
    }

    #[test]
    fn neighbours_merge_and_the_top_shrinks() {
        let mut a = Arena::new(8);
        let x = a.alloc(8).unwrap();
        let y = a.alloc(8).unwrap();
        let z = a.alloc(8).unwrap();
        a.free(x, 8);
        a.free(z, 8); // reaches the top: the top drops to 16
        a.free(y, 8); // merges with x and reaches the top: the arena is empty
        assert_eq!(a.alloc(24).unwrap(), 0);
        assert_eq!(a.peak(), 24);
    }

    #[test]
    fn sizes_are_aligned() {
        let a = Arena::new(256);
        assert_eq!(a.aligned(1), Some(256));
        assert_eq!(a.aligned(0), Some(256));
        assert_eq!(a.aligned(257), Some(512));
        assert_eq!(a.aligned(u64::MAX), None);
    }
}
