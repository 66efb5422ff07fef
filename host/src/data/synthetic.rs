//! The built-in synthetic corpus: no files, deterministic from (vocab, seed), with known
//! entropy, so a loss can be judged against what is learnable.

use crate::rng::Rng;

const SOURCES: usize = 4;
const SUCCESSORS: usize = 4;
/// Log-normal spread of the successor weights: most states have one or two likely successors.
const SPREAD: f64 = 1.5;

/// One source: a first-order Markov chain over its slice of the vocabulary, the tokens
/// `start, start+1, … (mod vocab)`; states are indices into the slice.
struct Chain {
    start: usize,
    next: Vec<[u32; SUCCESSORS]>,
    prob: Vec<[f64; SUCCESSORS]>,
    /// The stationary distribution (every sequence starts in it) and its running sum.
    pi: Vec<f64>,
    pi_cum: Vec<f64>,
}

impl Chain {
    fn new(rng: &mut Rng, start: usize, n: usize) -> Chain {
        // Successor 0 follows one random cycle through all states, so the chain is irreducible;
        // the others are random distinct states of the slice.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut cycle = vec![0u32; n];
        for k in 0..n {
            cycle[order[k]] = order[(k + 1) % n] as u32;
        }
        let (mut next, mut prob) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &c in &cycle {
            let mut succ = [c; SUCCESSORS];
            let mut k = 1;
            while k < SUCCESSORS {
                let s = rng.below(n) as u32;
                if !succ[..k].contains(&s) {
                    succ[k] = s;
                    k += 1;
                }
            }
            let w: [f64; SUCCESSORS] = std::array::from_fn(|_| (SPREAD * rng.normal() as f64).exp());
            let total: f64 = w.iter().sum();
            next.push(succ);
            prob.push(w.map(|x| x / total));
        }
        // Power iteration on the lazy chain (I + P) / 2: the same stationary distribution, and
        // it converges for any irreducible chain, periodic or not.
        let mut pi = vec![1.0 / n as f64; n];
        for _ in 0..100_000 {
            let mut step = vec![0.0; n];
            for i in 0..n {
                for k in 0..SUCCESSORS {
                    step[next[i][k] as usize] += pi[i] * prob[i][k];
                }
            }
            let mut change = 0.0;
            for (p, s) in pi.iter_mut().zip(&step) {
                change += (0.5 * (s - *p)).abs();
                *p = 0.5 * (*p + s);
            }
            if change < 1e-14 {
                break;
            }
        }
        let total: f64 = pi.iter().sum();
        pi.iter_mut().for_each(|p| *p /= total);
        let mut pi_cum = pi.clone();
        for i in 1..n {
            pi_cum[i] += pi_cum[i - 1];
        }
        Chain { start, next, prob, pi, pi_cum }
    }
}

/// Entropy in nats of a distribution.
fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&x| x > 0.0).map(|x| x * x.ln()).sum::<f64>()
}

/// Uniform f64 in [0, 1) with 53 random bits.
fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The built-in corpus: no files, deterministic from (vocab, seed), with known entropy.
///
/// A mixture of 4 equally likely sources; source `s` is a random sparse first-order Markov chain
/// over the 3·vocab/8 tokens from `s·vocab/4` on (wrapping), so neighbouring sources share a
/// third of their tokens and every token belongs to one or two sources. Each state has 4
/// successors with log-normal weights. A sequence picks one source, starts in that chain's
/// stationary distribution and walks it, so the marginal at every position is exactly the
/// unigram distribution Σ_s π_s / 4.
pub struct Synthetic {
    vocab: usize,
    chains: Vec<Chain>,
    unigram: f64,
    floor: f64,
    source_cost: f64,
}

impl Synthetic {
    /// Build the corpus for `vocab` (at least 64; panics below) from `seed`.
    pub fn new(vocab: usize, seed: u64) -> Synthetic {
        assert!(vocab >= 64, "the synthetic corpus needs vocab >= 64");
        let mut rng = Rng::for_name(seed, "data/synthetic/chains");
        let chains: Vec<Chain> =
            (0..SOURCES).map(|s| Chain::new(&mut rng, s * vocab / SOURCES, 3 * vocab / 8)).collect();
        let w = 1.0 / SOURCES as f64;
        let mut marginal = vec![0.0; vocab];
        let (mut floor, mut h_given_source) = (0.0, 0.0);
        for c in &chains {
            for (i, (p, row)) in c.pi.iter().zip(&c.prob).enumerate() {
                marginal[(c.start + i) % vocab] += w * p;
                floor += w * p * entropy(row);
            }
            h_given_source += w * entropy(&c.pi);
        }
        let unigram = entropy(&marginal);
        // H(S | X0) = H(S) + H(X0 | S) - H(X0).
        let source_cost = (SOURCES as f64).ln() + h_given_source - unigram;
        Synthetic { vocab, chains, unigram, floor, source_cost }
    }

