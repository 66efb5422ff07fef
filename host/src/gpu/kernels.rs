//! The host's own kernels (`kernels/norm.cu`, `rope.cu`, `cross_entropy.cu`, `elementwise.cu`)
//! behind typed wrappers: RMSNorm, RoPE, embedding, cross-entropy, casts, accumulation and sums.
//! Each wrapper checks devices, dtypes and sizes and says in one line which op and which shapes
//! did not fit; the launch shape of each kernel is written beside it in its `.cu` file.
//! All of them are asynchronous on the device's one stream.

use super::{blocks, src, Gpu};
use pith_plugin_api::{Arg, DType, Device, Tensor};

/// Threads of the row kernels' blocks (8 warps, one row each) and of the elementwise kernels.
const BLOCK: u32 = 256;
/// Most blocks of the kernels that end in one atomicAdd per block (sums, RMSNorm's dw).
const ATOMIC_GRID: usize = 512;
/// Floats of shared memory a block may use without opting in (48 KiB).
const SHARED_FLOATS: usize = 12 * 1024;

/// "BF16 [37, 300]".
fn desc(t: &Tensor) -> String {
    format!("{:?} {:?}", t.dtype, t.dims())
}

fn on_device(op: &str, ts: &[&Tensor]) -> Result<(), String> {
    match ts.iter().find(|t| t.device != Device::Cuda) {
        Some(t) => Err(format!("{op}: expected device tensors, got {} on {:?}", desc(t), t.device)),
        None => Ok(()),
    }
}

/// A size as a kernel's `int`.
fn int(op: &str, what: &str, n: usize) -> Result<i32, String> {
    i32::try_from(n).map_err(|_| format!("{op}: {what} = {n} does not fit the kernel's int"))
}

/// Launch shape of a 1-D grid with `shared` bytes of dynamic shared memory.
fn shape(grid: usize, block: u32, shared: usize) -> ([u32; 3], [u32; 3], u32) {
    ([grid.clamp(1, i32::MAX as usize) as u32, 1, 1], [block, 1, 1], shared as u32)
}

/// Grid of an elementwise kernel over `n` elements taken 4 at a time.
fn pack_grid(n: usize) -> usize {
    blocks(n.div_ceil(4), BLOCK) as usize
}

