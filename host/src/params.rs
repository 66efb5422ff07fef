//! Every tensor a run declares, whoever declared it (the host's layers or a plugin): trained
//! parameters with their gradients and optimizer state, and the components' buffers and
//! accumulators (`ParamSpec::role`: no gradient, no state). One flat list, so checkpoints, the
//! optimizer, clipping and `pith plan` all see the same thing.

use crate::cpu::{view, view_mut};
use crate::rng::Rng;
use pith_plugin_api::{Group, Init, ParamSpec, Role, Tensor};
use std::ops::Range;

pub struct Param {
    /// Full name, e.g. `layers.3.moe.router.weight`.
    pub name: String,
    pub spec: ParamSpec,
    pub w: Vec<f32>,
    /// The gradient (empty for buffers and accumulators).
    pub g: Vec<f32>,
    /// Optimizer state tensors, named by the optimizer, each shaped like `w`.
    pub state: Vec<(String, Vec<f32>)>,
    /// Expert parallelism: `w` is this rank's slice of a tensor stacked by expert.
    pub shard: Option<Shard>,
    /// `[parallel] shard_optimizer`: the rank that steps this tensor (holds its optimizer state
    /// and, on CUDA, its f32 master); None: every rank of its group steps it.
    pub owner: Option<u32>,
}

/// Slice `part` of `parts` equal slices (dimension 0) of a parameter: an expert-parallel rank's
/// experts. The whole tensor is what checkpoints hold; its gradient is summed over the ranks
/// holding the same slice (`Group::DataParallel`), every other parameter's over the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub part: usize,
    pub parts: usize,
}

impl Shard {
    /// Every expert on this rank.
    pub const WHOLE: Shard = Shard { part: 0, parts: 1 };
}

impl Param {
    fn init(&mut self, seed: u64) {
        let n = self.spec.numel();
        self.w = match self.spec.init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Constant(c) => vec![c; n],
            Init::Normal(std) => {
                // A slice's values are the whole tensor's at those positions.
                let mut rng = Rng::for_name(seed, &self.name);
                rng.skip_normals(self.shard.map_or(0, |s| s.part * n) as u64);
                (0..n).map(|_| rng.normal() * std).collect()
            }
        };
        self.g = if self.trained() { vec![0.0; n] } else { Vec::new() };
    }
    /// A trained parameter (not a buffer or accumulator).
    pub fn trained(&self) -> bool {
        self.spec.role == Role::Param
    }
    pub fn shape(&self) -> Vec<usize> {
        self.spec.shape.iter().map(|&d| d as usize).collect()
    }
    /// The whole tensor's shape (this rank's slice: [`Param::shape`]).
    pub fn full_shape(&self) -> Vec<usize> {
        let mut s = self.shape();
        if let (Some(sh), Some(d0)) = (self.shard, s.first_mut()) {
            *d0 *= sh.parts;
        }
        s
    }
    /// Whether rank `rank` steps this tensor (its owner, or every rank when it has none).
    pub fn steps_on(&self, rank: u32) -> bool {
        self.owner.is_none_or(|o| o == rank)
    }
    /// The group its gradient (and accumulator) is summed over.
    pub fn group(&self) -> Group {
        if self.shard.is_some() {
            Group::DataParallel
        } else {
            Group::World
        }
    }
}

#[derive(Default)]
pub struct Params {
    pub list: Vec<Param>,
    /// Declare only (for `pith plan`): record names and shapes, allocate nothing.
    pub shapes_only: bool,
    /// While set, `add` only declares; `materialize` then initialises every declared parameter
    /// in parallel (the same values: each parameter's stream depends only on seed and name).
    pub defer: bool,
    pub(crate) pending: Vec<(usize, u64)>,
}

