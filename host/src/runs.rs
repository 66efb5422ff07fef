//! `pith runs show RUN...` / `pith runs compare RUN...`: a table of each run's final numbers
//! (from `summary.json`, else its last metrics line) and a PNG of loss (train, and val as dots),
//! learning rate, gradient norm and load max/mean against steps, one colour per run. The PNG is
//! drawn here (lines, a 5×7 bitmap font, an uncompressed zlib stream): a plot needs no crate.

use std::path::{Path, PathBuf};

struct Run {
    name: String,
    rows: Vec<serde_json::Value>,
    summary: Option<serde_json::Value>,
}

fn read(dir: &Path) -> Result<Run, String> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e} (not a run directory?)", path.display()))?;
    let rows = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect::<Vec<_>>();
    if rows.is_empty() {
        return Err(format!("{}: no steps yet", path.display()));
    }
    let summary = std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    Ok(Run { name: dir.display().to_string(), rows, summary })
}

/// The table, and the plot written to `png` (default: `<first run>/runs.png`); returns the text.
pub fn compare(dirs: &[PathBuf], png: Option<&Path>) -> Result<String, String> {
    let runs = dirs.iter().map(|d| read(d)).collect::<Result<Vec<_>, _>>()?;
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |x| format!("{x:.d$}"));
    let mut out =
        format!("{:<3} {:<32} {:>7} {:>9} {:>9} {:>9} {:>10}\n", "", "run", "steps", "loss", "val", "tok/s", "seconds");
    for (i, r) in runs.iter().enumerate() {
        let last = r.rows.last().unwrap();
        let val = r.rows.iter().rev().find_map(|m| m["val_loss"].as_f64());
        let s = r.summary.as_ref();
        let tps = s.and_then(|s| s["tokens_per_s"].as_f64()).or_else(|| last["tokens_per_s"].as_f64());
        let secs = s.and_then(|s| s["seconds"].as_f64()).or_else(|| last["elapsed_s"].as_f64());
        out += &format!(
            "{:<3} {:<32} {:>7} {:>9} {:>9} {:>9} {:>10}\n",
            format!("[{}]", i + 1),
            r.name,
            last["step"].as_u64().unwrap_or(0),
            f(last["loss"].as_f64(), 4),
            f(val, 4),
            f(tps, 0),
            f(secs, 1)
        );
    }
    let path = png.map(Path::to_path_buf).unwrap_or_else(|| dirs[0].join("runs.png"));
    let series = |key: &str| -> Vec<Vec<(f64, f64)>> {
        let point = |m: &serde_json::Value| Some((m["step"].as_f64()?, m[key].as_f64()?));
        runs.iter().map(|r| r.rows.iter().filter_map(point).collect()).collect()
    };
    let panels = [
        ("loss", series("loss"), series("val_loss")),
        ("lr", series("lr"), vec![]),
        ("grad norm", series("grad_norm"), vec![]),
        ("load max/mean", series("load_max_over_mean"), vec![]),
    ];
    let mut c = Canvas::new(1000, 720);
    for (i, (title, lines, dots)) in panels.iter().enumerate() {
        let (x0, y0) = (60 + (i % 2) * 490, 30 + (i / 2) * 350);
        c.panel(title, x0, y0, 410, 280, lines, dots);
    }
    for i in 0..runs.len() {
        let (x, y) = (60 + 120 * i, 704);
        c.fill(x, y, 24, 4, COLORS[i % COLORS.len()]);
        c.text(&format!("{}", i + 1), x + 30, y - 3, BLACK);
    }
    std::fs::write(&path, c.png()).map_err(|e| format!("{}: {e}", path.display()))?;
    out += &format!("plot: {} (lines: loss, lr, grad norm, load max/mean by step; dots: val loss)", path.display());
    Ok(out)
}

