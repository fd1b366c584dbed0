//! Device payload → [`DeviceMessage`], under hard [`Limits`].
//!
//! The format is told apart by content, not by topic or header, so a device can never be
//! misrouted by a wrong content type: after optional JSON whitespace a `{` means JSON, anything
//! else must be a CBOR map. Both formats become the same `serde_json` document, so the engine
//! sees one data model and a JSON and a CBOR payload with the same content decode identically.
//!
//! Cost model (this runs for every message on a small box): JSON is parsed once, straight into
//! the document, with the limits enforced *while* parsing so a hostile payload is cut off early.
//! CBOR is parsed once into `ciborium::Value` and then moved (not copied) into the document in
//! one walk that enforces the same limits (so a CBOR payload briefly costs a few times its size
//! in memory before fan-out limits apply; the payload size limit bounds that). Field paths are kept as a linked list on the stack
//! and only rendered to a string when an error is reported.
//!
//! Decisions (the contract is strict on purpose: an accepted message is one both tiers agree on):
//! - `id` must be a string (INTERFACES.md says so); an integer id is refused rather than
//!   converted, so `42` and `"42"` can never silently become the same event.
//! - Unknown top-level keys are refused, naming them; extensions belong in `data`.
//! - `device` and `type` may be absent or `null`.
//! - Floats are refused for `seq` and `ts`, even `1.0`.
//! - Duplicate keys are refused at any level: parsers disagree on which one wins.
//! - CBOR byte strings are refused (JSON has no equivalent); CBOR tags are refused except the
//!   self-describe tag 55799 and tag 0 (date/time string), which are unwrapped.

use std::cell::RefCell;
use std::fmt::Write as _;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use thiserror::Error;

use crate::dlq::{Stage, Subject};
use crate::limits::Limits;
use crate::message::DeviceMessage;
use crate::timestamp::{self, TimestampError};

/// Longest `id` accepted, in characters: it becomes part of keys and S3 records.
pub const MAX_ID_CHARS: usize = 128;

/// The top-level keys a device message may carry.
pub const ENVELOPE_KEYS: [&str; 6] = ["id", "seq", "ts", "device", "type", "data"];

/// Longest piece of input (key, value) echoed back in an error message.
const ECHO_MAX: usize = 40;

/// A payload that did not become a [`DeviceMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{kind}")]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    /// The message `id`, when it could be read before the failure, so the DLQ entry can name
    /// the event.
    pub id: Option<String>,
}

impl DecodeError {
    /// Envelope/structure problems (the document is well-formed but not a valid message) as
    /// opposed to document problems (the bytes are not an acceptable document at all); the
    /// pipeline files the former under stage `schema`, the latter under `decode`.
    pub fn is_envelope(&self) -> bool {
        self.kind.is_envelope()
    }

    /// The DLQ stage this failure is filed under.
    pub fn stage(&self) -> Stage {
        if self.is_envelope() {
            Stage::Schema
        } else {
            Stage::Decode
        }
    }
}

/// What went wrong. Every message names the field path (`data.list[3]`) or the byte offset.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeErrorKind {
    // ---- document level (stage "decode") ----
    #[error("empty payload")]
    Empty,
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "payload is neither a JSON object nor a CBOR map (first byte 0x{first_byte:02x} at byte {offset})"
    )]
    UnknownFormat { first_byte: u8, offset: usize },
    #[error("invalid UTF-8 at byte {offset}")]
    InvalidUtf8 { offset: usize },
    #[error("truncated: unexpected end of input at byte {offset}{}", inside(.within))]
    Truncated {
        offset: usize,
        /// Innermost field being read when the input ended (JSON only).
        within: Option<String>,
    },
    #[error("syntax error at byte {offset}{}: {message}", inside(.within))]
    Syntax {
        offset: usize,
        within: Option<String>,
        message: String,
    },
    #[error("trailing data after the document at byte {offset}")]
    TrailingData { offset: usize },
    #[error("{}: {value}{} is not allowed (numbers must be finite)", at(.path), at_byte(.offset))]
    NonFinite {
        path: String,
        /// `NaN`, `Infinity` or `-Infinity`.
        value: &'static str,
        /// Where the token starts (JSON only: CBOR floats are values, not tokens).
        offset: Option<usize>,
    },
    #[error("{}: nested deeper than {limit} levels", .path.as_deref().unwrap_or("document"))]
    TooDeep {
        /// `None` when the parser's own recursion guard fired first (no path known).
        path: Option<String>,
        limit: usize,
    },
    #[error("{}: string of {chars} characters is over the {limit}-character limit", at(.path))]
    StringTooLong {
        path: String,
        chars: usize,
        limit: usize,
    },
    #[error("{}: more than {limit} {what}", at(.path))]
    TooManyFields {
        path: String,
        limit: usize,
        /// `keys` (object) or `elements` (array).
        what: &'static str,
    },
    #[error("{}: duplicate key", at(.path))]
    DuplicateKey { path: String },
    /// Valid CBOR that has no JSON equivalent (byte strings, tags, non-text keys, integers
    /// beyond 64 bits).
    #[error("{}: {what}", at(.path))]
    Unsupported { path: String, what: String },

    // ---- envelope (stage "schema") ----
    #[error("top level must be an object (JSON) or a map (CBOR), found {found}")]
    NotAnObject { found: &'static str },
    #[error("{field}: required field is missing")]
    Missing { field: &'static str },
    #[error("{field}: expected {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{field}: {reason}")]
    InvalidValue { field: &'static str, reason: String },
    #[error(
        "unknown top-level field{} {} (allowed: id, seq, ts, device, type, data; put extras in data)",
        if .fields.len() == 1 { "" } else { "s" },
        .fields.join(", ")
    )]
    UnknownFields { fields: Vec<String> },
}

impl DecodeErrorKind {
    /// See [`DecodeError::is_envelope`].
    pub fn is_envelope(&self) -> bool {
        matches!(
            self,
            DecodeErrorKind::NotAnObject { .. }
                | DecodeErrorKind::Missing { .. }
                | DecodeErrorKind::WrongType { .. }
                | DecodeErrorKind::InvalidValue { .. }
                | DecodeErrorKind::UnknownFields { .. }
        )
    }

