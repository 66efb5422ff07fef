//! Training data: the built-in synthetic corpus, llm.c-style token shards, the [`Dataset`] the
//! train loop draws batches from, and `pith data prepare` (text/JSONL → shards).
//!
//! Shard layout (llm.c): 256 little-endian i32 header words — [0] magic 20240520, [1] version,
//! [2] token count — then the tokens, little-endian: version 1 = u16 (llm.c's own, used when
//! vocab ≤ 65536), version 2 = u32 (Pith's extension for larger vocabularies).
//!
//! Val convention: `data.val` (a shard file, directory or glob) when set; otherwise the
//! `val_*.bin` files next to the `train_*.bin` shards (as `prepare` writes them), or, for
//! `synthetic`, a disjoint sample stream of the same corpus.

use crate::config::DataConfig;
use crate::rng::Rng;
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// Header word 0 of every shard (llm.c's magic number).
pub const MAGIC: i32 = 20240520;
/// Bytes before the first token: 256 × i32.
pub const HEADER_BYTES: usize = 256 * 4;

// ------------------------------------------------------------------------ the synthetic corpus

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

// ------------------------------------------------------------------------------ token shards

/// `dir/.name.tmp-PID`: where a file or directory is written before it is renamed into place.
fn temp_sibling(path: &Path) -> Result<PathBuf, String> {
    let (name, pid) = (file_name(path), std::process::id());
    match name.is_empty() {
        true => Err(format!("{}: not a file name", path.display())),
        false => Ok(path.with_file_name(format!(".{name}.tmp-{pid}"))),
    }
}

/// Write `tokens` as a shard at `path`: u16 (version 1) when `vocab` ≤ 65536, else u32
/// (version 2). Atomic: written to a temp file in the same directory, then renamed.
pub fn write_shard(path: &Path, tokens: &[u32], vocab: usize) -> Result<(), String> {
    let name = path.display();
    if tokens.len() > i32::MAX as usize {
        return Err(format!("{name}: too many tokens for one shard"));
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!("{name}: token id {t} is not below vocab {vocab}"));
    }
    let version = if vocab <= 1 << 16 { 1 } else { 2 };
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * 2 * version as usize);
    let mut header = [0i32; 256];
    header[..3].copy_from_slice(&[MAGIC, version, tokens.len() as i32]);
    header.iter().for_each(|h| bytes.extend(h.to_le_bytes()));
    for &t in tokens {
        match version {
            1 => bytes.extend((t as u16).to_le_bytes()),
            _ => bytes.extend(t.to_le_bytes()),
        }
    }
    let tmp = temp_sibling(path)?;
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("{name}: cannot write shard: {e}")
    })
}

/// A memory-mapped token shard, validated on open.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    width: usize,
    len: usize,
}

