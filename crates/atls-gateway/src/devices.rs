//! What the gateway keeps per device: bounded in number (overall and per
//! address prefix), in time (a device that stops mid-handshake is
//! forgotten after `handshake_timeout`, an established one after
//! `idle_timeout`) and in bytes (cookies, blockwise buffers, answers kept
//! for deduplication).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use atls_coap::block::Block1Assembly;
use atls_coap::server::Endpoint;
use atls_sessions::ClientKey;
use cookie_store::CookieStore;

/// Answers (and message IDs in progress) remembered per device for
/// deduplication (RFC 7252 §4.5).
pub(crate) const RECENT_PER_DEVICE: usize = 8;
/// How long a message ID is remembered (EXCHANGE_LIFETIME, RFC 7252 §4.8.2).
pub(crate) const DEDUP_LIFETIME: Duration = Duration::from_secs(247);
/// Cookies kept per device; more from the service are ignored.
pub(crate) const MAX_COOKIES: usize = 16;
/// Bytes of cookies (names and values) kept per device.
pub(crate) const MAX_COOKIE_BYTES: usize = 8192;

/// One device (a CoAP endpoint: address, port and transport).
pub(crate) struct Device {
    pub(crate) cookies: CookieStore,
    /// This device's own upstream connection pool (draft §5.1.5: one
    /// upstream connection per device, so its exchanges are not
    /// head-of-line blocked behind another's and the service sees them
    /// apart).
    pub(crate) http: Option<reqwest::Client>,
    /// Index of the route its last ClientHello chose.
    pub(crate) route: Option<usize>,
    /// The SNI of its last ClientHello.
    pub(crate) sni: Option<String>,
    /// A ClientHello of it chose its route: later flights go there (a
    /// device forgotten mid-handshake is refused, not sent elsewhere).
    pub(crate) routed: bool,
    /// Flight exchanges answered since its last ClientHello.
    pub(crate) exchanges: u8,
    /// It completed a handshake (two flight exchanges answered, or an
    /// OSCORE exchange): kept for `idle_timeout`, not `handshake_timeout`,
    /// and never evicted for a newcomer.
    pub(crate) established: bool,
    pub(crate) block1: Option<(Block1Assembly, Instant)>,
    /// The last answer too large for one message: (body, ETag, format,
    /// when), served in Block2 blocks.
    pub(crate) block2: Option<Block2Body>,
    /// (message ID, when, answer): `None` while the upstream works on it.
    pub(crate) recent: VecDeque<(u16, Instant, Option<Vec<u8>>)>,
    pub(crate) in_flight: usize,
    pub(crate) seen: Instant,
    /// Bumped when a new DTLS session of the device scopes message IDs
    /// afresh: an answer of an older session is not remembered for it.
    pub(crate) epoch: u64,
}

pub(crate) struct Block2Body {
    pub(crate) body: Vec<u8>,
    pub(crate) tag: [u8; 8],
    pub(crate) at: Instant,
}

impl Device {
    fn new(now: Instant) -> Self {
        Self {
            cookies: CookieStore::default(),
            http: None,
            route: None,
            sni: None,
            routed: false,
            exchanges: 0,
            established: false,
            block1: None,
            block2: None,
            recent: VecDeque::new(),
            in_flight: 0,
            seen: now,
            epoch: 0,
        }
    }

    fn buffered(&self) -> (usize, usize) {
        (
            usize::from(self.block1.is_some()),
            self.block2.as_ref().map_or(0, |b| b.body.len()),
        )
    }

    /// When its Block1 transfer and its Block2 body were last used.
    fn buffer_times(&self) -> (Option<Instant>, Option<Instant>) {
        (
            self.block1.as_ref().map(|(_, at)| *at),
            self.block2.as_ref().map(|b| b.at),
        )
    }
}

/// Why a device cannot be served now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoRoom {
    /// Too many devices from this address prefix.
    PerAddress,
    /// The table is full of established devices.
    Full,
}