    /// What the failure is about: the field path it names (`seq`, `data.list[3]`), or the
    /// document as a whole (its bytes, its top level).
    pub fn subject(&self) -> Subject {
        use DecodeErrorKind::*;
        let path = match self {
            NonFinite { path, .. }
            | StringTooLong { path, .. }
            | TooManyFields { path, .. }
            | DuplicateKey { path }
            | Unsupported { path, .. }
            | TooDeep {
                path: Some(path), ..
            } => path.as_str(),
            Missing { field } | WrongType { field, .. } | InvalidValue { field, .. } => field,
            _ => "",
        };
        if path.is_empty() {
            Subject::Document
        } else {
            Subject::Field(path.to_string())
        }
    }

    /// A stable, low-cardinality name, e.g. for a metrics label.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeErrorKind::Empty => "empty",
            DecodeErrorKind::TooLarge { .. } => "too_large",
            DecodeErrorKind::UnknownFormat { .. } => "unknown_format",
            DecodeErrorKind::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeErrorKind::Truncated { .. } => "truncated",
            DecodeErrorKind::Syntax { .. } => "syntax",
            DecodeErrorKind::TrailingData { .. } => "trailing_data",
            DecodeErrorKind::NonFinite { .. } => "non_finite",
            DecodeErrorKind::TooDeep { .. } => "too_deep",
            DecodeErrorKind::StringTooLong { .. } => "string_too_long",
            DecodeErrorKind::TooManyFields { .. } => "too_many_fields",
            DecodeErrorKind::DuplicateKey { .. } => "duplicate_key",
            DecodeErrorKind::Unsupported { .. } => "unsupported",
            DecodeErrorKind::NotAnObject { .. } => "not_an_object",
            DecodeErrorKind::Missing { .. } => "missing_field",
            DecodeErrorKind::WrongType { .. } => "wrong_type",
            DecodeErrorKind::InvalidValue { .. } => "invalid_value",
            DecodeErrorKind::UnknownFields { .. } => "unknown_fields",
        }
    }
}

fn at(path: &str) -> &str {
    if path.is_empty() { "top level" } else { path }
}

fn inside(within: &Option<String>) -> String {
    match within.as_deref() {
        None => String::new(),
        Some("") => " (at the top level)".to_string(),
        Some(p) => format!(" (inside {p})"),
    }
}

fn at_byte(offset: &Option<usize>) -> String {
    offset.map(|o| format!(" at byte {o}")).unwrap_or_default()
}

/// Decodes one device payload (JSON object or CBOR map) and checks its envelope.
pub fn decode_message(payload: &[u8], limits: &Limits) -> Result<DeviceMessage, DecodeError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeErrorKind::TooLarge {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        }
        .into());
    }
    let ctx = Ctx {
        limits,
        id: RefCell::new(None),
        err: RefCell::new(None),
        within: RefCell::new(None),
    };
    let start = payload
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    let root = match start {
        None => Err(DecodeErrorKind::Empty),
        Some(i) if payload[i] == b'{' => decode_json(payload, &ctx),
        Some(_) => decode_cbor(payload, &ctx),
    };
    match root {
        Ok(root) => envelope(root),
        Err(kind) => Err(DecodeError {
            kind,
            id: ctx.id.into_inner(),
        }),
    }
}

impl From<DecodeErrorKind> for DecodeError {
    fn from(kind: DecodeErrorKind) -> Self {
        DecodeError { kind, id: None }
    }
}

// ------------------------------------------------------------------------------------------
// Shared: paths and limit checks

/// Where a value sits in the document; a stack-allocated linked list, rendered only on error.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match *self {
            Path::Root => {}
            Path::Key(parent, key) => {
                parent.write(out);
                let plain = !key.is_empty()
                    && key.len() <= ECHO_MAX
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if plain {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                } else {
                    // Keys with dots, spaces or quotes would make the path ambiguous.
                    out.push('[');
                    out.push_str(&quote(key));
                    out.push(']');
                }
            }
            Path::Index(parent, i) => {
                parent.write(out);
                let _ = write!(out, "[{i}]");
            }
        }
    }
}

/// JSON-quotes `s`, cut to [`ECHO_MAX`] characters.
fn quote(s: &str) -> String {
    let cut = match s.char_indices().nth(ECHO_MAX) {
        Some((i, _)) => &s[..i],
        None => s,
    };
    let mut q = serde_json::to_string(cut).unwrap_or_default();
    if cut.len() < s.len() {
        q.insert(q.len() - 1, '…');
    }
    q
}

struct Ctx<'l> {
    limits: &'l Limits,
    /// The message id, captured only when a failure happens after it was read.
    id: RefCell<Option<String>>,
    /// Our own error, raised inside serde visitors (which can only return an opaque error).
    err: RefCell<Option<DecodeErrorKind>>,
    /// Innermost path at which a JSON parser error surfaced.
    within: RefCell<Option<String>>,
}

