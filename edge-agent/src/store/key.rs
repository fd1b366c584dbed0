//! Key prefixes of the one tree. Keys sort by prefix, then big-endian number or name.
//!
//! One tree with prefixes, rather than a tree per concept, is what lets one `sled::Batch`
//! (atomic) hold everything a commit changes.

pub const OUTBOX: u8 = b'o';
pub const DLQ: u8 = b'q';
/// DLQ id → when its next automatic retry is due (transient failures only).
pub const DLQ_RETRY: u8 = b'r';
pub const STATE: u8 = b's';
pub const META: u8 = b'm';
/// Device → its open sequence gaps as the agent tracks them (`missed::DeviceGaps`).
pub const GAPS: u8 = b'g';
/// Missed-event record id → `missed::MissedRecord`.
pub const MISSED: u8 = b'x';
/// Missed-event record id → empty: the record reached the cloud broker in a status
/// message (written by the uplink, never by the pipeline, so neither overwrites the other).
pub const MISSED_REPORTED: u8 = b'y';
/// Event id → `CorrectionMark`: the edge corrected this result (at most once, ever).
pub const CORRECTED: u8 = b'c';

pub fn numbered(prefix: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

pub fn named(prefix: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(prefix);
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn number_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[1..9]);
    u64::from_be_bytes(b)
}
