//! The host's layers on the CPU, f32: forward and backward as plain functions over row-major
//! slices (no autograd; the model calls them in order and keeps what backward needs). Rows or
//! heads run in parallel with rayon; every reduction across rows runs in a fixed order, so
//! results are bitwise reproducible whatever the thread count. Matrix products go through
//! [`sgemm`]. Backward functions WRITE input grads and ACCUMULATE parameter grads.

use crate::config::ModelConfig;
use crate::cpu::sgemm;
use rayon::prelude::*;

/// y [N,M] = x [N,K] · wᵀ, w [M,K] (the PyTorch `Linear` layout, no bias).
pub fn linear_fwd(x: &[f32], w: &[f32], n: usize, k: usize, m: usize, y: &mut [f32]) {
    sgemm(n, k, m, 1.0, x, false, w, true, 0.0, y);
}

/// dx [N,K] = dy [N,M] · w (`+=` when `acc`); dw [M,K] += dyᵀ · x.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (n, k, m): (usize, usize, usize),
    dx: &mut [f32],
    acc: bool,
    dw: &mut [f32],
) {
    let beta = if acc { 1.0 } else { 0.0 };
    sgemm(n, m, k, 1.0, dy, false, w, false, beta, dx);
    sgemm(m, n, k, 1.0, dy, true, x, false, 1.0, dw);
}

/// y [N,C] += b [C] on every row (a projection's bias).
pub fn bias_fwd(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(b.len()).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b));
}

/// db [C] += Σ over rows of dy [N,C] (in fixed row chunks: reproducible).
pub fn bias_bwd(dy: &[f32], db: &mut [f32]) {
    let c = db.len();
    add_row_sums(db, dy.len() / c, |i, acc| acc.iter_mut().zip(&dy[i * c..][..c]).for_each(|(a, d)| *a += d));
}

/// out [N,H] = rows `tokens` [N] of table [V,H].
pub fn embedding_fwd(table: &[f32], tokens: &[u32], h: usize, out: &mut [f32]) {
    let rows = out.par_chunks_mut(h).zip(tokens);
    rows.for_each(|(o, &t)| o.copy_from_slice(&table[t as usize * h..][..h]));
}

/// dtable [V,H] += dout [N,H] scattered to rows `tokens` (in token order: ids repeat).
pub fn embedding_bwd(dtable: &mut [f32], tokens: &[u32], dout: &[f32], h: usize) {
    for (&t, d) in tokens.iter().zip(dout.chunks(h)) {
        let row = &mut dtable[t as usize * h..][..h];
        row.iter_mut().zip(d).for_each(|(a, b)| *a += b);
    }
}

/// out [C] += Σ_r f(r) over `rows` rows, summed in fixed chunks of rows (parallel over chunks,
/// then in chunk order), so the result does not depend on the thread count.
fn add_row_sums(out: &mut [f32], rows: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    const CHUNK: usize = 64;
    let c = out.len();
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ch| {
            let mut acc = vec![0.0; c];
            (ch * CHUNK..rows.min((ch + 1) * CHUNK)).for_each(|r| f(r, &mut acc));
            acc
        })
        .collect();
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
}

/// RMSNorm over rows of C = w.len(): y [N,C] = x · rstd · w with rstd [N] = 1/√(mean(x²)+eps)
/// (saved for backward).
pub fn rmsnorm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let c = w.len();
    let rows = y.par_chunks_mut(c).zip(x.par_chunks(c)).zip(rstd.par_iter_mut());
    rows.for_each(|((y, x), r)| {
        *r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / c as f32 + eps).sqrt();
        y.iter_mut().zip(x).zip(w).for_each(|((y, x), w)| *y = x * *r * w);
    });
}

/// RMSNorm backward: WRITE dx [N,C], ACCUMULATE dw [C] (x, rstd as in forward).
pub fn rmsnorm_bwd(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
    let c = w.len();
    let rows = dx.par_chunks_mut(c).zip(x.par_chunks(c)).zip(dy.par_chunks(c)).zip(rstd);
    rows.for_each(|(((dx, x), dy), &r)| {
        let dot: f32 = (0..c).map(|j| dy[j] * w[j] * x[j]).sum::<f32>() * r * r / c as f32;
        (0..c).for_each(|j| dx[j] = r * (w[j] * dy[j] - x[j] * dot));
    });
    add_row_sums(dw, rstd.len(), |i, acc| {
        let (x, dy) = (&x[i * c..][..c], &dy[i * c..][..c]);
        (0..c).for_each(|j| acc[j] += dy[j] * x[j] * rstd[i]);
    });
}

