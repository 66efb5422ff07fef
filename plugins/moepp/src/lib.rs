//! `moepp`: the experts of MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods
//! with Zero-Computation Experts", arXiv:2410.07348). Of the model's E routed experts the last
//! `constant + copy + zero` are zero-computation experts, the first E − that many SwiGLU FFN experts
//! (std `swiglu`'s math and layout, reimplemented here). README.md has the paper, the equations,
//! every config key, and what the ABI cannot avoid yet (rows routed to zero and copy experts still
//! travel through dispatch and combine).
//!
//! Expert ids, in order: FFN 0..n_f, then constant n_f..n_f+n_c, copy, zero (the last; MoE++'s
//! reference code orders them the same way). For rows x_e of expert e (x [N,H] sorted by expert,
//! groups from offsets [E_local+1] on the host):
//!   FFN:       a = x_e·Wg[e], b = x_e·Wu[e];  u = silu(a) ⊙ b;  y_e = u·Wd[e]
//!   zero:      y = 0
//!   copy:      y = x
//!   constant j: s = x·W_c[j]ᵀ [2] (`w_const` [n_c,2,H]);  [α0, α1] = softmax(s);  y = α0·x + α1·v_j
//!              (`v_const` [n_c,H])
//! Backward (exact), per constant row with g = dy:
//!   dα0 = ⟨g, x⟩, dα1 = ⟨g, v_j⟩;  ds0 = α0·α1·(dα0 − dα1) = −ds1;
//!   dx = α0·g + ds0·W_c[j,0] + ds1·W_c[j,1];  dW_c[j] += dsᵀ·x;  dv_j += Σ α1·g;
//! copy: dx = dy; zero: dx = 0; FFN: std swiglu's backward. Forward FLOPs: 6·H·F per FFN row and
//! 4·H per constant row (the two-logit GEMV); copy and zero rows count 0.
//! Metric: `ffn_rows_frac`, the share of the layer's routed rows that FFN experts computed.
//!
//! CUDA (kernels/moepp.cu): the GEMMs through the host (bf16 activations and weights, f32 logits and
//! weight gradients), the elementwise steps as this crate's kernels: `moepp_swiglu_fwd`/`_bwd`,
//! `moepp_fill` (copy and zero rows), `moepp_const_fwd` (the mix), `moepp_const_bwd` (a warp per row:
//! the two dots, ds, dx). The weight gradients of the constant experts are GEMMs (no atomics).

use pith_plugin_api::{
    kernel_source, kit, parse_config, register, Arg, DType, Device, Experts, ExpertsOut, Host, Init, ModelDims,
    ParamSpec, Result, Tensor,
};
use serde::Deserialize;

pith_plugin_api::export_plugin!("moepp");

const WHO: &str = "moepp";
/// Threads per block of every launch (8 warps; the warp-per-row kernel relies on it).
const BLOCK: [u32; 3] = [256, 1, 1];

/// The zero-computation experts of each kind (defaults: MoE++'s 1 zero, 1 copy, 2 constant) and
/// the FFN experts' hidden size.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    zero: usize,
    #[serde(default = "one")]
    copy: usize,
    #[serde(default = "two")]
    constant: usize,
    #[serde(default)]
    ffn: Option<usize>,
}

fn one() -> usize {
    1
}

fn two() -> usize {
    2
}

/// Expert counts by kind, in id order: FFN, constant, copy, zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kinds {
    ffn: usize,
    constant: usize,
    copy: usize,
    zero: usize,
}

impl Kinds {
    fn total(&self) -> usize {
        self.ffn + self.constant + self.copy + self.zero
    }
    /// The local experts `first .. first + n` of a model laid out as `self`, by kind (the kinds'
    /// id ranges cut by the local range; the local order is the same).
    fn local(&self, first: usize, n: usize) -> Kinds {
        let overlap = |a: usize, b: usize| (first + n).min(b).saturating_sub(first.max(a));
        let (c0, p0, z0) = (self.ffn, self.ffn + self.constant, self.ffn + self.constant + self.copy);
        Kinds { ffn: overlap(0, c0), constant: overlap(c0, p0), copy: overlap(p0, z0), zero: overlap(z0, self.total()) }
    }
}

