//! `pith data prepare`: text and JSONL files → train/val token shards and `meta.json`, with
//! the byte tokenizer or a Hugging Face tokenizer.json.

use super::shards::{list, remove_stale_temps, temp_sibling, write_shard};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::collections::HashSet;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
    /// Inputs reached more than once (named twice, or through a symlink) and read only once.
    pub duplicates: usize,
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
/// Every file is read once, however often it is reached (by its canonical path: named twice, or
/// through a symlink), and every directory is searched once (so a symlink loop ends).
/// Holds the corpus in memory. Writes into a temp directory and renames it, so it never leaves
/// partial output (a temp that a killed run left is removed); refuses a non-empty `out_dir`.
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
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(format!("{out}: exists and is not a directory; give --out a new or empty directory"));
    }
    if out_dir.exists() && list(out_dir, false).map_or(true, |e| !e.is_empty()) {
        return Err(format!("{out}: exists and is not empty; not writing there"));
    }
    let mut found = Inputs::default();
    for p in inputs {
        found.collect(p, true)?;
    }
    let Inputs { files, duplicates, .. } = found;
    if duplicates > 0 {
        let why = "a file or directory reached again (named twice, or through a symlink) is read once";
        tracing::info!("skipped {duplicates} duplicate input(s): {why}");
    }
    let mut docs = Vec::new();
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

    for stale in remove_stale_temps(out_dir) {
        tracing::info!("removed {}: the partial output of an interrupted `pith data prepare`", stale.display());
    }
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
    Ok(PrepareSummary { out_dir, tokenizer, vocab, separator, documents, tokens, shards, duplicates })
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

/// The input files found so far, in order; the canonical paths of those and of the directories
/// searched; how many inputs were reached again and skipped.
#[derive(Default)]
struct Inputs {
    files: Vec<PathBuf>,
    seen: HashSet<PathBuf>,
    duplicates: usize,
}

impl Inputs {
    /// Add `path`: a .txt/.jsonl file, or a directory searched recursively in name order; each
    /// file and directory only the first time it is reached.
    fn collect(&mut self, path: &Path, explicit: bool) -> Result<(), String> {
        let name = path.display();
        let text = matches!(path.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl"));
        let wanted = path.is_dir() || (text && path.is_file());
        match (wanted, explicit) {
            (false, true) if !path.exists() => return Err(format!("{name}: no such file or directory")),
            (false, true) => return Err(format!("{name}: not a .txt or .jsonl file, nor a directory")),
            (false, false) => return Ok(()),
            (true, _) => {}
        }
        let canonical = fs::canonicalize(path).map_err(|e| format!("{name}: {e}"))?;
        if !self.seen.insert(canonical) {
            self.duplicates += 1;
        } else if path.is_dir() {
            for child in list(path, false)? {
                self.collect(&child, false)?;
            }
        } else {
            self.files.push(path.to_path_buf());
        }
        Ok(())
    }
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
    use crate::data::shards::{file_name, Shard};
    use crate::data::testutil::{open_shards, TempDir};
    use crate::data::Split;

    /// `prepare` with the byte tokenizer and a val fraction of 0.1.
    fn prepare_bytes(input: &Path, out: &Path, field: &str, shard: usize) -> Result<PrepareSummary, String> {
        prepare(&[input.to_path_buf()], out, None, field, 0.1, shard)
    }

    fn read_split(dir: &Path, split: &str) -> Vec<u32> {
        let mut tokens = Vec::new();
        let mut files = list(dir, true).unwrap();
        files.retain(|f| file_name(f).starts_with(split));
        for f in files {
            tokens.extend(Shard::open(&f).unwrap().tokens().unwrap());
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
    fn prepare_reads_each_input_once_and_ends_symlink_loops() {
        let dir = TempDir::new("dups");
        let (docs, sub) = (dir.0.join("docs"), dir.0.join("docs/sub"));
        std::fs::create_dir_all(&sub).unwrap();
        let texts: Vec<String> = (0..10).map(|i| format!("document number {i}. ")).collect();
        for (i, t) in texts.iter().enumerate() {
            std::fs::write(sub.join(format!("{i}.txt")), t).unwrap();
        }
        std::os::unix::fs::symlink(&docs, sub.join("loop")).unwrap();
        std::os::unix::fs::symlink(sub.join("0.txt"), docs.join("alias.txt")).unwrap();
        let inputs = [docs.clone(), sub.join("0.txt"), docs.clone()];
        let s = prepare(&inputs, &dir.0.join("out"), None, "text", 0.2, 1000).unwrap();
        // docs/alias.txt is sub/0.txt; sub/0.txt, sub/loop, and both inputs given again are skipped.
        assert_eq!((s.documents, s.duplicates), ([8, 2], 4));
        let total: usize = texts.iter().map(String::len).sum();
        assert_eq!(s.tokens[0] + s.tokens[1], total as u64);
        let val = String::from_utf8(decode_bytes(&read_split(&dir.0.join("out"), "val_"))).unwrap();
        let train = String::from_utf8(decode_bytes(&read_split(&dir.0.join("out"), "train_"))).unwrap();
        assert!(val.split(". ").filter(|d| !d.is_empty()).all(|d| !train.contains(d)), "{val} is in {train}");
        let twice = prepare(&[sub.join("3.txt"), sub.join("3.txt")], &dir.0.join("out2"), None, "text", 0.2, 100);
        assert_eq!(twice.unwrap().duplicates, 1, "one file named twice is one document, split in two");
    }

    #[test]
    fn prepare_removes_the_partial_output_of_a_killed_run() {
        let dir = TempDir::new("stale-prepare");
        std::fs::write(dir.0.join("a.txt"), "some text to split. ".repeat(20)).unwrap();
        let stale = dir.0.join(".out.tmp-999999999"); // a pid above any pid_max: not running
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("train_000000.bin"), b"half a shard").unwrap();
        let s = prepare_bytes(&dir.0.join("a.txt"), &dir.0.join("out"), "text", 1000).unwrap();
        assert_eq!(s.tokens[0] + s.tokens[1], 400);
        assert!(open_shards(&dir.0.join("out"), 256, Split::Val).is_ok());
        if Path::new("/proc/self").exists() {
            let names: Vec<String> = list(&dir.0, false).unwrap().iter().map(|f| file_name(f)).collect();
            assert_eq!(names, ["a.txt", "out"], "the stale temp is gone");
        }
        std::fs::write(dir.0.join("file"), "").unwrap();
        let err = prepare_bytes(&dir.0.join("a.txt"), &dir.0.join("file"), "text", 1000).unwrap_err();
        assert!(err.contains("file: exists and is not a directory"), "{err}");
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
