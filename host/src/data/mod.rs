//! Training data: the [`Dataset`] the train loop draws batches from, over one of two sources.
//!
//! - `synthetic.rs`: the built-in corpus ([`Synthetic`]): no files, known entropy.
//! - `shards.rs`: llm.c-style `.bin` token shards ([`write_shard`], [`Shard`]), a set of them
//!   read as one stream, and finding the files a `data.source` / `data.val` names.
//! - `prepare.rs`: `pith data prepare` ([`prepare()`]): text/JSONL → shards.
//! - here: [`Split`] and [`Dataset`], which picks a source and walks it, and [`check_inputs`],
//!   which reads both splits once before a run so that bad data fails before step 1.
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
    /// The config key the data comes from, for errors: `data.source = "…"` or `data.val = "…"`.
    key: String,
}

impl Dataset {
    /// Open the `split` of the data `cfg` names, for a model with `vocab` tokens.
    ///
    /// `seed` picks the synthetic corpus and its sample streams (every rank of a run must pass
    /// the same seed and take different rows or positions); shards are walked in file order from
    /// position 0 whatever the seed. Val data: `cfg.val` when set; else the synthetic val stream,
    /// or the `val_*.bin` next to the `train_*.bin` shards (an error when there are none). A
    /// source is `synthetic`, a shard file, a directory (its `train_*.bin` / `val_*.bin` for
    /// that split when it holds such files, else every `*.bin`) or a glob in the file name
    /// (`dir/train_*.bin`). A token id ≥ `vocab` in a shard is an error naming the file. Every
    /// error names the config key and its value.
    pub fn open(cfg: &DataConfig, vocab: usize, seed: u64, split: Split) -> Result<Dataset, String> {
        let key = key(cfg, split);
        if is_synthetic(cfg, split) {
            if vocab < 64 {
                return Err("data.source = synthetic needs model.vocab >= 64".into());
            }
            let name = ["data/synthetic/train", "data/synthetic/val"][split as usize];
            let stream = Rng::for_name(seed, name).next_u64();
            let corpus = Synthetic::new(vocab, seed);
            let source = Source::Synthetic { corpus, stream };
            return Ok(Dataset { source, position: 0, key });
        }
        let files = match (split, &cfg.val) {
            (Split::Val, Some(val)) => resolve(val, split),
            (Split::Train, _) => resolve(&cfg.source, split),
            (Split::Val, None) => default_val(&cfg.source),
        };
        let set = files.and_then(|f| ShardSet::open(&f, vocab)).map_err(|e| format!("{key}: {e}"))?;
        Ok(Dataset { source: Source::Shards(set), position: 0, key })
    }