struct MoePP {
    hidden: usize,
    ffn: usize,
    /// This rank's experts by kind (all of the model's on one rank).
    local: Kinds,
}

fn create(config: &str, dims: ModelDims) -> Result<MoePP> {
    let c: Config = parse_config(config)?;
    if c.ffn == Some(0) {
        return Err("`ffn` = 0: an expert's hidden size must be at least 1".into());
    }
    let (hidden, experts, ffn) =
        (dims.hidden as usize, dims.experts as usize, c.ffn.unwrap_or(dims.expert_ffn as usize));
    if hidden == 0 || ffn == 0 || dims.local_experts == 0 {
        return Err(format!(
            "{WHO}: model.hidden ({hidden}), the local experts ({}) and model.expert_ffn ({ffn}) must all be at least 1",
            dims.local_experts
        ));
    }
    let zc = c.zero + c.copy + c.constant;
    if zc >= experts {
        return Err(format!(
            "`zero` + `copy` + `constant` = {} + {} + {} = {zc} zero-computation experts leave no FFN expert of the \
             model's {experts} (model.experts); they must add up to at most {}",
            c.zero,
            c.copy,
            c.constant,
            experts.saturating_sub(1)
        ));
    }
    let (first, n) = (dims.first_expert as usize, dims.local_experts as usize);
    if first + n > experts {
        return Err(format!("{WHO}: local experts {first}..{} are not experts of the model (0..{experts})", first + n));
    }
    let all = Kinds { ffn: experts - zc, constant: c.constant, copy: c.copy, zero: c.zero };
    Ok(MoePP { hidden, ffn, local: all.local(first, n) })
}

register!(
    Experts,
    "moepp",
    "MoE++: SwiGLU FFN experts plus zero (y=0), copy (y=x) and constant (y=α·x+β·v) experts, the last ids",
    "[experts]\nplugin = \"moepp\"\nzero = 1\ncopy = 1\nconstant = 2",
    create
);

fn cuda_source() -> &'static str {
    kernel_source!(include_str!("../kernels/moepp.cu"))
}

/// [`kit::expect`], the message led by this component's name.
fn expect(t: &Tensor, dtype: DType, device: Device, want: &[usize], what: &str) -> Result<()> {
    pith_plugin_api::kit::expect(t, dtype, device, want, &format!("{WHO}: {what}"))
}

/// Matrix `i` of shape `shape` of the stacked tensor `t` ([i, shape..]) as its own view.
fn mat(t: Tensor, i: usize, shape: &[usize]) -> Tensor {
    let numel: usize = shape.iter().product();
    Tensor::new(t.addr + (i * numel * t.dtype.size()) as u64, t.dtype, t.device, shape)
}

/// Grid of the warp-per-row kernel over `n` rows: 8 rows (warps) per block, grid-stride beyond.
fn rows_grid(n: usize) -> [u32; 3] {
    [n.div_ceil(8).clamp(1, 65535) as u32, 1, 1]
}

/// [α0, α1] = softmax([s0, s1]) (kernels/moepp.cu's `moepp_alpha` computes the same).
fn alpha(s0: f32, s1: f32) -> (f32, f32) {
    let m = s0.max(s1);
    let (e0, e1) = ((s0 - m).exp(), (s1 - m).exp());
    (e0 / (e0 + e1), e1 / (e0 + e1))
}

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

/// Launch arguments of the kernels, in parameter order (a unit test holds them to kernels/moepp.cu).
mod args {
    use super::*;

