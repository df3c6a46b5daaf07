//! The bounded session table and its admission policy.
//!
//! Every session has a random [`SessionId`] and two server connection IDs
//! (the OSCORE and COSE kids clients put on their messages), all unique among
//! live sessions. The table's lock is held only for map and ordered-set
//! operations (O(log n)); creating engine sessions and handshake crypto run
//! outside it, between [`SessionTable::admit`] and [`Admission::insert`].
//! Entries that leave the table are dropped after the lock is released.
//!
//! The policy, in the order it is applied:
//!
//! 1. A payload opens a session only through [`SessionTable::admit`], which
//!    refuses *before anything is evicted*: a first flight identical to one
//!    still half-open ([`Refusal::DuplicateFirstFlight`]), the half-open cap
//!    ([`Refusal::HalfOpenFull`]), the per-client half-open cap
//!    ([`Refusal::ClientHalfOpenFull`]), and a table full of established
//!    sessions none of which may give its place ([`Refusal::Full`]).
//! 2. The transport runs the first flight through a TLS session outside the
//!    table and inserts it only when the engine answered it.
//! 3. A half-open handshake never evicts anything. When one completes
//!    ([`SessionTable::establish`]) and the table already holds
//!    `max_sessions` established sessions, the least recently used one gives
//!    its place, if [`Eviction`] allows it; otherwise the newcomer is refused.
//! 4. "Used" means a request that *verified* ([`SessionTable::touch`]): a
//!    lookup by cookie or kid alone moves nothing, so whoever merely saw an
//!    identifier cannot keep a session recent (or alive).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::id::{ClientKey, SessionId};

/// When an established session may give its place to a newcomer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Never: with `max_sessions` established sessions, new handshakes are
    /// refused until one ends or expires.
    Never,
    /// The least recently used established session gives its place to a
    /// completed handshake, provided no request of it verified within
    /// `min_idle`. Sessions in active use are never evicted: when every one
    /// has been used more recently, newcomers are refused.
    LeastRecentlyUsed {
        /// How long a session must have been unused before it may be evicted.
        min_idle: Duration,
    },
}

/// The bounds of a [`SessionTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Most established sessions held at once.
    pub max_sessions: usize,
    /// Most handshakes in progress at once, on top of `max_sessions`.
    pub max_half_open: usize,
    /// Most handshakes in progress from one client ([`ClientKey`]); 0 means
    /// no per-client cap.
    pub max_half_open_per_client: usize,
    /// A handshake not finished within this time is dropped.
    pub handshake_timeout: Duration,
    /// An established session with no verified request for this long is dropped.
    pub idle_timeout: Duration,
    /// No session lives longer than this.
    pub lifetime: Duration,
    /// Whether and when a completed handshake may evict an established session.
    pub eviction: Eviction,
    /// Bytes of each server connection ID (OSCORE Recipient ID, COSE kid):
    /// 1 to 7, which fits every AEAD nonce of the draft's §10 table.
    pub cid_len: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_half_open: 1_000,
            max_half_open_per_client: 100,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10 * 60),
            lifetime: Duration::from_secs(60 * 60),
            eviction: Eviction::LeastRecentlyUsed {
                min_idle: Duration::from_secs(30),
            },
            cid_len: 4,
        }
    }
}

/// Which of a session's two server connection IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KidKind {
    /// The `oscore_connection_id` CID: the kid of OSCORE requests.
    Oscore,
    /// The `cose_ext` CID: the kid of COSE requests.
    Cose,
}

impl KidKind {
    fn index(self) -> usize {
        match self {
            KidKind::Oscore => 0,
            KidKind::Cose => 1,
        }
    }
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Still handshaking.
    HalfOpen,
    /// Handshake complete.
    Established,
}

/// Why the table will not take a new session.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// A first flight identical to one whose handshake is still in progress.
    DuplicateFirstFlight,
    /// `max_half_open` handshakes are in progress.
    HalfOpenFull {
        /// When the oldest of them times out.
        retry_after: Duration,
    },
    /// This client has `max_half_open_per_client` handshakes in progress.
    ClientHalfOpenFull {
        /// When all of them will have timed out.
        retry_after: Duration,
    },
    /// `max_sessions` established sessions, none of which may be evicted.
    Full {
        /// When one may be evicted or expires.
        retry_after: Duration,
    },
    /// The session ended (expired, closed or evicted) while its flight was
    /// being processed.
    Gone,
    /// The operating system's random number generator failed.
    Random,
}

