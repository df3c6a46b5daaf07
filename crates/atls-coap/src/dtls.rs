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
//! The server keeps one DTLS session per client address and port, bounded
//! in all (`max_sessions`), in handshakes at once (`max_handshakes`), per IP
//! address, and in time (a handshake must finish within
//! `handshake_timeout`; a session idle for `idle_timeout` is dropped). A
//! datagram from an unknown endpoint creates state only when it is a
//! complete ClientHello and there is room. Configure the transport endpoint
//! with `DtlsConfig::cookie_exchange` (as `atls serve --coaps` does): an
//! unverified ClientHello is then answered with a HelloVerifyRequest,
//! smaller than itself, and costs no key exchange.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atls_core::records::{self, FirstFlight, Framing};
use atls_core::{
    ClientEndpoint, ClientSessionParams, HandshakeInfo, ServerEndpoint, ServerSessionParams, Session,
};
use tokio::net::UdpSocket;

use crate::server::CoapServer;

/// Largest datagram read.
const MAX_DATAGRAM: usize = 16 * 1024 + 512;

/// Bounds of a CoAP-over-DTLS server.
#[derive(Clone, Debug)]
pub struct DtlsServerConfig {
    /// DTLS sessions kept in all (handshaking and established).
    pub max_sessions: usize,
    /// DTLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// DTLS handshakes in progress at once from one IP address.
    pub max_handshakes_per_ip: usize,
    /// DTLS sessions (of any phase) from one IP address.
    pub max_sessions_per_ip: usize,
    /// A handshake not finished within this is dropped.
    pub handshake_timeout: Duration,
    /// A session that received nothing for this long is dropped.
    pub idle_timeout: Duration,
}

