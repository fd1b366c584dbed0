//! A device's recent readings of one event type, oldest first by `ts`, the latest last: what a
//! late event is calculated against. The edge keeps one per device and type in its state; the
//! cloud keeps one per device and type beside the stored results, to recalculate against
//! exactly what the edge had. One type, so both tiers keep the same readings in the same order
//! and drop the same one when it is full.

use serde::{Deserialize, Serialize};

/// How many readings before the latest one a window keeps. A late event older than all of them
/// is calculated as if there were no previous reading (flag `out_of_order`). Small on purpose:
/// the edge rewrites a device's state with every event.
pub const EARLIER_READINGS: usize = 4;

/// Something with the event time a window orders by.
pub trait Timed {
    fn ts(&self) -> i64;
}

/// At most [`Window::CAPACITY`] items ordered by `ts`, the latest last. Which way an item goes
/// in (as the new latest, or among the earlier ones) is the caller's rule: the edge knows its
/// latest reading, the cloud may not have seen it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Window<T>(Vec<T>);

impl<T> Default for Window<T> {
    fn default() -> Self {
        Window(Vec::new())
    }
}

impl<T: Timed> Window<T> {
    /// The latest reading and [`EARLIER_READINGS`] before it.
    pub const CAPACITY: usize = EARLIER_READINGS + 1;

    pub fn latest(&self) -> Option<&T> {
        self.0.last()
    }

    /// The newest item older than `ts`: the reading an event at `ts` comes after.
    pub fn before(&self, ts: i64) -> Option<&T> {
        self.0.iter().rev().find(|k| k.ts() < ts)
    }

    /// The oldest item newer than `ts`: the one an event at `ts` was missing from.
    pub fn after(&self, ts: i64) -> Option<&T> {
        self.0.iter().find(|k| k.ts() > ts)
    }

    /// Oldest first, the latest last.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.0.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Makes `item` the latest; the oldest falls out when the window is full.
    pub fn advance(&mut self, item: T) {
        if self.0.len() >= Self::CAPACITY {
            self.0.remove(0);
        }
        self.0.push(item);
    }

    /// Makes a new latest with `fill`, reusing the oldest item's allocations when the window
    /// is full (the edge's hot path: the same fields, overwritten in place).
    pub fn advance_with(&mut self, fill: impl FnOnce(&mut T))
    where
        T: Default,
    {
        let mut slot = if self.0.len() >= Self::CAPACITY {
            self.0.remove(0)
        } else {
            T::default()
        };
        fill(&mut slot);
        self.0.push(slot);
    }

    /// Puts `item` in `ts` order, before any of equal `ts` (so it never displaces the latest
    /// of the same time); the oldest falls out when the window overflows. Returns where it
    /// sits, or `None` when it was itself the oldest and fell out.
    pub fn insert(&mut self, item: T) -> Option<usize> {
        let at = self.0.partition_point(|k| k.ts() < item.ts());
        self.0.insert(at, item);
        if self.0.len() > Self::CAPACITY {
            self.0.remove(0);
            return at.checked_sub(1);
        }
        Some(at)
    }

    /// The item at `i` (oldest first), as [`insert`](Self::insert) reports it.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.0.get_mut(i)
    }
}

impl<T> FromIterator<T> for Window<T>
where
    T: Timed,
{
    /// Keeps the newest [`Window::CAPACITY`] of `items`, in `ts` order.
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut w = Window::default();
        for item in items {
            w.insert(item);
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Timed for (i64, &'static str) {
        fn ts(&self) -> i64 {
            self.0
        }
    }

    fn names(w: &Window<(i64, &'static str)>) -> Vec<&'static str> {
        w.iter().map(|k| k.1).collect()
    }

    #[test]
    fn advance_keeps_the_newest_capacity() {
        let mut w = Window::default();
        for (i, n) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
            w.advance((i as i64, n));
        }
        assert_eq!(names(&w), ["b", "c", "d", "e", "f"]);
        assert_eq!(w.latest(), Some(&(5, "f")));
        assert_eq!(w.before(3), Some(&(2, "c")));
        assert_eq!(w.after(3), Some(&(4, "e")));
        assert_eq!(w.before(1), None);
    }

    #[test]
    fn advance_with_reuses_the_oldest_slot_when_full() {
        let mut w: Window<(i64, &'static str)> = Window::default();
        w.advance_with(|s| *s = (1, "a"));
        assert_eq!(names(&w), ["a"]);
        for i in 2..=6 {
            w.advance_with(|s| {
                // Full from the sixth on: the slot handed out is the oldest item.
                if i == 6 {
                    assert_eq!(*s, (1, "a"));
                }
                *s = (i, "n");
            });
        }
        assert_eq!(w.len(), Window::<(i64, &str)>::CAPACITY);
        assert_eq!(w.latest(), Some(&(6, "n")));
    }

    #[test]
    fn insert_orders_by_ts_and_reports_where() {
        let mut w = Window::default();
        w.advance((10, "latest"));
        assert_eq!(w.insert((5, "late")), Some(0));
        // Equal ts goes before: the latest stays the latest.
        assert_eq!(w.insert((10, "same-time")), Some(1));
        assert_eq!(names(&w), ["late", "same-time", "latest"]);
        for ts in [6, 7] {
            w.insert((ts, "x"));
        }
        assert_eq!(w.len(), 5);
        // Older than everything in a full window: in and straight out again.
        assert_eq!(w.insert((1, "too-old")), None);
        assert_eq!(w.insert((8, "mid")), Some(2));
        assert_eq!(names(&w), ["x", "x", "mid", "same-time", "latest"]);
    }

    #[test]
    fn collects_the_newest_in_order() {
        let w: Window<_> = [(3, "c"), (1, "a"), (9, "i"), (2, "b"), (7, "g"), (8, "h")]
            .into_iter()
            .collect();
        assert_eq!(names(&w), ["b", "c", "g", "h", "i"]);
    }

    #[test]
    fn serialises_as_a_plain_list() {
        let w: Window<i64> = Window(vec![1, 2]);
        assert_eq!(serde_json::to_string(&w).unwrap(), "[1,2]");
    }
}