impl Shard {
    /// Map and validate a shard; a bad magic, an unknown version or a size that disagrees with
    /// the header's token count is a one-line error naming the file.
    pub fn open(path: &Path) -> Result<Shard, String> {
        let name = path.display();
        let file = fs::File::open(path).map_err(|e| format!("{name}: cannot open shard: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{name}: {e}"))?;
        let size = meta.len();
        if size < HEADER_BYTES as u64 {
            let msg = format!("{size} bytes, less than the {HEADER_BYTES}-byte header");
            return Err(format!("{name}: truncated: {msg}"));
        }
        // SAFETY: a read-only map of a file nobody modifies while it is mapped (shards are
        // written once, by rename, and never edited in place).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("{name}: cannot map: {e}"))?;
        let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        if word(0) != MAGIC {
            let msg = format!("not a token shard: magic {}, expected {MAGIC}", word(0));
            return Err(format!("{name}: {msg}"));
        }
        let version = word(1);
        if version != 1 && version != 2 {
            let msg = format!("unknown shard version {version} (1 = u16, 2 = u32)");
            return Err(format!("{name}: {msg}"));
        }
        let width = 2 * version as usize;
        let count = word(2);
        let want = HEADER_BYTES as u64 + count.max(0) as u64 * width as u64;
        if count < 0 || size != want {
            let what = ["wrong size", "truncated"][(size < want) as usize];
            let msg = format!("header says {count} tokens ({want} bytes), file has {size} bytes");
            return Err(format!("{name}: {what}: {msg}"));
        }
        let (path, len) = (path.to_path_buf(), count as usize);
        Ok(Shard { path, map, width, len })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token `i` (panics when `i >= len()`).
    pub fn get(&self, i: usize) -> u32 {
        let b = &self.map[HEADER_BYTES + i * self.width..][..self.width];
        match self.width {
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// An error naming the file and the first token id that is not below `vocab`.
    fn check_vocab(&self, vocab: usize) -> Result<(), String> {
        let ids = (0..self.len).into_par_iter().with_min_len(1 << 16);
        match ids.find_first(|&i| self.get(i) as usize >= vocab) {
            None => Ok(()),
            Some(i) => Err(format!(
                "{}: token id {} at index {i} is not below model.vocab {vocab}",
                self.path.display(),
                self.get(i)
            )),
        }
    }
}

// ---------------------------------------------------------------------------------- datasets

/// Which part of the data: what the model trains on, or the held-out part it is evaluated on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// Shards read as one stream of tokens; `starts[i]` is where shard `i` begins in it.
struct ShardSet {
    shards: Vec<Shard>,
    starts: Vec<u64>,
    total: u64,
}

impl ShardSet {
    /// Open the shards and check that every token id is below `vocab`.
    fn open(files: &[PathBuf], vocab: usize) -> Result<ShardSet, String> {
        let (mut shards, mut starts, mut total) = (Vec::new(), Vec::new(), 0);
        for f in files {
            let shard = Shard::open(f)?;
            shard.check_vocab(vocab)?;
            starts.push(total);
            total += shard.len() as u64;
            shards.push(shard);
        }
        Ok(ShardSet { shards, starts, total })
    }

    /// Append `n` tokens from stream offset `at` (modulo the total) to `out`, wrapping around.
    fn read(&self, mut at: u64, n: usize, out: &mut Vec<u32>) {
        let end = out.len() + n;
        at %= self.total;
        while out.len() < end {
            let i = self.starts.partition_point(|&s| s <= at) - 1;
            let (shard, local) = (&self.shards[i], (at - self.starts[i]) as usize);
            let take = (shard.len() - local).min(end - out.len());
            out.extend((local..local + take).map(|j| shard.get(j)));
            at = (at + take as u64) % self.total;
        }
    }
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
                    let (first, total) = (set.shards[0].path.display(), set.total);
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

/// The sorted shard files a source names (see [`Dataset::open`]).
fn resolve(spec: &str, split: Split) -> Result<Vec<PathBuf>, String> {
    let path = Path::new(spec);
    let mut files = if spec.contains(['*', '?']) {
        if parent(path).to_string_lossy().contains(['*', '?']) {
            return Err(format!("{spec}: wildcards work only in the file name"));
        }
        let pattern = file_name(path);
        let mut files = list(parent(path), true)?;
        files.retain(|f| wildcard(pattern.as_bytes(), file_name(f).as_bytes()));
        files
    } else if path.is_dir() {
        list(path, true)?
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Err(format!("{spec}: no such shard file or directory"));
    };
    if path.is_dir() {
        files.retain(|f| file_name(f).ends_with(".bin"));
        let named = |f: &PathBuf| file_name(f).starts_with(["train_", "val_"][split as usize]);
        if files.iter().any(named) {
            files.retain(named);
        }
    }
    if files.is_empty() {
        return Err(format!("{spec}: no .bin token shards found"));
    }
    Ok(files)
}

/// The `val_*.bin` next to a source's `train_*.bin` shards.
fn default_val(source: &str) -> Result<Vec<PathBuf>, String> {
    let train = resolve(source, Split::Train)?;
    let mut val = Vec::new();
    if train.iter().all(|f| file_name(f).starts_with("train_")) {
        let mut dirs: Vec<&Path> = train.iter().map(|f| parent(f)).collect();
        dirs.dedup();
        for d in dirs {
            let mut found = list(d, true)?;
            found.retain(|f| file_name(f).starts_with("val_") && file_name(f).ends_with(".bin"));
            val.append(&mut found);
        }
    }
    if val.is_empty() {
        return Err(format!(
            "{source}: no held-out data: set data.val (a shard file, directory or glob), or keep \
             val_*.bin next to the train_*.bin shards (as `pith data prepare` writes them)"
        ));
    }
    Ok(val)
}

fn parent(path: &Path) -> &Path {
    let parent = path.parent().unwrap_or(Path::new(""));
    if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }
}

fn file_name(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default();
    name.to_string_lossy().into_owned()
}

/// The entries of `dir` (only the files, or all of them), sorted by name.
fn list(dir: &Path, files_only: bool) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: cannot list: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.retain(|p| !files_only || p.is_file());
    paths.sort();
    Ok(paths)
}

/// Glob match of a file name: `*` is any run of characters, `?` any one.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, _) => s.is_empty(),
        (Some(b'*'), _) => wildcard(&p[1..], s) || (!s.is_empty() && wildcard(p, &s[1..])),
        (Some(&a), Some(&b)) => (a == b'?' || a == b) && wildcard(&p[1..], &s[1..]),
        (Some(_), None) => false,
    }
}

