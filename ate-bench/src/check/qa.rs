//! Q&A checks: ANSWER.md cites `path:line` for each requirement of `meta.toml`; a citation counts
//! when its file matches, the line (or one within ±window) matches the pattern and the line lies in
//! the named function. Also [`locate`], which fills reference answers from the same rules.

use super::{answer, walk, Outcome};
use crate::re::Re;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Cite {
    pub what: String,
    /// A repo-relative path, or a prefix of one (`host/src/data` matches `host/src/data/mod.rs`).
    pub file: String,
    /// The cited line, or one within ±window of it, matches this (regex subset, see re.rs).
    #[serde(default)]
    pub pattern: Option<String>,
    /// The cited line lies inside `fn <function>`'s body.
    #[serde(default)]
    pub function: Option<String>,
    #[serde(default = "default_window")]
    pub window: usize,
}
fn default_window() -> usize {
    3
}

/// Every requirement is cited, with at most 2·requirements + 1 citations; ANSWER.md mentions `must`.
pub fn check(cites: &[Cite], must: &[String], dir: &Path, o: &mut Outcome) -> Result<(), String> {
    let ans = answer(dir)?;
    let cs = citations(&ans);
    let limit = 2 * cites.len() + 1;
    if cs.is_empty() {
        return Err("ANSWER.md cites no `path:line`".into());
    }
    o.rule(cs.len() <= limit, format!("at most {limit} citations (found {})", cs.len()));
    for c in cites {
        let mut why = Vec::new();
        let mut hit = None;
        for (path, line) in cs.iter().filter(|(p, _)| file_matches(c, p)) {
            match std::fs::read_to_string(dir.join(path)) {
                Err(e) => why.push(format!("{path}: {e}")),
                Ok(text) => match cite_ok(c, &text, *line) {
                    Ok(()) => hit = Some(format!("{path}:{line}")),
                    Err(e) => why.push(format!("{path}:{line}: {e}")),
                },
            }
            if hit.is_some() {
                break;
            }
        }
        let detail = match (&hit, why.is_empty()) {
            (Some(h), _) => format!(" ({h})"),
            (None, true) => format!(" (no citation in {})", c.file),
            (None, false) => format!(" ({})", why.join("; ")),
        };
        o.rule(hit.is_some(), format!("cites {}{detail}", c.what));
    }
    let low = ans.to_lowercase();
    for m in must {
        o.rule(low.contains(&m.to_lowercase()), format!("ANSWER.md mentions `{m}`"));
    }
    Ok(())
}

/// `path:line` citations in an answer (backticks, `./` and `#L` forms allowed).
pub fn citations(text: &str) -> Vec<(String, usize)> {
    let cs: Vec<char> = text.chars().collect();
    let pathy = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut out = Vec::new();
    for i in 0..cs.len() {
        let sep = cs[i] == ':' || (cs[i] == '#' && cs.get(i + 1) == Some(&'L'));
        if !sep {
            continue;
        }
        let ds = i + if cs[i] == '#' { 2 } else { 1 };
        let digits: String = cs[ds.min(cs.len())..].iter().take_while(|c| c.is_ascii_digit()).collect();
        let mut s = i;
        while s > 0 && pathy(cs[s - 1]) {
            s -= 1;
        }
        let path: String = cs[s..i].iter().collect();
        let path = path.trim_start_matches("./").to_string();
        if let (Ok(line), true) = (digits.parse::<usize>(), path.contains('.') && path.contains('/')) {
            out.push((path, line));
        }
    }
    out
}

/// Is `path` the requirement's file, or under it when `c.file` is a prefix?
fn file_matches(c: &Cite, path: &str) -> bool {
    path == c.file
        || (path.starts_with(&c.file) && (c.file.ends_with('/') || path[c.file.len()..].starts_with(['/', '.'])))
}

/// Does the cited `line` of `text` satisfy `c`? Err says why not.
fn cite_ok(c: &Cite, text: &str, line: usize) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().collect();
    if line == 0 || line > lines.len() {
        return Err(format!("line {line} is past the end ({} lines)", lines.len()));
    }
    if let Some(f) = &c.function {
        let (a, b) = fn_span(&lines, f).ok_or(format!("no `fn {f}` in the file"))?;
        if line < a || line > b {
            return Err(format!("line {line} is outside fn {f} (lines {a}-{b})"));
        }
    }
    if let Some(p) = &c.pattern {
        let re = Re::new(p)?;
        let (lo, hi) = (line.saturating_sub(c.window).max(1), (line + c.window).min(lines.len()));
        if !(lo..=hi).any(|i| re.is_match(lines[i - 1])) {
            return Err(format!("no line within ±{} of {line} matches `{p}`", c.window));
        }
    }
    Ok(())
}

/// The 1-based line range of `fn name`'s body in `lines`, if there is one.
pub fn fn_span(lines: &[&str], name: &str) -> Option<(usize, usize)> {
    let open = [format!("fn {name}("), format!("fn {name}<")];
    let start = lines.iter().position(|l| open.iter().any(|o| l.contains(o.as_str())))?;
    let mut depth = 0i64;
    let mut seen = false;
    for (i, l) in lines.iter().enumerate().skip(start) {
        let code = l.split("//").next().unwrap_or("");
        let mut in_str = false;
        let mut prev = ' ';
        for c in code.chars() {
            match c {
                '"' if prev != '\\' && prev != '\'' => in_str = !in_str,
                '{' if !in_str && prev != '\'' => {
                    depth += 1;
                    seen = true;
                }
                '}' if !in_str && prev != '\'' => depth -= 1,
                _ => {}
            }
            prev = c;
        }
        if seen && depth <= 0 {
            return Some((start + 1, i + 1));
        }
    }
    None
}

/// Where requirement `c` is satisfied in `dir` (the first match in file order): for reference answers.
pub fn locate(c: &Cite, dir: &Path) -> Option<String> {
    let mut files = Vec::new();
    walk(&dir.join(Path::new(&c.file).parent().unwrap_or(Path::new(""))), &mut files);
    files.sort();
    for f in files {
        let rel = f.strip_prefix(dir).ok()?.to_string_lossy().into_owned();
        if !file_matches(c, &rel) {
            continue;
        }
        let text = std::fs::read_to_string(&f).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        // Prefer the exact pattern line (not merely one within the window).
        let exact = |i: usize| c.pattern.as_ref().is_none_or(|p| Re::new(p).is_ok_and(|r| r.is_match(lines[i - 1])));
        if let Some(i) = (1..=lines.len()).find(|&i| exact(i) && cite_ok(c, &text, i).is_ok()) {
            return Some(format!("{rel}:{i}"));
        }
    }
    None
}
