//! Label selectors in kubectl's syntax (`-l`): `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
//! `k notin (a,b)`, `k`, `!k`, `k>1`, `k<1`; a comma means AND. Keys and values are
//! validated like the API machinery does and errors read like kubectl's.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::ModelError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Operator::Equals | Operator::In => v.is_some_and(|v| self.values.contains(v)),
            Operator::NotEquals | Operator::NotIn => !v.is_some_and(|v| self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let (Some(v), Some(bound)) = (v, self.values.first()) else {
                    return false;
                };
                let (Ok(v), Ok(bound)) = (v.parse::<i64>(), bound.parse::<i64>()) else {
                    return false;
                };
                if self.op == Operator::GreaterThan {
                    v > bound
                } else {
                    v < bound
                }
            }
        }
    }
}

/// A parsed selector: every requirement must hold. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn parse(input: &str) -> Result<Selector, ModelError> {
        let err = |source: SelectorSyntax| ModelError::Selector {
            selector: input.to_string(),
            source,
        };
        let toks = lex(input);
        let mut p = Parser { toks, pos: 0 };
        let mut requirements = Vec::new();
        loop {
            match p.peek() {
                Tok::End => break,
                Tok::Ident(_) | Tok::Not => {
                    requirements.push(p.requirement().map_err(err)?);
                    match p.next() {
                        Tok::End => break,
                        Tok::Comma => {
                            if matches!(p.peek(), Tok::End) {
                                return Err(err(SelectorSyntax::Unexpected {
                                    found: String::new(),
                                    expected: "identifier after ','",
                                }));
                            }
                        }
                        t => {
                            return Err(err(SelectorSyntax::Unexpected {
                                found: t.to_string(),
                                expected: "',' or 'end of string'",
                            }));
                        }
                    }
                }
                t => {
                    return Err(err(SelectorSyntax::Unexpected {
                        found: t.to_string(),
                        expected: "!, identifier, or 'end of string'",
                    }));
                }
            }
        }
        Ok(Selector { requirements })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
    In,
    NotIn,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Tok::Ident(s) => s.as_str(),
            Tok::Not => "!",
            Tok::Eq => "=",
            Tok::DoubleEq => "==",
            Tok::NotEq => "!=",
            Tok::Gt => ">",
            Tok::Lt => "<",
            Tok::Open => "(",
            Tok::Close => ")",
            Tok::Comma => ",",
            Tok::In => "in",
            Tok::NotIn => "notin",
            Tok::End => "",
        };
        f.write_str(s)
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '!' | '=' | '>' | '<' | '(' | ')' | ',')
}

