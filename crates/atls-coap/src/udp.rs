//! CoAP over UDP (RFC 7252): the server loop, and the client side of a
//! confirmable exchange with retransmission and separate responses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{MessageType, Packet};
use tokio::net::UdpSocket;

use crate::handler::{Answer, CoapHandler};
use crate::server::Transport;

/// Largest datagram read.
const MAX_DATAGRAM: usize = 1500 + 152;

/// Serve `handler` (a [`crate::CoapServer`], or any [`CoapHandler`]) on
/// `socket` until the socket fails. Answers given later are sent when they
/// are ready, while other datagrams are handled.
pub async fn serve<H: CoapHandler + ?Sized>(socket: UdpSocket, handler: Arc<H>) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // An ICMP error for an earlier answer, or a transient failure:
            // the listener stays up.
            Err(e) if e.kind() != std::io::ErrorKind::InvalidInput => {
                tracing::debug!(error = %e, "CoAP over UDP: receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(datagram) = buf.get(..n) else { continue };
        match handler.datagram(datagram, from, Transport::Udp, Instant::now()) {
            Answer::Now(None) => {}
            Answer::Now(Some(answer)) => {
                if let Err(e) = socket.send_to(&answer, from).await {
                    tracing::debug!(error = %e, %from, "cannot answer");
                }
            }
            Answer::Later(pending) => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    if let Some(answer) = pending.await {
                        if let Err(e) = socket.send_to(&answer, from).await {
                            tracing::debug!(error = %e, %from, "cannot answer");
                        }
                    }
                });
            }
        }
    }
}

/// RFC 7252 §4.8 transmission parameters.
#[derive(Clone, Copy, Debug)]
pub struct Transmission {
    /// ACK_TIMEOUT.
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR.
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT.
    pub max_retransmit: u32,
    /// How long to wait for a separate response after an empty ACK.
    pub separate_timeout: Duration,
}

impl Default for Transmission {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            separate_timeout: Duration::from_secs(30),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The socket failed.
    #[error("UDP: {0}")]
    Io(#[from] std::io::Error),
    /// No answer after MAX_RETRANSMIT retransmissions.
    #[error("no answer from {0} after the CoAP retransmissions")]
    Timeout(SocketAddr),
    /// The peer answered with Reset.
    #[error("the peer reset the exchange")]
    Reset,
    /// The request could not be encoded.
    #[error("CoAP message: {0}")]
    Encode(String),
}

fn random_factor(t: &Transmission) -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    1.0 + (t.ack_random_factor - 1.0) * (f64::from(u16::from_be_bytes(b)) / 65535.0)
}

/// Where a client's CoAP messages travel: a plain UDP socket, or a DTLS
/// session on one (CoAP over DTLS).
pub(crate) trait MessageLink: Send {
    /// Send one message.
    fn send_message(
        &mut self,
        message: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// The next message from the peer, or `None` at `deadline`.
    fn recv_message(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> impl std::future::Future<Output = std::io::Result<Option<Vec<u8>>>> + Send;
}

/// A UDP socket and the peer it exchanges with.
pub(crate) struct Plain<'a> {
    pub(crate) socket: &'a UdpSocket,
    pub(crate) peer: SocketAddr,
}

impl MessageLink for Plain<'_> {
    async fn send_message(&mut self, message: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(message, self.peer).await.map(|_| ())
    }

    async fn recv_message(&mut self, deadline: tokio::time::Instant) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let Ok(received) = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await
            else {
                return Ok(None);
            };
            let (n, from) = received?;
            if from == self.peer {
                return Ok(Some(buf.get(..n).unwrap_or_default().to_vec()));
            }
        }
    }
}

impl MessageLink for crate::dtls::DtlsLink {
    async fn send_message(&mut self, message: &[u8]) -> std::io::Result<()> {
        crate::dtls::DtlsLink::send_message(self, message).await
    }

    async fn recv_message(&mut self, deadline: tokio::time::Instant) -> std::io::Result<Option<Vec<u8>>> {
        crate::dtls::DtlsLink::recv_message(self, deadline).await
    }
}

/// What arrived for an exchange.
enum Received {
    Response(Packet),
    /// An empty ACK: the response comes separately.
    EmptyAck,
}