impl Refusal {
    /// How long the client should wait before trying again, when waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::HalfOpenFull { retry_after }
            | Refusal::ClientHalfOpenFull { retry_after }
            | Refusal::Full { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short stable name, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::DuplicateFirstFlight => "duplicate_first_flight",
            Refusal::HalfOpenFull { .. } => "half_open_full",
            Refusal::ClientHalfOpenFull { .. } => "client_half_open_full",
            Refusal::Full { .. } => "table_full",
            Refusal::Gone => "gone",
            Refusal::Random => "random",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::DuplicateFirstFlight => "this first flight is already being answered",
            Refusal::HalfOpenFull { .. } => "too many ATLS handshakes in progress",
            Refusal::ClientHalfOpenFull { .. } => "too many ATLS handshakes in progress from this client",
            Refusal::Full { .. } => "the ATLS session table is full",
            Refusal::Gone => "the ATLS session ended",
            Refusal::Random => "the random number generator failed",
        })
    }
}

/// What the table has done since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// First flights admitted (a session was reserved for them).
    pub admitted: u64,
    /// Admissions abandoned before insertion (the engine did not answer the flight).
    pub abandoned: u64,
    /// Handshakes completed and kept.
    pub established: u64,
    /// Refused: duplicate first flight.
    pub refused_duplicate: u64,
    /// Refused: half-open cap.
    pub refused_half_open: u64,
    /// Refused: per-client half-open cap.
    pub refused_client: u64,
    /// Refused: table full of sessions that may not be evicted.
    pub refused_full: u64,
    /// Established sessions evicted for a newcomer.
    pub evicted: u64,
    /// Sessions dropped by their handshake, idle or lifetime deadline.
    pub expired: u64,
    /// Of which handshakes that never completed (the handshake deadline).
    pub expired_half_open: u64,
    /// Sessions removed by the transport (closed, failed).
    pub removed: u64,
}

/// How full the table is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Sessions held (half-open and established).
    pub sessions: usize,
    /// Of which established.
    pub established: usize,
    /// Of which still handshaking.
    pub half_open: usize,
    /// What happened so far.
    pub counters: Counters,
}

/// A session found in the table.
#[derive(Debug)]
pub struct Found<E> {
    /// Its identifier.
    pub id: SessionId,
    /// The transport's state of it.
    pub entry: Arc<E>,
    /// Handshaking or established.
    pub phase: Phase,
}

struct Slot<E> {
    /// `None` while admitted but not yet inserted.
    entry: Option<Arc<E>>,
    phase: Phase,
    created: Instant,
    last_used: Instant,
    deadline: Instant,
    client: Option<ClientKey>,
    cids: [Vec<u8>; 2],
    first_flight: Option<u64>,
}

struct Inner<E> {
    slots: HashMap<SessionId, Slot<E>>,
    kids: [HashMap<Vec<u8>, SessionId>; 2],
    /// Fingerprints of the first flights of half-open sessions.
    first_flights: HashMap<u64, SessionId>,
    /// Half-open sessions per client.
    per_client: HashMap<ClientKey, usize>,
    half_open_deadlines: BTreeSet<(Instant, SessionId)>,
    established_deadlines: BTreeSet<(Instant, SessionId)>,
    /// Established sessions by the time of their last verified request.
    lru: BTreeSet<(Instant, SessionId)>,
    half_open: usize,
    established: usize,
    counters: Counters,
    /// Handshakes that expired unfinished under the lock, logged once it is
    /// released.
    unfinished: Vec<(SessionId, Option<ClientKey>)>,
    /// An established session evicted under the lock, logged likewise.
    evicted_note: Option<SessionId>,
}

/// Expired sessions removed per call on the request path when nothing is
/// refused; a refusal first sweeps every expired session.
const SWEEP_BUDGET: usize = 64;

/// The bounded table of a server's sessions; `E` is the transport's state of
/// one session (behind its own lock, which the table never takes).
pub struct SessionTable<E> {
    policy: Policy,
    inner: Mutex<Inner<E>>,
    hasher: RandomState,
}

impl<E> fmt::Debug for SessionTable<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTable")
            .field("policy", &self.policy)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A place reserved for a new session: its identifiers are fixed and count
/// against the caps. [`Admission::insert`] it once the engine answered its
/// first flight; dropping it gives the place back.
pub struct Admission<'t, E> {
    table: &'t SessionTable<E>,
    id: SessionId,
    oscore_cid: Vec<u8>,
    cose_cid: Vec<u8>,
    inserted: bool,
}

