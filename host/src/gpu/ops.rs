//! The host's ops table on CUDA: what a plugin's `Host` calls reach when the run is on the GPU.
//! Plugin allocations (device and host) live until [`GpuOps::reset`] at the end of the
//! micro-batch, like the CPU backend's arena.

use super::{DTensor, Gpu};
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use pith_plugin_api::abi::{Ops, OpsRef};
use pith_plugin_api::{Arg, DType, Device, LaunchDims, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

pub struct GpuOps {
    pub gpu: Arc<Gpu>,
    device: Mutex<Vec<DTensor>>,
    host: Mutex<Vec<Vec<u32>>>,
    metrics: Mutex<BTreeMap<String, (f64, usize)>>,
}

/// See [`GpuOps::reset_on_drop`].
pub struct ResetOnDrop<'a>(&'a GpuOps);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.reset();
    }
}

fn res<T>(r: Result<T, String>) -> RResult<T, RString> {
    r.map_err(RString::from).into()
}

/// The group offsets of a grouped GEMM: a host i32 tensor [G+1], non-decreasing, ending at `rows`.
fn offsets_of(t: &Tensor, rows: usize) -> Result<Vec<usize>, String> {
    if t.device != Device::Cpu || t.dtype != DType::I32 || t.rank != 1 {
        return Err(format!(
            "offsets must be a host (CPU) i32 [G+1] tensor, got {:?} {:?} on {:?}",
            t.dtype,
            t.dims(),
            t.device
        ));
    }
    let o = t.i32s();
    if o.first() != Some(&0) || o.windows(2).any(|w| w[1] < w[0]) || *o.last().unwrap() as usize != rows {
        return Err(format!("offsets must rise from 0 to the {rows} rows, got {:?}…", &o[..o.len().min(8)]));
    }
    Ok(o.iter().map(|&v| v as usize).collect())
}

fn on_gpu(ts: &[&Tensor], what: &str) -> Result<(), String> {
    match ts.iter().find(|t| t.device != Device::Cuda) {
        Some(t) => Err(format!("{what}: expected device tensors, got one on {:?} {:?}", t.device, t.dims())),
        None => Ok(()),
    }
}

impl GpuOps {
    pub fn new(gpu: Arc<Gpu>) -> GpuOps {
        GpuOps { gpu, device: Mutex::default(), host: Mutex::default(), metrics: Mutex::default() }
    }
    pub fn ops(&self) -> OpsRef<'_> {
        pith_plugin_api::abi::ops_ref(self)
    }
    /// Free every allocation plugins made (after the micro-batch's backward).
    pub fn reset(&self) {
        self.device.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.host.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
    /// A guard that calls [`GpuOps::reset`] when dropped: a pass holds one, so plugin
    /// allocations are freed on its error paths (and panics) too.
    pub fn reset_on_drop(&self) -> ResetOnDrop<'_> {
        ResetOnDrop(self)
    }
    /// How many device allocations plugins hold now; see [`GpuOps::release_to`].
    pub fn mark(&self) -> usize {
        self.device.lock().unwrap().len()
    }
    /// Free the device allocations plugins made since `mark` (a layer's forward state once its
    /// backward is done, with the backward's temporaries).
    pub fn release_to(&self, mark: usize) {
        self.device.lock().unwrap().truncate(mark);
    }
    /// Take the metrics reported since the last call, averaged per name.
    pub fn take_metrics(&self) -> BTreeMap<String, f64> {
        let mut m = self.metrics.lock().unwrap();
        let out = m.iter().map(|(k, (s, n))| (k.clone(), s / *n as f64)).collect();
        m.clear();
        out
    }
    fn alloc_impl(&self, shape: &[usize], dtype: DType, device: Device, zeroed: bool) -> Result<Tensor, String> {
        if shape.len() > 4 {
            return Err(format!("alloc: {} dims; tensors have at most 4", shape.len()));
        }
        if device == Device::Cpu {
            let n = (shape.iter().product::<usize>() * dtype.size()).div_ceil(4);
            let buf = vec![0u32; n.max(1)];
            let t = Tensor::new(buf.as_ptr() as u64, dtype, Device::Cpu, shape);
            self.host.lock().unwrap().push(buf);
            return Ok(t);
        }
        let t = if zeroed { self.gpu.zeros(shape, dtype)? } else { self.gpu.tensor(shape, dtype)? };
        let view = t.t;
        self.device.lock().unwrap().push(t);
        Ok(view)
    }
    fn copy_impl(&self, src: Tensor, dst: Tensor) -> Result<(), String> {
        if src.dtype != dst.dtype || src.numel() != dst.numel() {
            let (a, b) = ((src.dtype, src.dims()), (dst.dtype, dst.dims()));
            return Err(format!("copy: {a:?} into {b:?}: dtype and size must match"));
        }
        let bytes = src.numel() * src.dtype.size();
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the views are valid for `bytes` during the call; `src` is only read.
        let (from, to) = (src.addr as *const u8, dst.addr as *mut u8);
        match (src.device, dst.device) {
            (Device::Cuda, Device::Cuda) => self.gpu.copy_d2d(&src, &dst),
            (Device::Cuda, Device::Cpu) => {
                self.gpu.download(&src, unsafe { std::slice::from_raw_parts_mut(to, bytes) })
            }
            (Device::Cpu, Device::Cuda) => {
                self.gpu.copy_to_device(unsafe { std::slice::from_raw_parts(from, bytes) }, dst.addr)
            }
            (Device::Cpu, Device::Cpu) => {
                unsafe { std::ptr::copy(from, to, bytes) };
                Ok(())
            }
        }
    }
}