    pub fn swiglu_fwd(a: Tensor, b: Tensor, u: Tensor, n: usize) -> Vec<Arg> {
        vec![a.arg(), b.arg(), u.arg(), Arg::I64(n as i64)]
    }
    pub fn swiglu_bwd(a: Tensor, b: Tensor, du: Tensor, da: Tensor, db: Tensor, n: usize) -> Vec<Arg> {
        vec![a.arg(), b.arg(), du.arg(), da.arg(), db.arg(), Arg::I64(n as i64)]
    }
    /// dst[i] = src[i] for i < ncopy, 0 for ncopy ≤ i < n.
    pub fn fill(src: Tensor, dst: Tensor, ncopy: usize, n: usize) -> Vec<Arg> {
        vec![src.arg(), dst.arg(), Arg::I64(ncopy as i64), Arg::I64(n as i64)]
    }
    pub fn const_fwd(x: Tensor, s: Tensor, v: Tensor, y: Tensor, m: usize, h: usize) -> Vec<Arg> {
        vec![x.arg(), s.arg(), v.arg(), y.arg(), Arg::I32(m as i32), Arg::I32(h as i32)]
    }
    /// `t`: dy, x, v, w_const, s, dx, ds, a1.
    pub fn const_bwd(t: [Tensor; 8], m: usize, h: usize) -> Vec<Arg> {
        [&t.map(|t| t.arg())[..], &[Arg::I32(m as i32), Arg::I32(h as i32)]].concat()
    }
}

/// Row ranges of one call: FFN rows 0..ffn_end; constant expert c's rows `constant[c]`; copy rows
/// copy.0..copy.1; zero rows copy.1..n.
struct Rows {
    ffn_end: usize,
    constant: Vec<(usize, usize)>,
    copy: (usize, usize),
    n: usize,
}

impl MoePP {
    fn n_local(&self) -> usize {
        self.local.total()
    }

    /// Where each parameter sits in `p`: the FFN's three (if any FFN expert is local), then the
    /// constant experts' two (if any).
    fn param_count(&self) -> (usize, usize) {
        let f = if self.local.ffn > 0 { 3 } else { 0 };
        (f, f + if self.local.constant > 0 { 2 } else { 0 })
    }

    /// Shapes, dtypes and the offsets; returns the row ranges by kind.
    fn check(&self, dev: Device, p: &[Tensor], x: &Tensor, offsets: &Tensor) -> Result<Rows> {
        let (f, all) = self.param_count();
        if p.len() != all {
            return Err(format!(
                "{WHO}: expected {all} parameters ({} FFN, {} constant-expert), got {}",
                f,
                all - f,
                p.len()
            ));
        }
        let act = match dev {
            Device::Cpu => DType::F32,
            Device::Cuda => DType::BF16,
        };
        let (l, hd, ff) = (self.local, self.hidden, self.ffn);
        if l.ffn > 0 {
            expect(&p[0], act, dev, &[l.ffn, hd, ff], "w_gate")?;
            expect(&p[1], act, dev, &[l.ffn, hd, ff], "w_up")?;
            expect(&p[2], act, dev, &[l.ffn, ff, hd], "w_down")?;
        }
        if l.constant > 0 {
            expect(&p[f], act, dev, &[l.constant, 2, hd], "w_const")?;
            expect(&p[f + 1], act, dev, &[l.constant, hd], "v_const")?;
        }
        expect(x, act, dev, &[0, hd], "x")?;
        let e = self.n_local();
        expect(offsets, DType::I32, Device::Cpu, &[e + 1], "offsets")?;
        let off = offsets.i32s();
        let n = x.dim(0);
        if off[0] != 0 || off[e] as usize != n || off.windows(2).any(|w| w[0] > w[1]) {
            return Err(format!("{WHO}: offsets {off:?} must be non-decreasing from 0 to the {n} rows of x"));
        }
        let at = |i: usize| off[i] as usize;
        let c0 = l.ffn;
        let p0 = c0 + l.constant;
        Ok(Rows {
            ffn_end: at(c0),
            constant: (0..l.constant).map(|c| (at(c0 + c), at(c0 + c + 1))).collect(),
            copy: (at(p0), at(p0 + l.copy)),
            n,
        })
    }