// ------------------------------------------------------------------------- pith data prepare

/// Special tokens tried, in order, as the document separator of a Hugging Face tokenizer.
pub const SEPARATORS: [&str; 5] = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]"];

/// What [`prepare`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    pub out_dir: PathBuf,
    /// `bytes`, or the tokenizer.json path.
    pub tokenizer: String,
    pub vocab: usize,
    /// The separator token put before every document, if the tokenizer has one.
    pub separator: Option<u32>,
    /// [train, val] counts.
    pub documents: [usize; 2],
    pub tokens: [u64; 2],
    pub shards: [usize; 2],
}

/// Tokenize `.txt` files (one document each) and `.jsonl` files (one document per line, the text
/// in `jsonl_field`) — given as files, or directories searched recursively — into `out_dir`:
/// `train_000000.bin`…, `val_000000.bin`… of at most `shard_tokens` tokens, and `meta.json`.
///
/// `tokenizer`: a Hugging Face tokenizer.json, or None for bytes (vocab 256, token = byte). With
/// a tokenizer that has one of [`SEPARATORS`], that token starts every document (llm.c's
/// convention); the byte tokenizer adds nothing, so its shards decode to the documents
/// concatenated. Whole documents go to val, evenly spaced, `val_fraction` of them (at least
/// one); a single document is split instead, its last `val_fraction` of tokens going to val.
/// Holds the corpus in memory. Writes into a temp directory and renames it, so it never leaves
/// partial output; refuses a non-empty `out_dir`.
pub fn prepare(
    inputs: &[PathBuf],
    out_dir: &Path,
    tokenizer: Option<&Path>,
    jsonl_field: &str,
    val_fraction: f64,
    shard_tokens: usize,
) -> Result<PrepareSummary, String> {
    let out = out_dir.display();
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(format!("val fraction {val_fraction} is not in (0, 1)"));
    }
    if shard_tokens == 0 || shard_tokens > i32::MAX as usize {
        return Err(format!("shard size {shard_tokens} is not in [1, 2^31)"));
    }
    if out_dir.exists() && list(out_dir, false).map_or(true, |e| !e.is_empty()) {
        return Err(format!("{out}: exists and is not empty; not writing there"));
    }
    let (mut files, mut docs) = (Vec::new(), Vec::new());
    for p in inputs {
        collect_inputs(p, true, &mut files)?;
    }
    for f in &files {
        read_documents(f, jsonl_field, &mut docs)?;
    }
    if docs.is_empty() {
        return Err("no text in the inputs (.txt files, or .jsonl lines)".into());
    }
    let tok = match tokenizer {
        Some(p) => Some(load_tokenizer(p)?),
        None => None,
    };
    let (vocab, separator) = tok.as_ref().map_or((256, None), |t| (t.1, t.2));
    let encoded = tokenize(&docs, tok.as_ref().map(|t| &t.0), separator)?;
    drop(docs);
    let (documents, [train, val]) = split_documents(encoded, val_fraction)?;

    let tmp = temp_sibling(out_dir)?;
    let _ = fs::remove_dir_all(&tmp);
    let mut shards = [0, 0];
    let tokenizer = tokenizer.map_or("bytes".to_string(), |p| p.display().to_string());
    let written = (|| {
        fs::create_dir_all(&tmp).map_err(|e| format!("{}: cannot create: {e}", tmp.display()))?;
        for (k, (name, tokens)) in [("train", &train), ("val", &val)].into_iter().enumerate() {
            for (i, chunk) in tokens.chunks(shard_tokens).enumerate() {
                write_shard(&tmp.join(format!("{name}_{i:06}.bin")), chunk, vocab)?;
                shards[k] += 1;
            }
        }
        let sources: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let meta = serde_json::json!({
            "tokenizer": tokenizer,
            "vocab": vocab,
            "separator": separator,
            "train": {"documents": documents[0], "tokens": train.len(), "shards": shards[0]},
            "val": {"documents": documents[1], "tokens": val.len(), "shards": shards[1]},
            "sources": sources,
        });
        let text = serde_json::to_string_pretty(&meta).map_err(|e| e.to_string())? + "\n";
        let meta_path = tmp.join("meta.json");
        fs::write(&meta_path, text).map_err(|e| format!("{}: {e}", meta_path.display()))?;
        if out_dir.exists() {
            fs::remove_dir(out_dir).map_err(|e| format!("{out}: cannot replace: {e}"))?;
        }
        fs::rename(&tmp, out_dir).map_err(|e| format!("{out}: cannot rename the output: {e}"))
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let tokens = [train.len() as u64, val.len() as u64];
    let out_dir = out_dir.to_path_buf();
    Ok(PrepareSummary { out_dir, tokenizer, vocab, separator, documents, tokens, shards })
}

/// A tokenizer.json, its vocabulary size and its separator token, if any.
fn load_tokenizer(path: &Path) -> Result<(tokenizers::Tokenizer, usize, Option<u32>), String> {
    let t = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| format!("{}: cannot load tokenizer: {e}", path.display()))?;
    let top = t.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    let vocab = t.get_vocab_size(true).max(top + 1);
    let separator = SEPARATORS.iter().find_map(|s| t.token_to_id(s));
    Ok((t, vocab, separator))
}

