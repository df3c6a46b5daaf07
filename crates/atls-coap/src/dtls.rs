//! CoAP over DTLS 1.2 (RFC 7252 §9, `coaps://`): the hop-by-hop transport
//! of draft Figure 9, with ATLS end to end inside it.
//!
//! Both sides run the DTLS session of an `atls-core` engine (OpenSSL, the
//! engine with DTLS) with its socket unplugged, exactly as the ATLS layer
//! does: datagrams go in, records come out, and this module moves them
//! between the session and a UDP socket and runs the retransmission timer
//! (RFC 6347 §4.2.4). After the handshake each record carries one CoAP
//! message in the RFC 7252 format.
//!
//! The server answers a ClientHello without a valid cookie with a
//! HelloVerifyRequest computed statelessly (RFC 6347 §4.2.1) and keeps
//! nothing for it; only a peer that returned its cookie gets a DTLS session:
//! one per client address and port, bounded in all (`max_sessions`), in
//! handshakes at once (`max_handshakes`), per IP address (IPv6: /64), and in
//! time (a handshake must finish within `handshake_timeout`; a session that
//! received nothing authentic for `idle_timeout` is dropped). The transport
//! endpoint must enable `DtlsConfig::cookie_exchange` (as `atls serve
//! --coaps` does): the engine then checks the same cookie again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atls_core::records::{self, Framing};
use atls_core::{
    ClientEndpoint, ClientSessionParams, HandshakeInfo, ServerEndpoint, ServerSessionParams, Session,
};
use atls_sessions::ClientKey;
use tokio::net::UdpSocket;

use crate::handler::{Answer, CoapHandler};
use crate::server::Transport;

/// Largest datagram read.
const MAX_DATAGRAM: usize = 16 * 1024 + 512;

/// Bounds of a CoAP-over-DTLS server.
#[derive(Clone, Debug)]
pub struct DtlsServerConfig {
    /// DTLS sessions kept in all (handshaking and established).
    pub max_sessions: usize,
    /// DTLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// DTLS handshakes in progress at once from one IP address (IPv6: /64).
    pub max_handshakes_per_ip: usize,
    /// DTLS sessions (of any phase) from one IP address (IPv6: /64).
    pub max_sessions_per_ip: usize,
    /// A handshake not finished within this is dropped.
    pub handshake_timeout: Duration,
    /// A session that received nothing authentic for this long is dropped.
    pub idle_timeout: Duration,
    /// With `max_sessions` sessions, a newcomer (that returned a valid
    /// cookie) takes the place of the least recently active established
    /// session if it has been idle this long.
    pub evict_idle_after: Duration,
}

impl Default for DtlsServerConfig {
    fn default() -> Self {
        Self {
            max_sessions: 4096,
            max_handshakes: 256,
            max_handshakes_per_ip: 16,
            max_sessions_per_ip: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            evict_idle_after: Duration::from_secs(30),
        }
    }
}

/// How long a HelloVerifyRequest cookie stays valid (the current and the
/// previous window are accepted).
const COOKIE_WINDOW_SECS: u64 = 30;
/// Cookie length.
const COOKIE_LEN: usize = 16;

/// Split `output` (records of one DTLS session) into datagrams of at most
/// `mtu` bytes, whole records each.
fn datagrams(output: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    if output.is_empty() {
        return Vec::new();
    }
    let Ok(records) = records::split_records(Framing::Dtls, output) else {
        return vec![output.to_vec()];
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    for record in records {
        match out.last_mut() {
            Some(last) if last.len() + record.bytes.len() <= mtu => last.extend_from_slice(record.bytes),
            _ => out.push(record.bytes.to_vec()),
        }
    }
    out
}

/// A ClientHello in the first record of a datagram, whole (not
/// fragmented), as the stateless cookie exchange needs it.
struct Hello<'a> {
    /// The record's sequence number.
    record_seq: u64,
    /// The handshake message's sequence number.
    message_seq: u16,
    /// client_version and random.
    version_random: &'a [u8],
    session_id: &'a [u8],
    cookie: &'a [u8],
    /// Everything after the cookie (suites, compression, extensions).
    rest: &'a [u8],
}

