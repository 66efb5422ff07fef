//! Causal GQA flash attention on the device (kernels/attention.cu): forward and backward with the
//! host duties the kernels leave (delta, zeroing dQ's fp32 accumulator, its cast to bf16), and
//! head sizes between the kernels' (q·k, value) pairs zero-padded up to the next one: padding q
//! and k adds nothing to q·k, padding v adds zero output columns, so the result is exact.

use super::{src, DTensor, Gpu};
use crate::layers::AttnDims;
use pith_plugin_api::{Arg, DType, Tensor};

/// (q·k, value) head sizes of the flash kernels: `flash_attn_{fwd,bwd}_d{dk}` (dk = dv) or
/// `_d{dk}_{dv}` (MLA's 128 + 64 rotated q·k dims, 128 value dims).
const KERNELS: [(usize, usize); 4] = [(32, 32), (64, 64), (128, 128), (192, 128)];

type R<T> = Result<T, String>;

impl Gpu {
    /// Causal attention of q [B·S, hq·d], k [B·S, hkv·d], v [B·S, hkv·dv] (bf16), within
    /// `a.window`, with `sinks` (bf16 [hq]) when given: (out [B·S, hq·dv] bf16, lse f32 [B, hq,
    /// S]) as layers::attention_fwd.
    pub fn attention(
        &self,
        q: &DTensor,
        k: &DTensor,
        v: &DTensor,
        sinks: Option<&Tensor>,
        a: AttnDims,
    ) -> R<(DTensor, DTensor)> {
        let (kd, kv) = kernel(a)?;
        let (qw, kw, vw) = (self.widen(q, a.d, kd)?, self.widen(k, a.d, kd)?, self.widen(v, a.dv, kv)?);
        let (q, k, v) = (qw.as_ref().unwrap_or(q), kw.as_ref().unwrap_or(k), vw.as_ref().unwrap_or(v));
        let out = self.tensor(&[a.b * a.t, a.hq * kv], DType::BF16)?;
        let lse = self.tensor(&[a.b, a.hq, a.t], DType::F32)?;
        let mut args = vec![q.arg(), k.arg(), v.arg(), out.arg(), lse.arg(), sinks.map_or(Arg::Ptr(0), |s| s.arg())];
        args.extend(sizes(a));
        if self.hopper(kd, kv, a) {
            // The Q tile and two buffers of K and V tiles, 128 rows each; 1 KiB of alignment.
            let shared = (5 * 128 * kd * 2 + 1024) as u32;
            let grid = [a.hq as u32, a.b as u32, a.t.div_ceil(128) as u32];
            let name = format!("flash_attn_fwd_wg_d{kd}");
            self.launch(src::ATTENTION_HOPPER, &name, (grid, [256, 1, 1], shared), &args)?;
        } else {
            let (rows, threads) = if kd >= 128 { (64, 128) } else { (128, 256) };
            let grid = [a.hq as u32, a.b as u32, a.t.div_ceil(rows) as u32];
            let name = format!("flash_attn_fwd_{}", suffix(kd, kv, a));
            self.launch(src::ATTENTION, &name, (grid, [threads, 1, 1], 0), &args)?;
        }
        Ok((self.narrow(out, a.dv, kv)?, lse))
    }

