//! The expression language's own names: the variables every event type has, the stateful
//! functions, and which names a field, constant or calc entry may take.

/// Variables every event type has; a field or constant may not use these names.
pub const BUILTIN_VARIABLES: &[&str] = &[
    "ts",
    "seq",
    "received_at",
    "device",
    "has_prev",
    "seq_reset",
    "late",
    "prev",
    "math::pi",
    "math::e",
];

/// Functions resolved at compile time into per-event values.
pub const STATEFUL_FUNCTIONS: &[&str] = &["prev", "delta", "rate", "dt", "has"];

pub(crate) fn is_reserved(name: &str) -> bool {
    BUILTIN_VARIABLES.contains(&name)
        || name.starts_with("prev.")
        || name == "true"
        || name == "false"
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a name usable as a variable in every expression.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
