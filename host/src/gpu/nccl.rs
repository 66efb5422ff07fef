//! NCCL between the GPUs of a multi-process job (cudarc's `nccl` binding, loaded at run time
//! like the rest of CUDA, so the binary builds and runs without it). One communicator over the
//! world; rank 0 makes the unique id and the process group (parallel.rs) carries it to the
//! others. Every call is enqueued on the GPU's one stream, so it is ordered with the kernels
//! around it. `NCCL_NVLS_ENABLE=0` is set unless the user set it (NVLink multicast stays off).

use super::Gpu;
use crate::parallel::Parallel;
use cudarc::driver::CudaStream;
use cudarc::nccl::sys;
use pith_plugin_api::{DType, ReduceOp, Tensor};
use std::ffi::c_void;
use std::sync::Arc;

pub struct Nccl {
    /// The compute stream's collectives (plugins', the step's own).
    comm: sys::ncclComm_t,
    /// The gradient sums on `side`: a communicator of their own, so a plugin's small collective
    /// on the compute stream never queues behind a layer's gradients.
    grads: sys::ncclComm_t,
    pub rank: usize,
    pub size: usize,
    /// Where gradients are summed while the backward goes on ([`Nccl::reduce_when_written`]).
    side: Arc<CudaStream>,
}

// SAFETY: the communicator is used from one thread at a time (the trainer's), through &self
// calls that NCCL allows from any thread.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

fn check(what: &str, r: sys::ncclResult_t) -> Result<(), String> {
    match r {
        sys::ncclResult_t::ncclSuccess => Ok(()),
        e => Err(format!("NCCL {what}: {e:?} (NCCL_DEBUG=INFO shows why)")),
    }
}

fn dtype(d: DType) -> sys::ncclDataType_t {
    match d {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::I32 => sys::ncclDataType_t::ncclInt32,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

/// A communicator over the world: rank 0's unique id, carried by the process group.
fn communicator(par: &Parallel) -> Result<sys::ncclComm_t, String> {
    let mut id = [0i32; 32];
    if par.is_first() {
        let uid = cudarc::nccl::result::get_uniqueid().map_err(|e| format!("NCCL unique id: {e:?}"))?;
        id.iter_mut()
            .zip(uid.internal.chunks(4))
            .for_each(|(v, c)| *v = i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]));
    }
    par.broadcast_i32(&mut id)?;
    let mut uid = sys::ncclUniqueId { internal: [0; 128] };
    for (c, v) in uid.internal.chunks_mut(4).zip(id) {
        v.to_le_bytes().iter().zip(c).for_each(|(b, c)| *c = *b as _);
    }
    let mut comm = std::ptr::null_mut();
    // SAFETY: `comm` is written by NCCL; every rank passes the same id and world size.
    check("init", unsafe { sys::ncclCommInitRank(&mut comm, par.size as i32, uid, par.rank as i32) })?;
    Ok(comm)
}

