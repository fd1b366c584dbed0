//! Why an uplink message is not one the bridge can store: the typed error of
//! [`crate::service::validate`], [`crate::service::check_batch`] and [`crate::status::parse`].
//! Its text is the `reason` of the DLQ entry stored under `failures/`.

/// An uplink message (results batch or gateway status) that cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum InvalidUplink {
    #[error("topic '{0}' is not gateways/{{gateway}}/results")]
    ResultsTopic(String),
    #[error("topic '{0}' is not gateways/{{gateway}}/status")]
    StatusTopic(String),
    #[error("undecodable CBOR batch: {0}")]
    Batch(#[from] proto::wire::WireError),
    #[error("not a status message: {0}")]
    Status(#[from] serde_json::Error),
    /// The message names another gateway than its topic: refused, never stored as either.
    #[error("{what} names gateway '{named}' but arrived on the topic of '{topic}'")]
    WrongGateway {
        what: &'static str,
        named: String,
        topic: String,
    },
    #[error("batch.gateway: must not be empty")]
    NoGateway,
    #[error("results[{index}].gateway: '{found}' differs from the batch's '{batch}'")]
    ForeignResult {
        index: usize,
        found: String,
        batch: String,
    },
    #[error("results[{0}].edge_seq: must be at least 1")]
    ZeroSeq(usize),
}