fn parse_hello(datagram: &[u8]) -> Option<Hello<'_>> {
    let header = datagram.get(..13)?;
    if header[0] != 22 || header[3..5] != [0, 0] {
        return None;
    }
    let record_seq = header[5..11].iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
    let len = usize::from(u16::from_be_bytes([header[11], header[12]]));
    let fragment = datagram.get(13..13 + len)?;
    let hs = fragment.get(..12)?;
    let length = hs[1..4].iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
    let offset = hs[6..9].iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
    let frag_len = hs[9..12].iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
    if hs[0] != 1 || offset != 0 || frag_len != length {
        return None;
    }
    let body = fragment.get(12..12 + length)?;
    let version_random = body.get(..34)?;
    let sid_len = usize::from(*body.get(34)?);
    let session_id = body.get(35..35 + sid_len)?;
    let cookie_at = 35 + sid_len;
    let cookie_len = usize::from(*body.get(cookie_at)?);
    let cookie = body.get(cookie_at + 1..cookie_at + 1 + cookie_len)?;
    let rest = body.get(cookie_at + 1 + cookie_len..)?;
    Some(Hello {
        record_seq,
        message_seq: u16::from_be_bytes([hs[4], hs[5]]),
        version_random,
        session_id,
        cookie,
        rest,
    })
}

/// A ClientHello record with `cookie`, message and record sequence numbers.
fn hello_record(hello: &Hello<'_>, cookie: &[u8], message_seq: u16, record_seq: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + hello.rest.len());
    body.extend_from_slice(hello.version_random);
    body.push(hello.session_id.len() as u8);
    body.extend_from_slice(hello.session_id);
    body.push(cookie.len() as u8);
    body.extend_from_slice(cookie);
    body.extend_from_slice(hello.rest);
    handshake_record(1, message_seq, record_seq, &body)
}

/// One DTLS 1.2 epoch-0 handshake record holding one whole message.
fn handshake_record(msg_type: u8, message_seq: u16, record_seq: u64, body: &[u8]) -> Vec<u8> {
    let len = body.len() as u32;
    let mut out = Vec::with_capacity(25 + body.len());
    out.extend_from_slice(&[22, 0xFE, 0xFD, 0, 0]);
    out.extend_from_slice(&record_seq.to_be_bytes()[2..]);
    out.extend_from_slice(&((12 + body.len()) as u16).to_be_bytes());
    out.push(msg_type);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&message_seq.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(body);
    out
}

/// A HelloVerifyRequest answering `hello` (RFC 6347 §4.2.1: version DTLS
/// 1.0, the ClientHello's record sequence number).
fn hello_verify_request(hello: &Hello<'_>, cookie: &[u8]) -> Vec<u8> {
    let mut body = vec![0xFE, 0xFF, cookie.len() as u8];
    body.extend_from_slice(cookie);
    let mut record = handshake_record(3, hello.message_seq, hello.record_seq, &body);
    record[1..3].copy_from_slice(&[0xFE, 0xFF]);
    record
}

/// The per-IP key of the caps: the session table's (IPv4 addresses, IPv4-
/// mapped ones included; IPv6 addresses by /64).
fn ip_key(ip: IpAddr) -> ClientKey {
    ClientKey::from(ip)
}

struct Conn {
    session: Session,
    started: Instant,
    /// Last time the session made progress (an authentic record).
    last: Instant,
    /// The retransmission deadline registered in `Server::timers`.
    timer: Option<Instant>,
    /// Whether this session is counted as a handshake in progress.
    handshaking: bool,
    /// client_version and random of the ClientHello that opened it.
    random: [u8; 34],
    /// Tells this session from a later one of the same address and port:
    /// an answer given later goes only into the session it answers.
    generation: u64,
}

/// The server's DTLS sessions.
struct Server {
    transport: Arc<dyn ServerEndpoint>,
    coap: Arc<dyn CoapHandler>,
    /// Answers the handler gives later, to be sent in their sessions.
    later: tokio::sync::mpsc::Sender<(SocketAddr, u64, Vec<u8>)>,
    /// The generation of the next session.
    generation: u64,
    config: DtlsServerConfig,
    mtu: usize,
    conns: HashMap<SocketAddr, Conn>,
    timers: BTreeSet<(Instant, SocketAddr)>,
    /// Per IP key: (handshakes, sessions).
    per_ip: HashMap<ClientKey, (usize, usize)>,
    handshakes: usize,
    secret: [u8; 32],
    created: Instant,
    /// A full table had no session to evict: none before this time.
    no_victim_until: Option<Instant>,
}

impl Server {
    fn count(&mut self, ip: IpAddr, handshake: isize, all: isize) {
        let entry = self.per_ip.entry(ip_key(ip)).or_insert((0, 0));
        entry.0 = entry.0.saturating_add_signed(handshake);
        entry.1 = entry.1.saturating_add_signed(all);
        if entry.1 == 0 {
            self.per_ip.remove(&ip_key(ip));
        }
        self.handshakes = self.handshakes.saturating_add_signed(handshake);
    }

    fn remove(&mut self, addr: SocketAddr) {
        if let Some(conn) = self.conns.remove(&addr) {
            if let Some(t) = conn.timer {
                self.timers.remove(&(t, addr));
            }
            self.count(addr.ip(), -isize::from(conn.handshaking), -1);
        }
    }