impl Nccl {
    /// The world's communicator, or None with one rank. Every rank calls this at the same point.
    pub fn init(gpu: &Gpu, par: &Parallel) -> Result<Option<Nccl>, String> {
        if par.size == 1 {
            return Ok(None);
        }
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            // SAFETY: before NCCL starts its threads; the trainer's other threads don't read the env.
            unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
        }
        gpu.ctx.bind_to_thread().map_err(|e| format!("GPU: {e:?}"))?;
        let (comm, grads) = (communicator(par)?, communicator(par)?);
        let side = gpu.ctx.new_stream().map_err(|e| format!("a second CUDA stream: {e:?}"))?;
        Ok(Some(Nccl { comm, grads, rank: par.rank as usize, size: par.size as usize, side }))
    }

    fn stream(gpu: &Gpu) -> sys::cudaStream_t {
        gpu.stream.cu_stream() as sys::cudaStream_t
    }

    /// Sum `grads` over every rank on the side stream, once the work queued so far on the
    /// compute stream (the backward that wrote them) is done; the compute stream goes on. Call
    /// [`Nccl::reduced`] before anything reads them.
    pub fn reduce_when_written(&self, gpu: &Gpu, grads: &[Tensor]) -> Result<(), String> {
        let err = |e| format!("stream event: {e:?}");
        let written = gpu.stream.record_event(None).map_err(err)?;
        self.side.wait(&written).map_err(err)?;
        check("group start", unsafe { sys::ncclGroupStart() })?;
        let side = self.side.cu_stream() as sys::cudaStream_t;
        let r = grads.iter().filter(|t| t.numel() > 0).try_for_each(|t| {
            let (p, n, sum) = (t.addr as *mut c_void, t.numel(), sys::ncclRedOp_t::ncclSum);
            // SAFETY: a gradient tensor, alive for the run; nothing writes it until `reduced`.
            check("all_reduce", unsafe { sys::ncclAllReduce(p, p, n, dtype(t.dtype), sum, self.grads, side) })
        });
        check("group end", unsafe { sys::ncclGroupEnd() })?;
        r
    }

    /// The compute stream waits for every sum [`Nccl::reduce_when_written`] queued.
    pub fn reduced(&self, gpu: &Gpu) -> Result<(), String> {
        let done = self.side.record_event(None).map_err(|e| format!("stream event: {e:?}"))?;
        gpu.stream.wait(&done).map_err(|e| format!("stream wait: {e:?}"))
    }

    /// In place: `t` summed (or max, min) over every rank.
    pub fn all_reduce(&self, gpu: &Gpu, t: &Tensor, op: ReduceOp) -> Result<(), String> {
        let op = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
            ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
        };
        let (p, n) = (t.addr as *mut c_void, t.numel());
        // SAFETY: `t` is a device tensor of n elements of its dtype, alive until the stream passes.
        check("all_reduce", unsafe { sys::ncclAllReduce(p, p, n, dtype(t.dtype), op, self.comm, Self::stream(gpu)) })
    }

    /// Sum each of `ts` in place over every rank, as one group of calls.
    pub fn sum_all(&self, gpu: &Gpu, ts: &[Tensor]) -> Result<(), String> {
        check("group start", unsafe { sys::ncclGroupStart() })?;
        let r = ts.iter().filter(|t| t.numel() > 0).try_for_each(|t| self.all_reduce(gpu, t, ReduceOp::Sum));
        check("group end", unsafe { sys::ncclGroupEnd() })?;
        r
    }

    /// dst = every rank's `src` in rank order (dst has size × src's elements).
    pub fn all_gather(&self, gpu: &Gpu, src: &Tensor, dst: &Tensor) -> Result<(), String> {
        let (s, d, n) = (src.addr as *const c_void, dst.addr as *mut c_void, src.numel());
        // SAFETY: device tensors of the sizes the caller checked.
        check("all_gather", unsafe { sys::ncclAllGather(s, d, n, dtype(src.dtype), self.comm, Self::stream(gpu)) })
    }

    /// dst = this rank's part of the sum of every rank's `src` (src has size × dst's elements).
    pub fn reduce_scatter(&self, gpu: &Gpu, src: &Tensor, dst: &Tensor) -> Result<(), String> {
        let (s, d, n, sum) =
            (src.addr as *const c_void, dst.addr as *mut c_void, dst.numel(), sys::ncclRedOp_t::ncclSum);
        // SAFETY: as above.
        check("reduce_scatter", unsafe {
            sys::ncclReduceScatter(s, d, n, dtype(src.dtype), sum, self.comm, Self::stream(gpu))
        })
    }

    /// `send[r]` elements of `src` (in order) to rank r, `recv[r]` from rank r into `dst`.
    pub fn all_to_all(
        &self,
        gpu: &Gpu,
        src: &Tensor,
        send: &[usize],
        dst: &Tensor,
        recv: &[usize],
    ) -> Result<(), String> {
        let (es, dt, st) = (src.dtype.size(), dtype(src.dtype), Self::stream(gpu));
        check("group start", unsafe { sys::ncclGroupStart() })?;
        let (mut so, mut ro) = (0usize, 0usize);
        let mut r = Ok(());
        for peer in 0..self.size {
            let (s, d) = ((src.addr as usize + so * es) as *const c_void, (dst.addr as usize + ro * es) as *mut c_void);
            // SAFETY: the counts add up to the tensors' sizes (checked by the caller).
            r = r
                .and_then(|_| check("send", unsafe { sys::ncclSend(s, send[peer], dt, peer as i32, self.comm, st) }))
                .and_then(|_| check("recv", unsafe { sys::ncclRecv(d, recv[peer], dt, peer as i32, self.comm, st) }));
            (so, ro) = (so + send[peer], ro + recv[peer]);
        }
        check("group end", unsafe { sys::ncclGroupEnd() })?;
        r
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitRank and is not used after this.
        for c in [self.comm, self.grads] {
            unsafe { sys::ncclCommDestroy(c) };
        }
    }
}
