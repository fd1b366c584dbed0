//! The EventBridge detail-types the bridge publishes (INTERFACES.md), as one enum: a misspelt
//! type is a compile error, not events that no rule matches.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetailType {
    /// A result stored in S3.
    EventProcessed,
    /// A result corrected (by the gateway or the cloud), at most once per event.
    EventCorrected,
    /// A result the anomaly model scored as unusual.
    AnomalyDetected,
    /// A range of events that never arrived (device `seq` or gateway `edge_seq`).
    MissedEvents,
    /// A result or message that went to a DLQ, with its reason.
    EventDeadLettered,
}

impl DetailType {
    pub const ALL: [DetailType; 5] = [
        DetailType::EventProcessed,
        DetailType::EventCorrected,
        DetailType::AnomalyDetected,
        DetailType::MissedEvents,
        DetailType::EventDeadLettered,
    ];

    /// The `detail-type` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DetailType::EventProcessed => "EventProcessed",
            DetailType::EventCorrected => "EventCorrected",
            DetailType::AnomalyDetected => "AnomalyDetected",
            DetailType::MissedEvents => "MissedEvents",
            DetailType::EventDeadLettered => "EventDeadLettered",
        }
    }

    pub fn parse(s: &str) -> Option<DetailType> {
        DetailType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for DetailType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_parses_back() {
        for t in DetailType::ALL {
            assert_eq!(DetailType::parse(t.as_str()), Some(t));
        }
        assert_eq!(DetailType::parse("eventprocessed"), None);
    }
}