    /// The keyed hash behind the cookie of `hello` from `from` in time
    /// window `window`: over the address, port, client random and window.
    fn cookie_mac(&self, from: SocketAddr, hello: &Hello<'_>, window: u64) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        match from.ip() {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&from.port().to_be_bytes());
        mac.update(hello.version_random);
        mac.update(&window.to_be_bytes());
        mac
    }

    /// The cookie: the first `COOKIE_LEN` bytes of the keyed hash.
    fn cookie(&self, from: SocketAddr, hello: &Hello<'_>, window: u64) -> [u8; COOKIE_LEN] {
        use hmac::Mac as _;
        let tag = self.cookie_mac(from, hello, window).finalize().into_bytes();
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(tag.get(..COOKIE_LEN).unwrap_or(&[0; COOKIE_LEN]));
        cookie
    }

    fn window(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.created).as_secs() / COOKIE_WINDOW_SECS
    }

    /// Whether `hello` returns the cookie of the current or the previous
    /// window (compared in constant time by the hmac crate).
    fn cookie_valid(&self, from: SocketAddr, hello: &Hello<'_>, now: Instant) -> bool {
        use hmac::Mac as _;
        if hello.cookie.len() != COOKIE_LEN {
            return false;
        }
        let window = self.window(now);
        let ok = |w: u64| {
            self.cookie_mac(from, hello, w)
                .verify_truncated_left(hello.cookie)
                .is_ok()
        };
        ok(window) || window.checked_sub(1).is_some_and(ok)
    }

    /// Whether a new session from `addr` fits the bounds. With the table
    /// full, room is made by evicting the least recently active established
    /// session of the prefix holding the most sessions — if that session has
    /// been idle `evict_idle_after`, and that prefix is the newcomer's or
    /// holds more sessions than the newcomer's: a host cannot push out
    /// devices of smaller prefixes by opening sessions, only its own.
    fn room_for(&mut self, addr: SocketAddr, now: Instant) -> bool {
        let key = ip_key(addr.ip());
        let (handshakes, all) = self.per_ip.get(&key).copied().unwrap_or((0, 0));
        if self.handshakes >= self.config.max_handshakes
            || handshakes >= self.config.max_handshakes_per_ip
            || all >= self.config.max_sessions_per_ip
        {
            return false;
        }
        if self.conns.len() < self.config.max_sessions {
            return true;
        }
        if self.no_victim_until.is_some_and(|t| now < t) {
            return false;
        }
        let fullest = self
            .per_ip
            .iter()
            .max_by_key(|(_, (_, sessions))| *sessions)
            .map(|(k, (_, sessions))| (*k, *sessions));
        let victim = fullest
            .filter(|(prefix, sessions)| *sessions > all || *prefix == key)
            .and_then(|(prefix, _)| {
                self.conns
                    .iter()
                    .filter(|(a, c)| !c.handshaking && ip_key(a.ip()) == prefix)
                    .min_by_key(|(_, c)| c.last)
                    .filter(|(_, c)| now.saturating_duration_since(c.last) >= self.config.evict_idle_after)
                    .map(|(a, _)| *a)
            });
        match victim {
            Some(victim) => {
                self.remove(victim);
                true
            }
            None => {
                // The scan is O(sessions): not again for a second.
                self.no_victim_until = Some(now + Duration::from_secs(1));
                false
            }
        }
    }

    /// A ClientHello from `from`: without a valid cookie it gets a
    /// HelloVerifyRequest and the server keeps nothing; with one it starts
    /// a session (replacing an established one of the same address and
    /// port: the cookie proved the client is there, RFC 6347 §4.2.8).
    fn hello(&mut self, datagram: &[u8], hello: &Hello<'_>, from: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
        if !self.cookie_valid(from, hello, now) {
            let cookie = self.cookie(from, hello, self.window(now));
            return vec![hello_verify_request(hello, &cookie)];
        }
        // The ClientHello that returns a cookie is the second one.
        if hello.message_seq != 1 || hello.record_seq == 0 {
            return Vec::new();
        }
        let existing = self
            .conns
            .get(&from)
            .map(|c| (c.handshaking, c.random == hello.version_random));
        match existing {
            // A retransmission of the ClientHello of the handshake in
            // progress: the engine answers it.
            Some((true, true)) => return self.datagram_for(datagram, from, now),
            // A replay (or a late duplicate) of the ClientHello that opened
            // the established session: nothing to do.
            Some((false, true)) => return Vec::new(),
            // A new handshake from the address of a session: the cookie
            // proved the client is there (RFC 6347 §4.2.8); the old session
            // goes once the new one has started.
            Some(_) => {}
            None => {
                if !self.room_for(from, now) {
                    return Vec::new();
                }
            }
        }
        let handshakes_full = self.handshakes >= self.config.max_handshakes
            || self
                .per_ip
                .get(&ip_key(from.ip()))
                .is_some_and(|(h, _)| *h >= self.config.max_handshakes_per_ip);
        if existing.is_some_and(|(handshaking, _)| !handshaking) && handshakes_full {
            return Vec::new();
        }
        let params = ServerSessionParams {
            dtls_cookie: Some(hello.cookie.to_vec()),
            ..ServerSessionParams::default()
        };
        let Ok(mut session) = Session::server(self.transport.as_ref(), &params) else {
            return Vec::new();
        };
        // The engine runs the cookie exchange statefully: give it the first
        // ClientHello (this one without the cookie, one message and one
        // record earlier) and drop its HelloVerifyRequest, which carries
        // the same cookie; it then takes this ClientHello as the second.
        let first = hello_record(hello, &[], 0, hello.record_seq - 1);
        if session.push_flight(&first, now).is_err() {
            return Vec::new();
        }
        let _ = session.take_flight(now);
        if existing.is_some() {
            self.remove(from);
        }
        let mut random = [0u8; 34];
        random.copy_from_slice(hello.version_random);
        self.conns.insert(
            from,
            Conn {
                session,
                started: now,
                last: now,
                timer: None,
                handshaking: true,
                random,
                generation: self.generation,
            },
        );
        self.generation = self.generation.wrapping_add(1);
        self.count(from.ip(), 1, 1);
        // Message IDs are scoped to the DTLS session (RFC 7252 §9.1).
        self.coap.reset_exchanges(from, Transport::Dtls);
        self.datagram_for(datagram, from, now)
    }

    /// Handle one datagram; returns the datagrams to send back.
    fn datagram(&mut self, datagram: &[u8], from: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
        if let Some(hello) = parse_hello(datagram) {
            return self.hello(datagram, &hello, from, now);
        }
        if self.conns.contains_key(&from) {
            self.datagram_for(datagram, from, now)
        } else {
            Vec::new()
        }
    }

    /// A datagram for the session of `from`.
    fn datagram_for(&mut self, datagram: &[u8], from: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
        let Some(conn) = self.conns.get_mut(&from) else {
            return Vec::new();
        };
        let mut failed = false;
        let mut progress = false;
        if conn.handshaking {
            failed = conn.session.push_flight(datagram, now).is_err() && conn.session.is_closed();
            progress = conn.session.wants_write() || conn.session.is_handshake_complete();
        } else {
            let Ok(records) = records::split_records(Framing::Dtls, datagram) else {
                return Vec::new();
            };
            for record in records {
                if conn.session.push_flight(record.bytes, now).is_err() && conn.session.is_closed() {
                    failed = true;
                    break;
                }
                let message = conn.session.take_received();
                if message.is_empty() {
                    continue;
                }
                progress = true;
                match self.coap.datagram(&message, from, Transport::Dtls, now) {
                    Answer::Now(None) => {}
                    Answer::Now(Some(answer)) => {
                        if conn.session.send(&answer).is_err() {
                            failed = true;
                            break;
                        }
                    }
                    Answer::Later(pending) => {
                        let later = self.later.clone();
                        let generation = conn.generation;
                        tokio::spawn(async move {
                            if let Some(answer) = pending.await {
                                // A full queue drops the answer: the
                                // device's retransmission asks again.
                                let _ = later.try_send((from, generation, answer));
                            }
                        });
                    }
                }
            }
        }
        if progress {
            // Only authentic progress keeps a session alive: spoofed
            // datagrams of its address do not.
            conn.last = now;
        }
        let output = conn.session.take_flight(now).ok().flatten().unwrap_or_default();
        let closed = failed || conn.session.is_closed();
        let completed = conn.handshaking && conn.session.is_handshake_complete();
        let timer = conn.session.next_timeout();
        let old_timer = std::mem::replace(&mut conn.timer, timer);
        if completed {
            conn.handshaking = false;
            if let Some(info) = conn.session.handshake_info() {
                tracing::debug!(%from, version = info.version.name(), suite = %info.cipher_suite, "CoAP over DTLS: handshake complete");
            }
            self.count(from.ip(), -1, 0);
        }
        if let Some(t) = old_timer {
            self.timers.remove(&(t, from));
        }
        if let Some(t) = timer {
            self.timers.insert((t, from));
        }
        if closed {
            self.remove(from);
        }
        datagrams(&output, self.mtu)
    }

    /// An answer the handler gave later, protected in the session of `to`
    /// (none if the session ended meanwhile).
    fn send_later(&mut self, to: SocketAddr, generation: u64, answer: &[u8], now: Instant) -> Vec<Vec<u8>> {
        let Some(conn) = self.conns.get_mut(&to).filter(|c| c.generation == generation) else {
            return Vec::new();
        };
        if conn.handshaking || conn.session.send(answer).is_err() {
            return Vec::new();
        }
        let output = conn.session.take_flight(now).ok().flatten().unwrap_or_default();
        datagrams(&output, self.mtu)
    }

    /// Fire due retransmission timers.
    fn timers(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let due: Vec<(Instant, SocketAddr)> = self
            .timers
            .iter()
            .take_while(|(t, _)| *t <= now)
            .copied()
            .collect();
        let mut out = Vec::new();
        for (t, addr) in due {
            self.timers.remove(&(t, addr));
            let Some(conn) = self.conns.get_mut(&addr) else {
                continue;
            };
            conn.timer = None;
            if conn.session.handle_timeout(now).is_err() {
                self.remove(addr);
                continue;
            }
            if let Ok(Some(flight)) = conn.session.take_flight(now) {
                out.extend(datagrams(&flight, self.mtu).into_iter().map(|d| (addr, d)));
            }
            if let Some(next) = conn.session.next_timeout() {
                conn.timer = Some(next);
                self.timers.insert((next, addr));
            }
        }
        out
    }

    /// Drop handshakes that took too long and idle sessions.
    fn sweep(&mut self, now: Instant) {
        let stale: Vec<SocketAddr> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                if c.handshaking {
                    now.saturating_duration_since(c.started) > self.config.handshake_timeout
                } else {
                    now.saturating_duration_since(c.last) > self.config.idle_timeout
                }
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in stale {
            self.remove(addr);
        }
    }
}

