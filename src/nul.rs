//! U+0000 (the NUL character) in input. PostgreSQL stores it neither in `text`
//! (`invalid byte sequence for encoding "UTF8": 0x00`) nor in `jsonb` (`unsupported
//! Unicode escape sequence`), so a string holding it is refused where it enters (the
//! API's extractors, the event decoder) with the place named, instead of failing deep
//! inside a transaction. Text that guildgate keeps without owning it (what a webhook
//! endpoint answered) cannot be refused, since it has already arrived: [`storable`]
//! replaces the NUL instead.
//!
//! JSON can hold a NUL in a string only as the escape `\u0000` (a raw one is not JSON).
//! [`find_in_json`] finds it with one pass over the text that follows the nesting with a
//! stack of its own, so it has no depth limit and is not fooled by `\\u0000` (an escaped
//! backslash followed by `u0000`).

use std::fmt;

/// The longest pointer shown in a message; deeper ones are cut with `…`.
const MAX_SHOWN: usize = 200;

/// Where a JSON document holds U+0000.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NulAt {
    /// A JSON pointer (RFC 6901) to the string, or to the member whose key holds it. A
    /// NUL inside a key is written as the six characters `\u0000`, so the pointer itself
    /// never carries one.
    pub pointer: String,
    /// The NUL is in an object key, not in a value.
    pub in_key: bool,
}

impl fmt::Display for NulAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match self.pointer.char_indices().nth(MAX_SHOWN) {
            _ if self.pointer.is_empty() => "the document".to_string(),
            Some((cut, _)) => format!("{}…", &self.pointer[..cut]),
            None => self.pointer.clone(),
        };
        if self.in_key {
            write!(
                f,
                "{at}: the key must not contain U+0000 (the NUL character)"
            )
        } else {
            write!(f, "{at}: must not contain U+0000 (the NUL character)")
        }
    }
}

/// Whether `s` holds U+0000.
pub fn contains_nul(s: &str) -> bool {
    s.contains('\0')
}

/// `s` with each U+0000 replaced by U+FFFD (the replacement character), so that text
/// guildgate keeps but does not own (a webhook endpoint's answer, an error it caused)
/// can always be stored: refusing it is not an option, since it was already received.
pub fn storable(s: String) -> String {
    if contains_nul(&s) {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

enum Frame {
    /// The key of the member being read (its text, escapes and quotes included), or
    /// `None` while a key is expected.
    Object(Option<(usize, usize)>),
    Array(usize),
}

/// The first string (value or object key) of the JSON text `json` that holds U+0000, in
/// document order; `None` when there is none. `json` must already be known to be valid
/// JSON (parse it first): malformed text gives no useful answer, though never a panic.
pub fn find_in_json(json: &[u8]) -> Option<NulAt> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            b'{' => stack.push(Frame::Object(None)),
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array(n)) => *n += 1,
                Some(Frame::Object(key)) => *key = None,
                None => {}
            },
            b'"' => {
                let (end, nul) = string_at(json, i);
                let in_key = match stack.last_mut() {
                    Some(Frame::Object(key @ None)) => {
                        *key = Some((i, end));
                        true
                    }
                    _ => false,
                };
                if nul {
                    return Some(NulAt {
                        pointer: pointer(json, &stack),
                        in_key,
                    });
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The string starting with the quote at `start`: the index of its closing quote, and
/// whether it holds `\u0000`.
fn string_at(json: &[u8], start: usize) -> (usize, bool) {
    let mut nul = false;
    let mut j = start + 1;
    while let Some(&c) = json.get(j) {
        match c {
            b'"' => return (j, nul),
            b'\\' => {
                if json.get(j + 1) == Some(&b'u') && json.get(j + 2..j + 6) == Some(b"0000") {
                    nul = true;
                }
                // Skip the escaped character; the hex digits of `\u` are plain ones.
                j += 2;
            }
            _ => j += 1,
        }
    }
    (json.len(), nul)
}

fn pointer(json: &[u8], stack: &[Frame]) -> String {
    let mut out = String::new();
    for frame in stack {
        out.push('/');
        match frame {
            Frame::Array(n) => out.push_str(&n.to_string()),
            Frame::Object(Some((start, end))) => {
                let raw = json.get(*start..=*end).unwrap_or_default();
                let key: String = serde_json::from_slice(raw).unwrap_or_default();
                out.push_str(
                    &key.replace('~', "~0")
                        .replace('/', "~1")
                        .replace('\0', "\\u0000"),
                );
            }
            Frame::Object(None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_text_has_no_nul() {
        assert_eq!(storable("ok".to_string()), "ok");
        assert_eq!(storable("a\0b\0".to_string()), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(storable(String::new()), "");
    }

    fn at(json: &str) -> Option<NulAt> {
        serde_json::from_str::<serde_json::Value>(json).expect("the tests' JSON is valid");
        find_in_json(json.as_bytes())
    }

    fn value(pointer: &str) -> Option<NulAt> {
        Some(NulAt {
            pointer: pointer.into(),
            in_key: false,
        })
    }

    #[test]
    fn finds_the_first_nul_and_names_it_by_pointer() {
        assert_eq!(
            at(r#"{"a": "x", "b": [1, "ok", {"c": null}], "d": {}}"#),
            None
        );
        assert_eq!(at(r#""a\u0000""#), value(""));
        assert_eq!(at(r#"{"name": "a\u0000b"}"#), value("/name"));
        assert_eq!(
            at(r#"{"m": {"x": [true, "ok", "\u0000"]}, "later": "\u0000"}"#),
            value("/m/x/2")
        );
        assert_eq!(
            at(r#"{"a": [{"b": 1}, {"c": [], "d": {}, "e": ["x", "\u0000"]}]}"#),
            value("/a/1/e/1")
        );
        assert_eq!(at(r#"{"a/b": {"~\"": "\u0000"}}"#), value("/a~1b/~0\""));
        assert_eq!(
            at(r#"{"metadata": {"ok": 1, "k\u0000ey": 1}}"#),
            Some(NulAt {
                pointer: "/metadata/k\\u0000ey".into(),
                in_key: true
            })
        );
    }

    #[test]
    fn escapes_that_are_no_nul() {
        assert_eq!(at(r#"{"path": "C:\\u0000"}"#), None);
        assert_eq!(at(r#"{"x": "\u0001\u00ff\u1000\"\\"}"#), None);
        assert_eq!(at(r#"{"x": "\\\u0000"}"#), value("/x"));
    }

    #[test]
    fn no_depth_limit() {
        let deep = format!(
            "{}\"\\u0000\"{}",
            "{\"a\":[".repeat(5_000),
            "]}".repeat(5_000)
        );
        let found = find_in_json(deep.as_bytes()).unwrap();
        assert_eq!(found.pointer, "/a/0".repeat(5_000));
        let shown = found.to_string();
        assert!(shown.len() < 300, "{shown}");
        assert!(shown.contains('…'), "{shown}");
    }

    #[test]
    fn malformed_text_does_not_panic() {
        for text in ["\"\\", "\"\\u00", "}}]]", "{\"a", "[,,,"] {
            let _ = find_in_json(text.as_bytes());
        }
    }
}