impl Gpu {
    /// Per row of `dim` = w.numel(): rstd = 1/√(mean(x²)+eps); y = x·rstd·w. x f32 or bf16
    /// [rows, dim] (any shape whose last dimension is a multiple of dim); w bf16 [dim]; y bf16
    /// like x; rstd f32 [rows]. One warp per row, 8 rows a block.
    pub fn rmsnorm_fwd(&self, x: &Tensor, w: &Tensor, y: &Tensor, rstd: &Tensor, eps: f32) -> Result<(), String> {
        let op = "rmsnorm_fwd";
        on_device(op, &[x, w, y, rstd])?;
        let dim = w.numel();
        let rows = x.numel().checked_div(dim).unwrap_or(0);
        let ok = dim > 0
            && x.rank > 0
            && x.dim(-1).is_multiple_of(dim)
            && matches!(x.dtype, DType::F32 | DType::BF16)
            && w.dtype == DType::BF16
            && y.dtype == DType::BF16
            && y.numel() == x.numel()
            && rstd.dtype == DType::F32
            && rstd.numel() == rows;
        if !ok {
            return Err(format!(
                "{op}: x {}, w {}, y {}, rstd {}: expected x f32 or bf16 [rows, dim], w bf16 [dim], y bf16 like x, rstd f32 [rows]",
                desc(x),
                desc(w),
                desc(y),
                desc(rstd)
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let name = if x.dtype == DType::F32 { "rmsnorm_fwd_f32" } else { "rmsnorm_fwd_bf16" };
        let args = [
            x.arg(),
            w.arg(),
            y.arg(),
            rstd.arg(),
            Arg::I32(int(op, "rows", rows)?),
            Arg::I32(int(op, "dim", dim)?),
            Arg::F32(eps),
        ];
        self.launch(src::NORM, name, shape(rows.div_ceil(8), BLOCK, 0), &args)
    }

    /// RMSNorm backward (x, w, rstd as in forward). x f32: dy f32, dx f32 ACCUMULATED (dx += ...).
    /// x bf16: dy bf16, dx bf16 WRITTEN (dx may be dy). dw f32 [dim] accumulated in both cases.
    /// One warp per row; each block sums its rows' dw in shared memory, then one atomicAdd per
    /// column per block. dim ≤ 12288.
    pub fn rmsnorm_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<(), String> {
        let op = "rmsnorm_bwd";
        on_device(op, &[x, w, rstd, dy, dx, dw])?;
        let dim = w.numel();
        let rows = x.numel().checked_div(dim).unwrap_or(0);
        let ok = dim > 0
            && x.rank > 0
            && x.dim(-1).is_multiple_of(dim)
            && matches!(x.dtype, DType::F32 | DType::BF16)
            && w.dtype == DType::BF16
            && rstd.dtype == DType::F32
            && rstd.numel() == rows
            && dy.dtype == x.dtype
            && dy.numel() == x.numel()
            && dx.dtype == x.dtype
            && dx.numel() == x.numel()
            && dw.dtype == DType::F32
            && dw.numel() == dim;
        if !ok {
            return Err(format!(
                "{op}: x {}, w {}, rstd {}, dy {}, dx {}, dw {}: expected x [rows, dim] with dy and dx of its dtype (f32 or bf16) and size, w bf16 [dim], rstd f32 [rows], dw f32 [dim]",
                desc(x),
                desc(w),
                desc(rstd),
                desc(dy),
                desc(dx),
                desc(dw)
            ));
        }
        let warps = (SHARED_FLOATS / dim).min(8);
        if warps == 0 {
            return Err(format!("{op}: dim {dim} (w {}) is over the {SHARED_FLOATS} this kernel supports", desc(w)));
        }
        if rows == 0 {
            return Ok(());
        }
        let name = if x.dtype == DType::F32 { "rmsnorm_bwd_f32" } else { "rmsnorm_bwd_bf16" };
        let grid = rows.div_ceil(warps).min(ATOMIC_GRID);
        let args = [
            x.arg(),
            w.arg(),
            rstd.arg(),
            dy.arg(),
            dx.arg(),
            dw.arg(),
            Arg::I32(int(op, "rows", rows)?),
            Arg::I32(int(op, "dim", dim)?),
        ];
        self.launch(src::NORM, name, shape(grid, 32 * warps as u32, warps * dim * 4), &args)
    }

    /// RoPE in place on x bf16 [rows = B·seq, heads, W] (the position of row r is r % seq) as
    /// layers.rs `Rope::rotate`: the last D = 2·half dims of each head (half = the tables' last
    /// dim), pairs (i, i + half) or (2i, 2i + 1) when `interleaved`; sign +1 forward, −1 when
    /// `inverse` (Rope::backward). cos, sin f32 tables [≥ seq, half] on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seq: usize,
        heads: usize,
        interleaved: bool,
        inverse: bool,
    ) -> Result<(), String> {
        let op = "rope";
        on_device(op, &[x, cos, sin])?;
        let w = if x.rank >= 2 { x.dim(-1) } else { 0 };
        let half = if cos.rank == 2 { cos.dim(1) } else { 0 };
        let ok = x.dtype == DType::BF16
            && w % 2 == 0
            && half > 0
            && 2 * half <= w
            && heads > 0
            && x.dim(-2) == heads
            && seq > 0
            && cos.dtype == DType::F32
            && sin.dtype == DType::F32
            && cos.dims() == sin.dims()
            && cos.dim(0) >= seq;
        if !ok {
            return Err(format!(
                "rope: x {}, cos {}, sin {}, seq {seq}, heads {heads}: expected x bf16 [rows, {heads}, W] (W even) and f32 cos, sin [≥ {seq}, half] with 2·half ≤ W",
                desc(x),
                desc(cos),
                desc(sin)
            ));
        }
        let rows = x.numel() / (heads * w);
        if rows == 0 {
            return Ok(());
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let args = [
            x.arg(),
            cos.arg(),
            sin.arg(),
            Arg::I64(rows as i64),
            Arg::I32(int(op, "seq", seq)?),
            Arg::I32(int(op, "heads", heads)?),
            Arg::I32(int(op, "W", w)?),
            Arg::I32(int(op, "half", half)?),
            Arg::F32(sign),
            Arg::I32(interleaved as i32),
        ];
        let grid = blocks((rows * heads * half).div_ceil(2), BLOCK) as usize;
        self.launch(src::ROPE, "rope", shape(grid, BLOCK, 0), &args)
    }

    /// out[t] = table[tokens[t]] (tokens i32 [T], table f32 [V,H], out f32 [T,H]); a token
    /// outside [0, V) gives a row of NaN. One block per token row.
    pub fn embed_fwd(&self, tokens: &Tensor, table: &Tensor, out: &Tensor) -> Result<(), String> {
        let op = "embed_fwd";
        on_device(op, &[tokens, table, out])?;
        self.embed(op, tokens, table, out, ("table", "out"))
    }

    /// dtable[tokens[t]] += dout[t] (atomicAdd; dout f32 [T,H], dtable f32 [V,H]); tokens outside
    /// [0, V) are skipped. One block per token row.
    pub fn embed_bwd(&self, tokens: &Tensor, dout: &Tensor, dtable: &Tensor) -> Result<(), String> {
        let op = "embed_bwd";
        on_device(op, &[tokens, dout, dtable])?;
        self.embed(op, tokens, dtable, dout, ("dtable", "dout"))
    }

    /// Both embedding kernels (`op` is the kernel's name): tokens [T], table [V,H], rows [T,H];
    /// `names` of table and rows for the error.
    fn embed(
        &self,
        op: &str,
        tokens: &Tensor,
        table: &Tensor,
        rows: &Tensor,
        names: (&str, &str),
    ) -> Result<(), String> {
        let (tn, rn) = names;
        let t = tokens.numel();
        let ok = tokens.dtype == DType::I32
            && table.dtype == DType::F32
            && table.rank == 2
            && rows.dtype == DType::F32
            && rows.numel() == t * table.dim(1)
            && (t == 0 || (rows.rank > 0 && rows.dim(-1) == table.dim(1)));
        if !ok {
            return Err(format!(
                "{op}: tokens {}, {tn} {}, {rn} {}: expected tokens i32 [T], {tn} f32 [V, H], {rn} f32 [T, H]",
                desc(tokens),
                desc(table),
                desc(rows)
            ));
        }
        let (v, h) = (table.dim(0), table.dim(1));
        if t == 0 || h == 0 {
            return Ok(());
        }
        let (first, second) = if op == "embed_fwd" { (table, rows) } else { (rows, table) };
        let args = [
            tokens.arg(),
            first.arg(),
            second.arg(),
            Arg::I32(int(op, "T", t)?),
            Arg::I32(int(op, "H", h)?),
            Arg::I32(int(op, "V", v)?),
        ];
        self.launch(src::ELEMENTWISE, op, shape(t.min(65_535), BLOCK, 0), &args)
    }

    /// Cross-entropy per row of logits bf16 [T,V] with targets i32 [T] → losses f32 [T]
    /// (lse − logit[target], fp32 math; NaN for a target outside [0, V)). With Some(s), also
    /// OVERWRITES the logits with s·(softmax − onehot(target)) as bf16, the gradient. One block
    /// per row (1024 threads when V ≥ 8192, else 256).
    pub fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        losses: &Tensor,
        dscale: Option<f32>,
    ) -> Result<(), String> {
        let op = "cross_entropy";
        on_device(op, &[logits, targets, losses])?;
        let v = if logits.rank > 0 { logits.dim(-1) } else { 0 };
        let t = logits.numel().checked_div(v).unwrap_or(0);
        let ok = logits.dtype == DType::BF16
            && v > 0
            && targets.dtype == DType::I32
            && targets.numel() == t
            && losses.dtype == DType::F32
            && losses.numel() == t;
        if !ok {
            return Err(format!(
                "{op}: logits {}, targets {}, losses {}: expected logits bf16 [T, V], targets i32 [T], losses f32 [T]",
                desc(logits),
                desc(targets),
                desc(losses)
            ));
        }
        if t == 0 {
            return Ok(());
        }
        int(op, "T", t)?;
        let block = if v >= 8192 { 1024 } else { BLOCK };
        let args = [
            logits.arg(),
            targets.arg(),
            losses.arg(),
            Arg::I32(int(op, "V", v)?),
            Arg::I32(dscale.is_some() as i32),
            Arg::F32(dscale.unwrap_or(0.0)),
        ];
        self.launch(src::LOSS, "cross_entropy", shape(t, block, 0), &args)
    }

    /// dst = src converted (f32 → bf16, round to nearest even, or bf16 → f32; same numel).
    pub fn cast(&self, src: &Tensor, dst: &Tensor) -> Result<(), String> {
        on_device("cast", &[src, dst])?;
        let name = match (src.dtype, dst.dtype) {
            (DType::F32, DType::BF16) => "cast_f32_bf16",
            (DType::BF16, DType::F32) => "cast_bf16_f32",
            _ => "",
        };
        if name.is_empty() || src.numel() != dst.numel() {
            return Err(format!(
                "cast: {} into {}: expected f32 → bf16 or bf16 → f32 of one size",
                desc(src),
                desc(dst)
            ));
        }
        let n = src.numel();
        self.launch(src::ELEMENTWISE, name, shape(pack_grid(n), BLOCK, 0), &[src.arg(), dst.arg(), Arg::I64(n as i64)])
    }

    /// acc (f32) += x (f32 or bf16), same numel.
    pub fn add_into(&self, acc: &Tensor, x: &Tensor) -> Result<(), String> {
        on_device("add_into", &[acc, x])?;
        let name = match x.dtype {
            DType::F32 => "add_f32",
            DType::BF16 => "add_bf16",
            DType::I32 => "",
        };
        if name.is_empty() || acc.dtype != DType::F32 || acc.numel() != x.numel() {
            return Err(format!(
                "add_into: acc {} += x {}: expected acc f32 and x f32 or bf16 of one size",
                desc(acc),
                desc(x)
            ));
        }
        let n = x.numel();
        self.launch(src::ELEMENTWISE, name, shape(pack_grid(n), BLOCK, 0), &[acc.arg(), x.arg(), Arg::I64(n as i64)])
    }

    /// Columns `r` of x (bf16, rows of `width`) as out (bf16 [rows / sum, r.len()]): output row o
    /// is the sum of rows o·sum .. o·sum + sum − 1 (fp32, rounded once); sum 1 is a copy.
    pub fn cols(
        &self,
        x: &Tensor,
        width: usize,
        r: std::ops::Range<usize>,
        sum: usize,
        out: &Tensor,
    ) -> Result<(), String> {
        on_device("cols", &[x, out])?;
        let (w, rows) = (r.len(), out.numel() / r.len().max(1));
        if x.dtype != DType::BF16
            || out.dtype != DType::BF16
            || w == 0
            || r.end > width
            || sum == 0
            || x.numel() != rows * sum * width
            || out.numel() != rows * w
        {
            return Err(format!(
                "cols: x {} columns {r:?} of {width}, summing {sum} rows, into {}: expected bf16 x [rows·{sum}, {width}] and out [rows, {w}]",
                desc(x),
                desc(out)
            ));
        }
        let args = [x.arg(), out.arg(), Arg::I64(rows as i64), Arg::I32(width as i32), Arg::I32(r.start as i32)];
        let args = [&args[..], &[Arg::I32(w as i32), Arg::I32(sum as i32)]].concat();
        self.launch(src::ELEMENTWISE, "cols_bf16", shape(blocks(out.numel(), BLOCK) as usize, BLOCK, 0), &args)
    }

    /// Columns at .. at + w of dst (bf16, rows of `width`) = src (bf16 [rows, w]), each src row
    /// into `repeat` consecutive dst rows.
    pub fn set_cols(&self, dst: &Tensor, width: usize, at: usize, src: &Tensor, repeat: usize) -> Result<(), String> {
        on_device("set_cols", &[dst, src])?;
        let rows = dst.numel() / (width * repeat).max(1);
        let w = src.numel() / rows.max(1);
        if dst.dtype != DType::BF16
            || src.dtype != DType::BF16
            || rows == 0
            || w == 0
            || at + w > width
            || dst.numel() != rows * repeat * width
            || src.numel() != rows * w
        {
            return Err(format!(
                "set_cols: src {} into dst {} (rows of {width}) at column {at}, each row {repeat} times: expected bf16 src [rows, w] and dst [rows·{repeat}, {width}] with {at} + w ≤ {width}",
                desc(src),
                desc(dst)
            ));
        }
        let args = [dst.arg(), src.arg(), Arg::I64(rows as i64), Arg::I32(width as i32), Arg::I32(at as i32)];
        let args = [&args[..], &[Arg::I32(w as i32), Arg::I32(repeat as i32)]].concat();
        let n = rows * repeat * w;
        self.launch(src::ELEMENTWISE, "set_cols_bf16", shape(blocks(n, BLOCK) as usize, BLOCK, 0), &args)
    }

    /// y (bf16 [rows, cols]) += b (bf16 [cols]) on every row.
    pub fn bias_add(&self, y: &Tensor, b: &Tensor) -> Result<(), String> {
        on_device("bias_add", &[y, b])?;
        let cols = b.numel();
        if y.dtype != DType::BF16 || b.dtype != DType::BF16 || cols == 0 || !y.numel().is_multiple_of(cols) {
            return Err(format!("bias_add: y {} += b {}: expected bf16 y [rows, cols] and b [cols]", desc(y), desc(b)));
        }
        let rows = y.numel() / cols;
        let args = [y.arg(), b.arg(), Arg::I64(rows as i64), Arg::I32(cols as i32)];
        self.launch(src::ELEMENTWISE, "bias_add_bf16", shape(blocks(y.numel(), BLOCK) as usize, BLOCK, 0), &args)
    }

    /// g (f32 [cols]) += Σ over rows of dy (bf16 [rows, cols]): a bias's gradient.
    pub fn bias_grad(&self, dy: &Tensor, g: &Tensor) -> Result<(), String> {
        on_device("bias_grad", &[dy, g])?;
        let cols = g.numel();
        if dy.dtype != DType::BF16 || g.dtype != DType::F32 || cols == 0 || !dy.numel().is_multiple_of(cols) {
            return Err(format!(
                "bias_grad: g {} += Σ dy {}: expected bf16 dy [rows, cols], f32 g [cols]",
                desc(g),
                desc(dy)
            ));
        }
        let rows = dy.numel() / cols;
        let grid = ([cols.div_ceil(BLOCK as usize) as u32, rows.div_ceil(256).max(1) as u32, 1], [BLOCK, 1, 1], 0);
        self.launch(
            src::ELEMENTWISE,
            "bias_grad_bf16",
            grid,
            &[dy.arg(), g.arg(), Arg::I64(rows as i64), Arg::I32(cols as i32)],
        )
    }

    /// out (f32) = a + b, where a is f32 or bf16 and b is bf16 (same numel).
    pub fn sum_into(&self, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<(), String> {
        on_device("sum_into", &[out, a, b])?;
        let name = match a.dtype {
            DType::F32 => "sum2_f32_bf16",
            DType::BF16 => "sum2_bf16_bf16",
            DType::I32 => "",
        };
        let n = out.numel();
        if name.is_empty() || out.dtype != DType::F32 || b.dtype != DType::BF16 || a.numel() != n || b.numel() != n {
            return Err(format!(
                "sum_into: out {} = a {} + b {}: expected out f32, a f32 or bf16, b bf16, one size",
                desc(out),
                desc(a),
                desc(b)
            ));
        }
        let args = [out.arg(), a.arg(), b.arg(), Arg::I64(n as i64)];
        self.launch(src::ELEMENTWISE, name, shape(pack_grid(n), BLOCK, 0), &args)
    }

    /// x (f32) *= s.
    pub fn scale(&self, x: &Tensor, s: f32) -> Result<(), String> {
        on_device("scale", &[x])?;
        if x.dtype != DType::F32 {
            return Err(format!("scale: x {}: expected f32", desc(x)));
        }
        let n = x.numel();
        self.launch(
            src::ELEMENTWISE,
            "scale_f32",
            shape(pack_grid(n), BLOCK, 0),
            &[x.arg(), Arg::I64(n as i64), Arg::F32(s)],
        )
    }

    /// out[at] += Σ x² (x f32; out f32 [n]): block partial sums, one atomicAdd per block.
    pub fn sum_squares(&self, x: &Tensor, out: &Tensor, at: usize) -> Result<(), String> {
        on_device("sum_squares", &[x, out])?;
        if x.dtype != DType::F32 || out.dtype != DType::F32 || at >= out.numel() {
            return Err(format!(
                "sum_squares: x {} into out {} at {at}: expected f32 x, f32 out with more than {at} elements",
                desc(x),
                desc(out)
            ));
        }
        self.reduce(x, out.addr + 4 * at as u64, true)
    }

    /// out[0] += Σ x (x f32; out f32 [1]).
    pub fn sum(&self, x: &Tensor, out: &Tensor) -> Result<(), String> {
        on_device("sum", &[x, out])?;
        if x.dtype != DType::F32 || out.dtype != DType::F32 || out.numel() == 0 {
            return Err(format!("sum: x {} into out {}: expected f32 x and f32 out [1]", desc(x), desc(out)));
        }
        self.reduce(x, out.addr, false)
    }

    fn reduce(&self, x: &Tensor, out: u64, square: bool) -> Result<(), String> {
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let args = [x.arg(), Arg::Ptr(out), Arg::I64(n as i64), Arg::I32(square as i32)];
        self.launch(src::ELEMENTWISE, "sum_f32", shape(pack_grid(n).min(ATOMIC_GRID), BLOCK, 0), &args)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gpu, rand_bf16, rel_err};
    use super::super::{DTensor, Gpu};
    use crate::layers;
    use crate::rng::Rng;
    use half::bf16;
    use pith_plugin_api::{DType, Device, Tensor};

    /// Random f32 values and their device copy.
    fn rand_f32(g: &Gpu, rng: &mut Rng, shape: &[usize], std: f32) -> (Vec<f32>, DTensor) {
        let n: usize = shape.iter().product();
        let h: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
        let t = g.upload(&h, shape, DType::F32).unwrap();
        (h, t)
    }

    /// Random values of `dtype` (f32 or bf16; as f32, bf16-representable for bf16) on the device.
    fn rand_of(g: &Gpu, rng: &mut Rng, shape: &[usize], dtype: DType) -> (Vec<f32>, DTensor) {
        match dtype {
            DType::BF16 => rand_bf16(g, rng, shape, 1.0),
            _ => rand_f32(g, rng, shape, 1.0),
        }
    }

    /// max |got − want| / (|want| + floor): relative error of each element, `floor` keeping
    /// those near zero from dividing by nothing.
    fn rel_each(got: &[f32], want: &[f32], floor: f32) -> f32 {
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).map(|(g, w)| (g - w).abs() / (w.abs() + floor)).fold(0f32, f32::max)
    }

    /// A view of `t` from element `from` on (1-D), misaligned for the vector loads when `from`
    /// is odd.
    fn tail(t: &Tensor, from: usize) -> Tensor {
        let n = t.numel() - from;
        Tensor::new(t.addr + (from * t.dtype.size()) as u64, t.dtype, Device::Cuda, &[n])
    }

    /// RMSNorm forward and backward against layers::rmsnorm_fwd/bwd, for f32 input (dx
    /// accumulated) and bf16 input (dx written), with dims that take each load width (2, 8 and 1
    /// elements) and, for bf16, dx = dy in place. Tolerances: bf16 outputs (y; dx for bf16) 2⁻⁷:
    /// the GPU rounds to bf16 an fp32 value that differs from the CPU's only by summation order,
    /// so they are half a bf16 ulp (≤ 2⁻⁸ relative) apart; f32 outputs (rstd, f32 dx, dw) 1e-4:
    /// same inputs, fp32 sums of ≤ 1024 terms (rows for dw) in another order (~1e-6).
    /// H200: bf16 outputs ≤ 3.9e-3, rstd ≤ 1e-6, f32 dx ≤ 1.1e-6, dw ≤ 2.9e-6.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn rmsnorm_fwd_bwd_match_cpu() {
        let g = gpu();
        let mut rng = Rng::new(11);
        let cases = [
            (DType::F32, 37, 300),
            (DType::F32, 9, 512),
            (DType::BF16, 50 * 4, 64),
            (DType::BF16, 13, 77),
            (DType::BF16, 5, 1024),
        ];
        for (dt, rows, dim) in cases {
            let eps = 1e-6;
            let (x, xd) = rand_of(&g, &mut rng, &[rows, dim], dt);
            let (w, dw_) = rand_bf16(&g, &mut rng, &[dim], 1.0);
            let (y, rstd) = (g.tensor(&[rows, dim], DType::BF16).unwrap(), g.tensor(&[rows], DType::F32).unwrap());
            g.rmsnorm_fwd(&xd, &dw_, &y, &rstd, eps).unwrap();
            let (mut want_y, mut want_r) = (vec![0.0; rows * dim], vec![0.0; rows]);
            layers::rmsnorm_fwd(&x, &w, eps, &mut want_y, &mut want_r);
            let (ey, er) = (rel_err(&g.to_f32(&y).unwrap(), &want_y), rel_err(&g.to_f32(&rstd).unwrap(), &want_r));

            let (dy, ddy) = rand_of(&g, &mut rng, &[rows, dim], dt);
            let (dw0, ddw) = rand_f32(&g, &mut rng, &[dim], 1.0);
            // f32: dx accumulates onto random values; bf16: dx is written, here over dy itself.
            let (dx0, dx_f32) = rand_f32(&g, &mut rng, &[rows, dim], 1.0);
            let ddx: Tensor = if dt == DType::F32 { dx_f32.t } else { ddy.t };
            g.rmsnorm_bwd(&xd, &dw_, &rstd, &ddy, &ddx, &ddw).unwrap();
            let (mut want_dx, mut want_dw) = (vec![0.0; rows * dim], dw0.clone());
            layers::rmsnorm_bwd(&x, &w, &want_r, &dy, &mut want_dx, &mut want_dw);
            if dt == DType::F32 {
                want_dx.iter_mut().zip(&dx0).for_each(|(a, b)| *a += b);
            }
            let edx = rel_err(&g.to_f32(&ddx).unwrap(), &want_dx);
            let edw = rel_err(&g.to_f32(&ddw).unwrap(), &want_dw);
            println!("rmsnorm {dt:?} {rows}x{dim}: y {ey:.2e}, rstd {er:.2e}, dx {edx:.2e}, dw {edw:.2e}");
            let bf = 1.0 / 128.0;
            let tol_dx = if dt == DType::F32 { 1e-4 } else { bf };
            assert!(ey < bf && er < 1e-4 && edx < tol_dx && edw < 1e-4, "{dt:?} {rows}x{dim}: {ey} {er} {edx} {edw}");
        }
    }

    /// RoPE: forward against Rope::forward, the inverse against Rope::backward applied to the
    /// GPU's forward output (each one bf16 rounding of an fp32 rotation: 2⁻⁷), and forward then
    /// inverse giving back x within 2⁻⁵: two roundings, each off by up to 2⁻⁹ of the pair's norm
    /// (≈ 4 at most for unit normals), in a component that may be near zero. D = 64 takes the
    /// two-pair path, D = 6 (D/2 odd) one pair a thread; tables longer than seq. MLA's layout:
    /// the last 16 of 48 dims rotated, interleaved pairs (DeepSeek), and one head of 8 rotate-half.
    /// H200: forward 3.9e-3, inverse 3.8e-3, round trip 7.8e-3.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn rope_matches_cpu_and_inverts() {
        let g = gpu();
        let mut rng = Rng::new(12);
        for (b, seq, heads, w, d, inter) in
            [(2, 11, 3, 64, 64, false), (3, 5, 2, 6, 6, false), (2, 9, 4, 48, 16, true), (2, 7, 1, 24, 8, false)]
        {
            let rope = layers::Rope::new(16, d, 10_000.0, inter);
            let cos = g.upload(&rope.cos, &[16, d / 2], DType::F32).unwrap();
            let sin = g.upload(&rope.sin, &[16, d / 2], DType::F32).unwrap();
            let (x, dx) = rand_bf16(&g, &mut rng, &[b * seq, heads, w], 1.0);
            g.rope(&dx, &cos, &sin, seq, heads, inter, false).unwrap();
            let fwd = g.to_f32(&dx).unwrap();
            let mut want = x.clone();
            rope.forward(&mut want, seq, heads, w);
            g.rope(&dx, &cos, &sin, seq, heads, inter, true).unwrap();
            let back = g.to_f32(&dx).unwrap();
            let mut want_back = fwd.clone();
            rope.backward(&mut want_back, seq, heads, w);
            let (e1, e2, e3) = (rel_err(&fwd, &want), rel_err(&back, &want_back), rel_err(&back, &x));
            println!("rope W={w} D={d} interleaved={inter}: forward {e1:.2e}, inverse {e2:.2e}, round trip {e3:.2e}");
            assert!(e1 < 1.0 / 128.0 && e2 < 1.0 / 128.0 && e3 < 1.0 / 32.0, "W={w} D={d}: {e1} {e2} {e3}");
            assert!(rel_err(&fwd, &x) > 0.02, "W={w} D={d}: the forward rotation changed nothing");
        }
    }

