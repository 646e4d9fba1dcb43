//! A query's cohort filter: a small expression language over a dataset's columns,
//! parsed and evaluated by the site agent (never run as SQL text from the
//! coordinator: the agent renders it into bound parameters itself).
//!
//! ```text
//! expr      := or
//! or        := and ("or" and)*
//! and       := not ("and" not)*
//! not       := "not" not | "(" expr ")" | predicate
//! predicate := column cmp literal
//!            | column ["not"] "in" "(" literal ("," literal)* ")"
//!            | column "is" ["not"] "null"
//! cmp       := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
//! literal   := number | 'text' | true | false
//! column    := name | "quoted name"
//! ```
//!
//! Keywords are case-insensitive. Missing values follow SQL's three-valued logic: a
//! comparison or `in` with a missing value is *unknown*; `not unknown` is unknown;
//! `false and unknown` is false and `true or unknown` is true; a row is in the
//! cohort only when the whole filter is *true*. `is null` / `is not null` are never
//! unknown. So `not (age > 60)` leaves out the rows whose age is missing, exactly as
//! SQL's `WHERE NOT (age > 60)` does.

use std::fmt;

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number(v) => write!(f, "{v}"),
            Literal::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    pub fn sql(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "<>",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }

    fn holds(self, o: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Cmp::Eq => o == Equal,
            Cmp::Ne => o != Equal,
            Cmp::Lt => o == Less,
            Cmp::Le => o != Greater,
            Cmp::Gt => o == Greater,
            Cmp::Ge => o != Less,
        }
    }
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// The empty filter: every row.
    All,
    Compare {
        column: String,
        op: Cmp,
        value: Literal,
    },
    In {
        column: String,
        values: Vec<Literal>,
        negated: bool,
    },
    IsNull {
        column: String,
        negated: bool,
    },
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// SQL's three truth values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        }
    }

    fn and(self, other: Truth) -> Truth {
        match (self, other) {
            (Truth::False, _) | (_, Truth::False) => Truth::False,
            (Truth::True, Truth::True) => Truth::True,
            _ => Truth::Unknown,
        }
    }

    fn or(self, other: Truth) -> Truth {
        match (self, other) {
            (Truth::True, _) | (_, Truth::True) => Truth::True,
            (Truth::False, Truth::False) => Truth::False,
            _ => Truth::Unknown,
        }
    }
}

/// One cell as the filter sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Missing,
    Number(f64),
    Bool(bool),
    Text(&'a str),
}

/// A filter that does not parse: what was expected, at which character (0-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter does not parse at position {position}: {message}")]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

impl Expr {
    /// Parses a filter; empty text is [`Expr::All`].
    pub fn parse(text: &str) -> Result<Expr, FilterError> {
        let tokens = lex(text)?;
        let mut p = Parser {
            tokens: &tokens,
            at: 0,
            end: text.chars().count(),
        };
        if tokens.is_empty() {
            return Ok(Expr::All);
        }
        let expr = p.or()?;
        if let Some(t) = p.peek() {
            return Err(p.error_at(t.position, format!("unexpected {} after a complete filter", t.kind)));
        }
        Ok(expr)
    }

    /// The columns the filter reads, each once, in order of appearance.
    pub fn columns(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        self.visit(&mut |c| {
            if !out.iter().any(|o| o == c) {
                out.push(c.to_string());
            }
        });
        out
    }