/// Tokenize documents in parallel (bytes when `tok` is None), each led by `separator` if any,
/// with a progress bar when stderr is a terminal.
fn tokenize(
    docs: &[(String, String)],
    tok: Option<&tokenizers::Tokenizer>,
    separator: Option<u32>,
) -> Result<Vec<Vec<u32>>, String> {
    let bar = match std::io::stderr().is_terminal() {
        true => ProgressBar::new(docs.len() as u64),
        false => ProgressBar::hidden(),
    };
    let style = ProgressStyle::with_template("tokenizing {bar:40} {pos}/{len} documents, {eta}");
    bar.set_style(style.unwrap_or_else(|_| ProgressStyle::default_bar()));
    let encoded = docs.par_iter().map(|(origin, text)| {
        let mut ids: Vec<u32> = separator.into_iter().collect();
        match tok {
            None => ids.extend(text.bytes().map(u32::from)),
            Some(t) => {
                let enc = t.encode(text.as_str(), false);
                let enc = enc.map_err(|e| format!("{origin}: cannot tokenize: {e}"))?;
                ids.extend(enc.get_ids())
            }
        }
        bar.inc(1);
        Ok(ids)
    });
    let encoded = encoded.collect::<Result<Vec<_>, String>>();
    bar.finish_and_clear();
    encoded
}