/// Every device, by endpoint, with the two expiry orders.
#[derive(Default)]
pub(crate) struct Devices {
    map: HashMap<Endpoint, Device>,
    half_open: BTreeSet<(Instant, Endpoint)>,
    established: BTreeSet<(Instant, Endpoint)>,
    per_prefix: HashMap<ClientKey, usize>,
    /// Block1 transfers in progress per address prefix.
    prefix_transfers: HashMap<ClientKey, usize>,
    /// Block1 transfers and Block2 bodies by when they were last used, so
    /// that abandoned ones are dropped by the sweep.
    block1_order: BTreeSet<(Instant, Endpoint)>,
    block2_order: BTreeSet<(Instant, Endpoint)>,
    /// Block1 transfers in progress and bytes held in Block2 bodies.
    pub(crate) transfers: usize,
    pub(crate) block2_bytes: usize,
    /// Upstream requests in progress over all devices.
    pub(crate) in_flight: usize,
    /// Devices holding an upstream pool of their own.
    pooled: usize,
}

/// Limits the table applies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    pub(crate) max_devices: usize,
    pub(crate) max_per_prefix: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// How long an unused Block1 transfer or Block2 body is kept.
    pub(crate) transfer_timeout: Duration,
}

impl Devices {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.half_open.len(), self.established.len())
    }

    pub(crate) fn contains(&self, endpoint: &Endpoint) -> bool {
        self.map.contains_key(endpoint)
    }

    fn order(&mut self, established: bool) -> &mut BTreeSet<(Instant, Endpoint)> {
        if established {
            &mut self.established
        } else {
            &mut self.half_open
        }
    }

    /// Drop the pools of the least recently seen established devices until
    /// at most `max` devices hold one (their next request builds a new one).
    pub(crate) fn trim_pools(&mut self, max: usize) {
        if self.pooled <= max {
            return;
        }
        let victims: Vec<Endpoint> = self
            .established
            .iter()
            .filter(|(_, e)| self.map.get(e).is_some_and(|d| d.http.is_some()))
            .take(self.pooled.saturating_sub(max))
            .map(|(_, e)| *e)
            .collect();
        for e in victims {
            if let Some(d) = self.map.get_mut(&e) {
                if d.http.take().is_some() {
                    self.pooled = self.pooled.saturating_sub(1);
                }
            }
        }
    }

    /// One upstream request of `endpoint` ended.
    pub(crate) fn release(&mut self, endpoint: &Endpoint) {
        if let Some(device) = self.map.get_mut(endpoint) {
            if device.in_flight > 0 {
                device.in_flight = device.in_flight.saturating_sub(1);
                self.in_flight = self.in_flight.saturating_sub(1);
            }
        }
    }

    fn count_prefix_transfer(&mut self, key: ClientKey, delta: isize) {
        let n = self.prefix_transfers.entry(key).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.prefix_transfers.remove(&key);
        }
    }

    /// Book the change of a device's buffers (before → after).
    fn rebook(
        &mut self,
        endpoint: Endpoint,
        before: ((usize, usize), (Option<Instant>, Option<Instant>)),
        after: ((usize, usize), (Option<Instant>, Option<Instant>)),
    ) {
        let ((t0, b0), (a1_0, a2_0)) = before;
        let ((t1, b1), (a1_1, a2_1)) = after;
        self.transfers = self.transfers.saturating_add(t1).saturating_sub(t0);
        self.block2_bytes = self.block2_bytes.saturating_add(b1).saturating_sub(b0);
        if t1 != t0 {
            let key = ClientKey::from(endpoint.addr.ip());
            self.count_prefix_transfer(key, if t1 > t0 { 1 } else { -1 });
        }
        if a1_0 != a1_1 {
            if let Some(at) = a1_0 {
                self.block1_order.remove(&(at, endpoint));
            }
            if let Some(at) = a1_1 {
                self.block1_order.insert((at, endpoint));
            }
        }
        if a2_0 != a2_1 {
            if let Some(at) = a2_0 {
                self.block2_order.remove(&(at, endpoint));
            }
            if let Some(at) = a2_1 {
                self.block2_order.insert((at, endpoint));
            }
        }
    }

    pub(crate) fn remove(&mut self, endpoint: &Endpoint) {
        if let Some(device) = self.map.remove(endpoint) {
            self.order(device.established).remove(&(device.seen, *endpoint));
            let before = (device.buffered(), device.buffer_times());
            self.rebook(*endpoint, before, ((0, 0), (None, None)));
            if device.http.is_some() {
                self.pooled = self.pooled.saturating_sub(1);
            }
            self.in_flight = self.in_flight.saturating_sub(device.in_flight);
            let key = ClientKey::from(endpoint.addr.ip());
            if let Some(n) = self.per_prefix.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_prefix.remove(&key);
                }
            }
        }
    }

    /// Forget devices whose time is up: half-open ones after the handshake
    /// timeout, established ones after the idle timeout. A device with an
    /// upstream request in progress is kept until it is answered.
    pub(crate) fn sweep(&mut self, now: Instant, bounds: &Bounds) {
        // Abandoned Block1 transfers and unfetched Block2 bodies first. Each
        // entry is taken off its order before it is acted on, so a stale
        // one cannot hold the loop.
        for block1 in [true, false] {
            loop {
                let order = if block1 {
                    &mut self.block1_order
                } else {
                    &mut self.block2_order
                };
                match order.first() {
                    Some((at, _)) if now.saturating_duration_since(*at) > bounds.transfer_timeout => {}
                    _ => break,
                }
                let Some((at, endpoint)) = order.pop_first() else {
                    break;
                };
                let Some(device) = self.map.get_mut(&endpoint) else {
                    continue;
                };
                let before = (device.buffered(), device.buffer_times());
                let current = if block1 { before.1 .0 } else { before.1 .1 };
                if current != Some(at) {
                    continue; // stale: the buffer moved on
                }
                if block1 {
                    device.block1 = None;
                } else {
                    device.block2 = None;
                }
                let after = (device.buffered(), device.buffer_times());
                self.rebook(endpoint, before, after);
            }
        }
        for (established, timeout) in [(false, bounds.handshake_timeout), (true, bounds.idle_timeout)] {
            loop {
                let order = self.order(established);
                match order.first() {
                    Some((seen, _)) if now.saturating_duration_since(*seen) > timeout => {}
                    _ => break,
                }
                let Some((seen, endpoint)) = order.pop_first() else {
                    break;
                };
                let Some(device) = self.map.get_mut(&endpoint) else {
                    continue;
                };
                if device.seen != seen || device.established != established {
                    continue; // stale
                }
                if device.in_flight > 0 {
                    // Busy: look again once it is answered (it is touched then).
                    device.seen = now;
                    self.order(established).insert((now, endpoint));
                    continue;
                }
                self.remove(&endpoint);
            }
        }
    }

    /// Run `f` on the device of `endpoint`, creating it if `create` and
    /// there is room. A full table makes room by forgetting the half-open
    /// device seen least recently; established devices are never pushed
    /// out by newcomers.
    pub(crate) fn with<R>(
        &mut self,
        endpoint: Endpoint,
        now: Instant,
        bounds: &Bounds,
        create: bool,
        f: impl FnOnce(&mut Device, Totals) -> R,
    ) -> Result<Option<R>, NoRoom> {
        if !self.map.contains_key(&endpoint) {
            if !create {
                return Ok(None);
            }
            self.sweep(now, bounds);
            let key = ClientKey::from(endpoint.addr.ip());
            if self.per_prefix.get(&key).copied().unwrap_or(0) >= bounds.max_per_prefix.max(1) {
                return Err(NoRoom::PerAddress);
            }
            if self.map.len() >= bounds.max_devices.max(1) {
                // Room is made from half-open devices: first one that never
                // had a ClientHello forwarded, else the least recently seen.
                let idle = |e: &Endpoint| self.map.get(e).is_some_and(|d| d.in_flight == 0);
                let unrouted = |e: &Endpoint| self.map.get(e).is_some_and(|d| !d.routed);
                let victim = self
                    .half_open
                    .iter()
                    .take(256)
                    .find(|(_, e)| idle(e) && unrouted(e))
                    .or_else(|| self.half_open.iter().find(|(_, e)| idle(e)))
                    .map(|(_, e)| *e);
                match victim {
                    Some(victim) => self.remove(&victim),
                    None => return Err(NoRoom::Full),
                }
            }
            self.map.insert(endpoint, Device::new(now));
            self.half_open.insert((now, endpoint));
            *self.per_prefix.entry(key).or_insert(0) += 1;
        }
        let Some(device) = self.map.get_mut(&endpoint) else {
            return Ok(None);
        };
        let (seen, established) = (device.seen, device.established);
        let before = (device.buffered(), device.buffer_times());
        let in_flight = device.in_flight;
        let pooled = device.http.is_some();
        device.seen = device.seen.max(now);
        let totals = Totals {
            transfers: self.transfers,
            prefix_transfers: self
                .prefix_transfers
                .get(&ClientKey::from(endpoint.addr.ip()))
                .copied()
                .unwrap_or(0),
            block2_bytes: self.block2_bytes,
            in_flight: self.in_flight,
        };
        let result = f(device, totals);
        let after = (device.buffered(), device.buffer_times());
        let (seen_after, established_after, in_flight_after) =
            (device.seen, device.established, device.in_flight);
        let pooled_after = device.http.is_some();
        self.rebook(endpoint, before, after);
        self.pooled = self
            .pooled
            .saturating_add(usize::from(pooled_after))
            .saturating_sub(usize::from(pooled));
        self.in_flight = self
            .in_flight
            .saturating_add(in_flight_after)
            .saturating_sub(in_flight);
        if seen_after != seen || established_after != established {
            self.order(established).remove(&(seen, endpoint));
            self.order(established_after).insert((seen_after, endpoint));
        }
        Ok(Some(result))
    }
}