    fn visit(&self, f: &mut impl FnMut(&str)) {
        match self {
            Expr::All => {}
            Expr::Compare { column, .. } | Expr::In { column, .. } | Expr::IsNull { column, .. } => f(column),
            Expr::Not(e) => e.visit(f),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.visit(f);
                b.visit(f);
            }
        }
    }

    /// Every literal compared with `column`, for type checks against the dataset.
    pub fn literals_of(&self, column: &str) -> Vec<&Literal> {
        let mut out = Vec::new();
        self.collect_literals(column, &mut out);
        out
    }

    fn collect_literals<'a>(&'a self, column: &str, out: &mut Vec<&'a Literal>) {
        match self {
            Expr::Compare { column: c, value, .. } if c == column => out.push(value),
            Expr::In { column: c, values, .. } if c == column => out.extend(values.iter()),
            Expr::Not(e) => e.collect_literals(column, out),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect_literals(column, out);
                b.collect_literals(column, out);
            }
            _ => {}
        }
    }

    /// Whether any ordering comparison (`<`, `<=`, `>`, `>=`) names `column`.
    pub fn orders(&self, column: &str) -> bool {
        match self {
            Expr::Compare { column: c, op, .. } => c == column && !matches!(op, Cmp::Eq | Cmp::Ne),
            Expr::Not(e) => e.orders(column),
            Expr::And(a, b) | Expr::Or(a, b) => a.orders(column) || b.orders(column),
            _ => false,
        }
    }

    /// The filter's truth for one row; `cell(i)` is the value of `columns()[i]`.
    pub fn eval<'v>(&self, cell: &impl Fn(&str) -> Value<'v>) -> Truth {
        match self {
            Expr::All => Truth::True,
            Expr::Compare { column, op, value } => compare(cell(column), value)
                .map_or(Truth::Unknown, |o| if op.holds(o) { Truth::True } else { Truth::False }),
            Expr::In {
                column,
                values,
                negated,
            } => {
                let v = cell(column);
                if v == Value::Missing {
                    return Truth::Unknown;
                }
                let found = values.iter().any(|l| compare(v, l) == Some(std::cmp::Ordering::Equal));
                if found != *negated { Truth::True } else { Truth::False }
            }
            Expr::IsNull { column, negated } => {
                if (cell(column) == Value::Missing) != *negated {
                    Truth::True
                } else {
                    Truth::False
                }
            }
            Expr::Not(e) => e.eval(cell).not(),
            Expr::And(a, b) => a.eval(cell).and(b.eval(cell)),
            Expr::Or(a, b) => a.eval(cell).or(b.eval(cell)),
        }
    }

    /// Whether the row is in the cohort: the filter is true (not false, not unknown).
    pub fn keeps<'v>(&self, cell: &impl Fn(&str) -> Value<'v>) -> bool {
        self.eval(cell) == Truth::True
    }
}

/// The order of a cell and a literal, or None when either is missing or the types do
/// not compare (which validation against the dataset's columns rules out).
fn compare(v: Value<'_>, l: &Literal) -> Option<std::cmp::Ordering> {
    match (v, l) {
        (Value::Number(a), Literal::Number(b)) => a.partial_cmp(b),
        (Value::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Literal::Number(b)) => (a as u8 as f64).partial_cmp(b),
        (Value::Number(a), Literal::Bool(b)) => a.partial_cmp(&(*b as u8 as f64)),
        (Value::Text(a), Literal::Text(b)) => Some(a.cmp(b.as_str())),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Ident(String),
    Number(f64),
    Text(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Ident(s) => write!(f, "{s:?}"),
            Kind::Number(n) => write!(f, "the number {n}"),
            Kind::Text(s) => write!(f, "the text '{s}'"),
            Kind::Op(o) => write!(f, "{o:?}"),
            Kind::LParen => write!(f, "\"(\""),
            Kind::RParen => write!(f, "\")\""),
            Kind::Comma => write!(f, "\",\""),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    position: usize,
    /// A double-quoted name is never a keyword.
    quoted: bool,
}

fn lex(text: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |position: usize, message: String| FilterError { position, message };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let mut quoted = false;
        let kind = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => {
                i += 1;
                Kind::LParen
            }
            ')' => {
                i += 1;
                Kind::RParen
            }
            ',' => {
                i += 1;
                Kind::Comma
            }
            '=' => {
                i += 1;
                Kind::Op("=")
            }
            '!' | '<' | '>' => {
                let next = chars.get(i + 1).copied();
                let (op, len) = match (c, next) {
                    ('!', Some('=')) => ("!=", 2),
                    ('<', Some('>')) => ("<>", 2),
                    ('<', Some('=')) => ("<=", 2),
                    ('>', Some('=')) => (">=", 2),
                    ('<', _) => ("<", 1),
                    ('>', _) => (">", 1),
                    _ => return Err(err(i, "\"!\" must be followed by \"=\"".into())),
                };
                i += len;
                Kind::Op(op)
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(err(start, "this text literal is never closed with '".into())),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                Kind::Text(s)
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(err(start, "this quoted column name is never closed with \"".into())),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                if s.is_empty() {
                    return Err(err(start, "an empty column name".into()));
                }
                quoted = true;
                Kind::Ident(s)
            }
            c if c.is_ascii_digit() || c == '.' || c == '-' => {
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_alphanumeric()
                        || chars[j] == '.'
                        || ((chars[j] == '-' || chars[j] == '+') && matches!(chars[j - 1], 'e' | 'E')))
                {
                    j += 1;
                }
                let s: String = chars[i..j].iter().collect();
                let v: f64 = s
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| err(start, format!("{s:?} is not a number")))?;
                i = j;
                Kind::Number(v)
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let s: String = chars[i..j].iter().collect();
                i = j;
                Kind::Ident(s)
            }
            other => return Err(err(i, format!("unexpected character {other:?}"))),
        };
        out.push(Token {
            kind,
            position: start,
            quoted,
        });
    }
    Ok(out)
}