/// The [train, val] document counts and token streams: whole documents, evenly spaced, go to
/// val; a single document is split, its last `val_fraction` of tokens going to val.
fn split_documents(mut encoded: Vec<Vec<u32>>, val_fraction: f64) -> Result<([usize; 2], [Vec<u32>; 2]), String> {
    let n = encoded.len();
    if n == 1 {
        let mut train = encoded.pop().unwrap_or_default();
        if train.len() < 4 {
            return Err(format!("only {} tokens of text: too few to split", train.len()));
        }
        let k = (val_fraction * train.len() as f64).round() as usize;
        let val = train.split_off(train.len() - k.clamp(2, train.len() - 2));
        return Ok(([1, 0], [train, val]));
    }
    let n_val = ((val_fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut split = [Vec::new(), Vec::new()];
    for (i, doc) in encoded.iter().enumerate() {
        let to_val = (i + 1) * n_val / n > i * n_val / n;
        split[to_val as usize].extend_from_slice(doc);
    }
    Ok(([n - n_val, n_val], split))
}

/// Add `path` (a .txt/.jsonl file, or a directory searched recursively) to `out`, sorted.
fn collect_inputs(path: &Path, explicit: bool, out: &mut Vec<PathBuf>) -> Result<(), String> {
    if path.is_dir() {
        for child in list(path, false)? {
            collect_inputs(&child, false, out)?;
        }
        return Ok(());
    }
    let name = path.display();
    let text = matches!(path.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl"));
    match (text, explicit) {
        (true, _) if path.is_file() => out.push(path.to_path_buf()),
        (_, true) if !path.exists() => return Err(format!("{name}: no such file or directory")),
        (false, true) => return Err(format!("{name}: not a .txt or .jsonl file")),
        _ => {}
    }
    Ok(())
}

/// Append the non-empty documents of one input file to `docs`, each with where it came from.
fn read_documents(path: &Path, field: &str, docs: &mut Vec<(String, String)>) -> Result<(), String> {
    let name = path.display();
    let text = fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    if path.extension().is_some_and(|e| e == "txt") {
        if !text.is_empty() {
            docs.push((name.to_string(), text));
        }
        return Ok(());
    }
    for (i, line) in text.lines().enumerate() {
        let at = format!("{name}:{}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{at}: invalid JSON: {e}"))?;
        match value.get(field) {
            Some(serde_json::Value::String(s)) if s.is_empty() => {}
            Some(serde_json::Value::String(s)) => docs.push((at, s.clone())),
            _ => return Err(format!("{at}: no string field `{field}`")),
        }
    }
    Ok(())
}

/// The bytes of byte-level tokens (ids above 255 are not bytes and become `?`).
pub fn decode_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().map(|&t| u8::try_from(t).unwrap_or(b'?')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A unique temp directory, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
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

    fn data(source: &str, val: Option<&str>) -> DataConfig {
        let (source, val) = (source.into(), val.map(String::from));
        DataConfig { source, val }
    }

    /// Open `split` of a shard source (no val override) for vocab `vocab`.
    fn open_shards(source: &Path, vocab: usize, split: Split) -> Result<Dataset, String> {
        Dataset::open(&data(&source.display().to_string(), None), vocab, 1, split)
    }

    /// `prepare` with the byte tokenizer and a val fraction of 0.1.
    fn prepare_bytes(input: &Path, out: &Path, field: &str, shard: usize) -> Result<PrepareSummary, String> {
        prepare(&[input.to_path_buf()], out, None, field, 0.1, shard)
    }

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

    #[test]
    fn shards_round_trip_and_reject_corruption() {
        let dir = TempDir::new("shards");
        let (small, big) = (dir.0.join("a.bin"), dir.0.join("b.bin"));
        let tokens: Vec<u32> = (0..1000).map(|i| (i * 37 % 256) as u32).collect();
        write_shard(&small, &tokens, 256).unwrap();
        let wide: Vec<u32> = vec![0, 65_535, 65_536, 99_999];
        write_shard(&big, &wide, 100_000).unwrap();
        let a = Shard::open(&small).unwrap();
        assert_eq!((0..a.len()).map(|i| a.get(i)).collect::<Vec<_>>(), tokens);
        assert_eq!(std::fs::metadata(&small).unwrap().len(), 1024 + 2000);
        let b = Shard::open(&big).unwrap();
        assert_eq!((0..b.len()).map(|i| b.get(i)).collect::<Vec<_>>(), wide);
        assert!(write_shard(&small, &[256], 256).unwrap_err().contains("not below vocab"));

        let bytes = std::fs::read(&small).unwrap();
        let corrupt = |edit: &dyn Fn(&mut Vec<u8>), want: &str| {
            let path = dir.0.join("bad.bin");
            let mut b = bytes.clone();
            edit(&mut b);
            std::fs::write(&path, &b).unwrap();
            let err = Shard::open(&path).err().expect("corrupt shard must not open");
            assert!(err.contains("bad.bin") && err.contains(want) && !err.contains('\n'), "{err}");
        };
        corrupt(&|b| b[0] ^= 1, "magic");
        corrupt(&|b| b[4] = 7, "unknown shard version 7");
        corrupt(&|b| b.truncate(1500), "truncated");
        corrupt(&|b| b.truncate(100), "truncated");
        corrupt(&|b| b.push(0), "wrong size");
    }

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

    fn read_split(dir: &Path, split: &str) -> Vec<u32> {
        let mut tokens = Vec::new();
        let mut files = list(dir, true).unwrap();
        files.retain(|f| file_name(f).starts_with(split));
        for f in files {
            let s = Shard::open(&f).unwrap();
            tokens.extend((0..s.len()).map(|i| s.get(i)));
        }
        tokens
    }

    #[test]
    fn prepare_bytes_round_trips_a_text_file() {
        let dir = TempDir::new("prepare");
        let text = "To be, or not to be: that is the question.\n".repeat(50);
        std::fs::write(dir.0.join("a.txt"), &text).unwrap();
        let out = dir.0.join("out");
        let s = prepare_bytes(&dir.0.join("a.txt"), &out, "text", 1000).unwrap();
        assert_eq!((s.vocab, s.tokens, s.shards, s.separator), (256, [1935, 215], [2, 1], None));
        let mut all = decode_bytes(&read_split(&out, "train_"));
        all.extend(decode_bytes(&read_split(&out, "val_")));
        assert_eq!(all, text.as_bytes());
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!((meta["tokenizer"].as_str(), meta["vocab"].as_u64()), (Some("bytes"), Some(256)));
        let err = prepare_bytes(&dir.0.join("a.txt"), &out, "text", 1000).unwrap_err();
        assert!(err.contains("not empty"), "{err}");
        let names: Vec<String> = list(&dir.0, false).unwrap().iter().map(|f| file_name(f)).collect();
        assert_eq!(names, ["a.txt", "out"], "no temp files left behind");
    }

    #[test]
    fn prepare_jsonl_splits_documents_and_names_a_bad_line() {
        let dir = TempDir::new("jsonl");
        let lines: Vec<String> = (0..20).map(|i| format!("{{\"text\": \"doc {i}.\", \"id\": {i}}}")).collect();
        std::fs::write(dir.0.join("good.jsonl"), lines.join("\n")).unwrap();
        let s = prepare_bytes(&dir.0, &dir.0.join("out"), "text", 1 << 20).unwrap();
        assert_eq!(s.documents, [18, 2]);
        let val = String::from_utf8(decode_bytes(&read_split(&dir.0.join("out"), "val_"))).unwrap();
        assert_eq!(val, "doc 9.doc 19.");
        let bad = "{\"text\": \"fine\"}\n{\"text\": oops}\n";
        std::fs::write(dir.0.join("bad.jsonl"), bad).unwrap();
        let err = prepare_bytes(&dir.0.join("bad.jsonl"), &dir.0.join("out2"), "text", 100);
        let err = err.unwrap_err();
        assert!(err.contains("bad.jsonl:2: invalid JSON"), "{err}");
        let err = prepare_bytes(&dir.0.join("good.jsonl"), &dir.0.join("out2"), "body", 100);
        let err = err.unwrap_err();
        assert!(err.contains("good.jsonl:1: no string field `body`"), "{err}");
        assert!(!dir.0.join("out2").exists());
    }

    #[test]
    fn prepare_tinyshakespeare_with_bytes() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/tinyshakespeare.txt"));
        if !path.exists() {
            println!("skip: {} not found", path.display());
            return;
        }
        let dir = TempDir::new("shakespeare");
        let s = prepare_bytes(path, &dir.0.join("out"), "text", 1 << 18).unwrap();
        let size = std::fs::metadata(path).unwrap().len();
        assert_eq!(s.tokens[0] + s.tokens[1], size);
        let mut d = open_shards(&dir.0.join("out"), 256, Split::Val).unwrap();
        assert_eq!(d.next_batch(2, 32).unwrap().0.len(), 64);
    }

    #[test]
    fn prepare_with_a_hugging_face_tokenizer() {
        use tokenizers::{models::wordlevel::WordLevel, pre_tokenizers::whitespace::Whitespace, AddedToken};
        let dir = TempDir::new("hf");
        let words = ["[UNK]", "the", "cat", "sat", "on", "mat", "."];
        let vocab = words.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32));
        let model = WordLevel::builder().vocab(vocab.collect()).unk_token("[UNK]".into()).build().unwrap();
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace));
        tok.add_special_tokens(&[AddedToken::from("</s>", true)]);
        let json = dir.0.join("tokenizer.json");
        tok.save(&json, false).unwrap();
        let text = "the cat sat on the mat . ".repeat(10);
        std::fs::write(dir.0.join("a.txt"), &text).unwrap();
        let out = dir.0.join("out");
        let s = prepare(&[dir.0.join("a.txt")], &out, Some(&json), "text", 0.2, 16).unwrap();
        assert_eq!((s.vocab, s.separator, s.tokens[0] + s.tokens[1]), (8, Some(7), 71));
        let mut ids = read_split(&out, "train_");
        ids.extend(read_split(&out, "val_"));
        assert_eq!(ids[0], 7, "the separator starts the document");
        assert_eq!(tok.decode(&ids, true).unwrap(), text.trim_end());
        assert!(open_shards(&out, 8, Split::Train).is_ok());
        assert!(open_shards(&out, 7, Split::Train).is_err(), "id 7 is not below vocab 7");
    }
}