impl Ctx<'_> {
    fn check_depth(&self, depth: usize, path: &Path) -> Result<(), DecodeErrorKind> {
        if depth > self.limits.max_depth {
            return Err(DecodeErrorKind::TooDeep {
                path: Some(path.render()),
                limit: self.limits.max_depth,
            });
        }
        Ok(())
    }

    fn check_count(
        &self,
        count: usize,
        path: &Path,
        what: &'static str,
    ) -> Result<(), DecodeErrorKind> {
        if count > self.limits.max_fields {
            return Err(DecodeErrorKind::TooManyFields {
                path: path.render(),
                limit: self.limits.max_fields,
                what,
            });
        }
        Ok(())
    }

    fn check_str(&self, s: &str, path: &Path) -> Result<(), DecodeErrorKind> {
        let limit = self.limits.max_string_len;
        // Bytes >= chars, so the count is only needed for long strings.
        if s.len() > limit {
            let chars = s.chars().count();
            if chars > limit {
                return Err(DecodeErrorKind::StringTooLong {
                    path: path.render(),
                    chars,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Remembers the id of a message whose top level was (partly) read before a failure.
    fn stash_id(&self, id: Option<&Value>) {
        if let Some(Value::String(s)) = id
            && valid_id(s).is_ok()
        {
            *self.id.borrow_mut() = Some(s.clone());
        }
    }
}

fn non_finite(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

// ------------------------------------------------------------------------------------------
// JSON: one pass, limits enforced by the visitor

fn decode_json(payload: &[u8], ctx: &Ctx) -> Result<Map<String, Value>, DecodeErrorKind> {
    let text = std::str::from_utf8(payload).map_err(|e| DecodeErrorKind::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = ValueSeed {
        ctx,
        path: Path::Root,
        depth: 1,
    };
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match parsed {
        // The first non-whitespace byte is `{`, so a successful parse is an object.
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(DecodeErrorKind::NotAnObject {
            found: "non-object",
        }),
        Err(e) => Err(match ctx.err.borrow_mut().take() {
            Some(kind) => kind,
            None => json_error(&e, text, ctx),
        }),
    }
}

/// Turns a serde_json parser error into a kind with a byte offset (serde_json reports
/// line/column, and its messages do not mention NaN).
fn json_error(e: &serde_json::Error, text: &str, ctx: &Ctx) -> DecodeErrorKind {
    let within = ctx.within.borrow_mut().take();
    if e.is_eof() {
        return DecodeErrorKind::Truncated {
            offset: text.len(),
            within,
        };
    }
    let offset = byte_offset(text, e.line(), e.column());
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    if message.starts_with("trailing characters") {
        return DecodeErrorKind::TrailingData { offset };
    }
    if message.starts_with("recursion limit exceeded") {
        return DecodeErrorKind::TooDeep {
            path: within,
            limit: ctx.limits.max_depth,
        };
    }
    // serde_json says "expected value" / "invalid number" for these non-standard tokens.
    let from = offset.saturating_sub(1);
    let near = text.get(from..).unwrap_or("");
    let token = ["-Infinity", "NaN", "Infinity"]
        .into_iter()
        .find_map(|t| {
            if near.starts_with(t) {
                Some((t, from))
            } else if near.get(1..).is_some_and(|n| n.starts_with(t)) {
                Some((t, from + 1))
            } else {
                None
            }
        })
        .map(|(t, o)| {
            if t == "Infinity" && o > 0 && text.as_bytes()[o - 1] == b'-' {
                ("-Infinity", o - 1)
            } else {
                (t, o)
            }
        });
    if let Some((value, offset)) = token {
        return DecodeErrorKind::NonFinite {
            path: within.unwrap_or_default(),
            value: match value {
                "NaN" => "NaN",
                "Infinity" => "Infinity",
                _ => "-Infinity",
            },
            offset: Some(offset),
        };
    }
    DecodeErrorKind::Syntax {
        offset,
        within,
        message: message.to_string(),
    }
}

/// serde_json's 1-based line and column (in bytes) → 0-based byte offset of the offending byte.
fn byte_offset(text: &str, line: usize, column: usize) -> usize {
    let line_start = if line <= 1 {
        0
    } else {
        text.bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .nth(line - 2)
            .map_or(text.len(), |(i, _)| i + 1)
    };
    (line_start + column.saturating_sub(1)).min(text.len())
}

struct ValueSeed<'c, 'l, 'p> {
    ctx: &'c Ctx<'l>,
    path: Path<'p>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_, '_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let (ctx, path) = (self.ctx, self.path);
        d.deserialize_any(self).inspect_err(|_| {
            // The innermost value sees a parser error first; remember where it was.
            if ctx.err.borrow().is_none() {
                let mut within = ctx.within.borrow_mut();
                if within.is_none() {
                    *within = Some(path.render());
                }
            }
        })
    }
}

impl ValueSeed<'_, '_, '_> {
    fn fail<E: de::Error>(&self, kind: DecodeErrorKind) -> E {
        *self.ctx.err.borrow_mut() = Some(kind);
        E::custom("rejected by limits")
    }

    fn fill_map<'de, A: MapAccess<'de>>(
        &self,
        access: &mut A,
        map: &mut Map<String, Value>,
    ) -> Result<(), A::Error> {
        let mut count = 0usize;
        while let Some(key) = access.next_key::<String>()? {
            count += 1;
            self.ctx
                .check_count(count, &self.path, "keys")
                .map_err(|k| self.fail(k))?;
            let path = Path::Key(&self.path, &key);
            self.ctx.check_str(&key, &path).map_err(|k| self.fail(k))?;
            let value = access.next_value_seed(ValueSeed {
                ctx: self.ctx,
                path,
                depth: self.depth + 1,
            })?;
            match map.entry(key) {
                serde_json::map::Entry::Vacant(e) => {
                    e.insert(value);
                }
                serde_json::map::Entry::Occupied(e) => {
                    let path = Path::Key(&self.path, e.key()).render();
                    return Err(self.fail(DecodeErrorKind::DuplicateKey { path }));
                }
            }
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        match Number::from_f64(v) {
            Some(n) => Ok(Value::Number(n)),
            None => Err(self.fail(DecodeErrorKind::NonFinite {
                path: self.path.render(),
                value: non_finite(v),
                offset: None,
            })),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.ctx
            .check_str(v, &self.path)
            .map_err(|k| self.fail(k))?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.ctx
            .check_str(&v, &self.path)
            .map_err(|k| self.fail(k))?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        self.ctx
            .check_depth(self.depth, &self.path)
            .map_err(|k| self.fail(k))?;
        let mut items = Vec::new();
        loop {
            let index = items.len();
            let seed = ValueSeed {
                ctx: self.ctx,
                path: Path::Index(&self.path, index),
                depth: self.depth + 1,
            };
            match access.next_element_seed(seed)? {
                Some(v) => {
                    self.ctx
                        .check_count(index + 1, &self.path, "elements")
                        .map_err(|k| self.fail(k))?;
                    items.push(v);
                }
                None => break,
            }
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        self.ctx
            .check_depth(self.depth, &self.path)
            .map_err(|k| self.fail(k))?;
        let mut map = Map::new();
        if let Err(e) = self.fill_map(&mut access, &mut map) {
            if self.depth == 1 {
                self.ctx.stash_id(map.get("id"));
            }
            return Err(e);
        }
        Ok(Value::Object(map))
    }
}

// ------------------------------------------------------------------------------------------
// CBOR: one parse into ciborium::Value, one walk that moves it into the document

use ciborium::Value as Cbor;

/// CBOR tag 55799 ("self-described CBOR"): a magic prefix, nothing more.
const TAG_SELF_DESCRIBE: u64 = 55799;
/// CBOR tag 0: an RFC 3339 date/time string; unwrapping yields what JSON would carry.
const TAG_DATETIME: u64 = 0;

fn decode_cbor(payload: &[u8], ctx: &Ctx) -> Result<Map<String, Value>, DecodeErrorKind> {
    // Major type 5 is a map; 0xd9d9f7 is the self-describe tag, which a map may follow.
    let looks_like_map = payload[0] >> 5 == 5 || payload.starts_with(&[0xd9, 0xd9, 0xf7]);
    let mut rest = payload;
    let parsed = ciborium::de::from_reader::<Cbor, _>(&mut rest);
    let consumed = payload.len() - rest.len();
    if !looks_like_map && (parsed.is_err() || !rest.is_empty()) {
        // Neither `{` nor a CBOR document: most likely meant as neither (e.g. `[1,2]`).
        return Err(DecodeErrorKind::UnknownFormat {
            first_byte: payload[0],
            offset: 0,
        });
    }
    let mut value = parsed.map_err(|e| cbor_error(e, payload.len(), consumed, ctx))?;
    if !rest.is_empty() {
        return Err(DecodeErrorKind::TrailingData { offset: consumed });
    }
    while let Cbor::Tag(TAG_SELF_DESCRIBE, inner) = value {
        value = *inner;
    }
    match value {
        Cbor::Map(entries) => cbor_map(ctx, entries, &Path::Root, 1),
        other => Err(DecodeErrorKind::NotAnObject {
            found: cbor_type_name(&other),
        }),
    }
}

fn cbor_error(
    e: ciborium::de::Error<std::io::Error>,
    len: usize,
    consumed: usize,
    ctx: &Ctx,
) -> DecodeErrorKind {
    use ciborium::de::Error as E;
    match e {
        E::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => DecodeErrorKind::Truncated {
            offset: len,
            within: None,
        },
        E::Io(e) => DecodeErrorKind::Syntax {
            offset: consumed,
            within: None,
            message: e.to_string(),
        },
        E::Syntax(offset) => DecodeErrorKind::Syntax {
            offset,
            within: None,
            message: "invalid CBOR".to_string(),
        },
        E::Semantic(offset, message) => DecodeErrorKind::Syntax {
            offset: offset.unwrap_or(consumed),
            within: None,
            message,
        },
        E::RecursionLimitExceeded => DecodeErrorKind::TooDeep {
            path: None,
            limit: ctx.limits.max_depth,
        },
    }
}

fn cbor_type_name(v: &Cbor) -> &'static str {
    match v {
        Cbor::Integer(_) => "an integer",
        Cbor::Bytes(_) => "a byte string",
        Cbor::Float(_) => "a float",
        Cbor::Text(_) => "a text string",
        Cbor::Bool(_) => "a boolean",
        Cbor::Null => "null",
        Cbor::Tag(..) => "a tagged value",
        Cbor::Array(_) => "an array",
        Cbor::Map(_) => "a map",
        _ => "an unknown CBOR item",
    }
}

fn cbor_map(
    ctx: &Ctx,
    entries: Vec<(Cbor, Cbor)>,
    path: &Path,
    depth: usize,
) -> Result<Map<String, Value>, DecodeErrorKind> {
    ctx.check_depth(depth, path)?;
    ctx.check_count(entries.len(), path, "keys")?;
    let mut map = Map::new();
    let mut iter = entries.into_iter();
    let result = cbor_fill_map(ctx, &mut iter, &mut map, path, depth);
    if let Err(kind) = result {
        if depth == 1 {
            ctx.stash_id(map.get("id"));
            if ctx.id.borrow().is_none() {
                // Not reached yet: look for it among the entries still to be converted.
                let id = iter.as_slice().iter().find_map(|(k, v)| match (k, v) {
                    (Cbor::Text(k), v @ Cbor::Text(_)) if k == "id" => Some(v),
                    _ => None,
                });
                if let Some(Cbor::Text(id)) = id
                    && valid_id(id).is_ok()
                {
                    *ctx.id.borrow_mut() = Some(id.clone());
                }
            }
        }
        return Err(kind);
    }
    Ok(map)
}

fn cbor_fill_map(
    ctx: &Ctx,
    iter: &mut std::vec::IntoIter<(Cbor, Cbor)>,
    map: &mut Map<String, Value>,
    path: &Path,
    depth: usize,
) -> Result<(), DecodeErrorKind> {
    for (key, value) in iter {
        let key = match key {
            Cbor::Text(k) => k,
            other => {
                return Err(DecodeErrorKind::Unsupported {
                    path: path.render(),
                    what: format!(
                        "map key is {}; keys must be text strings",
                        cbor_type_name(&other)
                    ),
                });
            }
        };
        let child = Path::Key(path, &key);
        ctx.check_str(&key, &child)?;
        let value = cbor_value(ctx, value, &child, depth + 1)?;
        match map.entry(key) {
            serde_json::map::Entry::Vacant(e) => {
                e.insert(value);
            }
            serde_json::map::Entry::Occupied(e) => {
                return Err(DecodeErrorKind::DuplicateKey {
                    path: Path::Key(path, e.key()).render(),
                });
            }
        }
    }
    Ok(())
}

fn cbor_value(ctx: &Ctx, v: Cbor, path: &Path, depth: usize) -> Result<Value, DecodeErrorKind> {
    Ok(match v {
        Cbor::Null => Value::Null,
        Cbor::Bool(b) => Value::Bool(b),
        Cbor::Integer(i) => {
            let i = i128::from(i);
            if let Ok(u) = u64::try_from(i) {
                Value::Number(u.into())
            } else if let Ok(s) = i64::try_from(i) {
                Value::Number(s.into())
            } else {
                return Err(DecodeErrorKind::Unsupported {
                    path: path.render(),
                    what: format!("integer {i} does not fit in 64 bits"),
                });
            }
        }
        Cbor::Float(f) => match Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None => {
                return Err(DecodeErrorKind::NonFinite {
                    path: path.render(),
                    value: non_finite(f),
                    offset: None,
                });
            }
        },
        Cbor::Text(s) => {
            ctx.check_str(&s, path)?;
            Value::String(s)
        }
        Cbor::Bytes(_) => {
            return Err(DecodeErrorKind::Unsupported {
                path: path.render(),
                what: "byte strings are not allowed (send text, e.g. base64)".to_string(),
            });
        }
        Cbor::Array(items) => {
            ctx.check_depth(depth, path)?;
            ctx.check_count(items.len(), path, "elements")?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(cbor_value(ctx, item, &Path::Index(path, i), depth + 1)?);
            }
            Value::Array(out)
        }
        Cbor::Map(entries) => Value::Object(cbor_map(ctx, entries, path, depth)?),
        Cbor::Tag(TAG_SELF_DESCRIBE, inner) => cbor_value(ctx, *inner, path, depth)?,
        Cbor::Tag(TAG_DATETIME, inner) if matches!(*inner, Cbor::Text(_)) => {
            cbor_value(ctx, *inner, path, depth)?
        }
        Cbor::Tag(tag, _) => {
            return Err(DecodeErrorKind::Unsupported {
                path: path.render(),
                what: format!("CBOR tag {tag} is not supported"),
            });
        }
        other => {
            return Err(DecodeErrorKind::Unsupported {
                path: path.render(),
                what: format!("{} is not supported", cbor_type_name(&other)),
            });
        }
    })
}

// ------------------------------------------------------------------------------------------
// Envelope

/// Why a message `id` is refused (the reason of [`DecodeErrorKind::InvalidValue`] for `id`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("{chars} characters is over the {MAX_ID_CHARS}-character limit")]
    TooLong { chars: usize },
}

fn valid_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_CHARS {
        let chars = id.chars().count();
        if chars > MAX_ID_CHARS {
            return Err(IdError::TooLong { chars });
        }
    }
    Ok(())
}

/// A short description of a value for "found ..." messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("{} {n}", timestamp::type_name(v)),
        Value::String(s) => format!("a string ({})", quote(s)),
        other => timestamp::type_name(other).to_string(),
    }
}