    /// The FFN experts' offsets: the first `ffn + 1` of `offsets`, as a host tensor of their own.
    fn ffn_offsets(&self, h: &Host, offsets: &Tensor) -> Result<Tensor> {
        let o = h.alloc_host(&[self.local.ffn + 1], DType::I32)?;
        // SAFETY: o is this call's own allocation; offsets is only read.
        unsafe { o.i32s_mut() }.copy_from_slice(&offsets.i32s()[..=self.local.ffn]);
        Ok(o)
    }

    /// dst rows copy.0..copy.1 = src's, rows copy.1..n = 0 (y from x, or dx from dy).
    fn fill(&self, h: &Host, src: Tensor, dst: Tensor, rows: &Rows) -> Result<()> {
        let ((c0, c1), n, hd) = (rows.copy, rows.n, self.hidden);
        match h.device() {
            Device::Cpu => {
                // SAFETY: dst is the caller's output (y or dx), distinct from src; nothing else views it.
                let d = unsafe { dst.f32s_mut() };
                d[c0 * hd..c1 * hd].copy_from_slice(&src.f32s()[c0 * hd..c1 * hd]);
                d[c1 * hd..n * hd].fill(0.0);
            }
            Device::Cuda => {
                let (s, d, m) = (src.rows(c0, n - c0), dst.rows(c0, n - c0), (n - c0) * hd);
                let a = args::fill(s, d, (c1 - c0) * hd, m);
                h.launch(cuda_source(), "moepp_fill", kit::grid(m, 256), BLOCK, 0, &a)?;
            }
        }
        Ok(())
    }
}

impl Experts for MoePP {
    fn settings(&self) -> String {
        pith_plugin_api::settings!(
            zero = self.local.zero,
            copy = self.local.copy,
            constant = self.local.constant,
            ffn = self.ffn
        )
    }

    fn params(&self) -> Vec<ParamSpec> {
        let (l, h, f) = (self.local, self.hidden, self.ffn);
        let mut p = Vec::new();
        if l.ffn > 0 {
            p.push(ParamSpec::new("w_gate", &[l.ffn, h, f], Init::Normal(0.02), true));
            p.push(ParamSpec::new("w_up", &[l.ffn, h, f], Init::Normal(0.02), true));
            p.push(ParamSpec::new("w_down", &[l.ffn, f, h], Init::Normal(0.02), true));
        }
        if l.constant > 0 {
            p.push(ParamSpec::new("w_const", &[l.constant, 2, h], Init::Normal(0.02), true));
            // MoE++'s reference code draws the constant vectors from N(0, 1).
            p.push(ParamSpec::new("v_const", &[l.constant, h], Init::Normal(1.0), false));
        }
        p
    }

    /// 6·H·F per FFN row, 4·H per constant row (two logits), nothing for copy and zero rows.
    fn flops(&self, rows: &[u64]) -> f64 {
        let l = self.local;
        let sum = |a: usize, b: usize| rows.iter().take(b).skip(a).sum::<u64>() as f64;
        let (h, f) = (self.hidden as f64, self.ffn as f64);
        6.0 * h * f * sum(0, l.ffn) + 4.0 * h * sum(l.ffn, l.ffn + l.constant)
    }