fn lex(input: &str) -> Vec<Tok> {
    let chars: Vec<char> = input.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let (tok, len) = match (c, next) {
            ('!', Some('=')) => (Tok::NotEq, 2),
            ('=', Some('=')) => (Tok::DoubleEq, 2),
            ('!', _) => (Tok::Not, 1),
            ('=', _) => (Tok::Eq, 1),
            ('>', _) => (Tok::Gt, 1),
            ('<', _) => (Tok::Lt, 1),
            ('(', _) => (Tok::Open, 1),
            (')', _) => (Tok::Close, 1),
            (',', _) => (Tok::Comma, 1),
            _ => {
                let start = i;
                let mut j = i;
                while j < chars.len() && !chars[j].is_whitespace() && !is_special(chars[j]) {
                    j += 1;
                }
                let word: String = chars[start..j].iter().collect();
                let tok = match word.as_str() {
                    "in" => Tok::In,
                    "notin" => Tok::NotIn,
                    _ => Tok::Ident(word),
                };
                (tok, j - start)
            }
        };
        out.push(tok);
        i += len;
    }
    out
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Tok {
        self.toks.get(self.pos).cloned().unwrap_or(Tok::End)
    }

    fn next(&mut self) -> Tok {
        let t = self.peek();
        self.pos += 1;
        t
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorSyntax> {
        if self.peek() == Tok::Not {
            self.next();
            let key = match self.next() {
                Tok::Ident(k) => k,
                t => {
                    return Err(SelectorSyntax::Unexpected {
                        found: t.to_string(),
                        expected: "identifier",
                    });
                }
            };
            validate_key(&key)?;
            return Ok(Requirement {
                key,
                op: Operator::DoesNotExist,
                values: Vec::new(),
            });
        }
        let key = match self.next() {
            Tok::Ident(k) => k,
            t => {
                return Err(SelectorSyntax::Unexpected {
                    found: t.to_string(),
                    expected: "identifier",
                });
            }
        };
        validate_key(&key)?;
        let op = match self.peek() {
            Tok::End | Tok::Comma => {
                return Ok(Requirement {
                    key,
                    op: Operator::Exists,
                    values: Vec::new(),
                });
            }
            Tok::Eq | Tok::DoubleEq => Operator::Equals,
            Tok::NotEq => Operator::NotEquals,
            Tok::In => Operator::In,
            Tok::NotIn => Operator::NotIn,
            Tok::Gt => Operator::GreaterThan,
            Tok::Lt => Operator::LessThan,
            t => {
                return Err(SelectorSyntax::Unexpected {
                    found: t.to_string(),
                    expected: "in, notin, =, ==, !=, gt, lt",
                });
            }
        };
        self.next();
        let values = match op {
            Operator::In | Operator::NotIn => self.value_set()?,
            _ => {
                let v = match self.peek() {
                    // `k=` selects the empty value, as kubectl allows.
                    Tok::End | Tok::Comma => String::new(),
                    Tok::Ident(v) => {
                        self.next();
                        v
                    }
                    Tok::In | Tok::NotIn => {
                        let t = self.next();
                        t.to_string()
                    }
                    t => {
                        return Err(SelectorSyntax::Unexpected {
                            found: t.to_string(),
                            expected: "identifier",
                        });
                    }
                };
                if matches!(op, Operator::GreaterThan | Operator::LessThan) {
                    if v.parse::<i64>().is_err() {
                        return Err(SelectorSyntax::NotAnInteger { value: v });
                    }
                } else {
                    validate_value(&v)?;
                }
                vec![v]
            }
        };
        Ok(Requirement { key, op, values })
    }

    fn value_set(&mut self) -> Result<Vec<String>, SelectorSyntax> {
        match self.next() {
            Tok::Open => {}
            t => {
                return Err(SelectorSyntax::Unexpected {
                    found: t.to_string(),
                    expected: "'('",
                });
            }
        }
        let mut values = Vec::new();
        loop {
            match self.next() {
                Tok::Ident(v) => {
                    validate_value(&v)?;
                    values.push(v);
                }
                Tok::In => values.push("in".into()),
                Tok::NotIn => values.push("notin".into()),
                Tok::Close if values.is_empty() => {
                    return Err(SelectorSyntax::EmptyValueSet);
                }
                t => {
                    return Err(SelectorSyntax::Unexpected {
                        found: t.to_string(),
                        expected: "',', ')' or identifier",
                    });
                }
            }
            match self.next() {
                Tok::Comma => {}
                Tok::Close => return Ok(values),
                t => {
                    return Err(SelectorSyntax::Unexpected {
                        found: t.to_string(),
                        expected: "',' or ')'",
                    });
                }
            }
        }
    }
}

const NAME_FMT: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Why a label selector does not parse; the messages are kubectl's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorSyntax {
    #[error("found '{found}', expected: {expected}")]
    Unexpected {
        found: String,
        expected: &'static str,
    },
    #[error("for 'in', 'notin' operators, values set can't be empty")]
    EmptyValueSet,
    #[error("for 'Gt', 'Lt' operators, the value must be an integer: {value:?}")]
    NotAnInteger { value: String },
    #[error("invalid label key {key:?}: prefix part must be non-empty")]
    EmptyKeyPrefix { key: String },
    #[error(
        "invalid label key {key:?}: prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (at most 253 characters)"
    )]
    BadKeyPrefix { key: String },
    #[error("invalid label key {key:?}: name part must be non-empty")]
    EmptyKeyName { key: String },
    #[error("invalid label key {key:?}: name part must be no more than 63 characters")]
    LongKeyName { key: String },
    #[error("invalid label key {key:?}: name part {NAME_FMT}")]
    BadKeyName { key: String },
    #[error("invalid label value: {value:?}: must be no more than 63 characters")]
    LongValue { value: String },
    #[error("invalid label value: {value:?}: a valid label {NAME_FMT}")]
    BadValue { value: String },
}

/// A label key: `[prefix/]name`, prefix a DNS subdomain, name at most 63 characters.
pub fn validate_key(key: &str) -> Result<(), SelectorSyntax> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let key = || key.to_string();
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err(SelectorSyntax::EmptyKeyPrefix { key: key() });
        }
        if !is_dns1123_subdomain(p) {
            return Err(SelectorSyntax::BadKeyPrefix { key: key() });
        }
    }
    if name.is_empty() {
        return Err(SelectorSyntax::EmptyKeyName { key: key() });
    }
    if name.len() > 63 {
        return Err(SelectorSyntax::LongKeyName { key: key() });
    }
    if !is_name(name) {
        return Err(SelectorSyntax::BadKeyName { key: key() });
    }
    Ok(())
}

/// A label value: empty, or at most 63 characters of the name alphabet.
pub fn validate_value(v: &str) -> Result<(), SelectorSyntax> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 63 {
        return Err(SelectorSyntax::LongValue {
            value: v.to_string(),
        });
    }
    if !is_name(v) {
        return Err(SelectorSyntax::BadValue {
            value: v.to_string(),
        });
    }
    Ok(())
}
