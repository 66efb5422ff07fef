//! llm.c-style token shards: writing, memory-mapped reading, a set of shards read as one
//! stream, and finding the shard files a `data.source` or `data.val` names.
//!
//! Shard layout (llm.c): 256 little-endian i32 header words — word 0 the magic 20240520, word 1
//! the version, word 2 the token count — then the tokens, little-endian: version 1 = u16 (llm.c's
//! own, used when vocab ≤ 65536), version 2 = u32 (Pith's extension for larger vocabularies).

use super::Split;
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Header word 0 of every shard (llm.c's magic number).
pub const MAGIC: i32 = 20240520;
/// Bytes before the first token: 256 × i32.
pub const HEADER_BYTES: usize = 256 * 4;

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

/// Shards read as one stream of tokens; `starts[i]` is where shard `i` begins in it.
pub(super) struct ShardSet {
    pub(super) shards: Vec<Shard>,
    starts: Vec<u64>,
    pub(super) total: u64,
}

impl ShardSet {
    /// Open the shards and check that every token id is below `vocab`.
    pub(super) fn open(files: &[PathBuf], vocab: usize) -> Result<ShardSet, String> {
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
    pub(super) fn read(&self, mut at: u64, n: usize, out: &mut Vec<u32>) {
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

/// The sorted shard files a source names (see [`Dataset::open`](super::Dataset::open)).
pub(super) fn resolve(spec: &str, split: Split) -> Result<Vec<PathBuf>, String> {
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
pub(super) fn default_val(source: &str) -> Result<Vec<PathBuf>, String> {
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

/// `dir/.name.tmp-PID`: where a file or directory is written before it is renamed into place.
pub(super) fn temp_sibling(path: &Path) -> Result<PathBuf, String> {
    let (name, pid) = (file_name(path), std::process::id());
    match name.is_empty() {
        true => Err(format!("{}: not a file name", path.display())),
        false => Ok(path.with_file_name(format!(".{name}.tmp-{pid}"))),
    }
}

fn parent(path: &Path) -> &Path {
    let parent = path.parent().unwrap_or(Path::new(""));
    if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }
}

pub(super) fn file_name(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default();
    name.to_string_lossy().into_owned()
}

/// The entries of `dir` (only the files, or all of them), sorted by name.
pub(super) fn list(dir: &Path, files_only: bool) -> Result<Vec<PathBuf>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;

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
}
