//! The floating-point types an ensemble can store and compute in: `f32` (the default option:
//! half the memory traffic and twice the vector lanes) and `f64`, each with results of its own
//! pinned bit for bit by `eval::golden`.
//!
//! Only the ensemble's particle-sized work (the forward of every particle, C^{uw}, the update
//! pass) runs in the storage type; the output-space algebra (C^{ww}, the m×m solve, the
//! coefficients) always runs in `f64`.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Sub, SubAssign};

use serde::{Deserialize, Serialize};

pub trait Real:
    Copy
    + Default
    + PartialOrd
    + Debug
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + bytemuck::Pod
{
    const ZERO: Self;
    const ONE: Self;
    /// Values per 64-byte cache line.
    const PER_LINE: usize = 64 / std::mem::size_of::<Self>();
    /// How many times `f64`'s ensemble size a step in this type needs before two threads pay
    /// (`ensemble::parallel_min_work`).
    const SPLIT_FACTOR: usize;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn tanh(self) -> Self;
    fn is_finite(self) -> bool;
    /// The bits, widened (for loads that must not be optimised away).
    fn bits(self) -> u64;

    /// Four lanes of `Self` as one explicit vector (`wide`: one SSE register of `f32`, two of
    /// `f64` on the baseline build). Lane-wise `+` and `×` are the IEEE operations of the
    /// scalars, so a kernel written with it keeps the bits of the same per-lane sequence; what
    /// it fixes is the *shape*: with plain arrays the compiler may pick which dimension to
    /// vectorise and pay for it in shuffles (see `network::dot4`).
    type X4: Copy + Add<Output = Self::X4> + Mul<Output = Self::X4>;
    fn x4(v: [Self; 4]) -> Self::X4;
    fn x4_array(v: Self::X4) -> [Self; 4];
    /// The 4×4 transpose: lane l of result r is lane r of `v[l]`.
    fn x4_transpose(v: [Self::X4; 4]) -> [Self::X4; 4];
}

/// A network parameter as a kernel computing in `T` reads it: itself, or (an `f32` network
/// rolled out in `f64`) widened exactly on the load, so that the wide network's values are
/// never copied out.
pub trait Param<T: Real>: Copy {
    fn widen(self) -> T;
}

impl<T: Real> Param<T> for T {
    #[inline(always)]
    fn widen(self) -> T {
        self
    }
}

impl Param<f64> for f32 {
    #[inline(always)]
    fn widen(self) -> f64 {
        f64::from(self)
    }
}