impl<E> fmt::Debug for Admission<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<E> Admission<'_, E> {
    /// The new session's identifier.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The server's `oscore_connection_id` CID for this session.
    pub fn oscore_cid(&self) -> &[u8] {
        &self.oscore_cid
    }

    /// The server's `cose_ext` CID for this session.
    pub fn cose_cid(&self) -> &[u8] {
        &self.cose_cid
    }

    /// Put the session in the table (half-open). Fails only if its
    /// reservation expired meanwhile (a handshake timeout shorter than the
    /// engine's work).
    pub fn insert(mut self, entry: E) -> Result<Found<E>, Refusal> {
        let entry = Arc::new(entry);
        let id = self.id;
        let table = self.table;
        let mut inner = table.lock();
        let slot = inner.slots.get_mut(&id).ok_or(Refusal::Gone)?;
        slot.entry = Some(entry.clone());
        self.inserted = true;
        Ok(Found {
            id,
            entry,
            phase: slot.phase,
        })
    }
}

impl<E> Drop for Admission<'_, E> {
    fn drop(&mut self) {
        if !self.inserted {
            let removed = {
                let mut inner = self.table.lock();
                inner.counters.abandoned = inner.counters.abandoned.saturating_add(1);
                inner.remove(&self.id)
            };
            drop(removed);
        }
    }
}