    /// Entropy in nats of the marginal token distribution: the loss of the best model that
    /// ignores context. A loss below this proves the model learned something.
    pub fn unigram_entropy(&self) -> f64 {
        self.unigram
    }

    /// The entropy rate in nats/token, Σ_s w_s Σ_i π_s(i) H(P_s(i, ·)): the loss of a perfect
    /// model that knows the source and the previous token. Not knowing the source at the start of
    /// a sequence costs [`Synthetic::source_id_cost`] nats or less in total per sequence, so the
    /// best mean loss over `T` predictions lies in [floor, floor + source_id_cost / T].
    pub fn entropy_floor(&self) -> f64 {
        self.floor
    }

    /// H(source | first token) in nats (≤ ln 4): the most a perfect model loses, in total over
    /// one sequence, to working out which source the sequence comes from.
    pub fn source_id_cost(&self) -> f64 {
        self.source_cost
    }

    /// Append one sequence of `len` tokens drawn with `rng` to `out`.
    pub fn sample(&self, rng: &mut Rng, len: usize, out: &mut Vec<u32>) {
        let c = &self.chains[rng.below(SOURCES)];
        let u = unit(rng);
        let mut s = c.pi_cum.partition_point(|&x| x <= u).min(c.pi.len() - 1);
        for _ in 0..len {
            out.push(((c.start + s) % self.vocab) as u32);
            let (u, row) = (unit(rng), &c.prob[s]);
            let (mut k, mut acc) = (0, row[0]);
            while k + 1 < SUCCESSORS && acc <= u {
                k += 1;
                acc += row[k];
            }
            s = c.next[s][k] as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::data;
    use crate::data::{Dataset, Split};

    #[test]
    fn synthetic_is_deterministic_with_known_entropy() {
        let cfg = data("synthetic", None);
        let open = |split| Dataset::open(&cfg, 256, 1, split).unwrap();
        let (mut a, mut b, mut val) = (open(Split::Train), open(Split::Train), open(Split::Val));
        assert_eq!(a.next_batch(4, 64).unwrap(), b.next_batch(4, 64).unwrap());
        assert_ne!(a.next_batch(4, 64).unwrap(), val.next_batch(4, 64).unwrap(), "val must be a different stream");
        // Empirical unigram entropy over ~200k tokens.
        let mut counts = vec![0u64; 256];
        for _ in 0..50 {
            let (tokens, _) = a.next_batch(64, 64).unwrap();
            tokens.iter().for_each(|&t| counts[t as usize] += 1);
        }
        let n = counts.iter().sum::<u64>() as f64;
        let p: Vec<f64> = counts.iter().map(|&c| c as f64 / n).collect();
        let s = a.synthetic().unwrap();
        let (h, u, floor) = (entropy(&p), s.unigram_entropy(), s.entropy_floor());
        assert!((h - u).abs() < 0.02 * u, "empirical {h} vs exact {u}");
        assert!(floor * 1.5 < u && floor > 0.5, "floor {floor}, unigram {u}");
        assert!(s.source_id_cost() > 0.0 && s.source_id_cost() < (SOURCES as f64).ln());
        for v in [64, 1000, 70_000] {
            let s = Synthetic::new(v, 3);
            assert!(s.entropy_floor() * 1.5 < s.unigram_entropy(), "vocab {v}");
        }
    }

    #[test]
    fn bayes_optimal_loss_lies_between_floor_and_floor_plus_id_cost() {
        // The exact posterior-over-sources predictor on sampled sequences.
        let (s, t) = (Synthetic::new(256, 1), 64);
        let mut rng = Rng::new(5);
        let (mut loss, mut count) = (0.0, 0);
        let local = |c: &Chain, x: u32| Some((x as usize + 256 - c.start) % 256).filter(|&i| i < c.pi.len());
        for _ in 0..2000 {
            let mut seq = Vec::new();
            s.sample(&mut rng, t + 1, &mut seq);
            let mut post: Vec<f64> = s.chains.iter().map(|c| local(c, seq[0]).map_or(0.0, |i| c.pi[i])).collect();
            for w in seq.windows(2) {
                let step = s.chains.iter().map(|c| match (local(c, w[0]), local(c, w[1])) {
                    (Some(i), Some(j)) => {
                        (0..SUCCESSORS).filter(|&k| c.next[i][k] as usize == j).map(|k| c.prob[i][k]).sum()
                    }
                    _ => 0.0,
                });
                let step: Vec<f64> = step.collect();
                let (z, p): (f64, f64) = (post.iter().sum(), post.iter().zip(&step).map(|(a, b)| a * b).sum());
                loss -= (p / z).ln();
                count += 1;
                post.iter_mut().zip(&step).for_each(|(a, b)| *a *= b / p);
            }
        }
        let (mean, floor) = (loss / count as f64, s.entropy_floor());
        let top = floor + s.source_id_cost() / t as f64;
        assert!(mean > floor - 0.01 && mean < top + 0.01, "Bayes loss {mean}, floor {floor}, bound {top}");
    }
}