impl Ops for GpuOps {
    fn device(&self) -> Device {
        Device::Cuda
    }
    fn alloc(&self, shape: RSlice<'_, u64>, dtype: DType, device: Device, zeroed: bool) -> RResult<Tensor, RString> {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        res(self.alloc_impl(&dims, dtype, device, zeroed))
    }
    fn gemm(&self, a: Tensor, b: Tensor, c: Tensor, ta: bool, tb: bool, alpha: f32, beta: f32) -> RResult<(), RString> {
        res(on_gpu(&[&a, &b, &c], "gemm").and_then(|_| self.gpu.gemm(&a, &b, &c, ta, tb, alpha, beta)))
    }
    fn grouped_gemm(
        &self,
        x: Tensor,
        w: Tensor,
        y: Tensor,
        offsets: Tensor,
        trans_w: bool,
        acc: bool,
    ) -> RResult<(), RString> {
        res(on_gpu(&[&x, &w, &y], "grouped_gemm")
            .and_then(|_| offsets_of(&offsets, x.dim(0)))
            .and_then(|o| self.gpu.grouped_gemm(&x, &w, &y, &o, trans_w, acc)))
    }
    fn grouped_gemm_wgrad(&self, x: Tensor, dy: Tensor, dw: Tensor, offsets: Tensor) -> RResult<(), RString> {
        res(on_gpu(&[&x, &dy, &dw], "grouped_gemm_wgrad")
            .and_then(|_| offsets_of(&offsets, x.dim(0)))
            .and_then(|o| self.gpu.grouped_wgrad(&x, &dy, &dw, &o)))
    }
    fn copy(&self, src: Tensor, dst: Tensor) -> RResult<(), RString> {
        res(self.copy_impl(src, dst))
    }
    fn compile(&self, source: RStr<'_>) -> RResult<(), RString> {
        res(self.gpu.module(source.as_str()).map(|_| ()))
    }
    fn launch(&self, source: RStr<'_>, name: RStr<'_>, d: LaunchDims, args: RSlice<'_, Arg>) -> RResult<(), RString> {
        res(self.gpu.launch(source.as_str(), name.as_str(), (d.grid, d.block, d.shared_mem), &args))
    }
    fn metric(&self, name: RStr<'_>, value: f64) {
        let mut m = self.metrics.lock().unwrap();
        let e = m.entry(name.to_string()).or_insert((0.0, 0));
        e.0 += value;
        e.1 += 1;
    }
}
