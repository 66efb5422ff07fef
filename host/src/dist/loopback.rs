//! The loopback collective: barrier, all-reduce, broadcast, all-gather, reduce-scatter and
//! all-to-all-v on CPU slices over the rendezvous connections, for tests and laptops (multi-GPU
//! training will use NCCL). Every operation runs on a group, the list of its member ranks (the
//! world, a data-parallel or an expert-parallel group); only members call it, in the same order.
//! It is a star through the group's first member, which gathers every input, computes in group
//! order (sums add member 0, 1, 2, ... in turn) and sends each member its output, so all ranks get
//! bit-identical results whatever the timing. A failure (a rank gone or silent, mismatched calls or
//! sizes) is an error on every member, and the Loopback refuses any later operation.

use super::rendezvous::Rendezvous;
use super::World;
use std::time::{Duration, Instant};

/// An element the collective moves: f32 or i32, little-endian on the wire.
pub trait Elem: Copy + Send + 'static {
    fn encode(v: &[Self]) -> Vec<u8>;
    fn decode(b: &[u8]) -> Vec<Self>;
    fn add(a: Self, b: Self) -> Self;
    /// NaN wins, so a NaN anywhere is seen everywhere.
    fn max(a: Self, b: Self) -> Self;
}

macro_rules! elem {
    ($t:ty, $add:expr, $max:expr) => {
        impl Elem for $t {
            fn encode(v: &[$t]) -> Vec<u8> {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            fn decode(b: &[u8]) -> Vec<$t> {
                b.chunks_exact(4).map(|c| <$t>::from_le_bytes(c.try_into().unwrap())).collect()
            }
            fn add(a: $t, b: $t) -> $t {
                $add(a, b)
            }
            fn max(a: $t, b: $t) -> $t {
                $max(a, b)
            }
        }
    };
}
elem!(f32, |a: f32, b: f32| a + b, |a: f32, b: f32| if b > a || b.is_nan() { b } else { a });
elem!(i32, i32::wrapping_add, Ord::max);

pub struct Loopback {
    rv: Rendezvous,
    broken: Option<String>,
}

impl Loopback {
    pub fn new(rv: Rendezvous) -> Loopback {
        Loopback { rv, broken: None }
    }

    pub fn world(&self) -> &World {
        &self.rv.world
    }

    /// The connections, e.g. to share the NCCL unique id (`Rendezvous::broadcast`).
    pub fn rendezvous(&mut self) -> &mut Rendezvous {
        &mut self.rv
    }

    pub fn barrier(&mut self, group: &[u32]) -> Result<(), String> {
        self.star("barrier", group, Ok(vec![]), |ins| Ok(vec![vec![]; ins.len()])).map(drop)
    }

    pub fn all_reduce_sum<T: Elem>(&mut self, group: &[u32], buf: &mut [T]) -> Result<(), String> {
        self.reduce("all_reduce_sum", group, buf, T::add)
    }

    pub fn all_reduce_max<T: Elem>(&mut self, group: &[u32], buf: &mut [T]) -> Result<(), String> {
        self.reduce("all_reduce_max", group, buf, T::max)
    }

    fn reduce<T: Elem>(
        &mut self,
        op: &'static str,
        group: &[u32],
        buf: &mut [T],
        f: fn(T, T) -> T,
    ) -> Result<(), String> {
        let out = self.star(op, group, Ok(T::encode(buf)), |ins| {
            same_len(op, group, &ins)?;
            Ok(vec![T::encode(&fold(&ins, f)); ins.len()])
        })?;
        buf.copy_from_slice(&T::decode(&out));
        Ok(())
    }

    /// `buf` of rank `root` (a member) into every member's `buf`.
    pub fn broadcast<T: Elem>(&mut self, group: &[u32], root: u32, buf: &mut [T]) -> Result<(), String> {
        let at = group.iter().position(|&r| r == root);
        let mine = at.map(|_| T::encode(buf)).ok_or(format!("broadcast from rank {root}, not in the group {group:?}"));
        let out = self.star("broadcast", group, mine, |ins| {
            same_len("broadcast", group, &ins)?;
            Ok(vec![ins[at.unwrap()].clone(); ins.len()])
        })?;
        buf.copy_from_slice(&T::decode(&out));
        Ok(())
    }

    /// Every member's `src` (equal sizes), in group order, into `dst` (group size × src).
    pub fn all_gather<T: Elem>(&mut self, group: &[u32], src: &[T], dst: &mut [T]) -> Result<(), String> {
        let (me, n) = (self.rv.world.rank, group.len());
        let mine = (dst.len() == n * src.len()).then(|| T::encode(src)).ok_or(format!(
            "rank {me}: all_gather of {} elements over {n} ranks needs a dst of {}, not {}",
            src.len(),
            n * src.len(),
            dst.len()
        ));
        let out = self.star("all_gather", group, mine, |ins| {
            same_len("all_gather", group, &ins)?;
            Ok(vec![ins.concat(); ins.len()])
        })?;
        dst.copy_from_slice(&T::decode(&out));
        Ok(())
    }

    /// The sum of every member's `src` (group size × dst), member i getting the i-th part.
    pub fn reduce_scatter_sum<T: Elem>(&mut self, group: &[u32], src: &[T], dst: &mut [T]) -> Result<(), String> {
        let (me, n, k) = (self.rv.world.rank, group.len(), dst.len());
        let mine = (src.len() == n * k).then(|| T::encode(src)).ok_or(format!(
            "rank {me}: reduce_scatter_sum of a dst of {k} over {n} ranks needs a src of {}, not {}",
            n * k,
            src.len()
        ));
        let out = self.star("reduce_scatter_sum", group, mine, |ins| {
            same_len("reduce_scatter_sum", group, &ins)?;
            let sum = fold(&ins, T::add);
            Ok((0..n).map(|i| T::encode(&sum[i * k..(i + 1) * k])).collect())
        })?;
        dst.copy_from_slice(&T::decode(&out));
        Ok(())
    }

    /// Member i sends `send_counts[j]` elements of `src` (in member order) to member j and
    /// receives `recv_counts[j]` elements from member j into `dst` (in member order).
    pub fn all_to_all_v<T: Elem>(
        &mut self,
        group: &[u32],
        src: &[T],
        send_counts: &[usize],
        dst: &mut [T],
        recv_counts: &[usize],
    ) -> Result<(), String> {
        let (me, n) = (self.rv.world.rank, group.len());
        let (sends, recvs) = (send_counts.iter().sum::<usize>(), recv_counts.iter().sum::<usize>());
        let mine = if send_counts.len() != n || recv_counts.len() != n {
            Err(format!("rank {me}: all_to_all_v over {n} ranks needs {n} send and recv counts"))
        } else if src.len() != sends || dst.len() != recvs {
            Err(format!(
                "rank {me}: all_to_all_v: src has {} elements and send_counts add up to {sends}; dst has {} and recv_counts {recvs}",
                src.len(),
                dst.len()
            ))
        } else {
            let mut b: Vec<u8> =
                send_counts.iter().chain(recv_counts).flat_map(|&c| (c as u64).to_le_bytes()).collect();
            b.extend(T::encode(src));
            Ok(b)
        };
        let out = self.star("all_to_all_v", group, mine, |ins| {
            let count = |b: &[u8], k: usize| u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().unwrap()) as usize;
            let mut outs = vec![Vec::new(); n];
            for (i, b) in ins.iter().enumerate() {
                let mut at = 16 * n;
                for j in 0..n {
                    let (sends, expects) = (count(b, j), count(&ins[j], n + i));
                    if sends != expects {
                        let (gi, gj) = (group[i], group[j]);
                        return Err(format!(
                            "rank {gj} expects {expects} elements from rank {gi}, which sends it {sends}, in all_to_all_v"
                        ));
                    }
                    outs[j].extend_from_slice(&b[at..at + 4 * sends]);
                    at += 4 * sends;
                }
            }
            Ok(outs)
        })?;
        dst.copy_from_slice(&T::decode(&out));
        Ok(())
    }

    /// Send `mine` to the group's first member, which runs `root` on every input (in group order)
    /// and answers each member; returns this member's answer. An error anywhere reaches everyone.
    fn star(
        &mut self,
        op: &'static str,
        group: &[u32],
        mine: Result<Vec<u8>, String>,
        root: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, String>,
    ) -> Result<Vec<u8>, String> {
        if let Some(e) = &self.broken {
            return Err(format!("the process group failed earlier: {e}"));
        }
        let result = self.exchange(op, group, mine, root);
        if let Err(e) = &result {
            self.broken = Some(e.clone());
        }
        result
    }

    fn exchange(
        &mut self,
        op: &'static str,
        group: &[u32],
        mine: Result<Vec<u8>, String>,
        root: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, String>,
    ) -> Result<Vec<u8>, String> {
        let (me, size) = (self.rv.world.rank, self.rv.world.size);
        if !group.contains(&me) {
            return Err(format!("rank {me} called {op} on the group {group:?}, which does not include it"));
        }
        if let Some(r) = group.iter().find(|&&r| r >= size) {
            return Err(format!("{op}: the group {group:?} has rank {r}, but the ranks are 0..{size}"));
        }
        if (1..group.len()).any(|i| group[..i].contains(&group[i])) {
            return Err(format!("{op}: the group {group:?} lists a rank twice"));
        }
        let first = group[0] as usize;
        if me as usize != first {
            match mine {
                Ok(b) => self.rv.send(first, op, &b)?,
                Err(e) => {
                    let _ = self.rv.send(first, "abort", e.as_bytes());
                    return Err(e);
                }
            }
            // A second longer than the root waits, so the root's error (naming the culprit) comes first.
            return self.rv.recv(first, op, Instant::now() + self.rv.timeout + Duration::from_secs(1));
        }
        let deadline = Instant::now() + self.rv.timeout;
        let result = mine
            .and_then(|b| {
                let mut ins = vec![b];
                for &r in &group[1..] {
                    ins.push(self.rv.recv(r as usize, op, deadline)?);
                }
                root(ins)
            })
            .and_then(|mut outs| {
                for (i, &r) in group.iter().enumerate().skip(1) {
                    self.rv.send(r as usize, op, &outs[i])?;
                }
                Ok(outs.swap_remove(0))
            });
        if let Err(e) = &result {
            group[1..].iter().for_each(|&r| drop(self.rv.send(r as usize, "abort", e.as_bytes())));
        }
        result
    }
}