impl Params {
    /// Add `specs` under `prefix` (e.g. `layers.0.attn`), initialised from `seed` and each
    /// parameter's full name, so a parameter's initial value does not depend on what else
    /// the model holds. Returns the index range of the new parameters.
    pub fn add(&mut self, prefix: &str, specs: Vec<ParamSpec>, seed: u64) -> Range<usize> {
        self.add_sharded(prefix, specs, seed, None)
    }
    /// [`Params::add`] for slices `shard` of tensors stacked by expert.
    pub fn add_sharded(
        &mut self,
        prefix: &str,
        specs: Vec<ParamSpec>,
        seed: u64,
        shard: Option<Shard>,
    ) -> Range<usize> {
        let start = self.list.len();
        for spec in specs {
            let name = format!("{prefix}.{}", spec.name);
            let mut p = Param { name, spec, w: Vec::new(), g: Vec::new(), state: Vec::new(), shard, owner: None };
            if self.defer {
                self.pending.push((self.list.len(), seed));
            } else if !self.shapes_only {
                p.init(seed);
            }
            self.list.push(p);
        }
        start..self.list.len()
    }
    /// Initialise the parameters declared while `defer` was set, in parallel.
    pub fn materialize(&mut self) {
        use rayon::prelude::*;
        self.defer = false;
        let pending: std::collections::HashMap<usize, u64> = std::mem::take(&mut self.pending).into_iter().collect();
        if self.shapes_only {
            return;
        }
        self.list.par_iter_mut().enumerate().for_each(|(i, p)| {
            if let Some(&seed) = pending.get(&i) {
                p.init(seed);
            }
        });
    }
    /// Views of the weights in `r`, in declaration order.
    pub fn weights(&self, r: Range<usize>) -> Vec<Tensor> {
        self.list[r].iter().map(|p| view(&p.w, &p.shape())).collect()
    }
    /// Views of the gradients in `r`, in declaration order (numel 0 for buffers and accumulators).
    pub fn grads(&mut self, r: Range<usize>) -> Vec<Tensor> {
        self.list[r]
            .iter_mut()
            .map(|p| {
                let shape = if p.trained() { p.shape() } else { vec![0] };
                view_mut(&mut p.g, &shape)
            })
            .collect()
    }
    /// Zero every accumulator (after the step's `end_step` hooks read them).
    pub fn zero_accumulators(&mut self) {
        for p in self.list.iter_mut().filter(|p| p.spec.role == Role::Accumulator) {
            p.w.iter_mut().for_each(|w| *w = 0.0);
        }
    }
    pub fn zero_grads(&mut self) {
        for p in &mut self.list {
            p.g.iter_mut().for_each(|g| *g = 0.0);
        }
    }
    /// `[parallel] shard_optimizer`: give each trained tensor but `keep` (stepped on every rank)
    /// an owner among the `members` of its group (`Param::group`), the least loaded so far in
    /// declaration order, so every rank of a group computes the same owners and each holds about
    /// 1/n of the state.
    pub fn assign_owners(&mut self, members: impl Fn(Group) -> Vec<u32>, keep: &[usize]) {
        for g in [Group::World, Group::DataParallel] {
            let m = members(g);
            if m.len() < 2 {
                continue;
            }
            let mut load = vec![0usize; m.len()];
            let owned =
                self.list.iter_mut().enumerate().filter(|(i, p)| p.trained() && p.group() == g && !keep.contains(i));
            for (_, p) in owned {
                let i = (0..m.len()).min_by_key(|&i| load[i]).unwrap();
                load[i] += p.spec.numel();
                p.owner = Some(m[i]);
            }
        }
    }
    /// Trained parameters (buffers and accumulators are not counted).
    pub fn count(&self) -> usize {
        self.list.iter().filter(|p| p.trained()).map(|p| p.spec.numel()).sum()
    }
    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self) -> f32 {
        self.list.iter().map(|p| p.g.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>()).sum::<f64>().sqrt() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owners balance the elements over the group, in declaration order; experts' slices are
    /// owned within the data-parallel group; buffers have none.
    #[test]
    fn owners_split_the_state_evenly() {
        let mut p = Params { shapes_only: true, ..Default::default() };
        let specs = [8, 4, 4, 2, 2].map(|n| ParamSpec::new("w", &[n], Init::Zeros, true)).to_vec();
        p.add("a", specs, 1);
        p.add("buf", vec![ParamSpec::buffer("b", &[3], Init::Zeros)], 1);
        p.add_sharded("x", vec![ParamSpec::new("e", &[6], Init::Zeros, true)], 1, Some(Shard { part: 1, parts: 2 }));
        p.assign_owners(|g| if g == Group::World { vec![0, 1, 2, 3] } else { vec![1, 3] }, &[1]);
        let owners: Vec<Option<u32>> = p.list.iter().map(|p| p.owner).collect();
        assert_eq!(owners, [Some(0), None, Some(1), Some(2), Some(3), None, Some(1)]);
        assert!(p.list[2].steps_on(1) && !p.list[2].steps_on(0) && p.list[1].steps_on(2) && p.list[5].steps_on(2));
    }
}
