//! The job's layout as the trainer sees it: `[parallel] dp × ep` over the world of ranks
//! (dist/: torchrun, Slurm or `pith launch`), this rank's data-parallel and expert-parallel
//! groups, and the host-side collectives over the process group's connections — gradients and
//! accumulators on the CPU backend, the step's loss and load numbers, the stop flag, barriers.
//! Device tensors on CUDA go through NCCL instead (gpu/nccl.rs). One rank: every collective is
//! the identity and nothing is connected.
//!
//! Every rank trains on its own rows, whatever the layout: `train.micro_batch` is the global
//! number of sequences per micro-step; every rank reads the whole micro-batch and trains on its
//! slice (rows `rank·b .. (rank+1)·b`, b = micro_batch / world size) with its loss scaled by
//! 1/world. Expert parallelism (ep > 1) splits each layer's experts over `ep` consecutive ranks
//! (the `alltoall` comm schedule moves the rows); a gradient is summed over the ranks that hold
//! the same tensor: the world for everything but the experts, the data-parallel group (ranks
//! holding the same experts) for those. So a run resumed at another layout continues the same
//! run.

use crate::config::Config;
use crate::dist::{dp_ep_groups, ProcessGroup};
use crate::params::Shard;
use pith_plugin_api::Group;
use std::sync::{Mutex, PoisonError};

pub struct Parallel {
    pub rank: u32,
    pub size: u32,
    pub local_rank: u32,
    /// The ranks holding the same experts (gradients are summed over them), in order.
    pub dp: Vec<u32>,
    /// The ranks sharing one layer's experts (consecutive ranks).
    pub ep: Vec<u32>,
    pg: Option<Mutex<ProcessGroup>>,
}

impl Parallel {
    pub fn single() -> Parallel {
        Parallel { rank: 0, size: 1, local_rank: 0, dp: vec![0], ep: vec![0], pg: None }
    }

    /// Join the job the environment describes (torchrun, Slurm, `pith launch`; a single rank
    /// when none) and check `[parallel]` and the batch against it.
    pub fn init(cfg: &Config) -> Result<Parallel, String> {
        let pg = ProcessGroup::init()?;
        let (rank, size, local_rank) =
            pg.as_ref().map_or((0, 1, 0), |p| (p.world.rank, p.world.size, p.world.local_rank));
        let (dp, ep) = layout(cfg, size)?;
        let (dp_group, ep_group) = dp_ep_groups(rank, size, ep as u32)?;
        debug_assert_eq!(dp_group.len(), dp);
        Ok(Parallel { rank, size, local_rank, dp: dp_group, ep: ep_group, pg: pg.map(Mutex::new) })
    }

    pub fn members(&self, g: Group) -> Vec<u32> {
        match g {
            Group::World => (0..self.size).collect(),
            Group::DataParallel => self.dp.clone(),
            Group::ExpertParallel => self.ep.clone(),
        }
    }
    /// This rank's index in `g` and `g`'s size.
    pub fn rank_in(&self, g: Group) -> (usize, usize) {
        let m = self.members(g);
        (m.iter().position(|&r| r == self.rank).unwrap_or(0), m.len())
    }
    /// The rows of each micro-batch this rank trains on: slice `rank` of `size`.
    pub fn data_slice(&self) -> (usize, usize) {
        (self.rank as usize, self.size as usize)
    }
    /// This rank's slice of every layer's experts.
    pub fn ep_shard(&self) -> Shard {
        let (part, parts) = self.rank_in(Group::ExpertParallel);
        Shard { part, parts }
    }
    pub fn is_first(&self) -> bool {
        self.rank == 0
    }