/// `now + after`, saturating far in the future: a timeout of
/// `Duration::MAX` means "never", not "now".
fn later(now: Instant, after: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(after)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

/// Random identifiers tried before a space is considered exhausted.
const ID_ATTEMPTS: usize = 64;
/// Expired handshakes logged one by one per table operation; more are
/// counted in one line.
const LOGGED_EXPIRIES: usize = 16;

fn until(now: Instant, deadline: Instant) -> Duration {
    deadline.saturating_duration_since(now)
}

impl<E> Inner<E> {
    /// Take a session out of every index; returns its entry for the caller
    /// to drop after releasing the lock.
    fn remove(&mut self, id: &SessionId) -> Option<Arc<E>> {
        let slot = self.slots.remove(id)?;
        match slot.phase {
            Phase::HalfOpen => {
                self.half_open = self.half_open.saturating_sub(1);
                self.half_open_deadlines.remove(&(slot.deadline, *id));
                self.release_client(slot.client);
                if let Some(fp) = slot.first_flight {
                    if self.first_flights.get(&fp) == Some(id) {
                        self.first_flights.remove(&fp);
                    }
                }
            }
            Phase::Established => {
                self.established = self.established.saturating_sub(1);
                self.established_deadlines.remove(&(slot.deadline, *id));
                self.lru.remove(&(slot.last_used, *id));
            }
        }
        for (index, cid) in self.kids.iter_mut().zip(slot.cids.iter()) {
            if index.get(cid) == Some(id) {
                index.remove(cid);
            }
        }
        slot.entry
    }

    fn release_client(&mut self, client: Option<ClientKey>) {
        if let Some(client) = client {
            if let Some(count) = self.per_client.get_mut(&client) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_client.remove(&client);
                }
            }
        }
    }

    /// Remove up to `budget` sessions whose deadline has passed.
    fn sweep(&mut self, now: Instant, budget: usize, graveyard: &mut Vec<Arc<E>>) {
        for _ in 0..budget {
            let next = [
                self.half_open_deadlines.first().copied(),
                self.established_deadlines.first().copied(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some((deadline, id)) = next.filter(|(deadline, _)| *deadline <= now) else {
                return;
            };
            let _ = deadline;
            self.expire(&id, graveyard);
        }
    }

    /// Remove a session whose deadline has passed, counting it (and noting
    /// an unfinished handshake for the log).
    fn expire(&mut self, id: &SessionId, graveyard: &mut Vec<Arc<E>>) {
        if let Some(slot) = self.slots.get(id) {
            if slot.phase == Phase::HalfOpen {
                self.counters.expired_half_open = self.counters.expired_half_open.saturating_add(1);
                self.unfinished.push((*id, slot.client));
            }
        }
        graveyard.extend(self.remove(id));
        self.counters.expired = self.counters.expired.saturating_add(1);
    }

    /// The established session that would give its place now, if any.
    fn eviction_victim(&self, policy: &Policy, now: Instant) -> Result<SessionId, Duration> {
        match policy.eviction {
            Eviction::Never => Err(self
                .established_deadlines
                .first()
                .map_or(policy.idle_timeout, |(d, _)| until(now, *d))),
            Eviction::LeastRecentlyUsed { min_idle } => match self.lru.first() {
                Some((last_used, id)) if later(*last_used, min_idle) <= now => Ok(*id),
                Some((last_used, _)) => Err(until(now, later(*last_used, min_idle))),
                None => Err(policy.handshake_timeout),
            },
        }
    }

    /// Why a new session would be refused now, if it would.
    fn refusal(&self, policy: &Policy, client: Option<ClientKey>, fp: u64, now: Instant) -> Option<Refusal> {
        if self.first_flights.contains_key(&fp) {
            return Some(Refusal::DuplicateFirstFlight);
        }
        if self.half_open >= policy.max_half_open {
            let retry_after = self
                .half_open_deadlines
                .first()
                .map_or(policy.handshake_timeout, |(d, _)| until(now, *d));
            return Some(Refusal::HalfOpenFull { retry_after });
        }
        if let Some(client) = client.filter(|_| policy.max_half_open_per_client > 0) {
            if self.per_client.get(&client).copied().unwrap_or(0) >= policy.max_half_open_per_client {
                return Some(Refusal::ClientHalfOpenFull {
                    retry_after: policy.handshake_timeout,
                });
            }
        }
        if self.established >= policy.max_sessions {
            if let Err(retry_after) = self.eviction_victim(policy, now) {
                return Some(Refusal::Full { retry_after });
            }
        }
        None
    }

    fn count_refusal(&mut self, refusal: &Refusal) {
        let c = &mut self.counters;
        let counter = match refusal {
            Refusal::DuplicateFirstFlight => &mut c.refused_duplicate,
            Refusal::HalfOpenFull { .. } => &mut c.refused_half_open,
            Refusal::ClientHalfOpenFull { .. } => &mut c.refused_client,
            Refusal::Full { .. } => &mut c.refused_full,
            Refusal::Gone | Refusal::Random => return,
        };
        *counter = counter.saturating_add(1);
    }

    /// A connection ID no live session has. With short CIDs the space can
    /// run out: after a bounded number of tries the table counts as full.
    fn fresh_cid(&self, kind: KidKind, policy: &Policy) -> Result<Vec<u8>, Refusal> {
        let index = self.kids.get(kind.index()).ok_or(Refusal::Random)?;
        for _ in 0..ID_ATTEMPTS {
            let mut cid = vec![0u8; policy.cid_len];
            getrandom::fill(&mut cid).map_err(|_| Refusal::Random)?;
            if !index.contains_key(&cid) {
                return Ok(cid);
            }
        }
        Err(Refusal::Full {
            retry_after: policy.handshake_timeout,
        })
    }

    fn fresh_id(&self) -> Result<SessionId, Refusal> {
        for _ in 0..ID_ATTEMPTS {
            let id = SessionId::random().map_err(|_| Refusal::Random)?;
            if !self.slots.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(Refusal::Random)
    }
}

impl<E> SessionTable<E> {
    /// An empty table with `policy`.
    pub fn new(policy: Policy) -> Self {
        let policy = Policy {
            cid_len: policy.cid_len.clamp(1, 7),
            ..policy
        };
        Self {
            policy,
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                kids: [HashMap::new(), HashMap::new()],
                first_flights: HashMap::new(),
                per_client: HashMap::new(),
                half_open_deadlines: BTreeSet::new(),
                established_deadlines: BTreeSet::new(),
                lru: BTreeSet::new(),
                half_open: 0,
                established: 0,
                counters: Counters::default(),
                unfinished: Vec::new(),
                evicted_note: None,
            }),
            hasher: RandomState::new(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn lock(&self) -> MutexGuard<'_, Inner<E>> {
        // Nothing under this lock panics; a poisoned lock still holds
        // consistent indexes.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run `f` under the lock; entries it removes are dropped after the lock
    /// is released (dropping an engine session is not free).
    fn with<R>(&self, f: impl FnOnce(&mut Inner<E>, &mut Vec<Arc<E>>) -> R) -> R {
        let mut graveyard = Vec::new();
        let (result, unfinished, evicted) = {
            let mut inner = self.lock();
            let result = f(&mut inner, &mut graveyard);
            (
                result,
                std::mem::take(&mut inner.unfinished),
                inner.evicted_note.take(),
            )
        };
        drop(graveyard);
        if let Some(victim) = evicted {
            tracing::info!(
                target: "atls::handshake",
                session = %victim.prefix(),
                "evicted the least recently used ATLS session for a new one"
            );
        }
        // A sweep after a flood may expire many at once: the first few by
        // name, the rest in one line.
        if unfinished.len() > LOGGED_EXPIRIES {
            tracing::info!(
                target: "atls::handshake",
                count = unfinished.len() - LOGGED_EXPIRIES,
                "more ATLS handshakes expired unfinished"
            );
        }
        for (id, client) in unfinished.into_iter().take(LOGGED_EXPIRIES) {
            match client {
                Some(client) => tracing::info!(
                    target: "atls::handshake",
                    session = %id.prefix(),
                    %client,
                    "ATLS handshake expired unfinished"
                ),
                None => tracing::info!(
                    target: "atls::handshake",
                    session = %id.prefix(),
                    "ATLS handshake expired unfinished"
                ),
            }
        }
        result
    }

    /// Reserve a place for a session that `first_flight` would open, from
    /// `client` (`None`: not counted per client), or say why not. Nothing is
    /// evicted here.
    pub fn admit(
        &self,
        client: Option<ClientKey>,
        first_flight: &[u8],
        now: Instant,
    ) -> Result<Admission<'_, E>, Refusal> {
        let fp = self.hasher.hash_one(first_flight);
        let policy = self.policy;
        let (id, oscore_cid, cose_cid) = self.with(|inner, graveyard| {
            inner.sweep(now, SWEEP_BUDGET, graveyard);
            if inner.refusal(&policy, client, fp, now).is_some() {
                // Expired sessions may be holding the room.
                inner.sweep(now, usize::MAX, graveyard);
            }
            if let Some(refusal) = inner.refusal(&policy, client, fp, now) {
                inner.count_refusal(&refusal);
                return Err(refusal);
            }
            let id = inner.fresh_id()?;
            let oscore_cid = inner.fresh_cid(KidKind::Oscore, &policy)?;
            let cose_cid = inner.fresh_cid(KidKind::Cose, &policy)?;
            let deadline = later(now, policy.handshake_timeout.min(policy.lifetime));
            inner.slots.insert(
                id,
                Slot {
                    entry: None,
                    phase: Phase::HalfOpen,
                    created: now,
                    last_used: now,
                    deadline,
                    client,
                    cids: [oscore_cid.clone(), cose_cid.clone()],
                    first_flight: Some(fp),
                },
            );
            for (index, cid) in inner.kids.iter_mut().zip([&oscore_cid, &cose_cid]) {
                index.insert(cid.clone(), id);
            }
            inner.first_flights.insert(fp, id);
            inner.half_open_deadlines.insert((deadline, id));
            inner.half_open = inner.half_open.saturating_add(1);
            if let Some(client) = client {
                let count = inner.per_client.entry(client).or_insert(0);
                *count = count.saturating_add(1);
            }
            inner.counters.admitted = inner.counters.admitted.saturating_add(1);
            Ok((id, oscore_cid, cose_cid))
        })?;
        Ok(Admission {
            table: self,
            id,
            oscore_cid,
            cose_cid,
            inserted: false,
        })
    }

    /// The handshake of `id` completed: count it as established. With
    /// `max_sessions` established sessions already, the least recently used
    /// one is evicted if the policy allows it; otherwise `id` itself is
    /// removed and the refusal returned.
    pub fn establish(&self, id: &SessionId, now: Instant) -> Result<(), Refusal> {
        let policy = self.policy;
        self.with(|inner, graveyard| {
            inner.sweep(now, SWEEP_BUDGET, graveyard);
            let phase = inner.slots.get(id).ok_or(Refusal::Gone)?.phase;
            if phase == Phase::Established {
                return Ok(());
            }
            if inner.established >= policy.max_sessions {
                match inner.eviction_victim(&policy, now) {
                    Ok(victim) => {
                        inner.evicted_note = Some(victim);
                        graveyard.extend(inner.remove(&victim));
                        inner.counters.evicted = inner.counters.evicted.saturating_add(1);
                    }
                    Err(retry_after) => {
                        let refusal = Refusal::Full { retry_after };
                        inner.count_refusal(&refusal);
                        graveyard.extend(inner.remove(id));
                        return Err(refusal);
                    }
                }
            }
            let Some(slot) = inner.slots.get_mut(id) else {
                return Err(Refusal::Gone);
            };
            let (old_deadline, client, fp) = (slot.deadline, slot.client, slot.first_flight.take());
            slot.phase = Phase::Established;
            slot.last_used = now;
            slot.deadline = later(now, policy.idle_timeout).min(later(slot.created, policy.lifetime));
            let deadline = slot.deadline;
            inner.half_open_deadlines.remove(&(old_deadline, *id));
            inner.half_open = inner.half_open.saturating_sub(1);
            inner.release_client(client);
            if let Some(fp) = fp {
                if inner.first_flights.get(&fp) == Some(id) {
                    inner.first_flights.remove(&fp);
                }
            }
            inner.established_deadlines.insert((deadline, *id));
            inner.lru.insert((now, *id));
            inner.established = inner.established.saturating_add(1);
            inner.counters.established = inner.counters.established.saturating_add(1);
            Ok(())
        })
    }

    /// A request of `id` verified at `now`: it becomes the most recently used
    /// session and its idle deadline moves.
    pub fn touch(&self, id: &SessionId, now: Instant) {
        let policy = self.policy;
        self.with(|inner, _| {
            let Some(slot) = inner.slots.get_mut(id) else {
                return;
            };
            if slot.phase != Phase::Established || now <= slot.last_used {
                return;
            }
            let (old_used, old_deadline) = (slot.last_used, slot.deadline);
            slot.last_used = now;
            slot.deadline = later(now, policy.idle_timeout).min(later(slot.created, policy.lifetime));
            let deadline = slot.deadline;
            inner.lru.remove(&(old_used, *id));
            inner.lru.insert((now, *id));
            inner.established_deadlines.remove(&(old_deadline, *id));
            inner.established_deadlines.insert((deadline, *id));
        });
    }

    /// Remove a session (closed, failed). Its entry is dropped once the last
    /// request holding it finishes.
    pub fn remove(&self, id: &SessionId) {
        self.with(|inner, graveyard| {
            if let Some(entry) = inner.remove(id) {
                graveyard.push(entry);
                inner.counters.removed = inner.counters.removed.saturating_add(1);
            }
        });
    }

    /// The live session `id`; an expired one is removed and not returned.
    pub fn get(&self, id: &SessionId, now: Instant) -> Option<Found<E>> {
        self.with(|inner, graveyard| {
            inner.sweep(now, SWEEP_BUDGET, graveyard);
            let slot = inner.slots.get(id)?;
            if slot.deadline <= now {
                inner.expire(id, graveyard);
                return None;
            }
            Some(Found {
                id: *id,
                entry: slot.entry.clone()?,
                phase: slot.phase,
            })
        })
    }

    /// The live session whose server connection ID of `kind` is `kid`.
    pub fn get_by_kid(&self, kind: KidKind, kid: &[u8], now: Instant) -> Option<Found<E>> {
        let id = {
            let inner = self.lock();
            *inner.kids.get(kind.index())?.get(kid)?
        };
        self.get(&id, now)
    }

    /// How full the table is, and what it has done.
    pub fn stats(&self) -> TableStats {
        let inner = self.lock();
        TableStats {
            sessions: inner.slots.len(),
            established: inner.established,
            half_open: inner.half_open,
            counters: inner.counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_sessions: 3,
            max_half_open: 2,
            max_half_open_per_client: 0,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(100),
            lifetime: Duration::from_secs(1000),
            eviction: Eviction::LeastRecentlyUsed {
                min_idle: Duration::from_secs(5),
            },
            cid_len: 4,
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    /// Admit, insert and establish a session at `now`.
    fn open(table: &SessionTable<u32>, tag: u32, now: Instant) -> SessionId {
        let admission = table.admit(None, &tag.to_be_bytes(), now).expect("admitted");
        let found = admission.insert(tag).expect("inserted");
        table.establish(&found.id, now).expect("established");
        found.id
    }

    #[test]
    fn half_open_handshakes_are_capped_and_never_evict() {
        let t0 = Instant::now();
        let table = SessionTable::new(policy());
        let ids: Vec<_> = (0..3).map(|i| open(&table, i, t0)).collect();
        // Full of established sessions, all used just now: newcomers are refused
        // up front, and nothing is evicted.
        let refused = table.admit(None, b"new", secs(t0, 1)).expect_err("refused");
        assert_eq!(
            refused,
            Refusal::Full {
                retry_after: Duration::from_secs(4)
            }
        );
        assert!(ids.iter().all(|id| table.get(id, secs(t0, 1)).is_some()));

        // Once the LRU session is old enough, a half-open one is admitted but
        // evicts nothing until it completes.
        let later = secs(t0, 6);
        table.touch(&ids[1], later);
        table.touch(&ids[2], later);
        let a = table
            .admit(None, b"a", later)
            .expect("admitted")
            .insert(10)
            .expect("inserted");
        let b = table
            .admit(None, b"b", later)
            .expect("admitted")
            .insert(11)
            .expect("inserted");
        assert_eq!(table.stats().half_open, 2);
        assert!(matches!(
            table.admit(None, b"c", later),
            Err(Refusal::HalfOpenFull { retry_after }) if retry_after == Duration::from_secs(10)
        ));
        assert!(
            ids.iter().all(|id| table.get(id, later).is_some()),
            "nothing evicted"
        );

        // The first completion evicts the least recently used (ids[0]); the
        // second finds only recent sessions and is refused.
        table.establish(&a.id, later).expect("takes the LRU's place");
        assert!(table.get(&ids[0], later).is_none());
        assert_eq!(
            table.establish(&b.id, later),
            Err(Refusal::Full {
                retry_after: Duration::from_secs(5)
            })
        );
        assert!(table.get(&b.id, later).is_none(), "the refused newcomer is gone");
        let stats = table.stats();
        assert_eq!((stats.established, stats.half_open), (3, 0));
        assert_eq!(stats.counters.evicted, 1);
        assert_eq!(stats.counters.refused_full, 2);
        assert_eq!(stats.counters.refused_half_open, 1);
    }

    #[test]
    fn duplicate_first_flights_hold_one_place() {
        let t0 = Instant::now();
        let table = SessionTable::new(policy());
        let first = table
            .admit(None, b"hello", t0)
            .expect("admitted")
            .insert(1)
            .expect("in");
        assert_eq!(
            table.admit(None, b"hello", t0).map(|a| a.id()),
            Err(Refusal::DuplicateFirstFlight)
        );
        assert_eq!(table.stats().half_open, 1);
        // Once established, the same bytes are a new attempt (and still capped).
        table.establish(&first.id, t0).expect("established");
        assert!(table.admit(None, b"hello", t0).is_ok());
    }

    #[test]
    fn per_client_caps_spare_other_clients() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            max_half_open: 10,
            max_half_open_per_client: 2,
            ..policy()
        });
        let attacker = ClientKey::V4([127, 0, 0, 2]);
        let bystander = ClientKey::V4([127, 0, 0, 3]);
        let held: Vec<_> = (0..2u8)
            .map(|i| {
                table
                    .admit(Some(attacker), &[i], t0)
                    .expect("admitted")
                    .insert(0)
                    .expect("in")
            })
            .collect();
        assert!(matches!(
            table.admit(Some(attacker), b"x", t0),
            Err(Refusal::ClientHalfOpenFull { .. })
        ));
        assert!(table.admit(Some(bystander), b"x", t0).is_ok());
        // Completing (or dropping) a handshake gives the client its place back.
        table.establish(&held[0].id, t0).expect("established");
        assert!(table.admit(Some(attacker), b"y", t0).is_ok());
    }

    #[test]
    fn an_abandoned_admission_gives_its_place_back() {
        let t0 = Instant::now();
        let table: SessionTable<u32> = SessionTable::new(policy());
        let a = table.admit(None, b"a", t0).expect("admitted");
        let (oscore, cose) = (a.oscore_cid().to_vec(), a.cose_cid().to_vec());
        assert_eq!(oscore.len(), 4);
        assert!(table.get(&a.id(), t0).is_none(), "not visible before insertion");
        drop(a);
        let stats = table.stats();
        assert_eq!(
            (stats.sessions, stats.half_open, stats.counters.abandoned),
            (0, 0, 1)
        );
        assert!(table.get_by_kid(KidKind::Oscore, &oscore, t0).is_none());
        assert!(table.get_by_kid(KidKind::Cose, &cose, t0).is_none());
        assert!(table.admit(None, b"a", t0).is_ok(), "its fingerprint is released");
    }

    #[test]
    fn sessions_expire_by_handshake_idle_and_lifetime_deadlines() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            max_half_open: 10,
            max_sessions: 10,
            ..policy()
        });
        let half = table
            .admit(None, b"h", t0)
            .expect("admitted")
            .insert(0)
            .expect("in");
        assert!(table.get(&half.id, secs(t0, 9)).is_some());
        assert!(table.get(&half.id, secs(t0, 10)).is_none(), "handshake timeout");

        let idle = open(&table, 1, t0);
        let busy = open(&table, 2, t0);
        for s in (50..1000).step_by(50) {
            table.touch(&busy, secs(t0, s));
        }
        assert!(table.get(&idle, secs(t0, 101)).is_none(), "idle timeout");
        assert!(table.get(&busy, secs(t0, 999)).is_some());
        assert!(table.get(&busy, secs(t0, 1000)).is_none(), "lifetime");
        assert_eq!(table.stats().counters.expired, 3);
        assert_eq!(
            table.stats().counters.expired_half_open,
            1,
            "one unfinished handshake"
        );
    }

    #[test]
    fn a_lookup_without_verification_keeps_nothing_recent() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            eviction: Eviction::LeastRecentlyUsed {
                min_idle: Duration::ZERO,
            },
            ..policy()
        });
        let ids: Vec<_> = (0..3).map(|i| open(&table, i, secs(t0, u64::from(i)))).collect();
        // Someone who knows ids[0]'s kid looks it up again and again; only
        // ids[1] verifies a request.
        let kid = {
            let inner = table.lock();
            inner.slots[&ids[0]].cids[0].clone()
        };
        for s in 10..20 {
            assert!(table.get_by_kid(KidKind::Oscore, &kid, secs(t0, s)).is_some());
        }
        table.touch(&ids[1], secs(t0, 20));
        let newcomer = table
            .admit(None, b"n", secs(t0, 21))
            .expect("admitted")
            .insert(9)
            .expect("in");
        table.establish(&newcomer.id, secs(t0, 21)).expect("established");
        assert!(
            table.get(&ids[0], secs(t0, 21)).is_none(),
            "the looked-up session was still the LRU"
        );
        assert!(table.get(&ids[1], secs(t0, 21)).is_some());
        assert!(table.get(&ids[2], secs(t0, 21)).is_some());
    }

    #[test]
    fn never_evicting_refuses_newcomers_until_a_session_ends() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            eviction: Eviction::Never,
            ..policy()
        });
        let ids: Vec<_> = (0..3).map(|i| open(&table, i, t0)).collect();
        assert!(matches!(
            table.admit(None, b"x", secs(t0, 50)),
            Err(Refusal::Full { .. })
        ));
        table.remove(&ids[0]);
        assert!(table.admit(None, b"x", secs(t0, 50)).is_ok());
    }

    #[test]
    fn connection_ids_are_unique_and_route_to_their_session() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            max_sessions: 500,
            max_half_open: 500,
            cid_len: 1,
            ..policy()
        });
        // 1-byte CIDs: 256 values for 200 sessions forces collisions to be avoided.
        let mut seen = std::collections::HashSet::new();
        for i in 0..200u32 {
            let a = table.admit(None, &i.to_be_bytes(), t0).expect("admitted");
            assert!(seen.insert(a.oscore_cid().to_vec()), "unique OSCORE CID");
            let kid = a.oscore_cid().to_vec();
            let found = a.insert(i).expect("in");
            assert_eq!(
                *table.get_by_kid(KidKind::Oscore, &kid, t0).expect("routed").entry,
                i
            );
            assert_eq!(found.phase, Phase::HalfOpen);
        }
    }

    #[test]
    fn a_short_connection_id_space_runs_out_as_a_refusal() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            max_sessions: 1000,
            max_half_open: 1000,
            cid_len: 1,
            ..policy()
        });
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..300u32 {
            match table.admit(None, &i.to_be_bytes(), t0) {
                Ok(a) => held.push(a.insert(i).expect("in")),
                Err(Refusal::Full { .. }) => refused += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(
            held.len() <= 256 && refused >= 44,
            "{} held, {refused} refused",
            held.len()
        );
    }

    #[test]
    fn a_timeout_of_forever_never_expires() {
        let t0 = Instant::now();
        let table = SessionTable::new(Policy {
            handshake_timeout: Duration::MAX,
            idle_timeout: Duration::MAX,
            lifetime: Duration::MAX,
            ..policy()
        });
        let half = table
            .admit(None, b"h", t0)
            .expect("admitted")
            .insert(0)
            .expect("in");
        let est = open(&table, 1, t0);
        let much_later = secs(t0, 10 * 365 * 24 * 3600);
        assert!(table.get(&half.id, much_later).is_some());
        assert!(table.get(&est, much_later).is_some());
    }
}