    /// Its backward from the forward's inputs, out and lse: (dq, dk, dv) as layers::attention_bwd;
    /// with `sinks` (values bf16, gradient f32 [hq]) the sinks' gradient accumulates.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        (q, k, v): (&DTensor, &DTensor, &DTensor),
        sinks: Option<(&Tensor, &Tensor)>,
        out: &DTensor,
        lse: &DTensor,
        dout: &DTensor,
        a: AttnDims,
    ) -> R<(DTensor, DTensor, DTensor)> {
        let (kd, kv) = kernel(a)?;
        let (b, s, hq) = (a.b as i32, a.t as i32, a.hq as i32);
        // delta = Σ out·dout per row, over the unpadded value dims.
        let delta = self.tensor(&[a.b, a.hq, a.t], DType::F32)?;
        let prep = [out.arg(), dout.arg(), delta.arg(), Arg::I32(b), Arg::I32(s), Arg::I32(hq), Arg::I32(a.dv as i32)];
        let grid = [(a.b * a.t * a.hq).div_ceil(8) as u32, 1, 1];
        self.launch(src::ATTENTION, "flash_attn_bwd_prep", (grid, [256, 1, 1], 0), &prep)?;
        if let Some((sk, ds)) = sinks {
            let args = [lse.arg(), delta.arg(), sk.arg(), ds.arg(), Arg::I32(b), Arg::I32(s), Arg::I32(hq)];
            self.launch(src::ATTENTION, "flash_attn_sink_grad", ([a.hq as u32, 1, 1], [256, 1, 1], 0), &args)?;
        }
        let (qw, kw) = (self.widen(q, a.d, kd)?, self.widen(k, a.d, kd)?);
        let (vw, dw) = (self.widen(v, a.dv, kv)?, self.widen(dout, a.dv, kv)?);
        let (q, k) = (qw.as_ref().unwrap_or(q), kw.as_ref().unwrap_or(k));
        let (v, dout) = (vw.as_ref().unwrap_or(v), dw.as_ref().unwrap_or(dout));
        let dq_acc = self.zeros(&q.dims(), DType::F32)?;
        let (dk, dv) = (self.tensor(&k.dims(), DType::BF16)?, self.tensor(&v.dims(), DType::BF16)?);
        let mut args = vec![q.arg(), k.arg(), v.arg(), dout.arg(), lse.arg(), delta.arg()];
        args.extend([dq_acc.arg(), dk.arg(), dv.arg()]);
        args.extend(sizes(a));
        if self.hopper(kd, kv, a) {
            // K and V (128 keys), two buffers of Q and dO (bm queries), dS^T, two of lse and
            // delta, and 1 KiB to align the tiles to the 1024-byte swizzle atoms.
            let bm = if kd == 64 { 128 } else { 64 };
            let shared = (2 * 128 * kd * 2 + 4 * bm * kd * 2 + 128 * bm * 2 + 4 * bm * 4 + 1024) as u32;
            let grid = [a.hkv as u32, a.b as u32, a.t.div_ceil(128) as u32];
            let name = format!("flash_attn_bwd_wg_d{kd}");
            self.launch(src::ATTENTION_HOPPER, &name, (grid, [256, 1, 1], shared), &args)?;
        } else {
            let grid = [a.hkv as u32, a.b as u32, a.t.div_ceil(64) as u32];
            let name = format!("flash_attn_bwd_{}", suffix(kd, kv, a));
            self.launch(src::ATTENTION, &name, (grid, [128, 1, 1], 0), &args)?;
        }
        let dq = self.tensor(&q.dims(), DType::BF16)?;
        let n = dq.numel();
        let grid = [n.div_ceil(256).min(65_535) as u32, 1, 1];
        self.launch(
            src::ATTENTION,
            "flash_attn_dq_cast",
            (grid, [256, 1, 1], 0),
            &[dq_acc.arg(), dq.arg(), Arg::I64(n as i64)],
        )?;
        Ok((self.narrow(dq, a.d, kd)?, self.narrow(dk, a.d, kd)?, self.narrow(dv, a.dv, kv)?))
    }

    /// Whether kernels/attention_hopper.cu serves `a`: Hopper, head sizes 64/64 or 128/128, no
    /// window that cuts; `PITH_ATTENTION=fa2` keeps kernels/attention.cu's everywhere (to compare).
    fn hopper(&self, kd: usize, kv: usize, a: AttnDims) -> bool {
        static FA2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let fa2 = *FA2.get_or_init(|| std::env::var("PITH_ATTENTION").is_ok_and(|v| v == "fa2"));
        let uncut = a.window == 0 || a.window >= a.t;
        self.arch == "sm_90a" && kd == kv && (kd == 64 || kd == 128) && uncut && !fa2
    }

    /// x (rows of heads of w) with each head widened to `to` by zero columns; None when w = to.
    fn widen(&self, x: &DTensor, w: usize, to: usize) -> R<Option<DTensor>> {
        if w == to {
            return Ok(None);
        }
        let out = self.zeros(&[x.numel() / w, to], DType::BF16)?;
        self.set_cols(&out, to, 0, x, 1)?;
        Ok(Some(out))
    }

    /// The first `w` columns of each head of x (heads of `from`); x itself when w = from.
    fn narrow(&self, x: DTensor, w: usize, from: usize) -> R<DTensor> {
        if w == from {
            return Ok(x);
        }
        let out = self.tensor(&[x.numel() / from, w], DType::BF16)?;
        self.cols(&x, from, 0..w, 1, &out)?;
        Ok(out)
    }
}

/// The kernel's (q·k, value) head sizes for `a`: the first pair that holds both.
fn kernel(a: AttnDims) -> R<(usize, usize)> {
    let ok = a.hkv > 0 && a.hq.is_multiple_of(a.hkv) && a.d.is_multiple_of(2) && a.dv.is_multiple_of(2);
    KERNELS.into_iter().find(|&(k, v)| ok && a.d <= k && a.dv <= v).ok_or_else(|| {
        format!(
            "attention with {} query heads over {} key/value heads, q·k heads of {} and value heads of {}: \
             the CUDA flash attention takes even head sizes up to (128, 128) or (192, 128) and kv heads dividing the query heads",
            a.hq, a.hkv, a.d, a.dv
        )
    })
}

/// The kernels' name suffix: the head sizes, and `_w` (the windowed twin) when a window cuts.
fn suffix(dk: usize, dv: usize, a: AttnDims) -> String {
    let w = if a.window > 0 && a.window < a.t { "_w" } else { "" };
    if dk == dv {
        format!("d{dk}{w}")
    } else {
        format!("d{dk}_{dv}{w}")
    }
}