/// Every member's input the same size, or an error naming the first that differs.
fn same_len(op: &'static str, group: &[u32], ins: &[Vec<u8>]) -> Result<(), String> {
    match ins.iter().position(|b| b.len() != ins[0].len()) {
        None => Ok(()),
        Some(i) => Err(format!(
            "rank {} passed {} elements to {} where rank {} passed {}",
            group[i],
            ins[i].len() / 4,
            op,
            group[0],
            ins[0].len() / 4
        )),
    }
}

/// `f` over the inputs elementwise, in member order.
fn fold<T: Elem>(ins: &[Vec<u8>], f: fn(T, T) -> T) -> Vec<T> {
    let mut acc = T::decode(&ins[0]);
    for b in &ins[1..] {
        acc.iter_mut().zip(T::decode(b)).for_each(|(a, x)| *a = f(*a, x));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::rendezvous::tests::ranks;
    use super::*;

    /// `f(rank, loopback)` on every rank of a world of `size`, results by rank.
    fn run<T: Send + 'static>(size: u32, f: impl Fn(u32, &mut Loopback) -> T + Send + Sync + 'static) -> Vec<T> {
        ranks(size, move |rv| {
            let mut lb = Loopback::new(rv.unwrap());
            f(lb.world().rank, &mut lb)
        })
    }

    #[test]
    fn collectives_are_exact_and_the_same_on_every_rank() {
        let out = run(4, |r, lb| {
            let all = [0, 1, 2, 3];
            lb.barrier(&all).unwrap();
            // Summed in rank order: ((1e8 + 1) - 1e8) + 1 = 1 in f32 (other orders give 0 or 2).
            let mut s = [[1e8f32, 1.0, -1e8, 1.0][r as usize], r as f32];
            lb.all_reduce_sum(&all, &mut s).unwrap();
            let mut m = [r as f32, if r == 2 { f32::NAN } else { 0.0 }];
            lb.all_reduce_max(&all, &mut m).unwrap();
            let mut i = [r as i32 - 1];
            lb.all_reduce_sum(&all, &mut i).unwrap();
            let mut b = [r as i32; 3];
            lb.broadcast(&all, 2, &mut b).unwrap();
            let mut g = vec![0f32; 8];
            lb.all_gather(&all, &[r as f32, 10.0 * r as f32], &mut g).unwrap();
            let mut rs = [0i32; 2];
            lb.reduce_scatter_sum(&all, &(0..8).map(|x| x * (r as i32 + 1)).collect::<Vec<_>>(), &mut rs).unwrap();
            // Rank r sends j+1 copies of 100r+j to rank j, so it receives r+1 elements from each.
            let send: Vec<usize> = (1..=4).collect();
            let src: Vec<i32> = (0..4).flat_map(|j| vec![100 * r as i32 + j; j as usize + 1]).collect();
            let mut dst = vec![0i32; 4 * (r as usize + 1)];
            lb.all_to_all_v(&all, &src, &send, &mut dst, &[r as usize + 1; 4]).unwrap();
            (s, m, i[0], b, g, rs, dst)
        });
        for (r, (s, m, i, b, g, rs, dst)) in out.into_iter().enumerate() {
            assert_eq!(s, [1.0, 6.0]);
            assert!(m[0] == 3.0 && m[1].is_nan());
            assert_eq!((i, b), (2, [2; 3]));
            assert_eq!(g, [0.0, 0.0, 1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
            assert_eq!(rs, [20 * r as i32, 10 * (2 * r as i32 + 1)]);
            let want: Vec<i32> = (0..4).flat_map(|i| vec![100 * i + r as i32; r + 1]).collect();
            assert_eq!(dst, want);
        }
    }

    #[test]
    fn data_and_expert_parallel_groups_share_the_mesh() {
        // World 4 = dp 2 × ep 2: ep {0,1} {2,3}, dp {0,2} {1,3}; {2,3} runs without rank 0.
        let out = run(4, |r, lb| {
            let (dp, ep) = super::super::dp_ep_groups(r, 4, 2).unwrap();
            let mut x = [1 << r];
            lb.all_reduce_sum(&ep, &mut x).unwrap();
            let mut y = [1 << r];
            lb.all_reduce_sum(&dp, &mut y).unwrap();
            let mut z = [0i32; 2];
            lb.all_gather(&ep, &[r as i32], &mut z).unwrap();
            (x[0], y[0], z)
        });
        assert_eq!(out, [(3, 5, [0, 1]), (3, 10, [0, 1]), (12, 5, [2, 3]), (12, 10, [2, 3])]);
    }

    #[test]
    fn failures_are_errors_naming_the_rank_on_every_member() {
        let both = |f: fn(u32, &mut Loopback) -> Result<(), String>| run(2, f).into_iter().map(|e| e.unwrap_err());
        for e in both(|r, lb| {
            if r == 0 {
                lb.all_reduce_sum(&[0, 1], &mut [0f32])
            } else {
                lb.all_gather(&[0, 1], &[0f32], &mut [0f32; 2])
            }
        }) {
            assert_eq!(e, "rank 1 called all_gather where rank 0 called all_reduce_sum");
        }
        for e in both(|r, lb| lb.all_reduce_sum(&[0, 1], &mut vec![0f32; 2 + r as usize])) {
            assert_eq!(e, "rank 1 passed 3 elements to all_reduce_sum where rank 0 passed 2");
        }
        for e in both(|r, lb| lb.all_gather(&[0, 1], &[0f32], &mut vec![0f32; 2 + r as usize])) {
            assert_eq!(e, "rank 1: all_gather of 1 elements over 2 ranks needs a dst of 2, not 3");
        }
        let errs: Vec<_> = both(|r, lb| {
            let send = [1, 1 + r as usize];
            lb.all_to_all_v(&[0, 1], &vec![0i32; 2 + r as usize], &send, &mut [0i32; 2], &[1, 1])
        })
        .collect();
        assert_eq!(errs[0], "rank 1 expects 1 elements from rank 1, which sends it 2, in all_to_all_v");
        // Rank 1 leaves; then rank 1 stays but says nothing.
        let out = run(2, |r, lb| {
            if r == 1 {
                return vec![];
            }
            let left = lb.all_reduce_sum(&[0, 1], &mut [0f32]).unwrap_err();
            let after = lb.barrier(&[0, 1]).unwrap_err();
            vec![left, after]
        });
        assert_eq!(out[0][0], "rank 1 left the job (connection closed) during all_reduce_sum");
        assert_eq!(out[0][1], format!("the process group failed earlier: {}", out[0][0]));
        let out = run(2, |r, lb| {
            lb.rv.timeout = Duration::from_millis(300);
            if r == 1 {
                std::thread::sleep(Duration::from_millis(1000));
                return String::new();
            }
            lb.barrier(&[0, 1]).unwrap_err()
        });
        assert_eq!(out[0], "rank 1 sent nothing for 0.3 s during barrier");
        let out = run(2, |_, lb| lb.barrier(&[1, 2]).unwrap_err());
        assert_eq!(out[0], "rank 0 called barrier on the group [1, 2], which does not include it");
        assert_eq!(out[1], "barrier: the group [1, 2] has rank 2, but the ranks are 0..2");
    }
}