/// Rotary position embedding, rotate-half convention (Llama/Qwen3): for i < D/2, the pair
/// (x[i], x[i+D/2]) at position t rotates by angle t·θ^(−2i/D).
pub struct Rope {
    /// cos and sin tables [seq_len, D/2].
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    /// Pairs (2i, 2i+1) rotate together (DeepSeek's layout); else (i, i + D/2) (Llama's).
    pub interleaved: bool,
}

impl Rope {
    /// Plain RoPE over `head_dim` dims: frequencies theta^(−2i/head_dim).
    pub fn new(seq_len: usize, head_dim: usize, theta: f32, interleaved: bool) -> Rope {
        let freqs: Vec<f64> =
            (0..head_dim / 2).map(|i| (theta as f64).powf(-2.0 * i as f64 / head_dim as f64)).collect();
        Rope::with(seq_len, &freqs, 1.0, interleaved)
    }

    /// The model's RoPE: over its rotated dims, plain or YaRN (`[model.yarn]`: its frequencies,
    /// and cos and sin times its attention factor).
    pub fn of(c: &ModelConfig) -> Rope {
        let dim = c.rope_v_dims().0;
        match c.yarn {
            None => Rope::new(c.seq_len, dim, c.rope_theta, c.rope_interleaved),
            Some(y) => {
                let freqs = y.inv_freq(dim, c.rope_theta as f64);
                Rope::with(c.seq_len, &freqs, y.attention_factor(), c.rope_interleaved)
            }
        }
    }

    /// Tables of angle t·freqs[i], cos and sin times `mult`.
    fn with(seq_len: usize, freqs: &[f64], mult: f64, interleaved: bool) -> Rope {
        let half = freqs.len();
        let table = |f: fn(f64) -> f64| {
            (0..seq_len).flat_map(|t| freqs.iter().map(move |w| (mult * f(t as f64 * w)) as f32)).collect()
        };
        Rope { cos: table(f64::cos), sin: table(f64::sin), half, interleaved }
    }
    /// x [B,T,H,W] in place (T ≤ the table's seq_len): the last D (the table's dims) of each
    /// head of width W ≥ D (all of it but under MLA).
    pub fn forward(&self, x: &mut [f32], t: usize, heads: usize, width: usize) {
        self.rotate(x, t, heads, width, 1.0)
    }
    /// dx [B,T,H,W] in place: the inverse rotation (the transpose of forward).
    pub fn backward(&self, dx: &mut [f32], t: usize, heads: usize, width: usize) {
        self.rotate(dx, t, heads, width, -1.0)
    }
    fn rotate(&self, x: &mut [f32], t: usize, heads: usize, width: usize, sign: f32) {
        let (half, d) = (self.half, 2 * self.half);
        x.par_chunks_mut(heads * width).enumerate().for_each(|(row, x)| {
            let (cos, sin) = (&self.cos[(row % t) * half..][..half], &self.sin[(row % t) * half..][..half]);
            for head in x.chunks_mut(width) {
                let head = &mut head[width - d..];
                for i in 0..half {
                    let (i1, i2) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (x1, x2, s) = (head[i1], head[i2], sign * sin[i]);
                    head[i1] = x1 * cos[i] - x2 * s;
                    head[i2] = x2 * cos[i] + x1 * s;
                }
            }
        });
    }
}

/// Attention sizes: batch, sequence, query heads, key/value heads (divides hq), q·k head dim,
/// value head dim (d but under MLA), the scale of the scores (1/√d), and the sliding window
/// (a query sees its `window` most recent keys, itself included; 0: every earlier key).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
    pub window: usize,
}

impl AttnDims {
    /// Layer `l`'s attention over `b` sequences.
    pub fn of(c: &ModelConfig, b: usize, l: usize) -> AttnDims {
        let (hq, hkv, d, dv) = (c.heads, c.kv_heads, c.head_dim, c.rope_v_dims().1);
        AttnDims { b, t: c.seq_len, hq, hkv, d, dv, scale: c.softmax_scale(), window: c.window(l) }
    }
    /// The first key query `i` sees.
    fn first_key(&self, i: usize) -> usize {
        if self.window == 0 {
            0
        } else {
            (i + 1).saturating_sub(self.window)
        }
    }
}