impl Default for DtlsServerConfig {
    fn default() -> Self {
        Self {
            max_sessions: 4096,
            max_handshakes: 256,
            max_handshakes_per_ip: 16,
            max_sessions_per_ip: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Split `output` (records of one DTLS session) into datagrams of at most
/// `mtu` bytes, whole records each.
fn datagrams(output: &[u8], mtu: usize) -> Vec<Vec<u8>> {
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

struct Conn {
    session: Session,
    started: Instant,
    last: Instant,
    /// The retransmission deadline registered in `Server::timers`.
    timer: Option<Instant>,
}

/// The server's DTLS sessions.
struct Server {
    transport: Arc<dyn ServerEndpoint>,
    coap: Arc<CoapServer>,
    config: DtlsServerConfig,
    mtu: usize,
    conns: HashMap<SocketAddr, Conn>,
    timers: BTreeSet<(Instant, SocketAddr)>,
    per_ip: HashMap<IpAddr, (usize, usize)>,
    handshakes: usize,
}

impl Server {
    fn count(&mut self, ip: IpAddr, handshake: isize, all: isize) {
        let entry = self.per_ip.entry(ip).or_insert((0, 0));
        entry.0 = entry.0.saturating_add_signed(handshake);
        entry.1 = entry.1.saturating_add_signed(all);
        if entry.1 == 0 {
            self.per_ip.remove(&ip);
        }
        self.handshakes = self.handshakes.saturating_add_signed(handshake);
    }

    fn remove(&mut self, addr: SocketAddr) {
        if let Some(conn) = self.conns.remove(&addr) {
            if let Some(t) = conn.timer {
                self.timers.remove(&(t, addr));
            }
            let handshaking = isize::from(!conn.session.is_handshake_complete());
            self.count(addr.ip(), -handshaking, -1);
        }
    }

    /// Whether a new session from `addr` fits the bounds.
    fn room_for(&self, addr: SocketAddr) -> bool {
        let (handshakes, all) = self.per_ip.get(&addr.ip()).copied().unwrap_or((0, 0));
        self.conns.len() < self.config.max_sessions
            && self.handshakes < self.config.max_handshakes
            && handshakes < self.config.max_handshakes_per_ip
            && all < self.config.max_sessions_per_ip
    }

    /// Handle one datagram; returns the datagrams to send back.
    fn datagram(&mut self, datagram: &[u8], from: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
        let hello = records::classify_payload(Framing::Dtls, datagram)
            .is_ok_and(|f| f == FirstFlight::ClientHello)
            && records::split_records(Framing::Dtls, datagram)
                .is_ok_and(|r| r.first().is_some_and(|r| r.epoch == 0));
        let restart = hello
            && self
                .conns
                .get(&from)
                .is_some_and(|c| c.session.is_handshake_complete());
        if restart {
            // A client that lost its session and starts over from the same
            // address and port (RFC 6347 §4.2.8).
            self.remove(from);
        }
        if !self.conns.contains_key(&from) {
            if !hello || !self.room_for(from) {
                return Vec::new();
            }
            let Ok(session) = Session::server(self.transport.as_ref(), &ServerSessionParams::default())
            else {
                return Vec::new();
            };
            self.conns.insert(
                from,
                Conn {
                    session,
                    started: now,
                    last: now,
                    timer: None,
                },
            );
            self.count(from.ip(), 1, 1);
        }
        let Some(conn) = self.conns.get_mut(&from) else {
            return Vec::new();
        };
        conn.last = now;
        let was_handshaking = !conn.session.is_handshake_complete();
        let mut output = Vec::new();
        let mut failed = false;
        if was_handshaking {
            failed = conn.session.push_flight(datagram, now).is_err() && conn.session.is_closed();
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
                if let Some(answer) = self.coap.handle_secured(&message, from, now) {
                    if conn.session.send(&answer).is_err() {
                        failed = true;
                        break;
                    }
                }
            }
        }
        if let Ok(Some(flight)) = conn.session.take_flight(now) {
            output = flight;
        }
        let closed = failed || conn.session.is_closed();
        let completed = was_handshaking && conn.session.is_handshake_complete();
        let timer = conn.session.next_timeout();
        let old_timer = std::mem::replace(&mut conn.timer, timer);
        if completed {
            if let Some(info) = conn.session.handshake_info() {
                tracing::debug!(%from, version = ?info.version, suite = %info.cipher_suite, "CoAP over DTLS: handshake complete");
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
                if c.session.is_handshake_complete() {
                    now.saturating_duration_since(c.last) > self.config.idle_timeout
                } else {
                    now.saturating_duration_since(c.started) > self.config.handshake_timeout
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
/// configuration names the credentials: PSKs or a certificate), and the
/// CoAP messages inside them handled by `coap`. Runs until the socket fails.
pub async fn serve(
    socket: UdpSocket,
    transport: Arc<dyn ServerEndpoint>,
    coap: Arc<CoapServer>,
    config: DtlsServerConfig,
) -> std::io::Result<()> {
    let mtu = usize::from(transport.config().common.dtls.mtu).max(256);
    let mut server = Server {
        transport,
        coap,
        config,
        mtu,
        conns: HashMap::new(),
        timers: BTreeSet::new(),
        per_ip: HashMap::new(),
        handshakes: 0,
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
                let (n, from) = received?;
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
    session: Session,
    inbox: VecDeque<Vec<u8>>,
    mtu: usize,
}

impl DtlsLink {
    /// Run the DTLS handshake of `endpoint` with `server` (retransmitting
    /// on the DTLS timer), giving up after `timeout`.
    pub async fn connect(
        server: SocketAddr,
        endpoint: &dyn ClientEndpoint,
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
        let params = ClientSessionParams {
            server_name,
            ..ClientSessionParams::default()
        };
        let session = Session::client(endpoint, &params)?;
        let mtu = usize::from(endpoint.config().common.dtls.mtu).max(256);
        let mut link = Self {
            socket,
            peer: server,
            session,
            inbox: VecDeque::new(),
            mtu,
        };
        let give_up = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            link.flush().await?;
            if link.session.is_handshake_complete() {
                return Ok(link);
            }
            let wake = link
                .session
                .next_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1))
                .min(give_up);
            match tokio::time::timeout_at(wake, link.socket.recv(&mut buf)).await {
                Ok(received) => {
                    let n = received?;
                    let datagram = buf.get(..n).unwrap_or_default();
                    if records::split_records(Framing::Dtls, datagram).is_err() {
                        continue;
                    }
                    if let Err(e) = link.session.push_flight(datagram, Instant::now()) {
                        if link.session.is_closed() {
                            let _ = link.flush().await;
                            return Err(e.into());
                        }
                    }
                }
                Err(_) if tokio::time::Instant::now() >= give_up => {
                    return Err(DtlsLinkError::Timeout(server))
                }
                Err(_) => link.session.handle_timeout(Instant::now())?,
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
