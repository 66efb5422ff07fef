//! NCCL between the GPUs of a multi-process job (cudarc's `nccl` binding, loaded at run time
//! like the rest of CUDA, so the binary builds and runs without it). A communicator over the
//! world (rank 0 makes the unique id and the process group, parallel.rs, carries it to the
//! others), and the data- and expert-parallel groups' split from it. Every call is enqueued on the GPU's one stream, so it is ordered with the kernels
//! around it. `NCCL_NVLS_ENABLE=0` is set unless the user set it (NVLink multicast stays off).

use super::Gpu;
use crate::parallel::Parallel;
use cudarc::driver::CudaStream;
use cudarc::nccl::sys;
use pith_plugin_api::{DType, Group, ReduceOp, Tensor};
use std::ffi::c_void;
use std::sync::Arc;

/// One communicator and its number of ranks.
struct Comm {
    c: sys::ncclComm_t,
    size: usize,
}

pub struct Nccl {
    /// The compute stream's collectives (plugins', the step's own), per group; a group of one
    /// rank has none, a group of every rank uses the world's.
    world: Comm,
    dp: Option<Comm>,
    ep: Option<Comm>,
    /// The gradient sums on `side`: communicators of their own (the world's and the
    /// data-parallel group's, which sums the experts' gradients), so a plugin's small
    /// collective on the compute stream never queues behind a layer's gradients.
    grads: Comm,
    grads_dp: Option<Comm>,
    /// Ranks per group (indexed by `Group as usize`).
    sizes: [usize; 3],
    /// Where gradients are summed while the backward goes on ([`Nccl::reduce_when_written`]).
    side: Arc<CudaStream>,
}

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
fn communicator(par: &Parallel) -> Result<Comm, String> {
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
    Ok(Comm { c: comm, size: par.size as usize })
}