/// Head `h` of batch row `b` of x [B,T,H,D] as a contiguous [T,D].
fn gather(x: &[f32], b: usize, h: usize, heads: usize, (t, d): (usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * d);
    for i in 0..t {
        out.extend_from_slice(&x[((b * t + i) * heads + h) * d..][..d]);
    }
    out
}

fn scatter(x: &mut [f32], src: &[f32], b: usize, h: usize, heads: usize, (t, d): (usize, usize)) {
    for i in 0..t {
        x[((b * t + i) * heads + h) * d..][..d].copy_from_slice(&src[i * d..][..d]);
    }
}

/// Causal probabilities p [T,T] of one head: softmax over the keys query i sees (j ≤ i, and
/// within the window) of scale·q_i·k_j, zero elsewhere; with a `sink` logit, it joins each
/// row's softmax (and takes its share of the mass) without a value. With `lse` = None, computes
/// each row's logsumexp (the sink's term included) into `lse_out`; otherwise reuses it.
fn probs(q: &[f32], k: &[f32], a: &AttnDims, sink: Option<f32>, lse: Option<&[f32]>, lse_out: &mut [f32]) -> Vec<f32> {
    let (t, d) = (a.t, a.d);
    let mut p = vec![0.0; t * t];
    sgemm(t, d, t, a.scale, q, false, k, true, 0.0, &mut p);
    for (i, row) in p.chunks_mut(t).enumerate() {
        let seen = a.first_key(i)..i + 1;
        let l = match lse {
            Some(l) => l[i],
            None => {
                let s = sink.unwrap_or(f32::NEG_INFINITY);
                let m = row[seen.clone()].iter().fold(s, |a, &b| a.max(b));
                let e = row[seen.clone()].iter().map(|v| (v - m).exp()).sum::<f32>() + (s - m).exp();
                m + e.ln()
            }
        };
        lse_out[i] = l;
        row.iter_mut().enumerate().for_each(|(j, v)| *v = if seen.contains(&j) { (*v - l).exp() } else { 0.0 });
    }
    p
}

/// Causal grouped-query attention, softmax(scale·q·kᵀ)·v: q [B,T,Hq,D], k [B,T,Hkv,D], v
/// [B,T,Hkv,Dv] (query head h reads kv head h/(Hq/Hkv)) → (out [B,T,Hq,Dv], lse [B,Hq,T]), lse being each row's
/// logsumexp of the scaled scores, what backward needs to rebuild the probabilities. `sinks`
/// [Hq]: a logit per query head in every row's softmax (GPT-OSS), none when empty.
/// Parallel over (b, h).
pub fn attention_fwd(q: &[f32], k: &[f32], v: &[f32], sinks: &[f32], a: AttnDims) -> (Vec<f32>, Vec<f32>) {
    let (t, d, dv, g) = (a.t, a.d, a.dv, a.hq / a.hkv);
    let mut lse = vec![0.0; a.b * a.hq * t];
    let heads: Vec<Vec<f32>> = lse
        .par_chunks_mut(t)
        .enumerate()
        .map(|(bh, lse)| {
            let (b, h) = (bh / a.hq, bh % a.hq);
            let kh = gather(k, b, h / g, a.hkv, (t, d));
            let p = probs(&gather(q, b, h, a.hq, (t, d)), &kh, &a, sinks.get(h).copied(), None, lse);
            let mut o = vec![0.0; t * dv];
            let vh = gather(v, b, h / g, a.hkv, (t, dv));
            sgemm(t, t, dv, 1.0, &p, false, &vh, false, 0.0, &mut o);
            o
        })
        .collect();
    let mut out = vec![0.0; a.b * t * a.hq * dv];
    for (bh, o) in heads.iter().enumerate() {
        scatter(&mut out, o, bh / a.hq, bh % a.hq, a.hq, (t, dv));
    }
    (out, lse)
}

