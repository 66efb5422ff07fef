//! Training data: the [`Dataset`] the train loop draws batches from, over one of two sources.
//!
//! - `synthetic.rs`: the built-in corpus ([`Synthetic`]): no files, known entropy.
//! - `shards.rs`: llm.c-style `.bin` token shards ([`write_shard`], [`Shard`]), a set of them
//!   read as one stream, and finding the files a `data.source` / `data.val` names.
//! - `prepare.rs`: `pith data prepare` ([`prepare()`]): text/JSONL → shards.
//! - here: [`Split`] and [`Dataset`], which picks a source and walks it.
//!
//! Val convention: `data.val` (a shard file, directory or glob) when set; otherwise the
//! `val_*.bin` files next to the `train_*.bin` shards (as `prepare` writes them), or, for
//! `synthetic`, a disjoint sample stream of the same corpus.

mod prepare;
mod shards;
mod synthetic;

pub use prepare::{decode_bytes, prepare, PrepareSummary, SEPARATORS};
pub use shards::{write_shard, Shard, HEADER_BYTES, MAGIC};
pub use synthetic::Synthetic;

use crate::config::DataConfig;
use crate::rng::Rng;
use shards::{default_val, resolve, ShardSet};

/// Which part of the data: what the model trains on, or the held-out part it is evaluated on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

enum Source {
    Synthetic { corpus: Synthetic, stream: u64 },
    Shards(ShardSet),
}

/// A stream of training windows over the synthetic corpus or a list of shards.
///
/// Its whole state is [`Dataset::position`], so a resumed run continues exactly where it stopped:
/// for `synthetic`, the number of sequences drawn (sequence `i` is a pure function of seed,
/// split and `i`); for shards, the number of tokens advanced through the concatenated shards,
/// taken modulo their total (windows wrap around at the end).
pub struct Dataset {
    source: Source,
    position: u64,
}

impl Dataset {
    /// Open the `split` of the data `cfg` names, for a model with `vocab` tokens.
    ///
    /// `seed` picks the synthetic corpus and its sample streams (every rank of a run must pass
    /// the same seed and take different rows or positions); shards are walked in file order from
    /// position 0 whatever the seed. Val data: `cfg.val` when set; else the synthetic val stream,
    /// or the `val_*.bin` next to the `train_*.bin` shards (an error when there are none). A
    /// source is `synthetic`, a shard file, a directory (its `train_*.bin` / `val_*.bin` for
    /// that split when present, else every `*.bin`) or a glob in the file name
    /// (`dir/train_*.bin`). A token id ≥ `vocab` in a shard is an error naming the file.
    pub fn open(cfg: &DataConfig, vocab: usize, seed: u64, split: Split) -> Result<Dataset, String> {
        let files = match (split, &cfg.val) {
            (Split::Val, Some(val)) => resolve(val, split)?,
            _ if cfg.source == "synthetic" => {
                if vocab < 64 {
                    return Err("data.source = synthetic needs model.vocab >= 64".into());
                }
                let name = ["data/synthetic/train", "data/synthetic/val"][split as usize];
                let stream = Rng::for_name(seed, name).next_u64();
                let corpus = Synthetic::new(vocab, seed);
                let source = Source::Synthetic { corpus, stream };
                return Ok(Dataset { source, position: 0 });
            }
            (Split::Train, _) => resolve(&cfg.source, split)?,
            (Split::Val, None) => default_val(&cfg.source)?,
        };
        let source = Source::Shards(ShardSet::open(&files, vocab)?);
        Ok(Dataset { source, position: 0 })
    }

    /// The next `batch` windows of `seq_len + 1` tokens, as row-major `batch × seq_len` inputs
    /// and targets (the same window shifted by one). Shard windows start `seq_len` apart, so
    /// every token is a target once per pass; shards shorter than one window are an error.
    pub fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<(Vec<u32>, Vec<u32>), String> {
        let mut tokens = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        let mut window = Vec::with_capacity(seq_len + 1);
        for row in 0..batch as u64 {
            window.clear();
            match &self.source {
                Source::Synthetic { corpus, stream } => {
                    let index = (self.position + row).wrapping_mul(0xD1B5_4A32_D192_ED03);
                    let mut rng = Rng::new(Rng::new(stream ^ index).next_u64());
                    corpus.sample(&mut rng, seq_len + 1, &mut window);
                }
                Source::Shards(set) if set.total <= seq_len as u64 => {
                    let (first, total) = (set.shards[0].path().display(), set.total);
                    let msg = format!("{total} tokens in all, less than one window of seq_len + 1");
                    return Err(format!("{first} (and the rest of its set): {msg}"));
                }
                Source::Shards(set) => {
                    let at = self.position + row * seq_len as u64;
                    set.read(at, seq_len + 1, &mut window);
                }
            }
            tokens.extend_from_slice(&window[..seq_len]);
            targets.extend_from_slice(&window[1..]);
        }
        let per_row = match self.source {
            Source::Synthetic { .. } => 1,
            Source::Shards(_) => seq_len as u64,
        };
        self.position += batch as u64 * per_row;
        Ok((tokens, targets))
    }