    /// Embedding gather and scatter-add against layers::embedding_fwd/bwd, 50 tokens over 10
    /// rows (so ids repeat), H = 96 (float4 path) and H = 7. Forward is a copy: exact. Backward
    /// adds ~5 terms per entry onto random values, in another order than the CPU: 1e-5.
    /// H200: forward exact, backward 4.8e-7.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn embedding_matches_cpu() {
        let g = gpu();
        let mut rng = Rng::new(13);
        let (v, t) = (10, 50);
        for h in [96, 7] {
            let tokens: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
            let dtok = g.upload(&tokens, &[t], DType::I32).unwrap();
            let (table, dtable) = rand_f32(&g, &mut rng, &[v, h], 1.0);
            let out = g.tensor(&[t, h], DType::F32).unwrap();
            g.embed_fwd(&dtok, &dtable, &out).unwrap();
            let mut want = vec![0.0; t * h];
            layers::embedding_fwd(&table, &tokens, h, &mut want);
            let got = g.to_f32(&out).unwrap();

            let (dout, ddout) = rand_f32(&g, &mut rng, &[t, h], 1.0);
            let (mut want_dt, ddt) = rand_f32(&g, &mut rng, &[v, h], 1.0);
            g.embed_bwd(&dtok, &ddout, &ddt).unwrap();
            layers::embedding_bwd(&mut want_dt, &tokens, &dout, h);
            let e = rel_err(&g.to_f32(&ddt).unwrap(), &want_dt);
            println!("embedding H={h}: forward exact {}, backward {e:.2e}", got == want);
            assert!(got == want && e < 1e-5, "H={h}: {e}");
        }
    }

    /// Cross-entropy against layers::cross_entropy: per-row losses (the CPU on each row alone)
    /// and the mean, the logits untouched without dscale, and the gradient with dscale 1/T (the
    /// CPU's scale 1 divides by T). Logits bf16, std 3. Tolerances: losses 1e-4 (fp32 exp, log
    /// and sums of V terms in another order); gradient 2⁻⁷ of each entry (one bf16 rounding,
    /// ≤ 2⁻⁸, of a value the fp32 lse moves by ~1e-6) plus 1e-6 of the largest entry. V = 1000
    /// takes the 8-wide path, V = 37 the scalar one. H200: losses 1.0e-7, gradient 3.8e-3.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cross_entropy_matches_cpu() {
        let g = gpu();
        let mut rng = Rng::new(14);
        for (t, v) in [(7, 1000), (5, 37)] {
            let (logits, dl) = rand_bf16(&g, &mut rng, &[t, v], 3.0);
            let targets: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
            let dtg = g.upload(&targets, &[t], DType::I32).unwrap();
            let losses = g.tensor(&[t], DType::F32).unwrap();
            g.cross_entropy(&dl, &dtg, &losses, None).unwrap();
            let unchanged = g.to_f32(&dl).unwrap() == logits;
            let got = g.to_f32(&losses).unwrap();
            let want: Vec<f32> = (0..t)
                .map(|r| layers::cross_entropy(&logits[r * v..][..v], &targets[r..r + 1], v, 1.0, None))
                .collect();
            let mut want_d = vec![0.0; t * v];
            let mean = layers::cross_entropy(&logits, &targets, v, 1.0, Some(&mut want_d));
            g.cross_entropy(&dl, &dtg, &losses, Some(1.0 / t as f32)).unwrap();
            let got2 = g.to_f32(&losses).unwrap();
            let got_d = g.to_f32(&dl).unwrap();
            let el = rel_err(&got, &want).max(rel_err(&got2, &want));
            let em = (got.iter().map(|&l| l as f64).sum::<f64>() / t as f64 - mean as f64).abs() as f32;
            let big = want_d.iter().fold(0f32, |a, b| a.max(b.abs()));
            let ed = rel_each(&got_d, &want_d, 1e-6 * big);
            println!(
                "cross-entropy {t}x{v}: losses {el:.2e}, mean {em:.2e}, gradient {ed:.2e}, logits kept {unchanged}"
            );
            assert!(unchanged && el < 1e-4 && em < 1e-4 && ed < 1.0 / 128.0, "{t}x{v}: {el} {em} {ed}");
        }
    }

    /// cast both ways, add_into (f32 and bf16 x), scale, sum_squares and sum over n = 300001
    /// (many blocks, a tail past the 4-packs), and on views one element in (misaligned: the
    /// one-at-a-time path). Casts, adds and scaling are one correctly rounded fp32 operation per
    /// element, as on the CPU (f32 → bf16 round to nearest even in both): exact. Sums: 1e-4
    /// relative to max(|Σ|, 1) against f64: fp32 block sums (~1e-6), then ≤ 512 atomicAdds into
    /// the total, each rounding by ≤ 2⁻²⁴ of it (≤ 3e-5 in the worst case, ~1e-6 typically).
    /// H200: all exact, sums 3.1e-7.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn elementwise_and_sums_match_cpu() {
        let g = gpu();
        let mut rng = Rng::new(15);
        let n = 300_001;
        let (x, dx) = rand_f32(&g, &mut rng, &[n], 1.0);
        for from in [0, 1] {
            let (xs, xv) = (&x[from..], tail(&dx, from));
            let m = n - from;
            // cast f32 → bf16 → f32
            let b = g.tensor(&[n], DType::BF16).unwrap();
            let bv = tail(&b, from);
            g.cast(&xv, &bv).unwrap();
            let mut got_b = vec![bf16::ZERO; n];
            g.download(&b, &mut got_b).unwrap();
            let want_b: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
            let cast_ok = got_b[from..] == want_b[..];
            let back = g.tensor(&[n], DType::F32).unwrap();
            let backv = tail(&back, from);
            g.cast(&bv, &backv).unwrap();
            let back_ok = g.to_f32(&back).unwrap()[from..] == want_b.iter().map(|v| v.to_f32()).collect::<Vec<_>>()[..];
            // acc += x (f32), acc += bf16(x), acc *= 0.37
            let (acc0, dacc) = rand_f32(&g, &mut rng, &[n], 1.0);
            let accv = tail(&dacc, from);
            g.add_into(&accv, &xv).unwrap();
            g.add_into(&accv, &bv).unwrap();
            g.scale(&accv, 0.37).unwrap();
            let want_acc: Vec<f32> =
                acc0[from..].iter().zip(xs).zip(&want_b).map(|((a, x), b)| ((a + x) + b.to_f32()) * 0.37).collect();
            let acc_ok = g.to_f32(&dacc).unwrap()[from..] == want_acc[..];
            // out = x + bf16(x) and out = bf16(x) + bf16(x), exactly as f32 sums
            let out = g.tensor(&[n], DType::F32).unwrap();
            let outv = tail(&out, from);
            g.sum_into(&outv, &xv, &bv).unwrap();
            let sum_ok = g.to_f32(&out).unwrap()[from..]
                == xs.iter().zip(&want_b).map(|(x, b)| x + b.to_f32()).collect::<Vec<_>>()[..];
            g.sum_into(&outv, &bv, &bv).unwrap();
            let twice: Vec<f32> = want_b.iter().map(|b| b.to_f32() + b.to_f32()).collect();
            let sum_ok = sum_ok && g.to_f32(&out).unwrap()[from..] == twice[..];
            // out = [r0, r1, r2]: out[2] += Σ x², out[0] += Σ x
            let (out0, dout) = rand_f32(&g, &mut rng, &[3], 1.0);
            g.sum_squares(&xv, &dout, 2).unwrap();
            g.sum(&xv, &dout).unwrap();
            let got = g.to_f32(&dout).unwrap();
            let sq: f64 = xs.iter().map(|&v| v as f64 * v as f64).sum::<f64>() + out0[2] as f64;
            let s: f64 = xs.iter().map(|&v| v as f64).sum::<f64>() + out0[0] as f64;
            let want = [s as f32, out0[1], sq as f32];
            let e = rel_err(&got, &want);
            println!("elementwise n={m}: cast {cast_ok}, back {back_ok}, add/scale {acc_ok}, sum_into {sum_ok}, sums {e:.2e}");
            assert!(cast_ok && back_ok && acc_ok && sum_ok && e < 1e-4, "from {from}: {e}");
        }
    }
}
