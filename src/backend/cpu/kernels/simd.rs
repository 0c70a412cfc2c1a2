//! Run-time choice of the instruction set for the hot loops, and the 8-lane vector type
//! ([`V8`]) they are written in.
//!
//! Each kernel's loop is generic over [`V8`] and `#[inline(always)]`; a thin entry point compiled
//! with `#[target_feature(enable = "avx2,fma,f16c")]` instantiates it with `Avx2`, a portable one
//! with [`Lanes`]. [`Simd::detect`] picks the entry point once per process.

use half::f16;
use std::sync::OnceLock;

/// The instruction set the kernels' hot loops run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Simd {
    /// Whatever the compile target guarantees (SSE2 on x86-64); separate multiply and add.
    Portable,
    /// x86-64 with AVX2, FMA and F16C: 8-lane vectors and fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Simd {
    /// The best instruction set this CPU has, detected once. `M40LLM_CPU_SIMD=portable` forces
    /// the portable loops (to compare them, or to rule the vector paths out when debugging).
    pub fn detect() -> Simd {
        static DETECTED: OnceLock<Simd> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if std::env::var("M40LLM_CPU_SIMD").is_ok_and(|v| v == "portable") {
                return Simd::Portable;
            }
            Simd::available().last().copied().unwrap_or(Simd::Portable)
        })
    }

    /// Every instruction set this CPU can run, worst first (tests run each of them).
    pub fn available() -> Vec<Simd> {
        let all = [
            Simd::Portable,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma,
        ];
        all.into_iter().filter(|s| s.is_supported()).collect()
    }

    /// Whether this CPU can run this instruction set (the kernels refuse one it cannot).
    pub fn is_supported(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
        }
    }

    /// `Ok(self)` if this CPU runs it, else an error naming it.
    pub(crate) fn checked(self) -> Result<Simd, super::KernelError> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(super::KernelError::Invalid(format!(
                "this CPU cannot run the {self:?} kernels"
            )))
        }
    }
}

/// Lanes of a vector.
pub(crate) const LANES: usize = 8;

/// Eight f32 lanes: the vocabulary the hot loops are written in, once, generically.
///
/// [`Lanes`] implements it with plain arrays and separate multiply and add (any CPU);
/// `Avx2` with AVX2/FMA/F16C registers (x86-64). LLVM's auto-vectorizer turns the array loops
/// into 2-lane pieces for the quantized decodes (measured), hence the explicit AVX2 version.
/// Every operation has a fixed evaluation order, so a kernel's result depends only on its
/// inputs and the implementation, never on how work is split.
pub(crate) trait V8: Copy {
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// `x[0..8]`.
    fn load(x: &[f32]) -> Self;
    /// Stores into `y[0..8]`.
    fn store(self, y: &mut [f32]);
    /// Little-endian f32s in `b[0..32]`.
    fn load_f32_le(b: &[u8]) -> Self;
    /// The 8 bytes of `b` (little-endian order) as unsigned integers.
    fn from_u8(b: u64) -> Self;
    /// The 8 bytes of `b` as signed integers.
    fn from_i8(b: u64) -> Self;
    /// Little-endian halves in `b[0..16]`.
    fn from_f16_le(b: &[u8]) -> Self;
    /// `h[0..8]`.
    fn from_f16(h: &[f16]) -> Self;
    /// Little-endian bfloat16s in `b[0..16]`.
    fn from_bf16_le(b: &[u8]) -> Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// `a * b + self` (fused where the implementation has FMA).
    fn madd(self, a: Self, b: Self) -> Self;
    /// The sum of the lanes: `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
    fn hsum(self) -> f32;
    /// Scalar `a * b + c`, fused exactly when [`V8::madd`] is.
    fn madd1(a: f32, b: f32, c: f32) -> f32;
}

/// Portable lanes: an array, separate multiply and add.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lanes([f32; LANES]);

impl Lanes {
    #[inline(always)]
    fn map(f: impl Fn(usize) -> f32) -> Self {
        Lanes(std::array::from_fn(f))
    }
}

