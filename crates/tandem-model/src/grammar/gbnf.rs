//! GBNF (llama.cpp's grammar format) rewritten as llguidance's Lark, so one matcher serves both.
//!
//! GBNF: `name ::= body`, bodies over quoted strings, `[...]` character classes, `.`, rule names,
//! `( )`, `|`, `* + ?` and `{m}`, `{m,}`, `{m,n}`; `#` comments; a body may span lines and ends
//! where the next `name ::=` starts. `root` is the start rule. Lark takes the same operators;
//! strings are re-quoted as JSON, classes become `/[...]/` regexes, names are lowercased (Lark
//! reads capitalised names as terminals) and each rule is written on one line.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Define,
    Str(String),
    Class(String),
    Dot,
    Open,
    Close,
    Pipe,
    Op(char),
    Repeat(String),
}

/// Whether `src` is GBNF rather than Lark (GBNF defines rules with `::=`).
pub fn looks_like_gbnf(src: &str) -> bool {
    src.contains("::=")
}

fn unescape(
    chars: &mut std::iter::Peekable<std::str::Chars>,
    out: &mut String,
) -> Result<(), String> {
    let hex =
        |chars: &mut std::iter::Peekable<std::str::Chars>, n: usize| -> Result<char, String> {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| format!("bad escape \\{digits}"))
        };
    match chars.next() {
        Some('n') => out.push('\n'),
        Some('r') => out.push('\r'),
        Some('t') => out.push('\t'),
        Some('x') => out.push(hex(chars, 2)?),
        Some('u') => out.push(hex(chars, 4)?),
        Some('U') => out.push(hex(chars, 8)?),
        Some(c) => out.push(c),
        None => return Err("unfinished escape".into()),
    }
    Ok(())
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => while chars.next().is_some_and(|c| c != '\n') {},
            ':' => {
                let s: String = chars.by_ref().take(3).collect();
                if s != "::=" {
                    return Err(format!("expected '::=', got {s:?}"));
                }
                toks.push(Tok::Define);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => unescape(&mut chars, &mut s)?,
                        Some(c) => s.push(c),
                        None => return Err("unterminated string".into()),
                    }
                }
                toks.push(Tok::Str(s));
            }
            '[' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some('\\') => {
                            s.push('\\');
                            s.push(chars.next().ok_or("unterminated character class")?);
                        }
                        Some('/') => s.push_str("\\/"),
                        Some(c) => s.push(c),
                        None => return Err("unterminated character class".into()),
                    }
                }
                toks.push(Tok::Class(s));
            }
            '{' => {
                let mut s = String::new();
                for c in chars.by_ref() {
                    s.push(c);
                    if c == '}' {
                        break;
                    }
                }
                let inner = &s[1..s.len().saturating_sub(1)];
                if !s.ends_with('}')
                    || inner.is_empty()
                    || !inner
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
                {
                    return Err(format!("bad repetition {s:?}"));
                }
                toks.push(Tok::Repeat(s.replace(' ', "")));
            }
            '.' => {
                chars.next();
                toks.push(Tok::Dot);
            }
            '(' => {
                chars.next();
                toks.push(Tok::Open);
            }
            ')' => {
                chars.next();
                toks.push(Tok::Close);
            }
            '|' => {
                chars.next();
                toks.push(Tok::Pipe);
            }
            '*' | '+' | '?' => {
                chars.next();
                toks.push(Tok::Op(c));
            }
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                toks.push(Tok::Name(s));
            }
            c => return Err(format!("unexpected character {c:?}")),
        }
    }
    Ok(toks)
}

fn lark_name(gbnf: &str) -> String {
    match gbnf {
        "root" => "start".into(),
        "start" => "start_".into(),
        n => {
            let lower = n.to_ascii_lowercase();
            // Lark names start with a letter.
            if lower.starts_with(|c: char| c.is_ascii_lowercase()) {
                lower
            } else {
                format!("r_{lower}")
            }
        }
    }
}

/// The Lark grammar equal to the GBNF grammar `src`; the error says what could not be read.
pub fn gbnf_to_lark(src: &str) -> Result<String, String> {
    let toks = lex(src)?;
    let mut out = String::new();
    let mut has_root = false;
    let mut i = 0;
    while i < toks.len() {
        let (Some(Tok::Name(name)), Some(Tok::Define)) = (toks.get(i), toks.get(i + 1)) else {
            return Err(format!("expected a rule 'name ::= ...' at {:?}", toks[i]));
        };
        has_root |= name == "root";
        out.push_str(&lark_name(name));
        out.push(':');
        i += 2;
        let mut empty = true;
        while i < toks.len() {
            if matches!(toks.get(i + 1), Some(Tok::Define)) {
                break;
            }
            out.push(' ');
            match &toks[i] {
                Tok::Name(n) => out.push_str(&lark_name(n)),
                Tok::Str(s) => out.push_str(&serde_json::to_string(s).map_err(|e| e.to_string())?),
                Tok::Class(c) => {
                    out.push_str("/[");
                    out.push_str(c);
                    out.push_str("]/");
                }
                Tok::Dot => out.push_str("/(?s:.)/"),
                Tok::Open => out.push('('),
                Tok::Close => out.push(')'),
                Tok::Pipe => out.push('|'),
                Tok::Op(c) => out.push(*c),
                Tok::Repeat(r) => out.push_str(r),
                Tok::Define => return Err("'::=' without a rule name".into()),
            }
            empty = false;
            i += 1;
        }
        if empty {
            out.push_str(" \"\"");
        }
        out.push('\n');
    }
    if !has_root {
        return Err("a GBNF grammar needs a 'root' rule".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_strings_classes_and_repeats_carry_over() {
        let g = "# yes or no, then digits\nroot ::= answer \" \" [0-9]{1,3}\nanswer ::= \"yes\"\n  | \"no\\n\" ( Maybe )?\nMaybe ::= [^/]+ .\n";
        assert_eq!(
            gbnf_to_lark(g).unwrap(),
            "start: answer \" \" /[0-9]/ {1,3}\nanswer: \"yes\" | \"no\\n\" ( maybe ) ?\nmaybe: /[^\\/]/ + /(?s:.)/\n"
        );
    }

    #[test]
    fn bad_grammars_say_why() {
        assert!(gbnf_to_lark("a ::= \"x\"").unwrap_err().contains("root"));
        assert!(gbnf_to_lark("root ::= \"x")
            .unwrap_err()
            .contains("unterminated"));
        assert!(gbnf_to_lark("root := x").unwrap_err().contains("::="));
        assert!(gbnf_to_lark("root ::= x{a}")
            .unwrap_err()
            .contains("repetition"));
    }
}
