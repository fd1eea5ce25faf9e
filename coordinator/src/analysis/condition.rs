//! The condition of an analysis metric: a comparison of arithmetic over the
//! values its provider measured, e.g. `canary_p99 <= 1.2 * stable_p99` or
//! `canary_success_rate >= 0.99 and canary_success_rate >= stable_success_rate - 0.01`.
//!
//! Grammar, loosest first: `or` (also `||`), `and` (`&&`), one comparison
//! (`< <= > >= == !=`), `+ -`, `* /`, unary `-`, then numbers, names and
//! parentheses. A condition is parsed when the spec is (so a typo fails the
//! deploy, not the canary) and again from its text when evaluated.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Number(f64),
    Name(String),
    Neg(Box<Expr>),
    Arith(Box<Expr>, ArithOp, Box<Expr>),
    Compare(Box<Expr>, CompareOp, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// Why a condition has no verdict for a sample.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("{0} has no value in this sample")]
    Missing(String),
    #[error("a division by zero")]
    DivisionByZero,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(f64),
    Name(String),
    Op(&'static str),
    Open,
    Close,
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    const OPS: [&str; 14] = [
        "<=", ">=", "==", "!=", "&&", "||", "<", ">", "+", "-", "*", "/", "(", ")",
    ];
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let c = rest.chars().next().expect("not empty");
        if c.is_ascii_digit() || c == '.' {
            // Digits and dots, and an exponent with its sign (1.5e-3).
            let bytes = rest.as_bytes();
            let mut end = 0;
            while end < bytes.len() {
                let b = bytes[end];
                let sign_of_exponent =
                    (b == b'-' || b == b'+') && end > 0 && matches!(bytes[end - 1], b'e' | b'E');
                if !(b.is_ascii_digit() || b == b'.' || b == b'e' || b == b'E' || sign_of_exponent)
                {
                    break;
                }
                end += 1;
            }
            let number = &rest[..end];
            let value: f64 = number
                .parse()
                .map_err(|_| format!("{number:?} is not a number"))?;
            out.push(Token::Number(value));
            rest = &rest[end..];
        } else if c.is_ascii_alphabetic() || c == '_' {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            match &rest[..end] {
                "and" => out.push(Token::Op("&&")),
                "or" => out.push(Token::Op("||")),
                name => out.push(Token::Name(name.to_string())),
            }
            rest = &rest[end..];
        } else if let Some(op) = OPS.iter().find(|op| rest.starts_with(**op)) {
            out.push(match *op {
                "(" => Token::Open,
                ")" => Token::Close,
                op => Token::Op(op),
            });
            rest = &rest[op.len()..];
        } else {
            return Err(format!(
                "{c:?} is not part of a condition; use numbers, names, + - * /, comparisons, and, or, parentheses"
            ));
        }
        rest = rest.trim_start();
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn eat_op(&mut self, ops: &[&'static str]) -> Option<&'static str> {
        match self.peek() {
            Some(Token::Op(op)) if ops.contains(op) => {
                let op = *op;
                self.at += 1;
                Some(op)
            }
            _ => None,
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat_op(&["||"]).is_some() {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.compare()?;
        while self.eat_op(&["&&"]).is_some() {
            left = Expr::And(Box::new(left), Box::new(self.compare()?));
        }
        Ok(left)
    }

    fn compare(&mut self) -> Result<Expr, String> {
        let left = self.sum()?;
        let op = match self.eat_op(&["<=", ">=", "==", "!=", "<", ">"]) {
            Some("<") => CompareOp::Lt,
            Some("<=") => CompareOp::Le,
            Some(">") => CompareOp::Gt,
            Some(">=") => CompareOp::Ge,
            Some("==") => CompareOp::Eq,
            Some(_) => CompareOp::Ne,
            None => return Ok(left),
        };
        let right = self.sum()?;
        if matches!(
            self.peek(),
            Some(Token::Op("<" | "<=" | ">" | ">=" | "==" | "!="))
        ) {
            return Err("comparisons do not chain; join them with and".into());
        }
        Ok(Expr::Compare(Box::new(left), op, Box::new(right)))
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut left = self.product()?;
        while let Some(op) = self.eat_op(&["+", "-"]) {
            let op = if op == "+" {
                ArithOp::Add
            } else {
                ArithOp::Sub
            };
            left = Expr::Arith(Box::new(left), op, Box::new(self.product()?));
        }
        Ok(left)
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while let Some(op) = self.eat_op(&["*", "/"]) {
            let op = if op == "*" {
                ArithOp::Mul
            } else {
                ArithOp::Div
            };
            left = Expr::Arith(Box::new(left), op, Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat_op(&["-"]).is_some() {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        match token {
            Some(Token::Number(n)) => Ok(Expr::Number(n)),
            Some(Token::Name(name)) => Ok(Expr::Name(name)),
            Some(Token::Open) => {
                let inner = self.or()?;
                match self.tokens.get(self.at) {
                    Some(Token::Close) => {
                        self.at += 1;
                        Ok(inner)
                    }
                    _ => Err("a parenthesis is not closed".into()),
                }
            }
            Some(Token::Close) => Err("a ')' without its '('".into()),
            Some(Token::Op(op)) => Err(format!("{op:?} where a value belongs")),
            None => Err("it ends where a value belongs".into()),
        }
    }
}

impl Expr {
    fn is_boolean(&self) -> bool {
        matches!(self, Expr::Compare(..) | Expr::And(..) | Expr::Or(..))
    }

    /// Whether operands have the right kind: numbers under arithmetic and
    /// comparisons, truth values under and/or.
    fn check(&self) -> Result<(), String> {
        match self {
            Expr::Number(_) | Expr::Name(_) => Ok(()),
            Expr::Neg(e) => e.numeric(),
            Expr::Arith(a, _, b) | Expr::Compare(a, _, b) => {
                a.numeric()?;
                b.numeric()
            }
            Expr::And(a, b) | Expr::Or(a, b) => {
                for e in [a, b] {
                    if !e.is_boolean() {
                        return Err("and/or join comparisons, e.g. a > 1 and b < 2".into());
                    }
                    e.check()?;
                }
                Ok(())
            }
        }
    }

    fn numeric(&self) -> Result<(), String> {
        if self.is_boolean() {
            return Err("a comparison where a number belongs".into());
        }
        self.check()
    }

    fn names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Number(_) => {}
            Expr::Name(n) => out.push(n),
            Expr::Neg(e) => e.names(out),
            Expr::Arith(a, _, b) | Expr::Compare(a, _, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                a.names(out);
                b.names(out);
            }
        }
    }

    fn number(&self, values: &BTreeMap<String, f64>) -> Result<f64, EvalError> {
        Ok(match self {
            Expr::Number(n) => *n,
            Expr::Name(name) => *values
                .get(name)
                .ok_or_else(|| EvalError::Missing(name.clone()))?,
            Expr::Neg(e) => -e.number(values)?,
            Expr::Arith(a, op, b) => {
                let (a, b) = (a.number(values)?, b.number(values)?);
                match op {
                    ArithOp::Add => a + b,
                    ArithOp::Sub => a - b,
                    ArithOp::Mul => a * b,
                    ArithOp::Div if b == 0.0 => return Err(EvalError::DivisionByZero),
                    ArithOp::Div => a / b,
                }
            }
            _ => unreachable!("checked when parsed: a comparison is not a number"),
        })
    }

    fn truth(&self, values: &BTreeMap<String, f64>) -> Result<bool, EvalError> {
        Ok(match self {
            Expr::Compare(a, op, b) => {
                let (a, b) = (a.number(values)?, b.number(values)?);
                match op {
                    CompareOp::Lt => a < b,
                    CompareOp::Le => a <= b,
                    CompareOp::Gt => a > b,
                    CompareOp::Ge => a >= b,
                    CompareOp::Eq => a == b,
                    CompareOp::Ne => a != b,
                }
            }
            Expr::And(a, b) => a.truth(values)? && b.truth(values)?,
            Expr::Or(a, b) => a.truth(values)? || b.truth(values)?,
            _ => unreachable!("checked when parsed: a condition compares"),
        })
    }
}

impl Condition {
    /// Parses `text`; every name must be one of `known` (what the provider
    /// measures). The error says what is wrong, for the spec's message.
    pub fn parse(text: &str, known: &[&str]) -> Result<Self, String> {
        let mut parser = Parser {
            tokens: tokens(text)?,
            at: 0,
        };
        if parser.tokens.is_empty() {
            return Err("the condition is empty; write a comparison, e.g. result < 5".into());
        }
        let expr = parser.or()?;
        if parser.at < parser.tokens.len() {
            return Err(format!(
                "{:?} after a complete condition",
                parser.tokens[parser.at]
            ));
        }
        if !expr.is_boolean() {
            return Err(
                "the condition does not compare anything; write e.g. canary_p99 <= 1.2 * stable_p99"
                    .into(),
            );
        }
        expr.check()?;
        let mut names = Vec::new();
        expr.names(&mut names);
        if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
            return Err(format!(
                "{unknown} is not a value this provider measures; use {}",
                known.join(", ")
            ));
        }
        Ok(Condition { expr })
    }

    /// The names it reads, in order, each once.
    pub fn names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.expr.names(&mut names);
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(*n));
        names
    }

    /// Whether `values` meet the condition.
    pub fn holds(&self, values: &BTreeMap<String, f64>) -> Result<bool, EvalError> {
        self.expr.truth(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 3] = ["canary_p99", "stable_p99", "result"];

    fn values(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn holds(text: &str, pairs: &[(&str, f64)]) -> bool {
        Condition::parse(text, &KNOWN)
            .unwrap()
            .holds(&values(pairs))
            .unwrap()
    }

    #[test]
    fn relative_and_absolute_conditions_evaluate() {
        let slow = [("canary_p99", 50.0), ("stable_p99", 25.0)];
        assert!(!holds("canary_p99 <= 1.2 * stable_p99", &slow));
        assert!(holds("canary_p99 <= 2 * stable_p99", &slow));
        assert!(holds("canary_p99 < 100 and stable_p99 < 100", &slow));
        assert!(holds("canary_p99 > 60 || stable_p99 == 25", &slow));
        assert!(holds("-(canary_p99 - stable_p99) / 5 >= -5", &slow));
        assert!(holds("result != 1.5e1", &[("result", 14.0)]));
        assert!(holds(
            "result < 1e-3 and result > -2E+2",
            &[("result", 0.0005)]
        ));
        assert!(holds("result-1 > 0", &[("result", 3.0)]));
        // Precedence: and binds tighter than or, * than +.
        assert!(holds(
            "result > 5 or result > 1 and result > 100",
            &[("result", 6.0)]
        ));
        assert!(holds("1 + 2 * result == 7", &[("result", 3.0)]));
    }

    #[test]
    fn a_value_missing_or_a_zero_divisor_gives_no_verdict() {
        let c = Condition::parse("canary_p99 <= 1.2 * stable_p99", &KNOWN).unwrap();
        assert_eq!(
            c.holds(&values(&[("canary_p99", 3.0)])),
            Err(EvalError::Missing("stable_p99".into()))
        );
        let c = Condition::parse("result / stable_p99 < 1", &KNOWN).unwrap();
        assert_eq!(
            c.holds(&values(&[("result", 3.0), ("stable_p99", 0.0)])),
            Err(EvalError::DivisionByZero)
        );
    }

    #[test]
    fn conditions_that_do_not_parse_say_why() {
        for (text, says) in [
            ("", "empty"),
            ("canary_p99", "does not compare"),
            ("canary_p99 <= ", "ends where a value belongs"),
            (
                "canary_p95 < 3",
                "canary_p95 is not a value this provider measures; use canary_p99",
            ),
            ("result < 1 < 2", "do not chain"),
            ("(result < 1", "not closed"),
            ("result < 1)", "after a complete condition"),
            ("result < 1 and 3", "and/or join comparisons"),
            (
                "(result < 1) + 2 > 0",
                "a comparison where a number belongs",
            ),
            ("result ~ 3", "not part of a condition"),
            ("result < 1..2", "not a number"),
        ] {
            let error = Condition::parse(text, &KNOWN).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