    /// Where the next batch starts (sequences drawn, or tokens advanced for shards).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Continue from a position saved by [`Dataset::position`].
    pub fn set_position(&mut self, position: u64) {
        self.position = position;
    }

    /// The synthetic corpus (for its entropies), or None for shards.
    pub fn synthetic(&self) -> Option<&Synthetic> {
        match &self.source {
            Source::Synthetic { corpus, .. } => Some(corpus),
            Source::Shards(_) => None,
        }
    }
}

/// Helpers shared by the tests of this module and its submodules.
#[cfg(test)]
mod testutil {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A unique temp directory, removed on drop.
    pub(super) struct TempDir(pub(super) PathBuf);
    impl TempDir {
        pub(super) fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("pith-data-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(super) fn data(source: &str, val: Option<&str>) -> DataConfig {
        let (source, val) = (source.into(), val.map(String::from));
        DataConfig { source, val }
    }

    /// Open `split` of a shard source (no val override) for vocab `vocab`.
    pub(super) fn open_shards(source: &Path, vocab: usize, split: Split) -> Result<Dataset, String> {
        Dataset::open(&data(&source.display().to_string(), None), vocab, 1, split)
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{data, open_shards, TempDir};
    use super::*;
    use std::path::Path;

    #[test]
    fn shard_dataset_walks_windows_resumes_and_finds_val() {
        let dir = TempDir::new("dataset");
        let stream: Vec<u32> = (0..250).map(|i| i as u32 % 200).collect();
        write_shard(&dir.0.join("train_000000.bin"), &stream[..100], 256).unwrap();
        write_shard(&dir.0.join("train_000001.bin"), &stream[100..], 256).unwrap();
        write_shard(&dir.0.join("val_000000.bin"), &[1, 2, 3, 4], 256).unwrap();
        let root = dir.0.display().to_string();
        for source in [root.clone(), format!("{root}/train_*.bin")] {
            let mut d = Dataset::open(&data(&source, None), 256, 1, Split::Train).unwrap();
            let (x, y) = d.next_batch(2, 8).unwrap();
            assert_eq!(x, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
            assert_eq!(y, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
            assert_eq!(d.position(), 16);
            d.set_position(96); // crosses the shard boundary, then wraps around the end
            assert_eq!(d.next_batch(1, 8).unwrap().0, stream[96..104]);
            d.set_position(245);
            assert_eq!(d.next_batch(1, 8).unwrap().1, [46, 47, 48, 49, 0, 1, 2, 3]);
            let mut v = Dataset::open(&data(&source, None), 256, 1, Split::Val).unwrap();
            assert_eq!(v.next_batch(1, 3).unwrap(), (vec![1, 2, 3], vec![2, 3, 4]));
        }
        let err = open_shards(&dir.0, 100, Split::Train).err().unwrap();
        assert!(err.contains("train_000001.bin") && err.contains("token id 100 at index 0"), "{err}");
        let single = format!("{root}/val_000000.bin");
        let err = open_shards(Path::new(&single), 256, Split::Val).err().unwrap();
        assert!(err.contains("no held-out data"), "{err}");
        let mut v = Dataset::open(&data(&root, Some(&single)), 256, 1, Split::Val).unwrap();
        let err = v.next_batch(1, 4).unwrap_err();
        assert!(err.contains("val_000000.bin") && err.contains("4 tokens"), "{err}");
        let err = open_shards(&dir.0.join("nope_*.bin"), 256, Split::Train).err().unwrap();
        assert!(err.contains("no .bin token shards found"), "{err}");
    }

    #[test]
    fn synthetic_position_reproduces_batches() {
        let cfg = data("synthetic", None);
        let mut a = Dataset::open(&cfg, 256, 9, Split::Train).unwrap();
        a.next_batch(3, 16).unwrap();
        let at = a.position();
        let want = [a.next_batch(3, 16).unwrap(), a.next_batch(3, 16).unwrap()];
        let mut b = Dataset::open(&cfg, 256, 9, Split::Train).unwrap();
        b.set_position(at);
        assert_eq!([b.next_batch(3, 16).unwrap(), b.next_batch(3, 16).unwrap()], want);
    }
}