/// `g`'s communicator split from `world` (every rank calls this at the same point): None when
/// `g` is one rank or the whole world (which use none, or the world's).
fn split(world: &Comm, par: &Parallel, g: Group) -> Result<Option<Comm>, String> {
    let members = par.members(g);
    if members.len() == 1 || members.len() == world.size {
        return Ok(None);
    }
    let mut comm = std::ptr::null_mut();
    let (color, key) = (members[0] as i32, par.rank as i32);
    // SAFETY: every rank of `world` calls this with its group's first rank as the colour; a
    // null config takes NCCL's defaults.
    check("comm split", unsafe { sys::ncclCommSplit(world.c, color, key, &mut comm, std::ptr::null_mut()) })?;
    Ok(Some(Comm { c: comm, size: members.len() }))
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
        let (world, grads) = (communicator(par)?, communicator(par)?);
        let (dp, ep) = (split(&world, par, Group::DataParallel)?, split(&world, par, Group::ExpertParallel)?);
        let grads_dp = split(&grads, par, Group::DataParallel)?;
        let side = gpu.ctx.new_stream().map_err(|e| format!("a second CUDA stream: {e:?}"))?;
        let sizes = [Group::World, Group::DataParallel, Group::ExpertParallel].map(|g| par.members(g).len());
        Ok(Some(Nccl { world, dp, ep, grads, grads_dp, sizes, side }))
    }

    /// The compute stream's communicator for `g`, or None when `g` is this rank alone.
    fn comm(&self, g: Group) -> Option<&Comm> {
        match g {
            Group::World => Some(&self.world),
            Group::DataParallel => self.dp.as_ref(),
            Group::ExpertParallel => self.ep.as_ref(),
        }
        .or_else(|| (self.sizes[g as usize] == self.world.size).then_some(&self.world))
    }

    /// The stream the gradient sums run on.
    pub fn side(&self) -> &Arc<CudaStream> {
        &self.side
    }

    /// The number of ranks in `g`.
    pub fn size_of(&self, g: Group) -> usize {
        self.sizes[g as usize]
    }

    fn stream(gpu: &Gpu) -> sys::cudaStream_t {
        gpu.stream.cu_stream() as sys::cudaStream_t
    }

    /// Sum each gradient over its group (the world, or the data-parallel group for the
    /// experts') on the side stream — onto the rank of index `root` in the group when there is
    /// one (`shard_optimizer`), else onto every rank — once the work queued so far on the
    /// compute stream (the backward that wrote them) is done; the compute stream goes on. Call
    /// [`Nccl::reduced`] before anything reads them.
    pub fn reduce_when_written(&self, gpu: &Gpu, grads: &[(Tensor, Group, Option<usize>)]) -> Result<(), String> {
        let err = |e| format!("stream event: {e:?}");
        let written = gpu.stream.record_event(None).map_err(err)?;
        self.side.wait(&written).map_err(err)?;
        let side = self.side.cu_stream() as sys::cudaStream_t;
        check("group start", unsafe { sys::ncclGroupStart() })?;
        let r = grads.iter().filter(|(t, ..)| t.numel() > 0).try_for_each(|(t, g, root)| {
            let comm = match g {
                Group::World => Some(&self.grads),
                _ => self.grads_dp.as_ref().or((self.size_of(*g) == self.grads.size).then_some(&self.grads)),
            };
            let Some(comm) = comm.filter(|_| self.size_of(*g) > 1) else { return Ok(()) };
            let (p, n, sum, dt) = (t.addr as *mut c_void, t.numel(), sys::ncclRedOp_t::ncclSum, dtype(t.dtype));
            // SAFETY: a gradient tensor, alive for the run; nothing writes it until `reduced`.
            match root {
                Some(r) => check("reduce", unsafe { sys::ncclReduce(p, p, n, dt, sum, *r as i32, comm.c, side) }),
                None => check("all_reduce", unsafe { sys::ncclAllReduce(p, p, n, dt, sum, comm.c, side) }),
            }
        });
        check("group end", unsafe { sys::ncclGroupEnd() })?;
        r
    }

    /// The compute stream waits for every sum [`Nccl::reduce_when_written`] queued.
    pub fn reduced(&self, gpu: &Gpu) -> Result<(), String> {
        let done = self.side.record_event(None).map_err(|e| format!("stream event: {e:?}"))?;
        gpu.stream.wait(&done).map_err(|e| format!("stream wait: {e:?}"))
    }

    /// In place: `t` summed (or max, min) over `g`. The calls on the compute stream are timed
    /// under `nccl <op>` in `pith bench --profile`: that time is exposed (no kernel runs beside it).
    pub fn all_reduce(&self, gpu: &Gpu, t: &Tensor, op: ReduceOp, g: Group) -> Result<(), String> {
        if self.comm(g).is_none() {
            return Ok(());
        }
        gpu.timed("nccl all_reduce", || self.reduce(gpu, t, op, g))
    }

    fn reduce(&self, gpu: &Gpu, t: &Tensor, op: ReduceOp, g: Group) -> Result<(), String> {
        let Some(c) = self.comm(g) else { return Ok(()) };
        let op = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
            ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
        };
        let (p, n) = (t.addr as *mut c_void, t.numel());
        // SAFETY: `t` is a device tensor of n elements of its dtype, alive until the stream passes.
        check("all_reduce", unsafe { sys::ncclAllReduce(p, p, n, dtype(t.dtype), op, c.c, Self::stream(gpu)) })
    }

    /// Each `(t, g, root)`: `t` of the rank of index `root` in `g` onto every rank of `g`, in
    /// place on the compute stream, as one group of calls.
    pub fn broadcast_all(&self, gpu: &Gpu, ts: &[(Tensor, Group, usize)]) -> Result<(), String> {
        gpu.timed("nccl broadcast", || {
            check("group start", unsafe { sys::ncclGroupStart() })?;
            let r = ts.iter().filter(|(t, ..)| t.numel() > 0).try_for_each(|(t, g, root)| {
                let Some(c) = self.comm(*g) else { return Ok(()) };
                let p = t.addr as *mut c_void;
                // SAFETY: a device tensor alive for the run, the same size on every rank of `g`.
                check("broadcast", unsafe {
                    sys::ncclBroadcast(p, p, t.numel(), dtype(t.dtype), *root as i32, c.c, Self::stream(gpu))
                })
            });
            check("group end", unsafe { sys::ncclGroupEnd() })?;
            r
        })
    }

    /// Sum each of `ts` in place over `g`, as one group of calls.
    pub fn sum_all(&self, gpu: &Gpu, ts: &[Tensor], g: Group) -> Result<(), String> {
        gpu.timed("nccl all_reduce", || {
            check("group start", unsafe { sys::ncclGroupStart() })?;
            let r = ts.iter().filter(|t| t.numel() > 0).try_for_each(|t| self.reduce(gpu, t, ReduceOp::Sum, g));
            check("group end", unsafe { sys::ncclGroupEnd() })?;
            r
        })
    }

    /// dst = every rank of `g`'s `src` in rank order (dst has size × src's elements).
    pub fn all_gather(&self, gpu: &Gpu, src: &Tensor, dst: &Tensor, g: Group) -> Result<(), String> {
        let c = self.comm(g).ok_or("all_gather over one rank")?;
        let (s, d, n) = (src.addr as *const c_void, dst.addr as *mut c_void, src.numel());
        // SAFETY: device tensors of the sizes the caller checked.
        gpu.timed("nccl all_gather", || {
            check("all_gather", unsafe { sys::ncclAllGather(s, d, n, dtype(src.dtype), c.c, Self::stream(gpu)) })
        })
    }

    /// dst = this rank's part of the sum of `g`'s `src` (src has size × dst's elements).
    pub fn reduce_scatter(&self, gpu: &Gpu, src: &Tensor, dst: &Tensor, g: Group) -> Result<(), String> {
        let c = self.comm(g).ok_or("reduce_scatter over one rank")?;
        let (s, d, n, sum) =
            (src.addr as *const c_void, dst.addr as *mut c_void, dst.numel(), sys::ncclRedOp_t::ncclSum);
        // SAFETY: as above.
        gpu.timed("nccl reduce_scatter", || {
            check("reduce_scatter", unsafe {
                sys::ncclReduceScatter(s, d, n, dtype(src.dtype), sum, c.c, Self::stream(gpu))
            })
        })
    }

    /// `send[r]` elements of `src` (in order) to rank r of `g`, `recv[r]` from it into `dst`.
    pub fn all_to_all(
        &self,
        gpu: &Gpu,
        (src, send): (&Tensor, &[usize]),
        (dst, recv): (&Tensor, &[usize]),
        g: Group,
    ) -> Result<(), String> {
        let c = self.comm(g).ok_or("all_to_all over one rank")?;
        let (es, dt, st) = (src.dtype.size(), dtype(src.dtype), Self::stream(gpu));
        gpu.timed("nccl all_to_all", || {
            check("group start", unsafe { sys::ncclGroupStart() })?;
            let (mut so, mut ro) = (0usize, 0usize);
            let mut r = Ok(());
            for peer in 0..c.size {
                let s = (src.addr as usize + so * es) as *const c_void;
                let d = (dst.addr as usize + ro * es) as *mut c_void;
                // SAFETY: the counts add up to the tensors' sizes (checked by the caller).
                r = r
                    .and_then(|_| check("send", unsafe { sys::ncclSend(s, send[peer], dt, peer as i32, c.c, st) }))
                    .and_then(|_| check("recv", unsafe { sys::ncclRecv(d, recv[peer], dt, peer as i32, c.c, st) }));
                (so, ro) = (so + send[peer], ro + recv[peer]);
            }
            check("group end", unsafe { sys::ncclGroupEnd() })?;
            r
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let subs = [&self.dp, &self.ep, &self.grads_dp].into_iter().flatten();
        for c in subs.chain([&self.world, &self.grads]) {
            // SAFETY: made by ncclCommInitRank or ncclCommSplit, not used after this.
            unsafe { sys::ncclCommDestroy(c.c) };
        }
    }
}