    /// The next `batch` windows of `seq_len + 1` tokens, as row-major `batch × seq_len` inputs
    /// and targets (the same window shifted by one). Shard windows start `seq_len` apart, so
    /// every token is a target once per pass; shards shorter than one window are an error, and
    /// so is a shard that shrank since it was opened.
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
                    let files = match set.shards.len() {
                        1 => set.shards[0].path().display().to_string(),
                        n => format!("{} and {} more shards", set.shards[0].path().display(), n - 1),
                    };
                    let msg = format!(
                        "{} tokens in all, fewer than one window of model.seq_len + 1 = {}",
                        set.total,
                        seq_len + 1
                    );
                    return Err(format!("{}: {files}: {msg}", self.key));
                }
                Source::Shards(set) => {
                    let at = self.position + row * seq_len as u64;
                    set.read(at, seq_len + 1, &mut window).map_err(|e| format!("{}: {e}", self.key))?;
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

/// Check, before any work, that the data `cfg` names reads as training and eval will read it,
/// for a model of `vocab` tokens and batches of `micro_batch` × `seq_len`: for the train and the
/// val split (found as [`Dataset::open`] finds them), the shard files exist, their headers are
/// valid, every token id is below `vocab` (a linear scan), and the split holds at least one
/// window of `seq_len + 1` tokens (a first batch is read). Synthetic splits need no check.
/// Errors are one line naming the config key, its value and the shard file. Val shards that are
/// also train shards are a warning, not an error: the val loss then measures nothing held out.
pub fn check_inputs(cfg: &DataConfig, vocab: usize, seq_len: usize, micro_batch: usize) -> Result<(), String> {
    let mut files = Vec::new();
    for split in [Split::Train, Split::Val] {
        if is_synthetic(cfg, split) {
            continue;
        }
        let mut data = Dataset::open(cfg, vocab, 0, split)?;
        data.next_batch(micro_batch.max(1), seq_len)?;
        if let Source::Shards(set) = &data.source {
            files.push(set.shards.iter().filter_map(|s| std::fs::canonicalize(s.path()).ok()).collect::<Vec<_>>());
        }
    }
    if let [train, val] = &files[..] {
        if let Some(f) = val.iter().find(|f| train.contains(f)) {
            let key = key(cfg, Split::Val);
            tracing::warn!("{key}: {} is also training data: the val loss will not measure held-out text", f.display());
        }
    }
    Ok(())
}

/// Whether `split` of `cfg` is drawn from the synthetic corpus.
fn is_synthetic(cfg: &DataConfig, split: Split) -> bool {
    cfg.source == "synthetic" && (split == Split::Train || cfg.val.is_none())
}

/// The config key (and value) `split` of `cfg` comes from, as errors name it.
fn key(cfg: &DataConfig, split: Split) -> String {
    match (split, &cfg.val) {
        (Split::Train, _) => format!("data.source = {:?}", cfg.source),
        (Split::Val, Some(val)) => format!("data.val = {val:?}"),
        (Split::Val, None) => format!("data.val (unset: the val_*.bin beside data.source = {:?})", cfg.source),
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
    fn check_inputs_finds_bad_data_of_either_split_up_front() {
        let dir = TempDir::new("check");
        let tokens: Vec<u32> = (0..100).collect();
        write_shard(&dir.0.join("train_000000.bin"), &tokens, 256).unwrap();
        let root = dir.0.display().to_string();
        let check = |val: Option<&str>, vocab: usize| check_inputs(&data(&root, val), vocab, 8, 4);
        let one_line = |r: Result<(), String>, want: &[&str]| {
            let err = r.unwrap_err();
            assert!(want.iter().all(|w| err.contains(w)) && !err.contains('\n'), "{err}");
        };
        assert!(check_inputs(&data("synthetic", None), 256, 64, 4).is_ok());
        one_line(check(None, 256), &["data.val (unset: the val_*.bin beside data.source = ", "no held-out data"]);
        let val = dir.0.join("val_000000.bin");
        write_shard(&val, &[1, 2, 3, 4], 256).unwrap();
        one_line(check(None, 256), &["data.val (unset", "val_000000.bin: 4 tokens in all", "model.seq_len + 1 = 9"]);
        write_shard(&val, &(0..20).map(|i| [i, 300][(i == 13) as usize]).collect::<Vec<_>>(), 1000).unwrap();
        one_line(check(None, 256), &["val_000000.bin: token id 300 at index 13", "model.vocab 256"]);
        write_shard(&val, &(0..20).collect::<Vec<_>>(), 256).unwrap();
        assert!(check(None, 256).is_ok());
        let named = val.display().to_string();
        assert!(check(Some(&named), 256).is_ok());
        one_line(check(None, 50), &["data.source = ", "train_000000.bin: token id 50 at index 50"]);
        one_line(
            check(Some(&format!("{root}/nope_*.bin")), 256),
            &["data.val = ", "nope_*.bin", "no .bin token shards"],
        );
        std::fs::write(&val, b"not a shard").unwrap();
        one_line(check(Some(&named), 256), &["data.val = ", "val_000000.bin: not a token shard: magic"]);
        one_line(check_inputs(&data("synthetic", Some(&named)), 256, 8, 4), &["data.val = ", "not a token shard"]);
    }

    #[test]
    fn a_shard_truncated_under_a_dataset_is_an_error_not_sigbus() {
        let dir = TempDir::new("truncate");
        let path = dir.0.join("train_000000.bin");
        write_shard(&path, &(0..10_000).map(|i| i % 256).collect::<Vec<_>>(), 256).unwrap();
        let mut d = open_shards(&path, 256, Split::Train).unwrap();
        d.next_batch(4, 64).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        let err = d.next_batch(4, 64).unwrap_err();
        assert!(err.starts_with("data.source = ") && err.contains("train_000000.bin: shrank to 0 bytes"), "{err}");
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