/// The [`Real::X4`] items for a `wide` vector type of four lanes.
macro_rules! x4_with {
    ($v:ty) => {
        type X4 = $v;
        #[inline(always)]
        fn x4(v: [Self; 4]) -> Self::X4 {
            <$v>::new(v)
        }
        #[inline(always)]
        fn x4_array(v: Self::X4) -> [Self; 4] {
            v.to_array()
        }
        #[inline(always)]
        fn x4_transpose(v: [Self::X4; 4]) -> [Self::X4; 4] {
            <$v>::transpose(v)
        }
    };
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const SPLIT_FACTOR: usize = 1;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    /// [`tanh_f64`]: no libm, so the same bits on every IEEE machine.
    #[inline(always)]
    fn tanh(self) -> Self {
        tanh_f64(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    #[inline(always)]
    fn bits(self) -> u64 {
        self.to_bits()
    }
    x4_with!(wide::f64x4);
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const SPLIT_FACTOR: usize = 4;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        tanh_f32(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    #[inline(always)]
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    x4_with!(wide::f32x4);
}

/// `tanh` for `f32` as a rational function of odd degree 13 over even degree 6 (the minimax
/// fit Eigen uses for its vectorised float tanh), with the argument clamped to ±7.9053111,
/// beyond which tanh rounds to ±1 in `f32`. Only `+ − × ÷`, comparisons and selects, and no
/// fused multiply-add: the compiler vectorises a loop of it, and the result is the same on
/// every IEEE machine. Error against `f64::tanh` (tested): ≤ 4 ulp for |x| < 1, ≤ 6e-7 absolute
/// everywhere (8 ulp of a value near 1).
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_7e-3;
    const B4: f32 = 1.185_347e-4;
    const B6: f32 = 1.198_258_4e-6;
    // `clamp` keeps NaN a NaN.
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = x2 * A13 + A11;
    p = x2 * p + A9;
    p = x2 * p + A7;
    p = x2 * p + A5;
    p = x2 * p + A3;
    p = x2 * p + A1;
    p *= x;
    let mut q = x2 * B6 + B4;
    q = x2 * q + B2;
    q = x2 * q + B0;
    // Below 4e-4, tanh(x) = x to within an ulp, and the polynomial would lose the tail of
    // tiny x to underflow.
    if x.abs() < 4e-4 { x } else { p / q }
}

/// `tanh` for `f64` from `+ − × ÷`, comparisons, selects and bit operations only (no libm, no
/// fused multiply-add, no branch: the compiler vectorises a loop of it, and the result is the
/// same on every IEEE machine). Below |x| = 0.4, `x + x·x²·P(x²)/Q(x²)`; above,
/// `1 − 2/(e^{2|x|} + 1)` with the sign of x, `e^y` as `2^n·e^r` (n the nearest integer to
/// y/ln 2, ln 2 split in two so that r is exact) and `e^r = 1 + 2r·P(r²)/(Q(r²) − r·P(r²))`;
/// the rational functions are Cephes' (`tanh.c`, `exp.c`; the switch at 0.4 rather than
/// Cephes' 0.625, where the first is 3–4 ulp off and the second 2). |x| is held at 22 for the
/// exponential, beyond which tanh rounds to ±1. Error: at most 2 ulp from the correctly rounded
/// value (120,000 arguments against 40-digit decimal arithmetic), at most 3 ulp from glibc's
/// `tanh` (tested on a dense sweep); odd exactly, NaN stays NaN.
#[inline(always)]
pub fn tanh_f64(x: f64) -> f64 {
    const P: [f64; 3] = [
        -9.643_991_794_250_522e-1,
        -9.928_772_310_019_186e1,
        -1.614_687_684_417_079_5e3,
    ];
    const Q: [f64; 3] = [
        1.128_116_784_916_329_3e2,
        2.235_488_390_601_005e3,
        4.844_063_053_251_255e3,
    ];
    const EP: [f64; 3] = [1.261_771_930_748_106e-4, 3.029_944_077_074_419_6e-2, 1.0];
    const EQ: [f64; 4] = [
        3.001_985_051_386_644_5e-6,
        2.524_483_403_496_841e-3,
        2.272_655_482_081_550_3e-1,
        2.0,
    ];
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_457_519_531_25e-1;
    const LN2_LO: f64 = 1.428_606_820_309_417_2e-6;
    // Adding and subtracting 1.5·2^52 rounds a value below 2^51 to an integer; the sum's low
    // mantissa bits are that integer, from which 2^n is built.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let a = x.abs();
    // Small |x|: the odd rational function.
    let s = x * x;
    let small = x + x * s * (((P[0] * s + P[1]) * s + P[2]) / (((s + Q[0]) * s + Q[1]) * s + Q[2]));
    // Large |x|: through e^{2|x|}.
    let y = 2.0 * if a < 22.0 { a } else { 22.0 };
    let t = y * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (y - n * LN2_HI) - n * LN2_LO;
    let rr = r * r;
    let px = r * ((EP[0] * rr + EP[1]) * rr + EP[2]);
    let er = 1.0 + 2.0 * (px / ((((EQ[0] * rr + EQ[1]) * rr + EQ[2]) * rr + EQ[3]) - px));
    let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    let large = (1.0 - 2.0 / (er * scale + 1.0)).copysign(x);
    // NaN fails both comparisons and takes the small branch, which keeps it NaN. Below 1e-9,
    // tanh(x) rounds to x (x³/3 is under half an ulp of x), and x keeps the sign of a zero.
    if a >= 0.4 {
        large
    } else if a < 1e-9 {
        x
    } else {
        small
    }
}

/// What a stream's ensemble stores and computes in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Double precision.
    F64,
    /// Single precision (the default option): half the bytes per particle, 2–3× the speed; on
    /// the bundled datasets its predictions stay within 1e-6 of the series' range of the `f64`
    /// ones.
    F32,
}

impl Precision {
    pub fn bytes(self) -> usize {
        match self {
            Precision::F64 => 8,
            Precision::F32 => 4,
        }
    }

    /// The option's spelling: `f64` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F64 => "f64",
            Precision::F32 => "f32",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn precision_names_parse_back_and_match_the_options_spelling() {
        for p in [Precision::F64, Precision::F32] {
            assert_eq!(
                <Precision as clap::ValueEnum>::from_str(p.name(), false),
                Ok(p)
            );
            assert_eq!(
                serde_json::to_string(&p).expect("serialises"),
                format!("\"{}\"", p.name())
            );
        }
        assert!(<Precision as clap::ValueEnum>::from_str("f16", false).is_err());
    }

    fn ulps64(a: f64, b: f64) -> u64 {
        (a.to_bits() as i128 - b.to_bits() as i128).unsigned_abs() as u64
    }

    #[test]
    fn tanh_f64_is_within_three_ulp_of_libm() {
        // glibc's tanh is within an ulp of the exact value; the sweep covers both branches,
        // their border, the saturation and tiny arguments.
        let mut worst = (0u64, 0.0f64);
        let mut check = |x: f64| {
            let u = ulps64(tanh_f64(x), x.tanh());
            if u > worst.0 {
                worst = (u, x);
            }
        };
        let mut x = -25.0;
        while x <= 25.0 {
            check(x);
            x += 1.0 / 4096.0 + 1e-9;
        }
        let mut x = 0.37;
        while x <= 0.43 {
            check(x);
            check(-x);
            x += 1e-7;
        }
        for k in 0..1074 {
            check(2f64.powi(-k) * 1.37);
            check(-(2f64.powi(-k)) * 1.91);
        }
        assert!(worst.0 <= 3, "{worst:?}");
        assert_eq!(tanh_f64(0.0).to_bits(), 0.0f64.to_bits());
        assert_eq!(tanh_f64(-0.0).to_bits(), (-0.0f64).to_bits());
        assert_eq!(tanh_f64(30.0), 1.0);
        assert_eq!(tanh_f64(-30.0), -1.0);
        assert_eq!(tanh_f64(f64::INFINITY), 1.0);
        assert_eq!(tanh_f64(f64::NEG_INFINITY), -1.0);
        assert!(tanh_f64(f64::NAN).is_nan());
        for &x in &[1e-300, 1e-9, 0.3, 0.4, 1.7, 5.0, 19.0] {
            assert_eq!(tanh_f64(-x), -tanh_f64(x));
        }
    }

    #[test]
    fn tanh_f32_is_close_to_the_exact_value() {
        // Relative error in ulp where |x| < 1 (where tanh is far from saturating), absolute
        // error everywhere.
        let (mut worst_ulp, mut worst_abs) = ((0u32, 0.0f32), (0.0f64, 0.0f32));
        let mut check = |x: f32| {
            let exact = f64::from(x).tanh();
            let got = tanh_f32(x);
            if x.abs() < 1.0 {
                let u = ulps(got, exact as f32);
                if u > worst_ulp.0 {
                    worst_ulp = (u, x);
                }
            }
            let a = (f64::from(got) - exact).abs();
            if a > worst_abs.0 {
                worst_abs = (a, x);
            }
        };
        let mut x = -10.0f32;
        while x <= 10.0 {
            check(x);
            x += 1e-4;
        }
        for k in 0..126 {
            check(2f32.powi(-k) * 1.37);
        }
        assert!(worst_ulp.0 <= 4, "{worst_ulp:?}");
        assert!(worst_abs.0 <= 6e-7, "{worst_abs:?}");
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(20.0), 1.0);
        assert_eq!(tanh_f32(-20.0), -1.0);
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
        // Odd, exactly.
        for &x in &[1e-6f32, 0.3, 1.7, 5.0] {
            assert_eq!(tanh_f32(-x), -tanh_f32(x));
        }
    }
}
