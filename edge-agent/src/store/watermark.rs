//! The watermark: how far the store had committed, kept in a small file of its own beside
//! sled's, so a log sled cannot read is not mistaken for an empty store.
//!
//! sled 0.34 treats an unreadable first segment of a store that has no snapshot yet as the end
//! of its log: the store opens *empty*, and `store check` passes (`tests/edge_damaged_store.rs`
//! found it: garbage over the first 4 KiB of `db` silently dropped 50 acknowledged results).
//! After each durable commit the store overwrites this file with its numbering (no sync of its
//! own: it is written after the commit's sync, so even a stale or lost copy never claims more
//! than the store durably holds). At open, a store whose numbering is behind its watermark has
//! lost committed records: that is damage, and the start-up probe quarantines it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The watermark's file inside the store directory.
const FILE: &str = "watermark";

/// `b"EAWM"`, then `next_edge_seq` and `next_dlq_id` (little-endian u64), then their CRC-32.
const LEN: usize = 4 + 8 + 8 + 4;
const MAGIC: &[u8; 4] = b"EAWM";

/// The store's numbering at its last durable commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub next_edge_seq: u64,
    pub next_dlq_id: u64,
}

impl Mark {
    fn encode(self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..12].copy_from_slice(&self.next_edge_seq.to_le_bytes());
        b[12..20].copy_from_slice(&self.next_dlq_id.to_le_bytes());
        let sum = crc32fast::hash(&b[..20]);
        b[20..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// `None` for anything but a whole, intact watermark (a torn or foreign file says
    /// nothing about the store).
    fn decode(b: &[u8]) -> Option<Mark> {
        if b.len() != LEN || &b[..4] != MAGIC {
            return None;
        }
        let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
        let sum = u32::from_le_bytes(b[20..].try_into().unwrap());
        (sum == crc32fast::hash(&b[..20])).then(|| Mark {
            next_edge_seq: word(4..12),
            next_dlq_id: word(12..20),
        })
    }

    /// Whether a store numbered `self` holds everything `mark` says was committed.
    pub fn covers(self, mark: Mark) -> bool {
        self.next_edge_seq >= mark.next_edge_seq && self.next_dlq_id >= mark.next_dlq_id
    }
}

pub(super) struct Watermark {
    file: File,
}

impl Watermark {
    /// Opens (or creates) the watermark of `store_dir`, returning what it last said.
    pub(super) fn open(store_dir: &Path) -> io::Result<(Watermark, Option<Mark>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(store_dir.join(FILE))?;
        let mut buf = [0u8; LEN + 1];
        let n = file.read_at(&mut buf, 0)?;
        Ok((Watermark { file }, Mark::decode(&buf[..n])))
    }

    /// Records a durable commit's numbering (one page-cache write).
    pub(super) fn set(&self, mark: Mark) -> io::Result<()> {
        self.file.write_all_at(&mark.encode(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_anything_else() {
        let m = Mark {
            next_edge_seq: 51,
            next_dlq_id: 3,
        };
        assert_eq!(Mark::decode(&m.encode()), Some(m));
        let mut torn = m.encode();
        torn[5] ^= 1;
        assert_eq!(Mark::decode(&torn), None);
        assert_eq!(Mark::decode(&m.encode()[..LEN - 1]), None);
        assert_eq!(Mark::decode(b""), None);
    }

    #[test]
    fn covers_means_nothing_committed_is_missing() {
        let at = |e, d| Mark {
            next_edge_seq: e,
            next_dlq_id: d,
        };
        assert!(at(51, 3).covers(at(51, 3)));
        assert!(at(60, 3).covers(at(51, 3)));
        assert!(!at(1, 1).covers(at(51, 3)));
        assert!(!at(51, 2).covers(at(51, 3)));
    }

    #[test]
    fn reopening_reads_the_last_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (w, none) = Watermark::open(dir.path()).unwrap();
        assert_eq!(none, None);
        let m = Mark {
            next_edge_seq: 9,
            next_dlq_id: 2,
        };
        w.set(m).unwrap();
        drop(w);
        assert_eq!(Watermark::open(dir.path()).unwrap().1, Some(m));
    }
}
