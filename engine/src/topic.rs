//! The topic pattern: which MQTT topic levels carry the device id and the event type.

/// Why a topic pattern is refused (config path `topic`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("the topic pattern is empty")]
    Empty,
    /// A level with `+` or `#`.
    #[error("level '{0}' contains an MQTT wildcard; use {{device}} and {{type}}")]
    Wildcard(String),
    /// A level with a brace that is not exactly `{device}` or `{type}`.
    #[error("level '{0}': a placeholder must be a whole level, {{device}} or {{type}}")]
    PartialPlaceholder(String),
    /// The whole pattern, which lacks or repeats a placeholder.
    #[error("'{0}' must contain {{device}} and {{type}} exactly once each")]
    Placeholders(String),
}

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Type,
}

/// A compiled topic pattern such as `devices/{device}/events/{type}`.
///
/// `{device}` and `{type}` each stand for exactly one whole, non-empty level; every other level
/// must match literally. The MQTT wildcards `+` and `#` are not allowed in a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    pattern: String,
    levels: Vec<Level>,
}

impl TopicPattern {
    /// Parses and checks a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<TopicPattern, TopicError> {
        if pattern.is_empty() {
            return Err(TopicError::Empty);
        }
        let mut levels = Vec::new();
        let (mut devices, mut types) = (0, 0);
        for level in pattern.split('/') {
            match level {
                "{device}" => {
                    devices += 1;
                    levels.push(Level::Device);
                }
                "{type}" => {
                    types += 1;
                    levels.push(Level::Type);
                }
                _ => {
                    if level.contains(['+', '#']) {
                        return Err(TopicError::Wildcard(level.to_string()));
                    }
                    if level.contains(['{', '}']) {
                        return Err(TopicError::PartialPlaceholder(level.to_string()));
                    }
                    levels.push(Level::Literal(level.to_string()));
                }
            }
        }
        if devices != 1 || types != 1 {
            return Err(TopicError::Placeholders(pattern.to_string()));
        }
        Ok(TopicPattern {
            pattern: pattern.to_string(),
            levels,
        })
    }

    /// `(device, event_type)` if `topic` matches.
    pub fn matches<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let mut device = None;
        let mut event_type = None;
        let mut parts = topic.split('/');
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(l) => {
                    if part != l {
                        return None;
                    }
                }
                Level::Device | Level::Type => {
                    if part.is_empty() || part.contains(['+', '#']) {
                        return None;
                    }
                    if *level == Level::Device {
                        device = Some(part);
                    } else {
                        event_type = Some(part);
                    }
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((device?, event_type?))
    }

    /// The MQTT subscription filter: the pattern with `+` for both placeholders.
    pub fn subscription_filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device | Level::Type => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The topic a device publishes `event_type` events on.
    pub fn topic_for(&self, device: &str, event_type: &str) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device => device,
                Level::Type => event_type,
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// Whether a name can be one topic level (an event type name, a device id).
pub(crate) fn is_topic_level(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pattern_matches() {
        let p = TopicPattern::parse("devices/{device}/events/{type}").unwrap();
        assert_eq!(
            p.matches("devices/meter-1/events/meter"),
            Some(("meter-1", "meter"))
        );
        assert_eq!(p.subscription_filter(), "devices/+/events/+");
        assert_eq!(p.topic_for("a", "b"), "devices/a/events/b");
    }

    #[test]
    fn non_matching_topics() {
        let p = TopicPattern::parse("devices/{device}/events/{type}").unwrap();
        for t in [
            "",
            "devices/meter-1/events",
            "devices/meter-1/events/meter/extra",
            "devices//events/meter",
            "devices/m/events/",
            "device/meter-1/events/meter",
            "devices/meter-1/event/meter",
        ] {
            assert_eq!(p.matches(t), None, "{t}");
        }
    }

    #[test]
    fn other_orders_and_prefixes() {
        let p = TopicPattern::parse("site/a/{type}/{device}").unwrap();
        assert_eq!(p.matches("site/a/gps/truck-7"), Some(("truck-7", "gps")));
        assert_eq!(p.subscription_filter(), "site/a/+/+");
    }

    #[test]
    fn bad_patterns() {
        for (p, needle) in [
            ("", "empty"),
            ("devices/{device}/events", "exactly once"),
            ("devices/{device}/{device}/{type}", "exactly once"),
            ("devices/+/events/{type}/{device}", "wildcard"),
            ("devices/{device}/#/{type}", "wildcard"),
            ("devices/d-{device}/{type}", "whole level"),
        ] {
            let err = TopicPattern::parse(p).unwrap_err().to_string();
            assert!(err.contains(needle), "{p}: {err}");
        }
        assert_eq!(
            TopicPattern::parse("a/{device}/{type}x").unwrap_err(),
            TopicError::PartialPlaceholder("{type}x".into())
        );
        assert_eq!(
            TopicPattern::parse("a/+/{device}/{type}")
                .unwrap_err()
                .to_string(),
            "level '+' contains an MQTT wildcard; use {device} and {type}"
        );
    }
}
