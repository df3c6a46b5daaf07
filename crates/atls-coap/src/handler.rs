//! What the transport loops ([`crate::udp::serve`], [`crate::tcp::serve`],
//! [`crate::dtls::serve`]) hand CoAP messages to: the ATLS server core
//! ([`CoapServer`], which answers at once) or anything else that speaks
//! CoAP, such as a gateway that answers once an upstream has.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use coap_lite::Packet;

use crate::server::{CoapServer, Transport};

/// An answer that arrives later (its future resolves to it, or to nothing).
pub type Pending<T> = Pin<Box<dyn Future<Output = Option<T>> + Send + 'static>>;

/// A handler's answer to one message.
pub enum Answer<T> {
    /// Answered at once (or not at all).
    Now(Option<T>),
    /// Answered when the future resolves; the loop goes on meanwhile.
    Later(Pending<T>),
}

impl<T> std::fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Now(a) => write!(f, "Now({})", if a.is_some() { "answer" } else { "none" }),
            Self::Later(_) => f.write_str("Later"),
        }
    }
}

/// Handles the CoAP messages of every transport.
pub trait CoapHandler: Send + Sync + 'static {
    /// One message of a datagram transport (UDP, or the plaintext of a DTLS
    /// record of `from`'s session): the answer is a whole message.
    fn datagram(
        &self,
        message: &[u8],
        from: SocketAddr,
        transport: Transport,
        now: Instant,
    ) -> Answer<Vec<u8>>;

    /// One request of a reliable transport (CoAP over TCP, presented as a
    /// non-confirmable RFC 7252 message).
    fn reliable(&self, request: &Packet, from: SocketAddr, now: Instant) -> Answer<Packet>;

    /// A new DTLS session of `addr` scopes message IDs afresh (RFC 7252
    /// §9.1): forget its exchanges.
    fn reset_exchanges(&self, addr: SocketAddr, transport: Transport) {
        let _ = (addr, transport);
    }
}

impl CoapHandler for CoapServer {
    fn datagram(
        &self,
        message: &[u8],
        from: SocketAddr,
        transport: Transport,
        now: Instant,
    ) -> Answer<Vec<u8>> {
        Answer::Now(match transport {
            Transport::Dtls => self.handle_secured(message, from, now),
            _ => self.handle(message, from, now),
        })
    }

    fn reliable(&self, request: &Packet, from: SocketAddr, now: Instant) -> Answer<Packet> {
        Answer::Now(self.handle_reliable(request, from, now))
    }

    fn reset_exchanges(&self, addr: SocketAddr, transport: Transport) {
        CoapServer::reset_exchanges(self, addr, transport);
    }
}