const BLACK: [u8; 3] = [0, 0, 0];
const GREY: [u8; 3] = [200, 200, 200];
const COLORS: [[u8; 3]; 6] =
    [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189], [23, 190, 207]];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..self.w as i64).contains(&x) && (0..self.h as i64).contains(&y) {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx as i64, yy as i64, c);
            }
        }
    }
    /// A 2-pixel-wide line (Bresenham, drawn twice).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
    fn text(&mut self, s: &str, x: usize, y: usize, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        self.set((x + 6 * i + col) as i64, (y + r) as i64, c);
                    }
                }
            }
        }
    }
    /// A titled box with y-ticks at its range's ends and middle, x from the steps, `lines` as
    /// polylines and `dots` as squares, one colour per run.
    #[allow(clippy::too_many_arguments)]
    fn panel(
        &mut self,
        title: &str,
        x0: usize,
        y0: usize,
        w: usize,
        h: usize,
        lines: &[Vec<(f64, f64)>],
        dots: &[Vec<(f64, f64)>],
    ) {
        let all = lines.iter().chain(dots).flatten().filter(|p| p.1.is_finite());
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            (xmin, xmax, ymin, ymax) = (xmin.min(x), xmax.max(x), ymin.min(y), ymax.max(y));
        }
        if xmin > xmax {
            (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
        }
        if ymax - ymin < 1e-12 {
            (ymin, ymax) = (ymin - 0.5, ymax + 0.5);
        }
        let xmax = if xmax > xmin { xmax } else { xmin + 1.0 };
        let px = |x: f64, y: f64| {
            let fx = (x - xmin) / (xmax - xmin);
            let fy = (y - ymin) / (ymax - ymin);
            ((x0 as f64 + fx * w as f64) as i64, (y0 as f64 + (1.0 - fy) * h as f64) as i64)
        };
        for i in 0..=4 {
            let yy = y0 + i * h / 4;
            self.fill(x0, yy, w, 1, GREY);
        }
        self.fill(x0, y0, 1, h, BLACK);
        self.fill(x0, y0 + h, w, 1, BLACK);
        self.text(title, x0 + w / 2 - 3 * title.len(), y0 - 14, BLACK);
        for (i, v) in [ymax, (ymin + ymax) / 2.0, ymin].iter().enumerate() {
            let label = number(*v);
            self.text(&label, x0.saturating_sub(6 * label.len() + 4), y0 + i * h / 2 - 3, BLACK);
        }
        for (i, v) in [xmin, xmax].iter().enumerate() {
            let label = format!("{}", *v as u64);
            self.text(&label, x0 + i * w - 3 * label.len() * i, y0 + h + 6, BLACK);
        }
        self.text("step", x0 + w / 2 - 12, y0 + h + 6, BLACK);
        for (run, pts) in lines.iter().enumerate() {
            let c = COLORS[run % COLORS.len()];
            for pair in pts.windows(2).filter(|p| p[0].1.is_finite() && p[1].1.is_finite()) {
                self.line(px(pair[0].0, pair[0].1), px(pair[1].0, pair[1].1), c);
            }
        }
        for (run, pts) in dots.iter().enumerate() {
            let c = COLORS[run % COLORS.len()];
            for &(x, y) in pts.iter().filter(|p| p.1.is_finite()) {
                let (a, b) = px(x, y);
                self.fill((a - 3).max(0) as usize, (b - 3).max(0) as usize, 7, 7, BLACK);
                self.fill((a - 2).max(0) as usize, (b - 2).max(0) as usize, 5, 5, c);
            }
        }
    }
    /// PNG: RGB, 8 bits, filter 0 on every row, zlib with stored (uncompressed) blocks.
    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.w * 3 + 1) * self.h);
        for row in self.px.chunks(self.w * 3) {
            raw.push(0);
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
        for (i, b) in blocks.iter().enumerate() {
            z.push((i + 1 == blocks.len()) as u8);
            z.extend((b.len() as u16).to_le_bytes());
            z.extend((!(b.len() as u16)).to_le_bytes());
            z.extend_from_slice(b);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &raw {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        z.extend((b << 16 | a).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend(h.finalize().to_be_bytes());
        };
        let mut ihdr = (self.w as u32).to_be_bytes().to_vec();
        ihdr.extend((self.h as u32).to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &z);
        chunk(b"IEND", &[]);
        out
    }
}

/// A tick label: 3 significant digits, exponent form outside 1e-3..1e5.
fn number(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// 5×7 glyphs (one byte a row, the low 5 bits, the left column the highest) for what the plot
/// writes: digits, signs, the titles' letters; anything else is blank.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '/' => [1, 1, 2, 4, 8, 16, 16],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_is_well_formed() {
        let mut c = Canvas::new(20, 10);
        c.line((0, 0), (19, 9), COLORS[0]);
        c.text("0.5e-3", 1, 1, BLACK);
        let png = c.png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 20);
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]), "IEND's CRC ends the file");
        assert_eq!(number(0.003), "0.0030");
        assert_eq!(number(123456.0), "1.23e5");
    }
}
