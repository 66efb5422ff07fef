//! Routing traces (`pith train --trace-routing FILE --trace-tokens N [--trace-from STEP]`): the
//! expert ids and gate weights every MoE layer chose for the first N training tokens from step
//! STEP (default 1) on, as one safetensors file: `tokens` [N] i32, and per layer
//! `layers.L.expert_ids` [N,k] i32 and `layers.L.gate_weights` [N,k] f32; its metadata holds
//! `first_step` and `last_step`. From Python: `safetensors.numpy.load_file(FILE)`.

use crate::model::StepOut;
use safetensors::{tensor::TensorView, Dtype};
use std::path::PathBuf;

pub struct RoutingTrace {
    pub path: PathBuf,
    pub want: usize,
    /// The first step recorded.
    pub from: u64,
    /// The steps recorded so far (first, last).
    pub steps: Option<(u64, u64)>,
    tokens: Vec<i32>,
    /// Per layer: ids, weights, k.
    layers: Vec<(Vec<i32>, Vec<f32>, usize)>,
}

impl RoutingTrace {
    pub fn new(path: PathBuf, want: usize, from: u64) -> RoutingTrace {
        RoutingTrace { path, want, from, steps: None, tokens: Vec::new(), layers: Vec::new() }
    }

    /// Whether step `step` is to be recorded.
    pub fn wants(&self, step: u64) -> bool {
        !self.done() && step >= self.from
    }

    /// `4096 tokens of steps 3–4`, for the line that says where the trace went.
    pub fn describe(&self) -> String {
        match self.steps {
            Some((a, b)) if a == b => format!("{} tokens of step {a}", self.tokens.len()),
            Some((a, b)) => format!("{} tokens of steps {a}–{b}", self.tokens.len()),
            None => "no tokens".into(),
        }
    }

    /// Before training: the file must not exist (a trace is never overwritten) and its directory
    /// must.
    pub fn check(&self) -> Result<(), String> {
        let p = self.path.display();
        if self.path.exists() {
            return Err(format!("--trace-routing {p}: the file exists; remove it or name another"));
        }
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(format!("--trace-routing {p}: the directory {} does not exist", dir.display()));
        }
        if self.want == 0 {
            return Err("--trace-tokens 0: trace at least one token".into());
        }
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.tokens.len() >= self.want
    }

    /// Add a micro-batch's tokens and routing (of step `step`), up to `want` tokens in all.
    pub fn add(&mut self, tokens: &[u32], out: &StepOut, step: u64) {
        self.steps = Some((self.steps.map_or(step, |s| s.0), step));
        let take = (self.want - self.tokens.len()).min(tokens.len());
        self.tokens.extend(tokens[..take].iter().map(|&t| t as i32));
        self.layers.resize_with(out.routing.len(), Default::default);
        for ((ids, w, k), (rid, rw)) in self.layers.iter_mut().zip(&out.routing) {
            *k = rid.len() / tokens.len().max(1);
            ids.extend_from_slice(&rid[..take * *k]);
            w.extend_from_slice(&rw[..take * *k]);
        }
    }

    /// Write the trace (atomically: a temp file renamed into place).
    pub fn write(&self) -> Result<(), String> {
        fn bytes<T>(v: &[T]) -> &[u8] {
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        let n = self.tokens.len();
        let view = |dt, shape: Vec<usize>, b| TensorView::new(dt, shape, b).map_err(|e| e.to_string());
        let mut t = vec![("tokens".to_string(), view(Dtype::I32, vec![n], bytes(&self.tokens))?)];
        for (l, (ids, w, k)) in self.layers.iter().enumerate().filter(|(_, l)| l.2 > 0) {
            t.push((format!("layers.{l}.expert_ids"), view(Dtype::I32, vec![n, *k], bytes(ids))?));
            t.push((format!("layers.{l}.gate_weights"), view(Dtype::F32, vec![n, *k], bytes(w))?));
        }
        let tmp = self.path.with_extension("tmp");
        let err = |e: safetensors::SafeTensorError| format!("{}: {e}", self.path.display());
        let (a, b) = self.steps.unwrap_or((self.from, self.from));
        let meta = [("first_step".to_string(), a.to_string()), ("last_step".to_string(), b.to_string())];
        safetensors::serialize_to_file(t, &Some(meta.into_iter().collect()), &tmp).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| format!("{}: {e}", self.path.display()))
    }
}