/// Attention backward: (dq [B,T,Hq,D], dk [B,T,Hkv,D], dv [B,T,Hkv,Dv], dsinks [Hq]) from dout
/// [B,T,Hq,Dv] (q, k, v, sinks, out, lse as in forward). A sink's share of row i is
/// p_s = exp(sink − lse_i) and its gradient −p_s·δ_i (δ_i = ⟨out_i, dout_i⟩: it has no value).
/// Parallel over (b, kv head); each task owns its group's query heads, so dk and dv need no
/// reduction across tasks.
pub fn attention_bwd(
    (q, k, v, sinks): (&[f32], &[f32], &[f32], &[f32]),
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    a: AttnDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, dv, g, scale) = (a.t, a.d, a.dv, a.hq / a.hkv, a.scale);
    let groups: Vec<_> = (0..a.b * a.hkv)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / a.hkv, bk % a.hkv);
            let (kh, vh) = (gather(k, b, kvh, a.hkv, (t, d)), gather(v, b, kvh, a.hkv, (t, dv)));
            let (mut dkh, mut dvh, mut dqs) = (vec![0.0; t * d], vec![0.0; t * dv], Vec::new());
            for h in kvh * g..(kvh + 1) * g {
                let (qh, oh) = (gather(q, b, h, a.hq, (t, d)), gather(out, b, h, a.hq, (t, dv)));
                let doh = gather(dout, b, h, a.hq, (t, dv));
                let (lse, mut scratch) = (&lse[(b * a.hq + h) * t..][..t], vec![0.0; t]);
                let sink = sinks.get(h).copied();
                let p = probs(&qh, &kh, &a, sink, Some(lse), &mut scratch);
                sgemm(t, t, dv, 1.0, &p, true, &doh, false, 1.0, &mut dvh);
                let mut ds = vec![0.0; t * t];
                sgemm(t, dv, t, 1.0, &doh, false, &vh, true, 0.0, &mut ds);
                let mut dsink = 0.0f64;
                for i in 0..t {
                    let delta: f32 = (0..dv).map(|c| doh[i * dv + c] * oh[i * dv + c]).sum();
                    (0..t).for_each(|j| ds[i * t + j] = p[i * t + j] * (ds[i * t + j] - delta));
                    if let Some(s) = sink {
                        dsink -= ((s - lse[i]).exp() * delta) as f64;
                    }
                }
                let mut dqh = vec![0.0; t * d];
                sgemm(t, t, d, scale, &ds, false, &kh, false, 0.0, &mut dqh);
                sgemm(t, t, d, scale, &ds, true, &qh, false, 1.0, &mut dkh);
                dqs.push((dqh, dsink));
            }
            (dqs, dkh, dvh)
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let mut dsinks = vec![0.0f64; sinks.len()];
    for (bk, (dqs, dkh, dvh)) in groups.iter().enumerate() {
        let (b, kvh) = (bk / a.hkv, bk % a.hkv);
        scatter(&mut dk, dkh, b, kvh, a.hkv, (t, d));
        scatter(&mut dv, dvh, b, kvh, a.hkv, (t, a.dv));
        for (i, (dqh, ds)) in dqs.iter().enumerate() {
            scatter(&mut dq, dqh, b, kvh * g + i, a.hq, (t, d));
            if let Some(s) = dsinks.get_mut(kvh * g + i) {
                *s += ds;
            }
        }
    }
    (dq, dk, dv, dsinks.into_iter().map(|s| s as f32).collect())
}

