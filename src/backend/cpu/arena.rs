//! The activation arena of the CPU backend: one `f32` allocation holding every buffer of the
//! plan, and the one place where a step borrows its inputs and outputs from it at once.
//!
//! The plan places a step's outputs apart from each other and from the step's inputs (outputs
//! are allocated before dying inputs are freed). [`check_disjoint`] verifies that for the whole
//! plan when the backend is built (a clear error instead of a failed step), and
//! [`Arena::split`] checks it again for the regions of each step before handing out slices, so
//! the borrows it creates can never alias.

use crate::plan::{Operand, Plan};

/// Element offset and length of a buffer region in the arena (in f32 units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub len: usize,
}

impl Region {
    fn end(self) -> usize {
        self.start + self.len
    }

    fn overlaps(self, other: Region) -> bool {
        self.start < other.end() && other.start < self.end()
    }
}

/// Checks that, in every step of `plan`, no output buffer overlaps another output or an input.
pub fn check_disjoint(plan: &Plan) -> Result<(), String> {
    let region = |b: &crate::plan::Buffer| Region {
        start: b.offset as usize,
        len: b.bytes as usize,
    };
    for (i, step) in plan.steps.iter().enumerate() {
        let outs: Vec<Region> = step
            .outputs
            .iter()
            .filter_map(|o| o.buffer.as_ref().map(region))
            .collect();
        let ins: Vec<Region> = step
            .inputs
            .iter()
            .filter_map(|op| match op {
                Operand::Value(v) => plan.value(*v).and_then(|o| o.buffer.as_ref().map(region)),
                Operand::Weight(_) => None,
            })
            .collect();
        if !disjoint(&ins, &outs) {
            return Err(format!(
                "step {i} ({}) writes a buffer that overlaps another of its buffers",
                step.name
            ));
        }
    }
    Ok(())
}

/// True when the outputs overlap neither each other nor any input.
fn disjoint(inputs: &[Region], outputs: &[Region]) -> bool {
    outputs.iter().enumerate().all(|(j, o)| {
        outputs[j + 1..].iter().all(|p| !o.overlaps(*p)) && inputs.iter().all(|p| !o.overlaps(*p))
    })
}

/// The arena: `f32` storage for every activation buffer.
pub struct Arena {
    data: Vec<f32>,
}

impl Arena {
    pub fn new(bytes: u64) -> Arena {
        Arena {
            data: vec![0.0; bytes.div_ceil(4) as usize],
        }
    }

    /// A region, read-only.
    pub fn slice(&self, r: Region) -> &[f32] {
        &self.data[r.start..r.end()]
    }

    /// Shared slices of `inputs` and exclusive slices of `outputs`, all at once.
    ///
    /// # Panics
    /// If a region is outside the arena, or an output overlaps another output or an input: the
    /// backend checked the plan for both when it was built, so either is a bug.
    pub fn split(
        &mut self,
        inputs: &[Region],
        outputs: &[Region],
    ) -> (Vec<&[f32]>, Vec<&mut [f32]>) {
        let len = self.data.len();
        assert!(
            inputs.iter().chain(outputs).all(|r| r.end() <= len),
            "a region lies outside the arena"
        );
        assert!(
            disjoint(inputs, outputs),
            "a step's output overlaps another of its buffers"
        );
        let ptr = self.data.as_mut_ptr();
        // SAFETY: every region is inside the allocation (checked above); outputs are pairwise
        // disjoint and disjoint from every input (checked above), so each `&mut` slice is the
        // only reference to its elements, and inputs only share with each other. All slices
        // borrow `self` mutably for their lifetime, so nothing else touches the arena meanwhile.
        unsafe {
            let ins = inputs
                .iter()
                .map(|r| &*std::ptr::slice_from_raw_parts(ptr.add(r.start), r.len))
                .collect();
            let outs = outputs
                .iter()
                .map(|r| &mut *std::ptr::slice_from_raw_parts_mut(ptr.add(r.start), r.len))
                .collect();
            (ins, outs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_hands_out_disjoint_regions() {
        let mut a = Arena::new(64);
        let (ins, mut outs) = a.split(
            &[Region { start: 0, len: 4 }, Region { start: 2, len: 2 }],
            &[Region { start: 4, len: 4 }, Region { start: 8, len: 8 }],
        );
        assert_eq!(ins[1].len(), 2);
        outs[0][0] = 1.0;
        outs[1][7] = 2.0;
        assert_eq!(a.slice(Region { start: 4, len: 1 }), &[1.0]);
        assert_eq!(a.slice(Region { start: 15, len: 1 }), &[2.0]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn split_refuses_an_output_over_an_input() {
        let mut a = Arena::new(64);
        let _ = a.split(
            &[Region { start: 0, len: 4 }],
            &[Region { start: 3, len: 4 }],
        );
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn split_refuses_regions_outside() {
        let mut a = Arena::new(16);
        let _ = a.split(&[], &[Region { start: 2, len: 4 }]);
    }
}