/// Serve CoAP over DTLS on `socket`: DTLS sessions of `transport` (its
/// configuration names the credentials: PSKs or a certificate, and must
/// enable `DtlsConfig::cookie_exchange`), and the CoAP messages inside them
/// handled by `coap`. Runs until the socket fails.
///
/// A ClientHello without a valid cookie is answered with a
/// HelloVerifyRequest computed statelessly (RFC 6347 §4.2.1): the server
/// keeps nothing for a source address until it returned the cookie.
pub async fn serve<H: CoapHandler>(
    socket: UdpSocket,
    transport: Arc<dyn ServerEndpoint>,
    coap: Arc<H>,
    config: DtlsServerConfig,
) -> std::io::Result<()> {
    let common = &transport.config().common;
    if common.framing().ok() != Some(Framing::Dtls) || !common.dtls.cookie_exchange {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the coaps:// endpoint must be DTLS with DtlsConfig::cookie_exchange",
        ));
    }
    let mtu = usize::from(common.dtls.mtu).max(256);
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    let (later, mut later_rx) = tokio::sync::mpsc::channel(1024);
    let mut server = Server {
        transport,
        coap,
        later,
        config,
        mtu,
        conns: HashMap::new(),
        timers: BTreeSet::new(),
        per_ip: HashMap::new(),
        handshakes: 0,
        secret,
        created: Instant::now(),
        no_victim_until: None,
        generation: 0,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next_timer = server
            .timers
            .first()
            .map(|(t, _)| tokio::time::Instant::from_std(*t))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, from) = match received {
                    Ok(received) => received,
                    // An ICMP error for an earlier answer, or a transient
                    // failure: the listener stays up.
                    Err(e) => {
                        tracing::debug!(error = %e, "CoAP over DTLS: receive failed");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                let Some(datagram) = buf.get(..n) else { continue };
                for answer in server.datagram(datagram, from, Instant::now()) {
                    if let Err(e) = socket.send_to(&answer, from).await {
                        tracing::debug!(error = %e, %from, "cannot answer");
                    }
                }
            }
            () = tokio::time::sleep_until(next_timer) => {
                for (to, datagram) in server.timers(Instant::now()) {
                    let _ = socket.send_to(&datagram, to).await;
                }
            }
            Some((to, generation, answer)) = later_rx.recv() => {
                for datagram in server.send_later(to, generation, &answer, Instant::now()) {
                    if let Err(e) = socket.send_to(&datagram, to).await {
                        tracing::debug!(error = %e, %to, "cannot answer");
                    }
                }
            }
            _ = sweep.tick() => server.sweep(Instant::now()),
        }
    }
}