fn envelope(mut root: Map<String, Value>) -> Result<DeviceMessage, DecodeError> {
    use DecodeErrorKind::*;

    let id = match root.remove("id") {
        None => return Err(Missing { field: "id" }.into()),
        Some(Value::String(s)) => match valid_id(&s) {
            Ok(()) => s,
            Err(e) => {
                return Err(InvalidValue {
                    field: "id",
                    reason: e.to_string(),
                }
                .into());
            }
        },
        Some(other) => {
            return Err(WrongType {
                field: "id",
                expected: "a string",
                found: describe(&other),
            }
            .into());
        }
    };
    // From here on every error can name the event.
    let fail = |kind: DecodeErrorKind, id: String| Err(DecodeError { kind, id: Some(id) });

    let seq = match root.remove("seq") {
        None => return fail(Missing { field: "seq" }, id),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => {
                let reason = format!("{i} is negative; must be a non-negative integer");
                return fail(
                    InvalidValue {
                        field: "seq",
                        reason,
                    },
                    id,
                );
            }
            (None, None) => {
                let reason = format!("{n} is not an integer; must be a non-negative integer");
                return fail(
                    InvalidValue {
                        field: "seq",
                        reason,
                    },
                    id,
                );
            }
        },
        Some(other) => {
            let kind = WrongType {
                field: "seq",
                expected: "a non-negative integer",
                found: describe(&other),
            };
            return fail(kind, id);
        }
    };

    let ts = match root.remove("ts") {
        None => return fail(Missing { field: "ts" }, id),
        Some(v) => match timestamp::from_json(&v) {
            Ok(ts) => ts,
            Err(TimestampError::WrongType(_)) => {
                let kind = WrongType {
                    field: "ts",
                    expected: "epoch milliseconds (integer) or an RFC 3339 string",
                    found: describe(&v),
                };
                return fail(kind, id);
            }
            Err(e) => {
                let reason = e.to_string();
                return fail(
                    InvalidValue {
                        field: "ts",
                        reason,
                    },
                    id,
                );
            }
        },
    };

    let data = match root.remove("data") {
        None => return fail(Missing { field: "data" }, id),
        Some(Value::Object(data)) => data,
        Some(other) => {
            let kind = WrongType {
                field: "data",
                expected: "an object",
                found: describe(&other),
            };
            return fail(kind, id);
        }
    };

    let mut optional = |field: &'static str| match root.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(WrongType {
            field,
            expected: "a string",
            found: describe(&other),
        }),
    };
    let device = match optional("device") {
        Ok(v) => v,
        Err(kind) => return fail(kind, id),
    };
    let event_type = match optional("type") {
        Ok(v) => v,
        Err(kind) => return fail(kind, id),
    };

    if !root.is_empty() {
        let fields = root.keys().map(|k| quote(k)).collect();
        return fail(UnknownFields { fields }, id);
    }

    Ok(DeviceMessage {
        id,
        seq,
        ts,
        device,
        event_type,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits::default()
    }

    fn json_err(payload: &str) -> DecodeError {
        decode_message(payload.as_bytes(), &limits()).expect_err(payload)
    }

    fn cbor(v: &Cbor) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    fn cbor_of_json(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    fn text(s: &str) -> Cbor {
        Cbor::Text(s.to_string())
    }

    /// A CBOR message with the given `data` entries.
    fn cbor_msg(data: Vec<(Cbor, Cbor)>) -> Vec<u8> {
        cbor(&Cbor::Map(vec![
            (text("id"), text("e-1")),
            (text("seq"), Cbor::Integer(1.into())),
            (text("ts"), Cbor::Integer(0.into())),
            (text("data"), Cbor::Map(data)),
        ]))
    }

    fn cbor_err(payload: &[u8]) -> DecodeError {
        decode_message(payload, &limits()).expect_err("should fail")
    }

    /// Asserts the error's code and that its message contains `needle` (field path or offset).
    #[track_caller]
    fn check(e: &DecodeError, code: &str, needle: &str) {
        assert_eq!(e.kind.code(), code, "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }

    fn expected() -> DeviceMessage {
        DeviceMessage {
            id: "e-1".into(),
            seq: 42,
            ts: 1_795_600_800_000,
            device: Some("dev-1".into()),
            event_type: Some("reading".into()),
            data: match json!({"temp": 21.5, "n": -3, "ok": true, "list": [1, "x", null],
                               "nested": {"deep": {"k": "v"}}})
            {
                Value::Object(m) => m,
                _ => unreachable!(),
            },
        }
    }

    const GOOD: &str = r#"{"id":"e-1","seq":42,"ts":1795600800000,"device":"dev-1","type":"reading",
        "data":{"temp":21.5,"n":-3,"ok":true,"list":[1,"x",null],"nested":{"deep":{"k":"v"}}}}"#;

    // ---- happy paths ----

    #[test]
    fn json_with_epoch_ms() {
        assert_eq!(
            decode_message(GOOD.as_bytes(), &limits()).unwrap(),
            expected()
        );
    }

    #[test]
    fn json_with_rfc3339_and_leading_whitespace() {
        let p = GOOD.replace("1795600800000", r#""2026-11-25T10:00:00Z""#);
        let p = format!(" \r\n\t{p}\n");
        assert_eq!(decode_message(p.as_bytes(), &limits()).unwrap(), expected());
    }

    #[test]
    fn cbor_equivalent_decodes_identically() {
        let doc: Value = serde_json::from_str(GOOD).unwrap();
        let bytes = cbor_of_json(&doc);
        assert_eq!(decode_message(&bytes, &limits()).unwrap(), expected());

        // RFC 3339 ts, under the self-describe tag and with ts as a tag-0 date/time string.
        let mut doc = doc;
        doc["ts"] = json!("2026-11-25T10:00:00Z");
        let Cbor::Map(mut entries) = Cbor::serialized(&doc).unwrap() else {
            unreachable!()
        };
        for (k, v) in entries.iter_mut() {
            if k == &text("ts") {
                *v = Cbor::Tag(0, Box::new(v.clone()));
            }
        }
        let tagged = Cbor::Tag(55799, Box::new(Cbor::Map(entries)));
        assert_eq!(
            decode_message(&cbor(&tagged), &limits()).unwrap(),
            expected()
        );
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let m = decode_message(
            br#"{"id":"a","seq":0,"ts":0,"device":null,"data":{}}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(m.device, None);
        assert_eq!(m.event_type, None);
        assert_eq!(m.seq, 0);
        assert!(m.data.is_empty());
    }

    #[test]
    fn json_floats_decode_to_the_number_written() {
        // serde_json's default parser is one ULP off here (found by fuzzing device_cbor).
        let lat = 4.6949120158585146e284_f64;
        let body = format!(r#"{{"id":"a","seq":1,"ts":1764000000000,"data":{{"lat":{lat:e}}}}}"#);
        let m = decode_message(body.as_bytes(), &limits()).unwrap();
        assert_eq!(m.data["lat"].as_f64().unwrap().to_bits(), lat.to_bits());
    }

    #[test]
    fn limits_are_inclusive() {
        let l = Limits {
            max_depth: 3,
            max_string_len: 4,
            max_fields: 6,
            ..Limits::default()
        };
        // depth 3 = top level, data, data.a; 6 elements; 4-char strings and keys ("é" counts as
        // one character).
        let p = r#"{"id":"abc","seq":1,"ts":0,"data":{"a":{"b":"éééé"},"c":[1,2,3,4,5,6]}}"#;
        decode_message(p.as_bytes(), &l).unwrap();
    }

    // ---- document level (stage decode) ----

    #[test]
    fn empty_payload() {
        for p in ["", "  \n"] {
            let e = json_err(p);
            check(&e, "empty", "empty payload");
            assert_eq!(e.stage(), Stage::Decode);
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_parsing() {
        let l = Limits {
            max_payload_bytes: 100,
            ..Limits::default()
        };
        // Not even valid: size comes first.
        let e = decode_message(&[b'x'; 101], &l).unwrap_err();
        check(&e, "too_large", "101 bytes, over the 100-byte limit");
        assert!(!e.is_envelope());
    }

    #[test]
    fn truncated_json() {
        let doc =
            r#"{"id":"e-1","seq":4,"ts":"2026-11-25T10:00:00Z","data":{"a":[1.5,true,null]}}"#;
        for cut in 1..doc.len() {
            let e = json_err(&doc[..cut]);
            check(
                &e,
                "truncated",
                &format!("unexpected end of input at byte {cut}"),
            );
        }
        let e = json_err(r#"{"id":"e-1","seq":1,"ts":0,"data":{"a":[1,"#);
        check(&e, "truncated", "inside data.a");
        assert_eq!(e.id.as_deref(), Some("e-1"), "id read before the failure");
        assert_eq!(e.stage(), Stage::Decode);
    }

    #[test]
    fn truncated_cbor() {
        let doc: Value = serde_json::from_str(GOOD).unwrap();
        let bytes = cbor_of_json(&doc);
        for cut in 1..bytes.len() {
            let e = cbor_err(&bytes[..cut]);
            check(&e, "truncated", &format!("byte {cut}"));
            assert!(!e.is_envelope());
        }
    }

    #[test]
    fn invalid_utf8_in_json() {
        let mut p = br#"{"id":"e-1","seq":1,"ts":0,"data":{"s":"ab"#.to_vec();
        let at = p.len();
        p.extend_from_slice(&[0xc3, 0x28]);
        p.extend_from_slice(br#""}}"#);
        let e = cbor_err(&p);
        check(&e, "invalid_utf8", &format!("invalid UTF-8 at byte {at}"));
    }

    #[test]
    fn json_syntax_error_names_offset() {
        let e = json_err(r#"{"id":"e-1" "seq":1}"#);
        check(&e, "syntax", "at byte 12");
    }

    #[test]
    fn json_nan_and_infinity_tokens() {
        for (tok, shown) in [
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
        ] {
            let p = format!(r#"{{"id":"e-1","seq":1,"ts":0,"data":{{"temp":{tok}}}}}"#);
            let at = p.find(tok).unwrap();
            let e = json_err(&p);
            let msg = format!("data.temp: {shown} at byte {at} is not allowed");
            check(&e, "non_finite", &msg);
            assert_eq!(e.id.as_deref(), Some("e-1"));
        }
        let e = json_err(r#"{"id":"e-1","seq":1,"ts":0,"data":{"l":[1,NaN]}}"#);
        check(&e, "non_finite", "data.l[1]: NaN");
    }

    #[test]
    fn cbor_nan_and_infinity() {
        for (f, shown) in [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            let e = cbor_err(&cbor_msg(vec![(text("temp"), Cbor::Float(f))]));
            check(
                &e,
                "non_finite",
                &format!("data.temp: {shown} is not allowed"),
            );
            assert_eq!(e.id.as_deref(), Some("e-1"));
            assert_eq!(e.stage(), Stage::Decode);
        }
        let list = Cbor::Array(vec![Cbor::Null, Cbor::Float(1.0), Cbor::Float(f64::NAN)]);
        let e = cbor_err(&cbor_msg(vec![(text("list"), list)]));
        check(&e, "non_finite", "data.list[2]: NaN");
    }

    #[test]
    fn id_is_found_even_when_after_the_failure_in_cbor() {
        let bytes = cbor(&Cbor::Map(vec![
            (
                text("data"),
                Cbor::Map(vec![(text("x"), Cbor::Float(f64::NAN))]),
            ),
            (text("id"), text("late-id")),
        ]));
        assert_eq!(cbor_err(&bytes).id.as_deref(), Some("late-id"));
    }

    fn nested_json(levels: usize) -> String {
        format!(
            r#"{{"id":"e-1","seq":1,"ts":0,"data":{}1{}}}"#,
            r#"{"a":"#.repeat(levels),
            "}".repeat(levels)
        )
    }

    #[test]
    fn deep_nesting_json() {
        // top level (1) + 15 objects under data = 16: allowed; one more is not.
        decode_message(nested_json(15).as_bytes(), &limits()).unwrap();
        let e = json_err(&nested_json(16));
        let path = format!("data{}", ".a".repeat(15));
        check(
            &e,
            "too_deep",
            &format!("{path}: nested deeper than 16 levels"),
        );
        // Far beyond serde_json's own guard: still our error, still a path.
        check(&json_err(&nested_json(500)), "too_deep", "data.a.a");
    }

    #[test]
    fn deep_nesting_cbor() {
        let mut v = Cbor::Integer(1.into());
        for _ in 0..16 {
            v = Cbor::Array(vec![v]);
        }
        let e = cbor_err(&cbor_msg(vec![(text("x"), v)]));
        let path = format!("data.x{}", "[0]".repeat(14));
        check(
            &e,
            "too_deep",
            &format!("{path}: nested deeper than 16 levels"),
        );

        // Beyond the parser's own recursion guard.
        let mut bytes = vec![0xa1, 0x61, b'x'];
        bytes.extend(std::iter::repeat_n(0x81, 1000));
        bytes.push(0x01);
        check(
            &cbor_err(&bytes),
            "too_deep",
            "nested deeper than 16 levels",
        );
    }

    #[test]
    fn string_too_long() {
        let long = "é".repeat(4097);
        let p = format!(r#"{{"id":"e-1","seq":1,"ts":0,"data":{{"s":"{long}"}}}}"#);
        let e = json_err(&p);
        check(&e, "string_too_long", "data.s: string of 4097 characters");
        check(&e, "string_too_long", "4096-character limit");

        let e = cbor_err(&cbor_msg(vec![(text("s"), text(&long))]));
        check(&e, "string_too_long", "data.s: string of 4097 characters");

        let key = "k".repeat(4097);
        let p = format!(r#"{{"id":"e-1","seq":1,"ts":0,"data":{{"{key}":1}}}}"#);
        check(&json_err(&p), "string_too_long", "data[\"kkkk");
        let e = cbor_err(&cbor_msg(vec![(text(&key), Cbor::Null)]));
        check(&e, "string_too_long", "…\"]: string of 4097");
    }

    #[test]
    fn too_many_fields() {
        let keys: Vec<String> = (0..257).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let p = format!(
            r#"{{"id":"e-1","seq":1,"ts":0,"data":{{{}}}}}"#,
            keys.join(",")
        );
        check(&json_err(&p), "too_many_fields", "data: more than 256 keys");

        let items = vec!["0"; 257].join(",");
        let p = format!(r#"{{"id":"e-1","seq":1,"ts":0,"data":{{"l":[{items}]}}}}"#);
        check(
            &json_err(&p),
            "too_many_fields",
            "data.l: more than 256 elements",
        );

        let entries = (0..257)
            .map(|i| (text(&format!("k{i}")), Cbor::Null))
            .collect();
        let e = cbor_err(&cbor_msg(entries));
        check(&e, "too_many_fields", "data: more than 256 keys");
        let list = Cbor::Array(vec![Cbor::Null; 257]);
        let e = cbor_err(&cbor_msg(vec![(text("l"), list)]));
        check(&e, "too_many_fields", "data.l: more than 256 elements");
    }

    #[test]
    fn trailing_garbage() {
        let e = json_err(&format!("{GOOD} x"));
        check(&e, "trailing_data", &format!("at byte {}", GOOD.len() + 1));
        let e = json_err(&format!("{GOOD}{{}}"));
        check(&e, "trailing_data", "trailing data");

        let doc: Value = serde_json::from_str(GOOD).unwrap();
        let mut bytes = cbor_of_json(&doc);
        let len = bytes.len();
        bytes.push(0x00);
        check(
            &cbor_err(&bytes),
            "trailing_data",
            &format!("at byte {len}"),
        );
    }

    #[test]
    fn duplicate_keys() {
        let e = json_err(r#"{"id":"a","seq":1,"ts":0,"data":{"x":1,"x":2}}"#);
        check(&e, "duplicate_key", "data.x: duplicate key");
        let e = json_err(r#"{"id":"a","id":"b","seq":1,"ts":0,"data":{}}"#);
        check(&e, "duplicate_key", "id: duplicate key");
        let e = cbor_err(&cbor_msg(vec![
            (text("x"), Cbor::Null),
            (text("x"), Cbor::Null),
        ]));
        check(&e, "duplicate_key", "data.x: duplicate key");
    }

    #[test]
    fn cbor_without_json_equivalent() {
        let e = cbor_err(&cbor_msg(vec![(text("raw"), Cbor::Bytes(vec![1, 2]))]));
        check(&e, "unsupported", "data.raw: byte strings are not allowed");
        let tagged = Cbor::Tag(1, Box::new(Cbor::Integer(5.into())));
        let e = cbor_err(&cbor_msg(vec![(text("when"), tagged)]));
        check(&e, "unsupported", "data.when: CBOR tag 1 is not supported");
        let e = cbor_err(&cbor_msg(vec![(Cbor::Integer(7.into()), Cbor::Null)]));
        check(&e, "unsupported", "data: map key is an integer");
        let big = Cbor::Integer(u64::MAX.into());
        decode_message(&cbor_msg(vec![(text("big"), big)]), &limits()).unwrap();
        let neg = Cbor::Integer((-(1i128 << 64)).try_into().unwrap());
        let e = cbor_err(&cbor_msg(vec![(text("neg"), neg)]));
        check(&e, "unsupported", "data.neg: integer -18446744073709551616");
    }

    #[test]
    fn non_map_cbor_top_level() {
        let e = cbor_err(&cbor(&Cbor::Array(vec![text("id")])));
        check(&e, "not_an_object", "found an array");
        assert!(e.is_envelope());
        let e = cbor_err(&cbor(&Cbor::Integer(7.into())));
        check(&e, "not_an_object", "found an integer");
    }

    #[test]
    fn neither_json_nor_cbor() {
        for p in ["[1,2]", "hello", "\"id\""] {
            let e = json_err(p);
            check(&e, "unknown_format", "neither a JSON object nor a CBOR map");
            check(&e, "unknown_format", "at byte 0");
            assert_eq!(e.stage(), Stage::Decode);
        }
    }

    // ---- envelope (stage schema) ----

    #[test]
    fn missing_fields() {
        let cases = [
            (r#"{"seq":1,"ts":0,"data":{}}"#, "id"),
            (r#"{"id":"a","ts":0,"data":{}}"#, "seq"),
            (r#"{"id":"a","seq":1,"data":{}}"#, "ts"),
            (r#"{"id":"a","seq":1,"ts":0}"#, "data"),
        ];
        for (p, field) in cases {
            let e = json_err(p);
            check(
                &e,
                "missing_field",
                &format!("{field}: required field is missing"),
            );
            assert!(e.is_envelope());
            assert_eq!(e.stage(), Stage::Schema);
            assert_eq!(e.id.is_some(), field != "id");
        }
        // Same in CBOR.
        let bytes = cbor(&Cbor::Map(vec![(text("id"), text("a"))]));
        let e = cbor_err(&bytes);
        check(&e, "missing_field", "seq: required field is missing");
        assert_eq!(e.id.as_deref(), Some("a"));
    }

    #[test]
    fn wrong_types() {
        let cases = [
            (
                r#"{"id":"a","seq":"1","ts":0,"data":{}}"#,
                "seq: expected a non-negative integer, found a string (\"1\")",
            ),
            (
                r#"{"id":"a","seq":1,"ts":0,"data":[1]}"#,
                "data: expected an object, found an array",
            ),
            (
                r#"{"id":"a","seq":1,"ts":0,"data":null}"#,
                "data: expected an object, found null",
            ),
            (
                r#"{"id":7,"seq":1,"ts":0,"data":{}}"#,
                "id: expected a string, found an integer 7",
            ),
            (
                r#"{"id":"a","seq":1,"ts":true,"data":{}}"#,
                "ts: expected epoch milliseconds (integer) or an RFC 3339 string, found a boolean",
            ),
            (
                r#"{"id":"a","seq":1,"ts":0,"device":5,"data":{}}"#,
                "device: expected a string, found an integer 5",
            ),
            (
                r#"{"id":"a","seq":1,"ts":0,"type":{},"data":{}}"#,
                "type: expected a string, found an object",
            ),
        ];
        for (p, msg) in cases {
            let e = json_err(p);
            check(&e, "wrong_type", msg);
            assert!(e.is_envelope(), "{e}");
        }
    }

    #[test]
    fn seq_must_be_a_non_negative_integer() {
        let e = json_err(r#"{"id":"a","seq":1.5,"ts":0,"data":{}}"#);
        check(&e, "invalid_value", "seq: 1.5 is not an integer");
        let e = json_err(r#"{"id":"a","seq":1.0,"ts":0,"data":{}}"#);
        check(&e, "invalid_value", "seq: 1.0 is not an integer");
        let e = json_err(r#"{"id":"a","seq":-1,"ts":0,"data":{}}"#);
        check(&e, "invalid_value", "seq: -1 is negative");
        assert_eq!(e.id.as_deref(), Some("a"));
        let bytes = cbor(&Cbor::Map(vec![
            (text("id"), text("a")),
            (text("seq"), Cbor::Float(2.5)),
        ]));
        check(
            &cbor_err(&bytes),
            "invalid_value",
            "seq: 2.5 is not an integer",
        );
    }

    #[test]
    fn bad_timestamps() {
        let e = json_err(r#"{"id":"a","seq":1,"ts":"2026-13-45T10:00:00Z","data":{}}"#);
        check(
            &e,
            "invalid_value",
            "ts: \"2026-13-45T10:00:00Z\" is not an RFC 3339 timestamp",
        );
        assert!(e.is_envelope());
        let e = json_err(r#"{"id":"a","seq":1,"ts":-5,"data":{}}"#);
        check(&e, "invalid_value", "ts: -5 is negative");
        let e = json_err(r#"{"id":"a","seq":1,"ts":1795600800.5,"data":{}}"#);
        check(&e, "invalid_value", "ts: 1795600800.5 is not an integer");
        let e = json_err(r#"{"id":"a","seq":1,"ts":1795600800000000,"data":{}}"#);
        check(
            &e,
            "invalid_value",
            "ts: 1795600800000000 is beyond 9999-12-31",
        );
    }

    #[test]
    fn bad_ids() {
        let e = json_err(r#"{"id":"","seq":1,"ts":0,"data":{}}"#);
        check(&e, "invalid_value", "id: must not be empty");
        let p = format!(
            r#"{{"id":"{}","seq":1,"ts":0,"data":{{}}}}"#,
            "x".repeat(129)
        );
        let e = json_err(&p);
        check(
            &e,
            "invalid_value",
            "id: 129 characters is over the 128-character limit",
        );
        assert_eq!(e.id, None);
    }

    #[test]
    fn unknown_top_level_fields_are_refused() {
        let e = json_err(r#"{"id":"a","seq":1,"ts":0,"data":{},"temp":3,"x y":1}"#);
        check(
            &e,
            "unknown_fields",
            r#"unknown top-level fields "temp", "x y""#,
        );
        assert!(e.is_envelope());
        assert_eq!(e.id.as_deref(), Some("a"));
        let e = json_err(r#"{"id":"a","seq":1,"ts":0,"data":{},"temp":3}"#);
        check(
            &e,
            "unknown_fields",
            r#"unknown top-level field "temp" (allowed"#,
        );
    }

    #[test]
    fn subjects_name_the_field_path_or_the_document() {
        let field = |p: &str| Subject::Field(p.into());
        let e = json_err(r#"{"id":"","seq":1,"ts":0,"data":{}}"#);
        assert_eq!(e.kind.subject(), field("id"));
        let e = json_err(r#"{"id":"a","ts":0,"data":{}}"#);
        assert_eq!(e.kind.subject(), field("seq"));
        let long = "x".repeat(4097);
        let e = json_err(&format!(
            r#"{{"id":"e-1","seq":1,"ts":0,"data":{{"s":"{long}"}}}}"#
        ));
        assert_eq!(e.kind.subject(), field("data.s"));
        let e = json_err(r#"{"id":"a","seq":1,"ts":0,"data":{},"temp":3}"#);
        assert_eq!(e.kind.subject(), Subject::Document);
        let e = json_err(r#"{"id":"a","#);
        assert_eq!(e.kind.subject(), Subject::Document);
    }
}