/// Mean cross-entropy of logits [N,V] against targets [N] (max-subtracted, row losses summed in
/// f64 in row order). With `dlogits`, WRITES scale·∂loss/∂logits = scale·(softmax − onehot)/N.
pub fn cross_entropy(logits: &[f32], targets: &[u32], v: usize, scale: f32, dlogits: Option<&mut [f32]>) -> f32 {
    let n = targets.len();
    let lse = |row: &[f32]| {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
    };
    let rows = logits.par_chunks(v).zip(targets);
    let losses: Vec<f64> = rows.map(|(row, &y)| (lse(row) - row[y as usize]) as f64).collect();
    if let Some(dl) = dlogits {
        let s = scale / n as f32;
        dl.par_chunks_mut(v).zip(logits.par_chunks(v)).zip(targets).for_each(|((d, row), &y)| {
            let l = lse(row);
            d.iter_mut().zip(row).for_each(|(d, x)| *d = s * (x - l).exp());
            d[y as usize] -= s;
        });
    }
    (losses.iter().sum::<f64>() / n as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }
    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Central differences of `f` (the scalar loss, from f32 kernels summed in f64) at every
    /// coordinate of `x` (eps 1e-2) against `analytic`; tolerance |fd − an| ≤ 2e-3 + 1e-2·|an|.
    fn fd_check(what: &str, x: &mut [f32], analytic: &[f32], f: &dyn Fn(&[f32]) -> f64) {
        let eps = 1e-2;
        for i in 0..x.len() {
            let x0 = x[i];
            x[i] = x0 + eps;
            let up = f(x);
            x[i] = x0 - eps;
            let down = f(x);
            x[i] = x0;
            let fd = (up - down) / (2.0 * eps as f64);
            let an = analytic[i] as f64;
            assert!((fd - an).abs() <= 2e-3 + 1e-2 * an.abs(), "{what}[{i}]: fd {fd} vs analytic {an}");
        }
    }

    #[test]
    fn linear_and_embedding_grads() {
        let (n, k, m) = (5, 4, 3);
        let (mut x, mut w, r) = (rand(n * k, 1), rand(m * k, 2), rand(n * m, 3));
        let f = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; n * m];
            linear_fwd(x, w, n, k, m, &mut y);
            dot(&y, &r)
        };
        let (mut dx, mut dw) = (vec![0.0; n * k], vec![0.0; m * k]);
        linear_bwd(&x, &w, &r, (n, k, m), &mut dx, false, &mut dw);
        fd_check("linear dx", &mut x.clone(), &dx, &|x| f(x, &w));
        fd_check("linear dw", &mut w, &dw, &|w| f(&x, w));
        linear_bwd(&x.clone(), &w, &r, (n, k, m), &mut dx, true, &mut dw);
        fd_check("linear dx accumulated", &mut x, &dx.iter().map(|v| v / 2.0).collect::<Vec<_>>(), &|x| f(x, &w));

        let (v, h, tokens) = (6, 3, [1u32, 4, 1, 0, 5]);
        let (mut table, r) = (rand(v * h, 4), rand(tokens.len() * h, 5));
        let mut dt = vec![0.0; v * h];
        embedding_bwd(&mut dt, &tokens, &r, h);
        fd_check("embedding", &mut table, &dt, &|t| {
            let mut o = vec![0.0; tokens.len() * h];
            embedding_fwd(t, &tokens, h, &mut o);
            dot(&o, &r)
        });
    }

    #[test]
    fn rmsnorm_grads() {
        let (n, c, eps) = (7, 6, 1e-6);
        let (x, mut w, r) = (rand(n * c, 1), rand(c, 2), rand(n * c, 3));
        let f = |x: &[f32], w: &[f32]| {
            let (mut y, mut rs) = (vec![0.0; n * c], vec![0.0; n]);
            rmsnorm_fwd(x, w, eps, &mut y, &mut rs);
            dot(&y, &r)
        };
        let (mut y, mut rs, mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n * c], vec![0.5; c]);
        rmsnorm_fwd(&x, &w, eps, &mut y, &mut rs);
        rmsnorm_bwd(&x, &w, &rs, &r, &mut dx, &mut dw);
        dw.iter_mut().for_each(|v| *v -= 0.5); // dw accumulates
        fd_check("rmsnorm dx", &mut x.clone(), &dx, &|x| f(x, &w));
        fd_check("rmsnorm dw", &mut w, &dw, &|w| f(&x, w));
    }

    #[test]
    fn rope_matches_formula_and_grads() {
        let (b, t, h, d) = (2, 5, 3, 4);
        let rope = Rope::new(t, d, 100.0, false);
        let (mut x, r) = (rand(b * t * h * d, 1), rand(b * t * h * d, 2));
        let mut y = x.clone();
        rope.forward(&mut y, t, h, d);
        // position 3 of batch row 1, head 2, pair i = 1: angle 3·100^(−2/4) = 0.3
        let (at, c, s) = (((t + 3) * h + 2) * d, 0.3f32.cos(), 0.3f32.sin());
        assert!((y[at + 1] - (x[at + 1] * c - x[at + 3] * s)).abs() < 1e-6);
        assert!((y[at + 3] - (x[at + 3] * c + x[at + 1] * s)).abs() < 1e-6);
        let mut dx = r.clone();
        rope.backward(&mut dx, t, h, d);
        fd_check("rope", &mut x, &dx, &|x| {
            let mut y = x.to_vec();
            rope.forward(&mut y, t, h, d);
            dot(&y, &r)
        });
        // Under MLA only the last D of each head of width W rotates: heads of 7 = 3 kept + 4.
        let (mut wide, w) = (rand(b * t * h * 7, 3), 7);
        let before = wide.clone();
        rope.forward(&mut wide, t, h, w);
        let rotated: Vec<f32> = wide.chunks(w).flat_map(|c| c[3..].to_vec()).collect();
        let mut want: Vec<f32> = before.chunks(w).flat_map(|c| c[3..].to_vec()).collect();
        rope.forward(&mut want, t, h, d);
        assert_eq!(rotated, want);
        assert!(wide.chunks(w).zip(before.chunks(w)).all(|(a, b)| a[..3] == b[..3]));
        // Interleaved pairs: the same rotation of the same pairs, laid out (2i, 2i+1).
        let inter = Rope::new(t, d, 100.0, true);
        let perm = |x: &[f32], to_half: bool| -> Vec<f32> {
            let idx = |j: usize| if j < d / 2 { 2 * j } else { 2 * (j - d / 2) + 1 };
            x.chunks(d)
                .flat_map(|c| {
                    (0..d).map(move |j| if to_half { c[idx(j)] } else { c[(0..d).find(|&i| idx(i) == j).unwrap()] })
                })
                .collect()
        };
        let mut yi = perm(&x, false);
        inter.forward(&mut yi, t, h, d);
        let back: Vec<f32> = perm(&yi, true);
        assert!(back.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6), "interleaved = permuted half layout");
    }

    /// YaRN's frequencies and attention factor equal transformers' `_compute_yarn_parameters`
    /// (5.24): DeepSeek-V2-Lite's rope_scaling, and a small one whose ramp ends inside the dims;
    /// the model's tables are cos and sin of t·θ_i times the factor.
    #[test]
    fn yarn_matches_transformers() {
        let lite = crate::config::Yarn {
            factor: 40.0,
            original_seq_len: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
            attention_factor: None,
            truncate: true,
        };
        let want = [
            1.0,
            0.7498942,
            0.5623413,
            0.4216965,
            0.3162278,
            0.2371374,
            0.1778279,
            0.1333521,
            0.1,
            0.07498942,
            0.05623413,
            0.03900693,
            0.02687936,
            0.01837814,
            0.01244796,
            0.008334509,
            0.0055,
            0.003561997,
            0.002249365,
            0.001370513,
            7.905694e-4,
            4.149904e-4,
            1.778279e-4,
            3.333803e-5,
            2.5e-5,
            1.874735e-5,
            1.405853e-5,
            1.054241e-5,
            7.905694e-6,
            5.928434e-6,
            4.445698e-6,
            3.333804e-6,
        ];
        let got = lite.inv_freq(64, 1e4);
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).for_each(|(g, w)| assert!((g - w).abs() <= 2e-6 * w, "{g} vs {w}"));
        assert_eq!(lite.attention_factor(), 1.0);
        let small = crate::config::Yarn {
            factor: 4.0,
            original_seq_len: 16,
            beta_fast: 8.0,
            mscale: 1.0,
            mscale_all_dim: 0.5,
            ..lite
        };
        let got = small.inv_freq(8, 1e4);
        [1.0, 0.025, 0.0025, 0.00025].iter().zip(&got).for_each(|(w, g)| assert!((g - w).abs() <= 1e-7 * w, "{got:?}"));
        assert!((small.attention_factor() - 1.0648216253695715).abs() < 1e-12);
        let text = "vocab = 8\nhidden = 8\nlayers = 1\nheads = 1\nkv_heads = 1\nhead_dim = 8\nseq_len = 5\nexperts = 2\n\
                    expert_ffn = 4\n[yarn]\nfactor = 4.0\noriginal_seq_len = 16\nbeta_fast = 8.0\nmscale = 1.0\nmscale_all_dim = 0.5";
        let rope = Rope::of(&toml::from_str(text).unwrap());
        let (t, i) = (3, 1);
        let want = (small.attention_factor() * (t as f64 * 0.025).cos()) as f32;
        assert!((rope.cos[t * 4 + i] - want).abs() < 1e-6, "{} vs {want}", rope.cos[t * 4 + i]);
    }

    /// Against a naive softmax and finite differences: value heads of 3 beside q·k heads of 4
    /// (as MLA's), scale 0.6; plain causal, then a window of 3 keys with a sink logit per head
    /// (GPT-OSS's sliding layers).
    #[test]
    fn attention_matches_naive_and_grads() {
        for (window, with_sinks) in [(0, false), (3, true)] {
            let a = AttnDims { b: 2, t: 5, hq: 4, hkv: 2, d: 4, dv: 3, scale: 0.6, window };
            let (nq, nk, nv, no) =
                (a.b * a.t * a.hq * a.d, a.b * a.t * a.hkv * a.d, a.b * a.t * a.hkv * 3, a.b * a.t * a.hq * 3);
            let (mut q, mut k, mut v, r) = (rand(nq, 1), rand(nk, 2), rand(nv, 3), rand(no, 4));
            let mut sinks = if with_sinks { rand(4, 5) } else { vec![] };
            let run = |q: &[f32], k: &[f32], v: &[f32], s: &[f32]| attention_fwd(q, k, v, s, a);
            let (o, lse) = run(&q, &k, &v, &sinks);
            // naive: out[b,i,h] = Σ_{j seen} e^{s_j} v_j / (Σ_{j seen} e^{s_j} + e^{sink_h}),
            // s_j = 0.6·q_i·k_j, kv head h/2
            let at = |b: usize, i: usize, h: usize, heads: usize, d: usize| ((b * a.t + i) * heads + h) * d;
            for (b, i, h) in (0..a.b).flat_map(|b| (0..a.t).flat_map(move |i| (0..a.hq).map(move |h| (b, i, h)))) {
                let seen = if window == 0 { 0..=i } else { (i + 1).saturating_sub(window)..=i };
                let s: Vec<(usize, f32)> = seen
                    .map(|j| (j, dot(&q[at(b, i, h, 4, 4)..][..4], &k[at(b, j, h / 2, 2, 4)..][..4]) as f32 * 0.6))
                    .collect();
                let z: f32 = s.iter().map(|(_, s)| s.exp()).sum::<f32>() + sinks.get(h).map_or(0.0, |s| s.exp());
                for c in 0..a.dv {
                    let want: f32 = s.iter().map(|&(j, s)| s.exp() / z * v[at(b, j, h / 2, 2, 3) + c]).sum();
                    assert!((o[at(b, i, h, 4, 3) + c] - want).abs() < 1e-5, "attention out ({b},{i},{h},{c})");
                }
            }
            let (dq, dk, dv, ds) = attention_bwd((&q, &k, &v, &sinks), &o, &lse, &r, a);
            let (q0, k0, v0, s0) = (q.clone(), k.clone(), v.clone(), sinks.clone());
            fd_check("attention dq", &mut q, &dq, &|q| dot(&run(q, &k0, &v0, &s0).0, &r));
            fd_check("attention dk", &mut k, &dk, &|k| dot(&run(&q0, k, &v0, &s0).0, &r));
            fd_check("attention dv", &mut v, &dv, &|v| dot(&run(&q0, &k0, v, &s0).0, &r));
            if with_sinks {
                fd_check("attention dsinks", &mut sinks, &ds, &|s| dot(&run(&q0, &k0, &v0, s).0, &r));
            }
        }
    }

    #[test]
    fn cross_entropy_grads() {
        let (v, targets) = (7, [3u32, 0, 6, 3]);
        let uniform = cross_entropy(&vec![0.5; 4 * v], &targets, v, 1.0, None);
        assert!((uniform - (v as f32).ln()).abs() < 1e-6);
        let mut logits: Vec<f32> = rand(4 * v, 4).iter().map(|x| 3.0 * x).collect();
        let mut dl = vec![f32::NAN; 4 * v];
        let loss = cross_entropy(&logits, &targets, v, 2.0, Some(&mut dl));
        let big: Vec<f32> = logits.iter().map(|x| x + 1000.0).collect(); // stable under shifts
        assert!((cross_entropy(&big, &targets, v, 1.0, None) - loss).abs() < 1e-3);
        let half: Vec<f32> = dl.iter().map(|d| d / 2.0).collect();
        fd_check("cross-entropy", &mut logits, &half, &|l| cross_entropy(l, &targets, v, 1.0, None) as f64);
    }
}