/// Why a CoAP-over-DTLS link failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DtlsLinkError {
    /// The socket failed.
    #[error("UDP: {0}")]
    Io(#[from] std::io::Error),
    /// The DTLS handshake failed.
    #[error("DTLS: {0}")]
    Dtls(#[from] atls_core::Error),
    /// The DTLS handshake did not finish in time.
    #[error("no DTLS handshake with {0} in time")]
    Timeout(SocketAddr),
}

/// A client's DTLS session with one server on a connected UDP socket.
#[derive(Debug)]
pub struct DtlsLink {
    socket: UdpSocket,
    peer: SocketAddr,
    endpoint: Arc<dyn ClientEndpoint>,
    server_name: Option<String>,
    timeout: Duration,
    session: Session,
    inbox: VecDeque<Vec<u8>>,
    mtu: usize,
}

impl DtlsLink {
    /// Run the DTLS handshake of `endpoint` with `server` (retransmitting
    /// on the DTLS timer), giving up after `timeout`.
    pub async fn connect(
        server: SocketAddr,
        endpoint: Arc<dyn ClientEndpoint>,
        server_name: Option<String>,
        timeout: Duration,
    ) -> Result<Self, DtlsLinkError> {
        let local: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        let session = Self::session(endpoint.as_ref(), &server_name)?;
        let mtu = usize::from(endpoint.config().common.dtls.mtu).max(256);
        let mut link = Self {
            socket,
            peer: server,
            endpoint,
            server_name,
            timeout,
            session,
            inbox: VecDeque::new(),
            mtu,
        };
        link.handshake().await?;
        Ok(link)
    }

    fn session(
        endpoint: &dyn ClientEndpoint,
        server_name: &Option<String>,
    ) -> Result<Session, DtlsLinkError> {
        let params = ClientSessionParams {
            server_name: server_name.clone(),
            ..ClientSessionParams::default()
        };
        Ok(Session::client(endpoint, &params)?)
    }

    /// A new DTLS handshake from the same address and port (the server
    /// forgot the session: it restarted, or dropped it idle). The server
    /// keeps the old session until this one returned its cookie.
    pub async fn reconnect(&mut self) -> Result<(), DtlsLinkError> {
        self.session = Self::session(self.endpoint.as_ref(), &self.server_name)?;
        self.inbox.clear();
        self.handshake().await
    }

    async fn handshake(&mut self) -> Result<(), DtlsLinkError> {
        let server = self.peer;
        let give_up = tokio::time::Instant::now()
            .checked_add(self.timeout)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            self.flush().await?;
            if self.session.is_handshake_complete() {
                return Ok(());
            }
            let wake = self
                .session
                .next_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1))
                .min(give_up);
            match tokio::time::timeout_at(wake, self.socket.recv(&mut buf)).await {
                Ok(received) => {
                    let n = received?;
                    let datagram = buf.get(..n).unwrap_or_default();
                    if records::split_records(Framing::Dtls, datagram).is_err() {
                        continue;
                    }
                    if let Err(e) = self.session.push_flight(datagram, Instant::now()) {
                        if self.session.is_closed() {
                            let _ = self.flush().await;
                            return Err(e.into());
                        }
                    }
                }
                Err(_) if tokio::time::Instant::now() >= give_up => {
                    return Err(DtlsLinkError::Timeout(server))
                }
                Err(_) => self.session.handle_timeout(Instant::now())?,
            }
        }
    }

    /// What the DTLS handshake negotiated.
    pub fn handshake_info(&self) -> Option<&HandshakeInfo> {
        self.session.handshake_info()
    }

    /// The local endpoint.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The server.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if let Ok(Some(flight)) = self.session.take_flight(Instant::now()) {
            for datagram in datagrams(&flight, self.mtu) {
                self.socket.send(&datagram).await?;
            }
        }
        Ok(())
    }

    /// Send one CoAP message in one record.
    pub async fn send_message(&mut self, message: &[u8]) -> std::io::Result<()> {
        self.session
            .send(message)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))?;
        self.flush().await
    }

    /// The next CoAP message from the server, or `None` at `deadline`.
    pub async fn recv_message(&mut self, deadline: tokio::time::Instant) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            if let Some(message) = self.inbox.pop_front() {
                return Ok(Some(message));
            }
            if self.session.is_closed() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the server ended the DTLS session",
                ));
            }
            let Ok(received) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await else {
                return Ok(None);
            };
            let n = received?;
            let Ok(records) = records::split_records(Framing::Dtls, buf.get(..n).unwrap_or_default()) else {
                continue;
            };
            for record in records {
                // Records that do not authenticate are dropped by the stack.
                let _ = self.session.push_flight(record.bytes, Instant::now());
                let message = self.session.take_received();
                if !message.is_empty() {
                    self.inbox.push_back(message);
                }
            }
            self.flush().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::CoapServer;
    use atls_core::{ClientConfig, CommonConfig, Psk, ServerConfig, TlsVersion};

    fn common() -> CommonConfig {
        let mut common = CommonConfig {
            versions: vec![TlsVersion::Dtls12],
            ..CommonConfig::default()
        };
        common.dtls.cookie_exchange = true;
        common
    }

    fn psk() -> Psk {
        Psk::new("unit", vec![7u8; 32]).expect("psk")
    }

    fn server(config: DtlsServerConfig) -> Server {
        let engine = atls_tests::engines()[0];
        let transport = engine
            .server(&ServerConfig {
                common: common(),
                psks: vec![psk()],
                ..ServerConfig::default()
            })
            .expect("transport");
        let tls = engine
            .server(&atls_tests::server_config(TlsVersion::Tls13))
            .expect("tls");
        Server {
            transport,
            coap: CoapServer::new(tls, crate::CoapConfig::default()),
            later: tokio::sync::mpsc::channel(1).0,
            config,
            mtu: 1200,
            conns: HashMap::new(),
            timers: BTreeSet::new(),
            per_ip: HashMap::new(),
            handshakes: 0,
            secret: [9; 32],
            created: Instant::now(),
            no_victim_until: None,
            generation: 0,
        }
    }

    fn client() -> Session {
        let endpoint = atls_tests::engines()[0]
            .client(&ClientConfig {
                common: common(),
                psk: Some(psk()),
                ..ClientConfig::default()
            })
            .expect("client");
        Session::client(endpoint.as_ref(), &ClientSessionParams::default()).expect("session")
    }

    /// Run a client's handshake through the server from `from`; returns
    /// the client and every datagram it sent.
    fn handshake_sent(server: &mut Server, from: SocketAddr) -> (Session, Vec<Vec<u8>>) {
        let mut client = client();
        let now = Instant::now();
        let mut sent = Vec::new();
        for _ in 0..10 {
            let Some(flight) = client.take_flight(now).expect("flight") else {
                break;
            };
            for datagram in datagrams(&flight, 1200) {
                for answer in server.datagram(&datagram, from, now) {
                    client.push_flight(&answer, now).expect("push");
                }
                sent.push(datagram);
            }
            if client.is_handshake_complete() && !client.wants_write() {
                break;
            }
        }
        assert!(client.is_handshake_complete());
        (client, sent)
    }

    fn handshake(server: &mut Server, from: SocketAddr) -> Session {
        handshake_sent(server, from).0
    }

    /// A CoAP ping through `device`'s session: answered with a Reset.
    fn pinged(server: &mut Server, device: &mut Session, from: SocketAddr) -> bool {
        device.send(&[0x40, 0x00, 0x12, 0x34]).expect("send");
        let record = device
            .take_flight(Instant::now())
            .expect("flight")
            .expect("record");
        let answers = server.datagram(&record, from, Instant::now());
        let mut received = Vec::new();
        for answer in answers {
            let _ = device.push_flight(&answer, Instant::now());
            received.extend(device.take_received());
        }
        received == [0x70, 0x00, 0x12, 0x34]
    }

    #[test]
    fn a_replayed_client_hello_does_not_end_the_session_it_opened() {
        let mut server = server(DtlsServerConfig::default());
        let from: SocketAddr = "127.0.0.1:5003".parse().expect("addr");
        let (mut device, sent) = handshake_sent(&mut server, from);
        assert!(pinged(&mut server, &mut device, from));
        // The second ClientHello (with its valid cookie), again.
        let hello2 = sent.get(1).expect("the second ClientHello").clone();
        assert!(server.datagram(&hello2, from, Instant::now()).is_empty());
        assert!(pinged(&mut server, &mut device, from), "the session goes on");
        // A bogus record for the session: no answer at all (not even an
        // empty datagram).
        let mut bogus = hello2.clone();
        bogus[0] = 23;
        bogus[4] = 1;
        assert!(server.datagram(&bogus, from, Instant::now()).is_empty());
    }

    #[test]
    fn a_new_handshake_replaces_a_stalled_one_from_the_same_port() {
        let mut server = server(DtlsServerConfig::default());
        let from: SocketAddr = "127.0.0.1:5004".parse().expect("addr");
        let mut stalled = client();
        let hello = stalled
            .take_flight(Instant::now())
            .expect("flight")
            .expect("hello");
        let verify = server.datagram(&hello, from, Instant::now());
        stalled.push_flight(&verify[0], Instant::now()).expect("push");
        let second = stalled
            .take_flight(Instant::now())
            .expect("flight")
            .expect("hello");
        assert!(!server.datagram(&second, from, Instant::now()).is_empty());
        assert_eq!(server.handshakes, 1);
        let mut device = handshake(&mut server, from);
        assert!(pinged(&mut server, &mut device, from));
        assert_eq!((server.conns.len(), server.handshakes), (1, 0));
    }

    #[test]
    fn ipv4_peers_of_a_dual_stack_socket_are_told_apart() {
        let a: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        let b: IpAddr = "::ffff:192.0.2.2".parse().expect("ip");
        assert_ne!(ip_key(a), ip_key(b));
        assert_eq!(ip_key(a), ip_key("192.0.2.1".parse::<IpAddr>().expect("ip")));
        let c: IpAddr = "2001:db8:1:2:3:4:5:6".parse().expect("ip");
        let d: IpAddr = "2001:db8:1:2:ffff::1".parse().expect("ip");
        assert_eq!(ip_key(c), ip_key(d), "one IPv6 /64");
    }

    #[test]
    fn a_full_table_evicts_only_from_the_fullest_prefix() {
        let config = DtlsServerConfig {
            max_sessions: 3,
            evict_idle_after: Duration::ZERO,
            ..DtlsServerConfig::default()
        };
        let mut server = server(config);
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let mut device = handshake(&mut server, at("192.0.2.1:1000"));
        let _hog1 = handshake(&mut server, at("198.51.100.7:1"));
        let _hog2 = handshake(&mut server, at("198.51.100.7:2"));
        assert_eq!(server.conns.len(), 3);
        // The host with two sessions gets a third only by giving up one of
        // its own.
        let _hog3 = handshake(&mut server, at("198.51.100.7:3"));
        assert_eq!(server.conns.len(), 3);
        assert!(
            server.conns.contains_key(&at("192.0.2.1:1000")),
            "the device stays"
        );
        assert!(pinged(&mut server, &mut device, at("192.0.2.1:1000")));
        // Another device takes the hog's place, not the first device's.
        let _other = handshake(&mut server, at("203.0.113.9:1"));
        assert!(server.conns.contains_key(&at("192.0.2.1:1000")));
        assert_eq!(
            server
                .conns
                .keys()
                .filter(|a| a.ip() == "198.51.100.7".parse::<IpAddr>().expect("ip"))
                .count(),
            1
        );
    }

    #[test]
    fn a_spoofed_client_hello_does_not_end_an_established_session() {
        let mut server = server(DtlsServerConfig::default());
        let from: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let mut device = handshake(&mut server, from);
        assert_eq!((server.conns.len(), server.handshakes), (1, 0));
        // A ClientHello "from" the device's address, without a cookie.
        let hello = client()
            .take_flight(Instant::now())
            .expect("flight")
            .expect("hello");
        let answers = server.datagram(&hello, from, Instant::now());
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].get(13), Some(&3), "a HelloVerifyRequest");
        assert_eq!((server.conns.len(), server.handshakes), (1, 0));
        assert!(server.conns.get(&from).is_some_and(|c| !c.handshaking));
        // The device's session still carries its records.
        device.send(&[0x40, 0x01, 0x12, 0x34]).expect("send");
        let record = device
            .take_flight(Instant::now())
            .expect("flight")
            .expect("record");
        let _ = server.datagram(&record, from, Instant::now());
        assert!(server.conns.get(&from).is_some_and(|c| !c.handshaking));
        // A ClientHello that returns its cookie proves the client is there
        // (RFC 6347 §4.2.8): it replaces the session.
        let again = handshake(&mut server, from);
        assert!(again.is_handshake_complete());
        assert_eq!((server.conns.len(), server.handshakes), (1, 0));
    }

    #[test]
    fn counts_stay_right_through_completion_close_and_failure() {
        let mut server = server(DtlsServerConfig::default());
        let a: SocketAddr = "127.0.0.1:5001".parse().expect("addr");
        let mut device = handshake(&mut server, a);
        assert_eq!(server.handshakes, 0);
        assert_eq!(server.per_ip.get(&ip_key(a.ip())), Some(&(0, 1)));
        // close_notify from an established session: removed, counted once.
        device.close();
        let close = device
            .take_flight(Instant::now())
            .expect("flight")
            .expect("close_notify");
        let _ = server.datagram(&close, a, Instant::now());
        assert!(server.conns.is_empty());
        assert_eq!(server.handshakes, 0);
        assert!(server.per_ip.is_empty(), "{:?}", server.per_ip);
        // A handshake left unfinished, then timed out by the sweep.
        let b: SocketAddr = "127.0.0.1:5002".parse().expect("addr");
        let mut half = client();
        let hello = half.take_flight(Instant::now()).expect("flight").expect("hello");
        let verify = server.datagram(&hello, b, Instant::now());
        half.push_flight(&verify[0], Instant::now()).expect("push");
        let second = half.take_flight(Instant::now()).expect("flight").expect("hello");
        assert!(!server.datagram(&second, b, Instant::now()).is_empty());
        assert_eq!(server.handshakes, 1);
        server.sweep(Instant::now() + Duration::from_secs(11));
        assert!(server.conns.is_empty() && server.per_ip.is_empty() && server.handshakes == 0);
        assert!(server.timers.is_empty(), "no timer outlives its session");
    }
}