    fn forward(&self, h: Host, p: &[Tensor], x: Tensor, offsets: Tensor) -> Result<ExpertsOut> {
        let dev = h.device();
        let rows = self.check(dev, p, &x, &offsets)?;
        let (n, hd, ff, act, fp) = (rows.n, self.hidden, self.ffn, kit::act_dtype(&h), self.param_count().0);
        let y = h.alloc_uninit(&[n, hd], act)?;
        // FFN experts: std swiglu on rows 0..rf.
        let rf = rows.ffn_end;
        let new = || h.alloc_uninit(&[rf, ff], act);
        let (a, b, u) = (new()?, new()?, new()?);
        if rf > 0 {
            let (xf, off) = (x.rows(0, rf), self.ffn_offsets(&h, &offsets)?);
            h.grouped_gemm(xf, p[0], a, off, false, false)?;
            h.grouped_gemm(xf, p[1], b, off, false, false)?;
            match dev {
                Device::Cpu => {
                    // SAFETY: u is this call's own allocation; nothing else views it.
                    let uv = unsafe { u.f32s_mut() };
                    for ((u, &a), &b) in uv.iter_mut().zip(a.f32s()).zip(b.f32s()) {
                        *u = a * sigmoid(a) * b;
                    }
                }
                Device::Cuda => {
                    let g = kit::grid((rf * ff).div_ceil(8), 256);
                    h.launch(cuda_source(), "moepp_swiglu_fwd", g, BLOCK, 0, &args::swiglu_fwd(a, b, u, rf * ff))?;
                }
            }
            h.grouped_gemm(u, p[2], y.rows(0, rf), off, false, false)?;
        }
        // Constant experts: logits s (f32, saved) by GEMM, then y = α0·x + α1·v.
        let cstart = rf;
        let s = h.alloc_uninit(&[rows.copy.0 - cstart, 2], DType::F32)?;
        for (c, &(r0, r1)) in rows.constant.iter().enumerate().filter(|(_, r)| r.1 > r.0) {
            let (m, sc) = (r1 - r0, s.rows(r0 - cstart, r1 - r0));
            let (xc, yc, v) = (x.rows(r0, m), y.rows(r0, m), mat(p[fp + 1], c, &[1, hd]));
            h.gemm(xc, mat(p[fp], c, &[2, hd]), sc, false, true, 1.0, 0.0)?;
            match dev {
                Device::Cpu => {
                    // SAFETY: y is this call's own allocation, viewed nowhere else.
                    let (yv, xv, sv, vv) = (unsafe { yc.f32s_mut() }, xc.f32s(), sc.f32s(), v.f32s());
                    for r in 0..m {
                        let (a0, a1) = alpha(sv[2 * r], sv[2 * r + 1]);
                        for j in 0..hd {
                            yv[r * hd + j] = a0 * xv[r * hd + j] + a1 * vv[j];
                        }
                    }
                }
                Device::Cuda => {
                    let a = args::const_fwd(xc, sc, v, yc, m, hd);
                    h.launch(cuda_source(), "moepp_const_fwd", kit::grid(m * hd, 256), BLOCK, 0, &a)?;
                }
            }
        }
        // Copy and zero experts.
        self.fill(&h, x, y, &rows)?;
        if h.context().training && n > 0 {
            h.metric_weighted("ffn_rows_frac", rf as f64 / n as f64, n as f64);
        }
        Ok(ExpertsOut { y, saved: vec![a, b, u, s].into() })
    }

