//! llm.c-style token shards: writing, reading, a set of shards read as one stream, and finding
//! the shard files a `data.source` or `data.val` names.
//!
//! Shard layout (llm.c): 256 little-endian i32 header words — word 0 the magic 20240520, word 1
//! the version, word 2 the token count — then the tokens, little-endian: version 1 = u16 (llm.c's
//! own, used when vocab ≤ 65536), version 2 = u32 (Pith's extension for larger vocabularies).
//!
//! Shards are read with positioned reads, not memory-mapped: a file truncated under a running
//! reader is then an error naming it, where a mapped page past the new end would be SIGBUS. A
//! batch is one read per row (a few KB), as fast as the mapped pages were.

use super::Split;
use rayon::prelude::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Header word 0 of every shard (llm.c's magic number).
pub const MAGIC: i32 = 20240520;
/// Bytes before the first token: 256 × i32.
pub const HEADER_BYTES: usize = 256 * 4;
/// Tokens read at a time when a whole shard is scanned.
const SCAN_TOKENS: usize = 1 << 20;

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

/// An open token shard, its header validated (it holds its file open: one descriptor a shard).
pub struct Shard {
    path: PathBuf,
    file: fs::File,
    width: usize,
    len: usize,
}

impl Shard {
    /// Open and validate a shard; a bad magic, an unknown version or a size that disagrees with
    /// the header's token count is a one-line error naming the file.
    pub fn open(path: &Path) -> Result<Shard, String> {
        let name = path.display();
        let file = fs::File::open(path).map_err(|e| match e.raw_os_error() {
            Some(24) => format!("{name}: cannot open shard: {e}: raise `ulimit -n`, or write fewer, larger shards"),
            _ => format!("{name}: cannot open shard: {e}"),
        })?;
        let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
        let mut head = [0u8; HEADER_BYTES];
        let got = size.min(HEADER_BYTES as u64) as usize;
        file.read_exact_at(&mut head[..got], 0).map_err(|e| format!("{name}: cannot read the header: {e}"))?;
        let word = |i: usize| i32::from_le_bytes(head[4 * i..4 * i + 4].try_into().unwrap());
        if got >= 4 && word(0) != MAGIC {
            let msg = format!("magic {}, expected {MAGIC} (write shards with `pith data prepare`)", word(0));
            return Err(format!("{name}: not a token shard: {msg}"));
        }
        if got < HEADER_BYTES {
            let msg = format!("{size} bytes, less than the {HEADER_BYTES}-byte header");
            return Err(format!("{name}: truncated: {msg}"));
        }
        let version = word(1);
        if version != 1 && version != 2 {
            let msg = format!("unknown shard version {version} (valid: 1 = u16 tokens, 2 = u32 tokens)");
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
        Ok(Shard { path, file, width, len })
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

    /// Append tokens `start..start + n` to `out`. A file that no longer holds them (truncated
    /// after it was opened) is an error naming it.
    pub fn read(&self, start: usize, n: usize, out: &mut Vec<u32>) -> Result<(), String> {
        let name = self.path.display();
        if start + n > self.len {
            return Err(format!("{name}: tokens {start}..{} are past its {} tokens", start + n, self.len));
        }
        let mut bytes = vec![0u8; n * self.width];
        let at = (HEADER_BYTES + start * self.width) as u64;
        if let Err(e) = self.file.read_exact_at(&mut bytes, at) {
            let want = HEADER_BYTES + self.len * self.width;
            return Err(match self.file.metadata() {
                Ok(m) if m.len() < want as u64 => format!(
                    "{name}: shrank to {} bytes from {want} while in use (truncated or rewritten in place?); \
                     restore it, or write shards anew beside it and rename them in",
                    m.len()
                ),
                _ => format!("{name}: cannot read tokens {start}..{}: {e}", start + n),
            });
        }
        match self.width {
            2 => out.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)),
            _ => out.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        }
        Ok(())
    }

    /// Every token of the shard.
    pub fn tokens(&self) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(self.len);
        self.read(0, self.len, &mut out)?;
        Ok(out)
    }

    /// An error naming the file, the first token id that is not below `vocab` and its index.
    fn check_vocab(&self, vocab: usize) -> Result<(), String> {
        let chunks = (0..self.len.div_ceil(SCAN_TOKENS)).into_par_iter();
        let first_bad = chunks.map(|c| {
            let (start, mut ids) = (c * SCAN_TOKENS, Vec::with_capacity(SCAN_TOKENS));
            self.read(start, SCAN_TOKENS.min(self.len - start), &mut ids)?;
            Ok(ids.iter().position(|&t| t as usize >= vocab).map(|i| (start + i, ids[i])))
        });
        match first_bad.find_first(|r: &Result<_, String>| !matches!(r, Ok(None))) {
            None | Some(Ok(None)) => Ok(()),
            Some(Err(e)) => Err(e),
            Some(Ok(Some((i, id)))) => Err(format!(
                "{}: token id {id} at index {i} is not below model.vocab {vocab}; set model.vocab \
                 to the tokenizer's vocabulary size (`vocab` in the meta.json of `pith data prepare`)",
                self.path.display()
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
    pub(super) fn read(&self, mut at: u64, n: usize, out: &mut Vec<u32>) -> Result<(), String> {
        let end = out.len() + n;
        at %= self.total;
        while out.len() < end {
            let i = self.starts.partition_point(|&s| s <= at) - 1;
            let (shard, local) = (&self.shards[i], (at - self.starts[i]) as usize);
            let take = (shard.len() - local).min(end - out.len());
            shard.read(local, take, out)?;
            at = (at + take as u64) % self.total;
        }
        Ok(())
    }
}

/// What a `data.source` / `data.val` may be, for errors.
const VALID: &str = "valid: a .bin shard file, a directory of them, or a glob in the file name such as dir/train_*.bin";

/// The sorted shard files a source names (see [`Dataset::open`](super::Dataset::open)). Errors
/// do not repeat `spec`: the caller names the key and its value.
pub(super) fn resolve(spec: &str, split: Split) -> Result<Vec<PathBuf>, String> {
    let path = Path::new(spec);
    let files = if spec.contains(['*', '?']) {
        if parent(path).to_string_lossy().contains(['*', '?']) {
            return Err(format!("wildcards work only in the file name ({VALID})"));
        }
        let pattern = file_name(path);
        let mut files = list(parent(path), true)?;
        let hidden_ok = pattern.starts_with('.'); // like a shell: `*` skips .temp files
        files.retain(|f| {
            (hidden_ok || !file_name(f).starts_with('.')) && wildcard(pattern.as_bytes(), file_name(f).as_bytes())
        });
        files
    } else if path.is_dir() {
        let mut files = list(path, true)?;
        files.retain(|f| file_name(f).ends_with(".bin"));
        // A directory of train_/val_ shards gives each split only its own.
        let prefix = ["train_", "val_"];
        if files.iter().any(|f| prefix.iter().any(|p| file_name(f).starts_with(p))) {
            files.retain(|f| file_name(f).starts_with(prefix[split as usize]));
            if files.is_empty() {
                return Err(format!(
                    "no {}*.bin shards in this directory of train_/val_ shards",
                    prefix[split as usize]
                ));
            }
        }
        files
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Err(format!("no such shard file or directory ({VALID})"));
    };
    if files.is_empty() {
        return Err(format!("no .bin token shards found ({VALID})"));
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
        return Err("no held-out data: set data.val (a shard file, directory or glob), or put val_*.bin beside \
             the train_*.bin shards (as `pith data prepare` writes them)"
            .into());
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

/// Remove the [`temp_sibling`]s of `path` that a killed run left: those of a process that no
/// longer runs (checked in /proc; where there is none, nothing is removed). Returns them.
pub(super) fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let prefix = format!(".{}.tmp-", file_name(path));
    let proc = Path::new("/proc");
    let mut removed = list(parent(path), false).unwrap_or_default();
    removed.retain(|p| {
        let pid = file_name(p).strip_prefix(&prefix).and_then(|pid| pid.parse::<u32>().ok());
        let dead = pid.is_some_and(|pid| proc.join("self").exists() && !proc.join(pid.to_string()).exists());
        dead && (fs::remove_dir_all(p).is_ok() || fs::remove_file(p).is_ok())
    });
    removed
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
        assert_eq!(a.tokens().unwrap(), tokens);
        assert_eq!(std::fs::metadata(&small).unwrap().len(), 1024 + 2000);
        let b = Shard::open(&big).unwrap();
        assert_eq!(b.tokens().unwrap(), wide);
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
        corrupt(&|b| *b = b"{\"vocab\": 256}".to_vec(), "not a token shard: magic");
        corrupt(&|b| b.truncate(2), "truncated: 2 bytes");
    }

    #[test]
    fn a_shard_truncated_while_open_is_an_error_naming_it() {
        let dir = TempDir::new("shrink");
        let path = dir.0.join("train_000000.bin");
        let tokens: Vec<u32> = (0..5000).map(|i| i % 256).collect();
        write_shard(&path, &tokens, 256).unwrap();
        let shard = Shard::open(&path).unwrap();
        let mut out = Vec::new();
        shard.read(4000, 100, &mut out).unwrap();
        assert_eq!(out, tokens[4000..4100]);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(3000).unwrap();
        let err = shard.read(4000, 100, &mut out).unwrap_err();
        assert!(err.contains("train_000000.bin: shrank to 3000 bytes") && !err.contains('\n'), "{err}");
        assert!(shard.read(0, 100, &mut out).is_ok(), "what is still there still reads");
    }

    #[test]
    fn sources_resolve_to_their_split_and_skip_temp_files() {
        let dir = TempDir::new("resolve");
        for name in ["train_000000.bin", "train_000001.bin", ".train_000002.bin.tmp-1", "meta.json"] {
            std::fs::write(dir.0.join(name), b"x").unwrap();
        }
        let root = dir.0.display().to_string();
        let names = |files: Vec<PathBuf>| files.iter().map(|f| file_name(f)).collect::<Vec<_>>();
        assert_eq!(names(resolve(&root, Split::Train).unwrap()), ["train_000000.bin", "train_000001.bin"]);
        assert_eq!(
            names(resolve(&format!("{root}/*"), Split::Train).unwrap()),
            ["meta.json", "train_000000.bin", "train_000001.bin"]
        );
        let err = resolve(&root, Split::Val).unwrap_err();
        assert!(err.contains("no val_*.bin shards"), "{err}");
        let err = default_val(&root).unwrap_err();
        assert!(err.contains("no held-out data") && err.contains("set data.val"), "{err}");
        let err = resolve(&format!("{root}/nope"), Split::Train).unwrap_err();
        assert!(err.contains("no such shard file or directory (valid: "), "{err}");
        let err = resolve(&format!("{root}/nope_*.bin"), Split::Train).unwrap_err();
        assert!(err.contains("no .bin token shards found (valid: "), "{err}");
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        let dir = TempDir::new("stale");
        let out = dir.0.join("out");
        let dead = dir.0.join(".out.tmp-999999999"); // above any pid_max
        let live = dir.0.join(format!(".out.tmp-{}", std::process::id()));
        let other = dir.0.join(".other.tmp-999999999");
        for d in [&dead, &live, &other] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
        }
        let removed = remove_stale_temps(&out);
        if !Path::new("/proc/self").exists() {
            return assert!(removed.is_empty());
        }
        assert_eq!(removed, std::slice::from_ref(&dead));
        assert!(!dead.exists() && live.exists() && other.exists());
    }
}
