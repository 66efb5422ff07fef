//! A small regex subset for check metadata (no dependency beyond std): alternatives `a|b` at
//! the top level, `.`, classes `[a-z_]` / `[^...]`, escapes `\s \S \w \W \d \D` and `\<char>`,
//! quantifiers `* + ?` on one atom, anchors `^` (start) and `$` (end). No groups.

#[derive(Debug, Clone)]
enum Atom {
    Lit(char),
    Any,
    Class(Vec<(char, char)>, bool),
    Perl(char),
}

#[derive(Debug, Clone)]
struct Piece {
    atom: Atom,
    min: usize,
    max: usize,
}

#[derive(Debug, Clone)]
struct Alt {
    start: bool,
    end: bool,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone)]
pub struct Re(Vec<Alt>);

impl Atom {
    fn matches(&self, c: char) -> bool {
        match self {
            Atom::Lit(l) => *l == c,
            Atom::Any => true,
            Atom::Class(ranges, neg) => ranges.iter().any(|&(a, b)| a <= c && c <= b) != *neg,
            Atom::Perl(p) => {
                let m = match p.to_ascii_lowercase() {
                    's' => c.is_whitespace(),
                    'w' => c.is_alphanumeric() || c == '_',
                    _ => c.is_ascii_digit(),
                };
                m != p.is_ascii_uppercase()
            }
        }
    }
}

impl Re {
    pub fn new(pattern: &str) -> Result<Re, String> {
        let mut alts = Vec::new();
        for part in split_top(pattern) {
            let mut cs: Vec<char> = part.chars().collect();
            let start = cs.first() == Some(&'^');
            if start {
                cs.remove(0);
            }
            let end = cs.last() == Some(&'$') && !(cs.len() >= 2 && cs[cs.len() - 2] == '\\');
            if end {
                cs.pop();
            }
            let mut pieces = Vec::new();
            let mut i = 0;
            while i < cs.len() {
                let atom = match cs[i] {
                    '.' => Atom::Any,
                    '\\' => {
                        i += 1;
                        let c = *cs.get(i).ok_or_else(|| format!("regex `{pattern}`: trailing backslash"))?;
                        if "sSwWdD".contains(c) {
                            Atom::Perl(c)
                        } else {
                            Atom::Lit(c)
                        }
                    }
                    '[' => {
                        let close = (i + 1..cs.len())
                            .find(|&j| cs[j] == ']' && j > i + 1)
                            .ok_or_else(|| format!("regex `{pattern}`: unclosed ["))?;
                        let mut body = &cs[i + 1..close];
                        let neg = body.first() == Some(&'^');
                        if neg {
                            body = &body[1..];
                        }
                        let mut ranges = Vec::new();
                        let mut j = 0;
                        while j < body.len() {
                            if j + 2 < body.len() && body[j + 1] == '-' {
                                ranges.push((body[j], body[j + 2]));
                                j += 3;
                            } else {
                                ranges.push((body[j], body[j]));
                                j += 1;
                            }
                        }
                        i = close;
                        Atom::Class(ranges, neg)
                    }
                    '*' | '+' | '?' => return Err(format!("regex `{pattern}`: quantifier without an atom")),
                    '(' | ')' => return Err(format!("regex `{pattern}`: groups are not supported; escape with \\(")),
                    c => Atom::Lit(c),
                };
                i += 1;
                let (min, max) = match cs.get(i) {
                    Some('*') => (0, usize::MAX),
                    Some('+') => (1, usize::MAX),
                    Some('?') => (0, 1),
                    _ => (1, 1),
                };
                if (min, max) != (1, 1) {
                    i += 1;
                }
                pieces.push(Piece { atom, min, max });
            }
            alts.push(Alt { start, end, pieces });
        }
        Ok(Re(alts))
    }

    pub fn is_match(&self, text: &str) -> bool {
        let cs: Vec<char> = text.chars().collect();
        self.0.iter().any(|alt| {
            let starts = if alt.start { 0..1 } else { 0..cs.len() + 1 };
            starts.into_iter().any(|s| match_here(&alt.pieces, &cs[s..], alt.end))
        })
    }
}

/// Split on `|` outside classes and escapes.
fn split_top(p: &str) -> Vec<String> {
    let (mut parts, mut cur, mut in_class, mut esc) = (Vec::new(), String::new(), false, false);
    for c in p.chars() {
        match (esc, c) {
            (true, _) => esc = false,
            (false, '\\') => esc = true,
            (false, '[') => in_class = true,
            (false, ']') => in_class = false,
            (false, '|') if !in_class => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
}

fn match_here(pieces: &[Piece], text: &[char], end: bool) -> bool {
    let Some((p, rest)) = pieces.split_first() else {
        return !end || text.is_empty();
    };
    let mut n = 0;
    while n < p.max && n < text.len() && p.atom.matches(text[n]) {
        n += 1;
    }
    // Greedy, backing off one character at a time.
    (p.min..=n).rev().any(|k| match_here(rest, &text[k..], end))
}

#[cfg(test)]
mod tests {
    use super::Re;

    #[test]
    fn subset_matches_like_a_regex() {
        let m = |p: &str, t: &str| Re::new(p).unwrap().is_match(t);
        assert!(m(r"fn\s+rope", "pub fn  rope(x)"));
        assert!(!m(r"fn\s+rope", "fn rop"));
        assert!(m(r"catch_unwind|panic", "match catch_unwind(f)"));
        assert!(m(r"^\s*if t\.clip > 0", "        if t.clip > 0.0 && gnorm > t.clip {"));
        assert!(!m(r"^if", "  if"));
        assert!(m(r"step_[0-9]+$", "a/step_00000010"));
        assert!(!m(r"step_[0-9]+$", "a/step_0001x"));
        assert!(m(r"[^a-z]x?y", "1y"));
        assert!(m(r"series\(&theirs\)", "if series(&theirs) != series(ours) {"));
        assert!(Re::new("(a|b)").is_err());
    }
}