    fn backward(
        &self,
        h: Host,
        p: &[Tensor],
        g: &[Tensor],
        x: Tensor,
        offsets: Tensor,
        out: &ExpertsOut,
        dy: Tensor,
        dx: Tensor,
    ) -> Result<()> {
        let dev = h.device();
        let rows = self.check(dev, p, &x, &offsets)?;
        let (hd, ff, act, fp) = (self.hidden, self.ffn, kit::act_dtype(&h), self.param_count().0);
        let [a, b, u, s] = out.saved[..] else {
            return Err(format!("{WHO}: backward needs the 4 tensors its forward saved, got {}", out.saved.len()));
        };
        if g.len() != p.len() {
            return Err(format!("{WHO}: expected {} grads, got {}", p.len(), g.len()));
        }
        let rf = rows.ffn_end;
        for (t, what) in [(&a, "saved a"), (&b, "saved b"), (&u, "saved u")] {
            expect(t, act, dev, &[rf, ff], what)?;
        }
        expect(&s, DType::F32, dev, &[rows.copy.0 - rf, 2], "saved logits")?;
        // FFN experts: std swiglu's backward on rows 0..rf.
        if rf > 0 {
            let (xf, dyf, dxf, off) = (x.rows(0, rf), dy.rows(0, rf), dx.rows(0, rf), self.ffn_offsets(&h, &offsets)?);
            let new = || h.alloc_uninit(&[rf, ff], act);
            let (du, da, db) = (new()?, new()?, new()?);
            h.grouped_gemm(dyf, p[2], du, off, true, false)?;
            h.grouped_gemm_wgrad(u, dyf, g[2], off)?;
            match dev {
                Device::Cpu => {
                    let (av, bv, duv) = (a.f32s(), b.f32s(), du.f32s());
                    // SAFETY: da and db are this call's own allocations; nothing else views them.
                    let (dav, dbv) = unsafe { (da.f32s_mut(), db.f32s_mut()) };
                    for i in 0..duv.len() {
                        let (ai, sg) = (av[i], sigmoid(av[i]));
                        dav[i] = duv[i] * bv[i] * sg * (1.0 + ai * (1.0 - sg));
                        dbv[i] = duv[i] * ai * sg;
                    }
                }
                Device::Cuda => {
                    let (g8, m) = (kit::grid((rf * ff).div_ceil(8), 256), rf * ff);
                    h.launch(cuda_source(), "moepp_swiglu_bwd", g8, BLOCK, 0, &args::swiglu_bwd(a, b, du, da, db, m))?;
                }
            }
            h.grouped_gemm_wgrad(xf, da, g[0], off)?;
            h.grouped_gemm_wgrad(xf, db, g[1], off)?;
            h.grouped_gemm(da, p[0], dxf, off, true, false)?;
            h.grouped_gemm(db, p[1], dxf, off, true, true)?;
        }
        // Constant experts: ds and α1 per row (f32 on the CPU, bf16 on CUDA, for the GEMMs), dx.
        for (c, &(r0, r1)) in rows.constant.iter().enumerate().filter(|(_, r)| r.1 > r.0) {
            let m = r1 - r0;
            let (xc, dyc, dxc, sc) = (x.rows(r0, m), dy.rows(r0, m), dx.rows(r0, m), s.rows(r0 - rf, m));
            let (wc, v) = (mat(p[fp], c, &[2, hd]), mat(p[fp + 1], c, &[1, hd]));
            let (ds, a1) = (h.alloc_uninit(&[m, 2], act)?, h.alloc_uninit(&[m, 1], act)?);
            match dev {
                Device::Cpu => {
                    let (xv, gv, sv, wv, vv) = (xc.f32s(), dyc.f32s(), sc.f32s(), wc.f32s(), v.f32s());
                    // SAFETY: dx is the caller's output and ds, a1 this call's allocations; all distinct.
                    let (dxv, dsv, a1v) = unsafe { (dxc.f32s_mut(), ds.f32s_mut(), a1.f32s_mut()) };
                    for r in 0..m {
                        let (xr, gr) = (&xv[r * hd..(r + 1) * hd], &gv[r * hd..(r + 1) * hd]);
                        let (a0, a1) = alpha(sv[2 * r], sv[2 * r + 1]);
                        let d0: f32 = gr.iter().zip(xr).map(|(g, x)| g * x).sum();
                        let d1: f32 = gr.iter().zip(vv).map(|(g, v)| g * v).sum();
                        let s0 = a0 * a1 * (d0 - d1);
                        (dsv[2 * r], dsv[2 * r + 1], a1v[r]) = (s0, -s0, a1);
                        for j in 0..hd {
                            dxv[r * hd + j] = a0 * gr[j] + s0 * (wv[j] - wv[hd + j]);
                        }
                    }
                }
                Device::Cuda => {
                    let a = args::const_bwd([dyc, xc, v, wc, sc, dxc, ds, a1], m, hd);
                    h.launch(cuda_source(), "moepp_const_bwd", rows_grid(m), BLOCK, 0, &a)?;
                }
            }
            h.gemm(ds, xc, mat(g[fp], c, &[2, hd]), true, false, 1.0, 1.0)?; // dW_c += dsᵀ·x
            h.gemm(a1, dyc, mat(g[fp + 1], c, &[1, hd]), true, false, 1.0, 1.0)?;
            // dv += α1ᵀ·dy
        }
        // Copy and zero experts: dx = dy and 0.
        self.fill(&h, dy, dx, &rows)
    }
}

#[cfg(test)]
mod tests;