struct Parser<'t> {
    tokens: &'t [Token],
    at: usize,
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn position(&self) -> usize {
        self.peek().map_or(self.end, |t| t.position)
    }

    fn error_at(&self, position: usize, message: String) -> FilterError {
        FilterError { position, message }
    }

    fn expected(&self, what: &str) -> FilterError {
        match self.peek() {
            Some(t) => self.error_at(t.position, format!("expected {what}, found {}", t.kind)),
            None => self.error_at(self.end, format!("expected {what}, found the end of the filter")),
        }
    }

    /// Whether the next token is the keyword `word` (unquoted, any case); consumes it.
    fn keyword(&mut self, word: &str) -> bool {
        match self.peek() {
            Some(Token {
                kind: Kind::Ident(s),
                quoted: false,
                ..
            }) if s.eq_ignore_ascii_case(word) => {
                self.at += 1;
                true
            }
            _ => false,
        }
    }

    fn is_keyword(s: &str) -> bool {
        ["and", "or", "not", "in", "is", "null", "true", "false"]
            .iter()
            .any(|k| s.eq_ignore_ascii_case(k))
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.not()?;
        while self.keyword("and") {
            let right = self.not()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, FilterError> {
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        if matches!(self.peek().map(|t| &t.kind), Some(Kind::LParen)) {
            self.at += 1;
            let inner = self.or()?;
            if !matches!(self.peek().map(|t| &t.kind), Some(Kind::RParen)) {
                return Err(self.expected("\")\" to close the parenthesis"));
            }
            self.at += 1;
            return Ok(inner);
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Expr, FilterError> {
        let column = match self.peek() {
            Some(Token {
                kind: Kind::Ident(s),
                quoted,
                ..
            }) if *quoted || !Self::is_keyword(s) => s.clone(),
            _ => return Err(self.expected("a column name")),
        };
        self.at += 1;
        if self.keyword("is") {
            let negated = self.keyword("not");
            if !self.keyword("null") {
                return Err(self.expected("\"null\" after \"is\""));
            }
            return Ok(Expr::IsNull { column, negated });
        }
        let negated = self.keyword("not");
        if self.keyword("in") {
            if !matches!(self.peek().map(|t| &t.kind), Some(Kind::LParen)) {
                return Err(self.expected("\"(\" to open the list after \"in\""));
            }
            self.at += 1;
            let mut values = vec![self.literal()?];
            loop {
                match self.peek().map(|t| &t.kind) {
                    Some(Kind::Comma) => {
                        self.at += 1;
                        values.push(self.literal()?);
                    }
                    Some(Kind::RParen) => {
                        self.at += 1;
                        break;
                    }
                    _ => return Err(self.expected("\",\" or \")\" in the list")),
                }
            }
            return Ok(Expr::In {
                column,
                values,
                negated,
            });
        }
        if negated {
            return Err(self.expected("\"in\" after \"not\""));
        }
        let op = match self.peek().map(|t| &t.kind) {
            Some(Kind::Op(o)) => match *o {
                "=" => Cmp::Eq,
                "!=" | "<>" => Cmp::Ne,
                "<" => Cmp::Lt,
                "<=" => Cmp::Le,
                ">" => Cmp::Gt,
                _ => Cmp::Ge,
            },
            _ => return Err(self.expected("a comparison (=, !=, <, <=, >, >=), \"in\" or \"is\"")),
        };
        self.at += 1;
        let value = self.literal()?;
        Ok(Expr::Compare { column, op, value })
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        let literal = match self.peek() {
            Some(Token {
                kind: Kind::Number(v), ..
            }) => Literal::Number(*v),
            Some(Token {
                kind: Kind::Text(s), ..
            }) => Literal::Text(s.clone()),
            Some(Token {
                kind: Kind::Ident(s),
                quoted: false,
                ..
            }) if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false") => {
                Literal::Bool(s.eq_ignore_ascii_case("true"))
            }
            Some(Token {
                kind: Kind::Ident(s),
                quoted: false,
                ..
            }) if s.eq_ignore_ascii_case("null") => {
                return Err(self.error_at(
                    self.position(),
                    "null is not a value to compare with (a comparison with null is never true): write \"column is null\"".into(),
                ));
            }
            _ => return Err(self.expected("a number, a 'text' or true/false")),
        };
        self.at += 1;
        Ok(literal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(cells: &'a [(&'a str, Value<'a>)]) -> impl Fn(&str) -> Value<'a> + 'a {
        move |c| cells.iter().find(|(n, _)| *n == c).map_or(Value::Missing, |(_, v)| *v)
    }

    #[test]
    fn precedence_and_three_valued_logic() {
        let e = Expr::parse("radius_mean > 15 and malignant = 1 or not (age <= 40)").expect("parses");
        assert_eq!(e.columns(), vec!["radius_mean", "malignant", "age"]);
        let r = [("radius_mean", Value::Number(16.0)), ("malignant", Value::Bool(true))];
        assert_eq!(e.eval(&row(&r)), Truth::True);
        // age missing: not (unknown) is unknown; false or unknown is unknown.
        let r = [("radius_mean", Value::Number(10.0)), ("malignant", Value::Number(1.0))];
        assert_eq!(e.eval(&row(&r)), Truth::Unknown);
        assert!(!e.keeps(&row(&r)));
        let e = Expr::parse("not (age > 60)").expect("parses");
        assert!(!e.keeps(&row(&[])), "a missing age is not in the cohort under not");
        let e = Expr::parse("age is null or age > 60").expect("parses");
        assert!(e.keeps(&row(&[])));
        let e = Expr::parse("false_positive = true and x is not null").expect("column names may start with keywords");
        assert_eq!(e.columns(), vec!["false_positive", "x"]);
    }

    #[test]
    fn in_lists_text_and_negation() {
        let e = Expr::parse("stage in ('II', 'III') and sex not in ('M')").expect("parses");
        let r = [("stage", Value::Text("II")), ("sex", Value::Text("F"))];
        assert!(e.keeps(&row(&r)));
        let r = [("stage", Value::Text("I")), ("sex", Value::Text("F"))];
        assert_eq!(e.eval(&row(&r)), Truth::False);
        let r = [("stage", Value::Text("II"))];
        assert_eq!(e.eval(&row(&r)), Truth::Unknown, "sex missing: not in is unknown");
        let e = Expr::parse("\"Grade Text\" = 'it''s'").expect("quoted names and doubled quotes");
        assert!(e.keeps(&row(&[("Grade Text", Value::Text("it's"))])));
        assert_eq!(Expr::parse("  ").expect("empty"), Expr::All);
        let e = Expr::parse("x >= -1.5e2").expect("exponent");
        assert!(e.keeps(&row(&[("x", Value::Number(-150.0))])));
    }

    #[test]
    fn parse_errors_point_to_the_position() {
        let cases = [
            ("age > ", 6, "found the end"),
            ("age >> 3", 5, "expected a number"),
            ("(age > 3", 8, "\")\""),
            ("age = 3 and", 11, "a column name"),
            ("age = null", 6, "is null"),
            ("age in 3", 7, "\"(\""),
            ("age = 'open", 6, "never closed"),
            ("age ~ 3", 4, "unexpected character"),
            ("age = 3 4", 8, "after a complete filter"),
            ("age not = 3", 8, "\"in\" after \"not\""),
            ("and = 3", 0, "a column name"),
        ];
        for (text, position, says) in cases {
            let e = Expr::parse(text).expect_err(text);
            assert_eq!(e.position, position, "{text}: {e}");
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
    }
}
