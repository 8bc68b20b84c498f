//! `multi` graders' `calculate_output`: arithmetic over the sub-graders' scores by name —
//! numbers, names, `+ - * / ^`, unary minus, parentheses, and `min`, `max`, `abs`, `floor`,
//! `ceil`, `exp`, `sqrt`, `log` (OpenAI's set). A small recursive-descent parser: evalexpr, the
//! crate that does this, is AGPL-3.0 since version 12, which we do not take into the server.

/// A parsed formula.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Var(String),
    Neg(Box<Expr>),
    Bin(char, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

const FUNCTIONS: &[(&str, usize)] = &[
    ("min", 0),
    ("max", 0),
    ("abs", 1),
    ("floor", 1),
    ("ceil", 1),
    ("exp", 1),
    ("sqrt", 1),
    ("log", 1),
];

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.at).copied()
    }

    fn err(&self, what: &str) -> String {
        format!("{what} at character {}", self.at + 1)
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut e = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            e = Expr::Bin(op as char, Box::new(e), Box::new(self.term()?));
        }
        Ok(e)
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut e = self.power()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.at += 1;
            e = Expr::Bin(op as char, Box::new(e), Box::new(self.power()?));
        }
        Ok(e)
    }

    fn power(&mut self) -> Result<Expr, String> {
        let base = self.unary()?;
        if self.peek() == Some(b'^') {
            self.at += 1;
            // Right-associative.
            return Ok(Expr::Bin('^', Box::new(base), Box::new(self.power()?)));
        }
        Ok(base)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(b'-') {
            self.at += 1;
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(b'(') => {
                self.at += 1;
                let e = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(self.err("expected `)`"));
                }
                self.at += 1;
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                let start = self.at;
                while self
                    .s
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
                text.parse()
                    .map(Expr::Num)
                    .map_err(|_| self.err(&format!("`{text}` is not a number")))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.at;
                while self
                    .s
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.at += 1;
                }
                let name = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
                if self.peek() != Some(b'(') {
                    return Ok(Expr::Var(name));
                }
                let Some(&(_, arity)) = FUNCTIONS.iter().find(|(f, _)| *f == name) else {
                    return Err(self.err(&format!("unknown function `{name}`")));
                };
                self.at += 1;
                let mut args = Vec::new();
                if self.peek() != Some(b')') {
                    loop {
                        args.push(self.expr()?);
                        match self.peek() {
                            Some(b',') => self.at += 1,
                            Some(b')') => break,
                            _ => return Err(self.err("expected `,` or `)`")),
                        }
                    }
                }
                self.at += 1;
                if (arity > 0 && args.len() != arity) || args.is_empty() {
                    return Err(self.err(&format!("`{name}` takes {} argument(s)", arity.max(1))));
                }
                Ok(Expr::Call(name, args))
            }
            Some(c) => Err(self.err(&format!("unexpected `{}`", c as char))),
            None => Err(self.err("unexpected end")),
        }
    }
}

/// Parses `text`; the error says what and where.
pub fn parse(text: &str) -> Result<Expr, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
    };
    let e = p.expr()?;
    if p.peek().is_some() {
        return Err(p.err("unexpected text after the formula"));
    }
    Ok(e)
}

impl Expr {
    /// The names the formula reads.
    pub fn vars(&self, out: &mut Vec<String>) {
        match self {
            Expr::Num(_) => {}
            Expr::Var(v) => out.push(v.clone()),
            Expr::Neg(e) => e.vars(out),
            Expr::Bin(_, a, b) => {
                a.vars(out);
                b.vars(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.vars(out)),
        }
    }

    /// The value with `get` giving each name's.
    pub fn eval(&self, get: &dyn Fn(&str) -> Option<f64>) -> Result<f64, String> {
        Ok(match self {
            Expr::Num(x) => *x,
            Expr::Var(v) => get(v).ok_or_else(|| format!("no grader named `{v}`"))?,
            Expr::Neg(e) => -e.eval(get)?,
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(get)?, b.eval(get)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    '/' => a / b,
                    _ => a.powf(b),
                }
            }
            Expr::Call(f, args) => {
                let xs = args
                    .iter()
                    .map(|a| a.eval(get))
                    .collect::<Result<Vec<_>, _>>()?;
                match f.as_str() {
                    "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
                    "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    "abs" => xs[0].abs(),
                    "floor" => xs[0].floor(),
                    "ceil" => xs[0].ceil(),
                    "exp" => xs[0].exp(),
                    "sqrt" => xs[0].sqrt(),
                    _ => xs[0].ln(),
                }
            }
        })
    }
}