/// The trailing (window, B, S, Hq, Hkv, scale) arguments of both kernels.
fn sizes(a: AttnDims) -> [Arg; 6] {
    let i = |n: usize| Arg::I32(n as i32);
    [i(a.window), i(a.b), i(a.t), i(a.hq), i(a.hkv), Arg::F32(a.scale)]
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gpu, rand_bf16};
    use super::*;
    use crate::layers;
    use crate::rng::Rng;

    /// ‖got − want‖ / ‖want‖.
    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let d: f64 = got.iter().zip(want).map(|(g, w)| ((g - w) as f64).powi(2)).sum();
        (d / want.iter().map(|w| (*w as f64).powi(2)).sum::<f64>().max(1e-30)).sqrt()
    }

    /// Forward and backward against layers::attention_fwd/bwd (f32, on the same bf16 inputs) for
    /// every kernel, GQA, sequences that end mid-tile, MLA's sizes (192 q·k, 128 value), sizes
    /// that are padded (MLA-shaped 48/32, 24/16; 96), and GPT-OSS's sliding windows (shorter and
    /// longer than a tile) with sinks. Tolerance 2% relative L2: bf16 outputs and P, dS rounded to
    /// bf16 inside the kernels (~0.4% each); the sinks' gradient (f32 sums) 1%.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn attention_matches_cpu() {
        let g = gpu();
        let mut rng = Rng::new(21);
        for (b, t, hq, hkv, d, dv, window, sinks) in [
            (2, 100, 4, 2, 32, 32, 0, false),
            (1, 130, 4, 1, 64, 64, 0, false),
            (2, 70, 2, 2, 128, 128, 0, false),
            (2, 150, 4, 4, 192, 128, 0, false),
            (1, 64, 2, 2, 48, 32, 0, false),
            (2, 33, 3, 3, 24, 16, 0, false),
            (1, 80, 4, 2, 96, 96, 0, false),
            (2, 300, 4, 2, 64, 64, 40, true),
            (1, 200, 4, 2, 64, 64, 128, true),
            (1, 150, 2, 1, 128, 128, 70, true),
            (2, 90, 4, 2, 32, 32, 0, true),
            // Hopper's backward (kernels/attention_hopper.cu): several 128-key blocks and query
            // tiles per head, GQA, sequences ending mid-tile.
            (2, 300, 8, 2, 64, 64, 0, false),
            (1, 330, 4, 2, 128, 128, 0, true),
            (1, 256, 2, 2, 64, 64, 0, false),
        ] {
            let a = AttnDims { b, t, hq, hkv, d, dv, scale: 1.0 / (d as f32).sqrt(), window };
            let (qh, q) = rand_bf16(&g, &mut rng, &[b * t, hq * d], 1.0);
            let (kh, k) = rand_bf16(&g, &mut rng, &[b * t, hkv * d], 1.0);
            let (vh, v) = rand_bf16(&g, &mut rng, &[b * t, hkv * dv], 1.0);
            let (dh, dout) = rand_bf16(&g, &mut rng, &[b * t, hq * dv], 1.0);
            let (sh, s) = rand_bf16(&g, &mut rng, &[hq], 1.0);
            let sh = if sinks { sh } else { vec![] };
            let ds = g.zeros(&[hq], DType::F32).unwrap();
            let (out, lse) = g.attention(&q, &k, &v, sinks.then_some(&s.t), a).unwrap();
            let (want_out, want_lse) = layers::attention_fwd(&qh, &kh, &vh, &sh, a);
            let sg = sinks.then_some((&s.t, &ds.t));
            let (dq, dk, dv_) = g.attention_bwd((&q, &k, &v), sg, &out, &lse, &dout, a).unwrap();
            let want = layers::attention_bwd((&qh, &kh, &vh, &sh), &want_out, &want_lse, &dh, a);
            if sinks {
                let e = rel_l2(&g.to_f32(&ds).unwrap(), &want.3);
                println!("attention {a:?}: sinks' gradient relative L2 {e:.2e}");
                assert!(e < 1e-2, "{a:?}: sinks' gradient {e}");
            }
            let errs = [
                rel_l2(&g.to_f32(&out).unwrap(), &want_out),
                rel_l2(&g.to_f32(&lse).unwrap(), &want_lse),
                rel_l2(&g.to_f32(&dq).unwrap(), &want.0),
                rel_l2(&g.to_f32(&dk).unwrap(), &want.1),
                rel_l2(&g.to_f32(&dv_).unwrap(), &want.2),
            ];
            println!("attention {a:?}: out, lse, dq, dk, dv relative L2 {:?}", errs.map(|e| format!("{e:.2e}")));
            assert!(errs.iter().all(|&e| e < 2e-2), "{a:?}: {errs:?}");
        }
    }
}
