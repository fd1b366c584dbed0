//! Device messages in: the embedded MQTT front or a client of an external broker.
//!
//! Whatever the source, a message becomes an [`Inbound`] carrying an [`Ack`]. The pipeline
//! hands every `Ack` of a batch to an [`AckSet`] and releases the set only after the batch's
//! outcomes are durable, so a device (or the external broker) never hears "received" for a
//! message that a crash could still lose.

use bytes::Bytes;

/// One device message as it came off the wire.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// Epoch milliseconds at which the gateway received it.
    pub received_at: i64,
    pub ack: Ack,
}

/// What must happen once the message's outcome is durable (nothing for QoS 0).
#[derive(Debug)]
pub struct Ack {
    // filled in by the ingest implementation
}

/// The acknowledgements of one committed batch, released together.
#[derive(Debug, Default)]
pub struct AckSet {
    // filled in by the ingest implementation
}

impl AckSet {
    pub fn push(&mut self, _ack: Ack) {
        todo!()
    }

    /// Sends every acknowledgement (per connection, in arrival order, in as few writes as
    /// possible). Call only after the batch is durable.
    pub fn release(&mut self) {
        todo!()
    }
}
