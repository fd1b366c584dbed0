//! Connection caps: how many connections the endpoint holds in all and per client address, so
//! a flood of sockets (a misbehaving device, a hostile client) cannot exhaust file descriptors
//! or memory. A connection beyond a cap is closed at once, before it costs a task or a buffer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why an accepted socket was closed unserved (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    Total,
    Address,
}

impl Full {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Full::Total => "max_connections",
            Full::Address => "max_connections_per_address",
        }
    }
}

/// The open connections, in all and by address.
pub(super) struct Slots {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One connection's place; freed when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    pub(super) fn new(max_total: usize, max_per_address: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max_total,
            max_per_address,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub(super) fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 >= self.max_total {
            return Err(Full::Total);
        }
        let here = g.1.entry(ip).or_insert(0);
        if *here >= self.max_per_address {
            return Err(Full::Address);
        }
        *here += 1;
        g.0 += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_freed_slots_come_back() {
        let slots = Slots::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Full::Address));
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).err(), Some(Full::Total));
        drop(a1);
        let _b2 = slots.take(b).unwrap();
        assert_eq!(slots.open.lock().unwrap().1.len(), 2);
    }
}
