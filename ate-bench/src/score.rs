//! `score`: the cost of one agent session, from its JSONL transcript (format in README.md) and a
//! GPU ledger; `report`: medians across runs, per task, as a markdown table.

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Serialize, Debug, Default, PartialEq)]
pub struct Score {
    pub task: String,
    pub run: String,
    pub agent: String,
    /// Assistant messages (model calls).
    pub turns: u64,
    pub output_tokens: u64,
    /// Mean over turns of the context the model read: input + cache-read + cache-write tokens.
    pub mean_context_tokens: f64,
    pub max_context_tokens: u64,
    /// First to last timestamp of the session.
    pub wall_s: f64,
    /// Σ over ledger entries of overlap(entry, session) × gpus.
    pub gpu_s: f64,
    /// The check's verdict if the transcript records one ("PASS" / "FAIL"), else "".
    pub result: String,
}

/// Seconds since the epoch from a number or an RFC 3339 string (`2025-01-02T03:04:05.6Z`, `+01:00`).
pub fn timestamp(v: &Value) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    let s = v.as_str()?.trim();
    let num = |a: usize, b: usize| s.get(a..b).and_then(|x| x.parse::<i64>().ok());
    let (y, mo, d, h, mi, se) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let rest = &s[19..];
    let frac_len = rest.strip_prefix('.').map_or(0, |f| 1 + f.chars().take_while(|c| c.is_ascii_digit()).count());
    let frac: f64 = if frac_len > 1 { format!("0{}", &rest[..frac_len]).parse().ok()? } else { 0.0 };
    let tz = &rest[frac_len..];
    let offset = match tz {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            let hh: i64 = tz.get(1..3)?.parse().ok()?;
            let mm: i64 = tz.get(4..6).and_then(|x| x.parse().ok()).unwrap_or(0);
            sign * (hh * 3600 + mm * 60)
        }
    };
    // Days from civil (Howard Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset) as f64 + frac)
}

fn lines(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}

pub fn score(transcript: &Path, ledger: Option<&Path>) -> Result<Score, String> {
    let entries = lines(transcript)?;
    let mut s = Score::default();
    let (mut t0, mut t1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut ctx_sum, mut ledger_path) = (0u64, ledger.map(Path::to_path_buf));
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    for e in &entries {
        if let Some(t) = timestamp(&e["timestamp"]) {
            (t0, t1) = (t0.min(t), t1.max(t));
        }
        match (e["type"].as_str(), e["role"].as_str()) {
            (Some("session"), _) => {
                let str_of = |k: &str| match &e[k] {
                    Value::String(x) => x.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (s.task, s.run, s.agent) = (str_of("task"), str_of("run"), str_of("agent"));
                if ledger_path.is_none() {
                    if let Some(p) = e["gpu_ledger"].as_str() {
                        let p = Path::new(p);
                        ledger_path =
                            Some(if p.is_relative() { transcript.with_file_name(p) } else { p.to_path_buf() });
                    }
                }
            }
            (Some("result"), _) => s.result = e["check"].as_str().unwrap_or("").to_string(),
            (_, Some("assistant")) => {
                s.turns += 1;
                s.output_tokens += u(e, "output_tokens");
                let ctx = u(e, "input_tokens") + u(e, "cache_read_tokens") + u(e, "cache_write_tokens");
                ctx_sum += ctx;
                s.max_context_tokens = s.max_context_tokens.max(ctx);
            }
            _ => {}
        }
    }
    s.mean_context_tokens = if s.turns > 0 { ctx_sum as f64 / s.turns as f64 } else { 0.0 };
    s.wall_s = if t1 >= t0 { t1 - t0 } else { 0.0 };
    if let Some(lp) = ledger_path {
        for e in lines(&lp)? {
            let (Some(a), Some(b)) = (timestamp(&e["start"]), timestamp(&e["end"])) else {
                return Err(format!("{}: every entry needs `start` and `end`", lp.display()));
            };
            let gpus = e["gpus"].as_f64().unwrap_or(1.0);
            s.gpu_s += (b.min(t1) - a.max(t0)).max(0.0) * gpus;
        }
    }
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Markdown table: one row per task, medians over its runs (each file: score JSON lines).
pub fn report(files: &[std::path::PathBuf]) -> Result<String, String> {
    let mut by_task: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in files {
        for v in lines(f)? {
            let task = v["task"].as_str().filter(|t| !t.is_empty()).unwrap_or("?").to_string();
            by_task.entry(task).or_default().push(v);
        }
    }
    let mut out = String::from(
        "| task | runs | pass | turns | output tokens | mean context tokens | wall (s) | GPU (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (task, runs) in &by_task {
        let col = |k: &str| median(runs.iter().filter_map(|r| r[k].as_f64()).collect());
        let judged: Vec<&str> = runs.iter().filter_map(|r| r["result"].as_str()).filter(|r| !r.is_empty()).collect();
        let pass = if judged.is_empty() {
            "-".to_string()
        } else {
            format!("{}/{}", judged.iter().filter(|r| **r == "PASS").count(), judged.len())
        };
        out += &format!(
            "| {task} | {} | {pass} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            runs.len(),
            col("turns"),
            col("output_tokens"),
            col("mean_context_tokens"),
            col("wall_s"),
            col("gpu_s")
        );
    }
    Ok(out)
}
