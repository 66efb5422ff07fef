//! Element conversion between the safetensors dtypes Pith reads (F32, BF16, F16) or writes (F32,
//! BF16) and f32, and the transpose between HF's per-expert [out, in] and Pith's [in, out].

use safetensors::Dtype;

/// The little-endian f32 at the start of a byte slice.
pub(super) fn read_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let (exp, man) = (((h >> 10) & 0x1f) as u32, (h & 0x3ff) as u32);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            let v = m as f32 * (-24f32).exp2();
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 → bf16, rounding to nearest even.
pub(super) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Reads one element from the start of a byte slice.
pub(super) type Read = fn(&[u8]) -> f32;

/// Element size and reader for a dtype Pith imports.
pub(super) fn reader(d: Dtype) -> Option<(usize, Read)> {
    match d {
        Dtype::F32 => Some((4, read_f32)),
        Dtype::BF16 => Some((2, |b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))),
        Dtype::F16 => Some((2, |b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))),
        _ => None,
    }
}

/// dst [C, R] = srcᵀ for src [R, C] (row-major) read through `x` from element `off` on.
pub(super) fn transpose_into(dst: &mut [f32], (r, c): (usize, usize), off: usize, x: impl Fn(usize) -> f32) {
    for i in 0..r {
        for j in 0..c {
            dst[j * r + i] = x(off + i * c + j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        let cases = [(0x3c00, 1.0), (0xc000, -2.0), (0x0001, 2f32.powi(-24)), (0x7bff, 65504.0), (0x0000, 0.0)];
        for (h, f) in cases {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        for x in [1.0f32, -3.5, 1e-3, 12345.678, 0.0] {
            let b = f32_to_bf16(x);
            let back = f32::from_bits((b as u32) << 16);
            assert!((back - x).abs() <= x.abs() / 128.0, "{x} -> {back}");
        }
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80, "ties go to even");
    }
}