    /// Run `f` on the process group with `g`'s members, unless `g` has one rank.
    fn with<T>(
        &self,
        g: Group,
        one: T,
        f: impl FnOnce(&mut ProcessGroup, &[u32]) -> Result<T, String>,
    ) -> Result<T, String> {
        let members = self.members(g);
        match &self.pg {
            Some(pg) if members.len() > 1 => f(&mut pg.lock().unwrap_or_else(PoisonError::into_inner), &members),
            _ => Ok(one),
        }
    }
    pub fn sum_f32(&self, g: Group, buf: &mut [f32]) -> Result<(), String> {
        self.with(g, (), |pg, m| pg.comm.all_reduce_sum(m, buf))
    }
    pub fn sum_i32(&self, g: Group, buf: &mut [i32]) -> Result<(), String> {
        self.with(g, (), |pg, m| pg.comm.all_reduce_sum(m, buf))
    }
    pub fn max_f32(&self, g: Group, buf: &mut [f32]) -> Result<(), String> {
        self.with(g, (), |pg, m| pg.comm.all_reduce_max(m, buf))
    }
    pub fn min_f32(&self, g: Group, buf: &mut [f32]) -> Result<(), String> {
        buf.iter_mut().for_each(|v| *v = -*v);
        let r = self.max_f32(g, buf);
        buf.iter_mut().for_each(|v| *v = -*v);
        r
    }
    /// Rank `root`'s `buf` on every member of `g` (root a member).
    pub fn broadcast_f32(&self, g: Group, root: u32, buf: &mut [f32]) -> Result<(), String> {
        self.with(g, (), |pg, m| pg.comm.broadcast(m, root, buf))
    }
    /// Rank 0's `buf` everywhere (the NCCL unique id).
    pub fn broadcast_i32(&self, buf: &mut [i32]) -> Result<(), String> {
        self.with(Group::World, (), |pg, m| pg.comm.broadcast(m, 0, buf))
    }
    pub fn barrier(&self) -> Result<(), String> {
        self.with(Group::World, (), |pg, m| pg.comm.barrier(m))
    }
    pub fn all_gather_f32(&self, g: Group, src: &[f32], dst: &mut [f32]) -> Result<(), String> {
        if self.members(g).len() == 1 {
            dst.copy_from_slice(src);
            return Ok(());
        }
        self.with(g, (), |pg, m| pg.comm.all_gather(m, src, dst))
    }
    pub fn reduce_scatter_f32(&self, g: Group, src: &[f32], dst: &mut [f32]) -> Result<(), String> {
        if self.members(g).len() == 1 {
            dst.copy_from_slice(src);
            return Ok(());
        }
        self.with(g, (), |pg, m| pg.comm.reduce_scatter_sum(m, src, dst))
    }
    /// Elements (not rows): `send[r]` of `src` to member r, `recv[r]` from member r into `dst`.
    pub fn all_to_all_f32(
        &self,
        g: Group,
        src: &[f32],
        send: &[usize],
        dst: &mut [f32],
        recv: &[usize],
    ) -> Result<(), String> {
        if self.members(g).len() == 1 {
            dst.copy_from_slice(src);
            return Ok(());
        }
        self.with(g, (), |pg, m| pg.comm.all_to_all_v(m, src, send, dst, recv))
    }
}

/// (dp, ep) for a world of `size` ranks, from `[parallel]` (dp 0: the world size / ep), and the
/// checks that make the layout trainable; errors name the key and what would be valid.
pub fn layout(cfg: &Config, size: u32) -> Result<(usize, usize), String> {
    let (p, size) = (&cfg.parallel, size as usize);
    let ep = p.ep.max(1);
    let experts = cfg.model.experts;
    if !experts.is_multiple_of(ep) || ep > size {
        return Err(format!(
            "{}: parallel.ep = {ep} must divide model.experts = {experts} and the job's {size} ranks (to resume on another layout: --set parallel.ep=N)",
            cfg.at("parallel", 0, "ep")
        ));
    }
    let dp = if p.dp == 0 { size / ep } else { p.dp };
    if dp * ep != size {
        return Err(format!(
            "{}: parallel.dp = {dp} × ep = {ep} is {} ranks, but this job has {size} (WORLD_SIZE / SLURM_NTASKS / pith launch --gpus); set dp = 0 to use every rank",
            cfg.at("parallel", 0, "dp"),
            dp * ep
        ));
    }
    let b = cfg.train.micro_batch;
    if !b.is_multiple_of(size) {
        return Err(format!(
            "{}: train.micro_batch = {b} sequences do not split over the job's {size} ranks: use a multiple of {size} (micro_batch counts the sequences of all ranks)",
            cfg.at("train", 0, "micro_batch")
        ));
    }
    Ok((dp, ep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_their_errors() {
        let cfg = |sets: &[&str]| Config::load(None, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let c = cfg(&["train.micro_batch=4"]);
        assert_eq!(layout(&c, 1).unwrap(), (1, 1));
        assert_eq!(layout(&c, 4).unwrap(), (4, 1));
        let e = layout(&cfg(&["train.micro_batch=3"]), 2).unwrap_err();
        assert!(e.contains("train.micro_batch = 3") && e.contains("multiple of 2"), "{e}");
        let e = layout(&cfg(&["parallel.dp=2"]), 4).unwrap_err();
        assert!(e.contains("parallel.dp = 2 × ep = 1 is 2 ranks, but this job has 4"), "{e}");
        assert_eq!(layout(&cfg(&["train.micro_batch=4", "parallel.ep=2"]), 4).unwrap(), (2, 2));
        let e = layout(&cfg(&["model.experts=6", "parallel.ep=4"]), 4).unwrap_err();
        assert!(e.contains("parallel.ep = 4 must divide model.experts = 6"), "{e}");
        let one = Parallel::single();
        let mut v = [1.0f32, 2.0];
        one.sum_f32(Group::DataParallel, &mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(
            (one.data_slice(), one.ep_shard(), one.rank_in(Group::ExpertParallel)),
            ((0, 1), Shard::WHOLE, (0, 1))
        );
    }
}