/// Wait until `deadline` for what belongs to the exchange (`mid`, `token`).
async fn receive<L: MessageLink>(
    link: &mut L,
    deadline: tokio::time::Instant,
    mid: u16,
    token: &[u8],
) -> Result<Option<Received>, ExchangeError> {
    loop {
        let Some(bytes) = link.recv_message(deadline).await? else {
            return Ok(None);
        };
        let Ok(answer) = Packet::from_bytes(&bytes) else {
            continue;
        };
        match answer.header.get_type() {
            MessageType::Reset if answer.header.message_id == mid => return Err(ExchangeError::Reset),
            MessageType::Acknowledgement if answer.header.message_id == mid => {
                if answer.header.code == coap_lite::MessageClass::Empty {
                    return Ok(Some(Received::EmptyAck));
                }
                if answer.get_token() == token {
                    return Ok(Some(Received::Response(answer)));
                }
            }
            MessageType::Confirmable | MessageType::NonConfirmable if answer.get_token() == token => {
                if answer.header.get_type() == MessageType::Confirmable {
                    // A separate response: acknowledge it (RFC 7252 §5.2.2).
                    let mut ack = Packet::new();
                    ack.header.set_type(MessageType::Acknowledgement);
                    ack.header.message_id = answer.header.message_id;
                    if let Ok(ack) = ack.to_bytes() {
                        link.send_message(&ack).await?;
                    }
                }
                return Ok(Some(Received::Response(answer)));
            }
            _ => {}
        }
    }
}

/// Send a confirmable `request` to `peer` and wait for its response:
/// piggybacked, or separate after an empty ACK (acknowledged in turn).
/// Retransmits with exponential back-off from a randomised ACK_TIMEOUT.
pub async fn exchange(
    socket: &UdpSocket,
    peer: SocketAddr,
    request: Packet,
    t: &Transmission,
) -> Result<Packet, ExchangeError> {
    exchange_on(&mut Plain { socket, peer }, peer, request, t).await
}

/// [`exchange`] over any message link.
pub(crate) async fn exchange_on<L: MessageLink>(
    link: &mut L,
    peer: SocketAddr,
    mut request: Packet,
    t: &Transmission,
) -> Result<Packet, ExchangeError> {
    request.header.set_type(MessageType::Confirmable);
    let mid = request.header.message_id;
    let token = request.get_token().to_vec();
    let bytes = request
        .to_bytes()
        .map_err(|e| ExchangeError::Encode(e.to_string()))?;
    let mut timeout = t.ack_timeout.mul_f64(random_factor(t));
    for _ in 0..=t.max_retransmit {
        link.send_message(&bytes).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        match receive(link, deadline, mid, &token).await? {
            Some(Received::Response(answer)) => return Ok(answer),
            Some(Received::EmptyAck) => {
                let deadline = tokio::time::Instant::now() + t.separate_timeout;
                loop {
                    match receive(link, deadline, mid, &token).await? {
                        Some(Received::Response(answer)) => return Ok(answer),
                        Some(Received::EmptyAck) => continue,
                        None => return Err(ExchangeError::Timeout(peer)),
                    }
                }
            }
            None => timeout = timeout.saturating_mul(2),
        }
    }
    Err(ExchangeError::Timeout(peer))
}

/// Send a non-confirmable `request` once and wait until `deadline` for its
/// response; `None` when none came. The caller's own timer (the DTLS
/// retransmission timer of the ATLS layer) decides what to send again.
pub(crate) async fn exchange_non_on<L: MessageLink>(
    link: &mut L,
    mut request: Packet,
    deadline: tokio::time::Instant,
) -> Result<Option<Packet>, ExchangeError> {
    request.header.set_type(MessageType::NonConfirmable);
    let mid = request.header.message_id;
    let token = request.get_token().to_vec();
    let bytes = request
        .to_bytes()
        .map_err(|e| ExchangeError::Encode(e.to_string()))?;
    link.send_message(&bytes).await?;
    match receive(link, deadline, mid, &token).await? {
        Some(Received::Response(answer)) => Ok(Some(answer)),
        // An empty ACK cannot answer a non-confirmable request.
        Some(Received::EmptyAck) | None => Ok(None),
    }
}