/// The table-wide counts a device's step is judged against (the table
/// updates them from the device afterwards).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Totals {
    pub(crate) transfers: usize,
    /// Block1 transfers of the device's address prefix.
    pub(crate) prefix_transfers: usize,
    pub(crate) block2_bytes: usize,
    pub(crate) in_flight: usize,
}

/// Remember the message ID of a new request; `Err` with what to answer a
/// duplicate with (`None`: it is in progress or was answered long ago).
pub(crate) fn dedup(device: &mut Device, mid: u16, now: Instant) -> Result<(), Option<Vec<u8>>> {
    let fresh = |at: &Instant| now.saturating_duration_since(*at) < DEDUP_LIFETIME;
    if let Some((_, _, answer)) = device.recent.iter().find(|(m, at, _)| *m == mid && fresh(at)) {
        return Err(answer.clone());
    }
    device.recent.push_back((mid, now, None));
    while device.recent.len() > RECENT_PER_DEVICE {
        // The oldest entry goes (in progress or not: its answer is stored
        // nowhere then, and a late duplicate runs again upstream, where
        // ATLS and OSCORE refuse a replay).
        device.recent.pop_front();
    }
    Ok(())
}

/// Store the answer to `mid`.
pub(crate) fn remember(device: &mut Device, mid: u16, answer: &[u8]) {
    if let Some(entry) = device
        .recent
        .iter_mut()
        .find(|(m, _, a)| *m == mid && a.is_none())
    {
        entry.2 = Some(answer.to_vec());
    }
}

/// Forget `mid` (its exchange failed before anything was sent upstream:
/// a retransmission may try again).
pub(crate) fn forget(device: &mut Device, mid: u16) {
    device.recent.retain(|(m, _, a)| !(*m == mid && a.is_none()));
}