impl V8 for Lanes {
    #[inline(always)]
    fn zero() -> Self {
        Lanes([0.0; LANES])
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Lanes([x; LANES])
    }
    #[inline(always)]
    fn load(x: &[f32]) -> Self {
        Lanes(x[..LANES].try_into().expect("8 lanes"))
    }
    #[inline(always)]
    fn store(self, y: &mut [f32]) {
        y[..LANES].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn load_f32_le(b: &[u8]) -> Self {
        let b = &b[..4 * LANES];
        Lanes::map(|l| f32::from_le_bytes([b[4 * l], b[4 * l + 1], b[4 * l + 2], b[4 * l + 3]]))
    }
    #[inline(always)]
    fn from_u8(b: u64) -> Self {
        let b = b.to_le_bytes();
        Lanes::map(|l| f32::from(b[l]))
    }
    #[inline(always)]
    fn from_i8(b: u64) -> Self {
        let b = b.to_le_bytes();
        Lanes::map(|l| f32::from(b[l] as i8))
    }
    #[inline(always)]
    fn from_f16_le(b: &[u8]) -> Self {
        let b = &b[..2 * LANES];
        Lanes::map(|l| f16_to_f32(u16::from_le_bytes([b[2 * l], b[2 * l + 1]])))
    }
    #[inline(always)]
    fn from_f16(h: &[f16]) -> Self {
        let h = &h[..LANES];
        Lanes::map(|l| f16_to_f32(h[l].to_bits()))
    }
    #[inline(always)]
    fn from_bf16_le(b: &[u8]) -> Self {
        let b = &b[..2 * LANES];
        Lanes::map(|l| bf16_to_f32(u16::from_le_bytes([b[2 * l], b[2 * l + 1]])))
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Lanes::map(|l| self.0[l] + o.0[l])
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Lanes::map(|l| self.0[l] * o.0[l])
    }
    #[inline(always)]
    fn madd(self, a: Self, b: Self) -> Self {
        Lanes::map(|l| a.0[l] * b.0[l] + self.0[l])
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        let v = self.0;
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
    #[inline(always)]
    fn madd1(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;

/// AVX2 lanes. Sound only inside functions compiled with `avx2,fma,f16c` that run on a CPU
/// with them: every method is `#[inline(always)]` so that it is compiled into such a function
/// (the kernels' `#[target_feature]` entry points, called only after [`Simd::checked`]); the
/// type is private to the kernels.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{LANES, V8};
    use half::f16;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2(__m256);

    // SAFETY (all blocks below): the intrinsics need AVX, AVX2, FMA or F16C, which the calling
    // entry point enables and `Simd::checked` verified; loads and stores go through pointers to
    // slices whose length is checked first (`[..n]` panics otherwise).
    impl V8 for Avx2 {
        #[inline(always)]
        fn zero() -> Self {
            Avx2(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            Avx2(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        fn load(x: &[f32]) -> Self {
            let x = &x[..LANES];
            Avx2(unsafe { _mm256_loadu_ps(x.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, y: &mut [f32]) {
            let y = &mut y[..LANES];
            unsafe { _mm256_storeu_ps(y.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn load_f32_le(b: &[u8]) -> Self {
            let b = &b[..4 * LANES];
            Avx2(unsafe { _mm256_loadu_ps(b.as_ptr().cast()) })
        }
        #[inline(always)]
        fn from_u8(b: u64) -> Self {
            Avx2(unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b as i64))) })
        }
        #[inline(always)]
        fn from_i8(b: u64) -> Self {
            Avx2(unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b as i64))) })
        }
        #[inline(always)]
        fn from_f16_le(b: &[u8]) -> Self {
            let b = &b[..2 * LANES];
            Avx2(unsafe { _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().cast())) })
        }
        #[inline(always)]
        fn from_f16(h: &[f16]) -> Self {
            let h = &h[..LANES];
            Avx2(unsafe { _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast())) })
        }
        #[inline(always)]
        fn from_bf16_le(b: &[u8]) -> Self {
            let b = &b[..2 * LANES];
            Avx2(unsafe {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(b.as_ptr().cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
            })
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            Avx2(unsafe { _mm256_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            Avx2(unsafe { _mm256_mul_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn madd(self, a: Self, b: Self) -> Self {
            Avx2(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            unsafe {
                // (l0+l4, l1+l5, l2+l6, l3+l7), then ((l0+l4)+(l2+l6), (l1+l5)+(l3+l7)).
                let q = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let p = _mm_add_ps(q, _mm_movehl_ps(q, q));
                _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)))
            }
        }
        #[inline(always)]
        fn madd1(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }
}

/// IEEE half to single precision, exactly, without tables or branches, so that loops over f16
/// data vectorize: the 15 magnitude bits shifted into a float's exponent and mantissa and scaled
/// by 2^112 rebias the exponent (subnormal halves come out right too); infinities and NaNs get
/// the all-ones exponent back. Agrees with `half::f16::to_f32` and F16C on all 65536 inputs
/// (tested).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let em = h & 0x7fff;
    let scaled = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000); // * 2^112
    let mag = if em >= 0x7c00 {
        // Infinity, or NaN made quiet as F16C's vcvtph2ps and `half` do.
        let quiet = if em > 0x7c00 { 0x0040_0000 } else { 0 };
        f32::from_bits((em << 13) | 0x7f80_0000 | quiet)
    } else {
        scaled
    };
    f32::from_bits(mag.to_bits() | ((h & 0x8000) << 16))
}

/// A little-endian f16 at `b[0..2]`, widened.
#[inline(always)]
pub(crate) fn f16_le(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// bfloat16 to single precision (exact: the high half of an f32).
#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_every_half() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x} NaN payload");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_conversion_matches_half() {
        for bits in (0..=u16::MAX).step_by(7) {
            let want = half::bf16::from_bits(bits).to_f32();
            let got = bf16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn portable_is_always_available() {
        assert_eq!(Simd::available()[0], Simd::Portable);
        assert!(Simd::available().contains(&Simd::detect()));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_convert_like_the_portable_ones() {
        if !Simd::Avx2Fma.is_supported() {
            return;
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        fn widen<V: V8>(h: &[f16], y: &mut [f32]) {
            for (h, y) in h.chunks_exact(LANES).zip(y.chunks_exact_mut(LANES)) {
                V::from_f16(h).store(y);
            }
        }
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let (mut a, mut b) = (vec![0.0f32; all.len()], vec![0.0f32; all.len()]);
        // SAFETY: the CPU supports the features (checked above).
        unsafe {
            widen::<Lanes>(&all, &mut a);
            widen::<Avx2>(&all, &mut b);
        }
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{i:#06x}");
        }
        let bytes: Vec<u8> = (0..=255u8).collect();
        for c in bytes.chunks_exact(8) {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            let (mut p, mut q) = ([0.0f32; 8], [0.0f32; 8]);
            unsafe {
                #[target_feature(enable = "avx2,fma,f16c")]
                fn both(w: u64, p: &mut [f32], q: &mut [f32]) {
                    Lanes::from_i8(w).add(Lanes::from_u8(w)).store(p);
                    Avx2::from_i8(w).add(Avx2::from_u8(w)).store(q);
                }
                both(w, &mut p, &mut q);
            }
            assert_eq!(p, q);
        }
    }
}
