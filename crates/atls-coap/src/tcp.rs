//! CoAP over TCP (RFC 8323): the message framing, the Capabilities and
//! Settings Message, and the server loop.
//!
//! No crate implements RFC 8323 framing, so it is written here, over
//! coap-lite's option and payload codec: a TCP frame differs from a UDP
//! message only in its header (`Len | TKL`, extended length, code; no
//! version, type or message ID), so a frame is parsed by giving coap-lite
//! the same bytes behind a UDP header, and encoded the other way round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use coap_lite::{MessageClass, MessageType, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use atls_sessions::ClientKey;

use crate::handler::{Answer, CoapHandler};

/// Why a frame cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is longer than the peer may send (its Max-Message-Size).
    #[error("CoAP frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The header announces a token longer than 8 bytes.
    #[error("CoAP token longer than 8 bytes")]
    Token,
    /// The options or payload do not parse.
    #[error("malformed CoAP message")]
    Malformed,
}

/// Signaling codes (RFC 8323 §5): 7.01 CSM, 7.02 Ping, 7.03 Pong, 7.04
/// Release, 7.05 Abort.
pub const CSM: u8 = 0xE1;
/// 7.02 Ping.
pub const PING: u8 = 0xE2;
/// 7.03 Pong.
pub const PONG: u8 = 0xE3;
/// 7.05 Abort.
pub const ABORT: u8 = 0xE5;

/// Largest message this side accepts and announces in its CSM.
pub const MAX_MESSAGE_SIZE: usize = 128 * 1024;

/// How many bytes a frame needs in all, once its first bytes are known:
/// `None` until the header is complete.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let first = *buf.first()?;
    let (len_nibble, tkl) = (first >> 4, usize::from(first & 0x0F));
    let (ext_len, base) = match len_nibble {
        0..=12 => (0usize, usize::from(len_nibble)),
        13 => (1, 13),
        14 => (2, 269),
        _ => (4, 65805),
    };
    let ext = buf.get(1..1 + ext_len)?;
    let extra = ext.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    // header byte + extended length + code + token + options and payload
    Some(1 + ext_len + 1 + tkl + base.saturating_add(extra))
}

/// Parse one whole frame (as [`frame_len`] delimits it). Returns the code
/// byte (signaling codes are not CoAP requests or responses) and, for
/// everything else, the message as a coap-lite packet.
pub fn decode(frame: &[u8]) -> Result<(u8, Packet), FrameError> {
    let first = *frame.first().ok_or(FrameError::Malformed)?;
    let tkl = first & 0x0F;
    if tkl > 8 {
        return Err(FrameError::Token);
    }
    let ext_len = match first >> 4 {
        0..=12 => 0,
        13 => 1,
        14 => 2,
        _ => 4,
    };
    let code = *frame.get(1 + ext_len).ok_or(FrameError::Malformed)?;
    let rest = frame.get(2 + ext_len..).ok_or(FrameError::Malformed)?;
    // The same token, options and payload behind a UDP header (RFC 7252 §3).
    let mut udp = Vec::with_capacity(4 + rest.len());
    udp.extend_from_slice(&[0x40 | tkl, code, 0, 0]);
    udp.extend_from_slice(rest);
    crate::message::validate(&udp).map_err(|_| FrameError::Malformed)?;
    let packet = Packet::from_bytes(&udp).map_err(|_| FrameError::Malformed)?;
    Ok((code, packet))
}

/// Encode a packet as a frame (its type and message ID are not carried).
pub fn encode(packet: &Packet) -> Result<Vec<u8>, FrameError> {
    let udp = packet.to_bytes_unlimited().map_err(|_| FrameError::Malformed)?;
    let first = *udp.first().ok_or(FrameError::Malformed)?;
    let tkl = first & 0x0F;
    let code = *udp.get(1).ok_or(FrameError::Malformed)?;
    let rest = udp.get(4 + usize::from(tkl)..).ok_or(FrameError::Malformed)?;
    let token = udp.get(4..4 + usize::from(tkl)).ok_or(FrameError::Malformed)?;
    let len = rest.len();
    let mut out = Vec::with_capacity(len + 16);
    match len {
        0..=12 => out.push(((len as u8) << 4) | tkl),
        13..=268 => {
            out.push((13 << 4) | tkl);
            out.push((len - 13) as u8);
        }
        269..=65_804 => {
            out.push((14 << 4) | tkl);
            out.extend_from_slice(&((len - 269) as u16).to_be_bytes());
        }
        _ => {
            out.push((15 << 4) | tkl);
            out.extend_from_slice(
                &u32::try_from(len - 65_805)
                    .map_err(|_| FrameError::TooLarge(len))?
                    .to_be_bytes(),
            );
        }
    }
    out.push(code);
    out.extend_from_slice(token);
    out.extend_from_slice(rest);
    Ok(out)
}

/// This side's CSM: Max-Message-Size (option 2).
pub fn csm() -> Vec<u8> {
    let mut p = Packet::new();
    p.header.code = MessageClass::from(CSM);
    p.add_option(
        coap_lite::CoapOption::Unknown(2),
        (MAX_MESSAGE_SIZE as u32).to_be_bytes().to_vec(),
    );
    encode(&p).unwrap_or_default()
}

/// Connections served at once by [`serve`].
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections served at once from one IP address (IPv6: one /64).
pub const MAX_CONNECTIONS_PER_IP: usize = 64;
/// A connection that completes no frame for this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// A write the peer does not take within this long closes the connection.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve `server` (a [`crate::CoapServer`], or any [`CoapHandler`]) on
/// `listener`: each connection sends its CSM, then requests; answers are
/// frames in order. At most [`MAX_CONNECTIONS`] connections, and
/// [`MAX_CONNECTIONS_PER_IP`] per address, are served at once (others are
/// closed at once); a connection idle for [`IDLE_TIMEOUT`] is closed. A
/// failed accept (out of file descriptors, say) is retried, never fatal.
pub async fn serve<H: CoapHandler + ?Sized>(listener: TcpListener, server: Arc<H>) -> std::io::Result<()> {
    let counts: Arc<std::sync::Mutex<Slots>> = Arc::default();
    let mut last_warning: Option<Instant> = None;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: said at most once a minute.
                if last_warning.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(60)) {
                    tracing::warn!(error = %e, "CoAP over TCP: accept failed");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&counts, ClientKey::from(from.ip())) else {
            tracing::debug!(%from, "CoAP over TCP: too many connections; closed");
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            // The slot is given back however the task ends, panics included.
            let _slot = slot;
            if let Err(e) = connection(stream, from, server).await {
                tracing::debug!(error = %e, %from, "CoAP over TCP connection ended");
            }
        });
    }
}

/// Connections in use, overall and per IP key.
#[derive(Default)]
struct Slots {
    all: usize,
    per_ip: HashMap<ClientKey, usize>,
}

/// One connection's place in [`Slots`], given back on drop.
struct Slot {
    slots: Arc<std::sync::Mutex<Slots>>,
    key: ClientKey,
}

impl Slot {
    fn take(slots: &Arc<std::sync::Mutex<Slots>>, key: ClientKey) -> Option<Self> {
        let mut c = slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let per_ip = c.per_ip.get(&key).copied().unwrap_or(0);
        if c.all >= MAX_CONNECTIONS || per_ip >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        c.all = c.all.saturating_add(1);
        c.per_ip.insert(key, per_ip.saturating_add(1));
        Some(Self {
            slots: slots.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.all = c.all.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.key);
            }
        }
    }
}

/// Write `bytes`, within [`WRITE_TIMEOUT`]: a peer that never reads cannot
/// hold the connection's task.
async fn send(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer does not read",
        )),
    }
}

async fn connection<H: CoapHandler + ?Sized>(
    mut stream: TcpStream,
    from: SocketAddr,
    server: Arc<H>,
) -> std::io::Result<()> {
    send(&mut stream, &csm()).await?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    // A frame must complete within IDLE_TIMEOUT of the last one (a byte now
    // and then does not keep a connection).
    let mut deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    loop {
        // Handle every whole frame buffered.
        while let Some(len) = frame_len(&buf) {
            if len > MAX_MESSAGE_SIZE + 16 {
                // RFC 8323 §5.6: Abort, then close.
                let mut abort = Packet::new();
                abort.header.code = MessageClass::from(ABORT);
                send(&mut stream, &encode(&abort).unwrap_or_default()).await?;
                return Ok(());
            }
            if buf.len() < len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
            let (code, mut request) = match decode(&frame) {
                Ok(decoded) => decoded,
                Err(_) => {
                    let mut abort = Packet::new();
                    abort.header.code = MessageClass::from(ABORT);
                    send(&mut stream, &encode(&abort).unwrap_or_default()).await?;
                    return Ok(());
                }
            };
            match code {
                CSM | PONG => continue,
                PING => {
                    let mut pong = Packet::new();
                    pong.header.code = MessageClass::from(PONG);
                    pong.set_token(request.get_token().to_vec());
                    send(&mut stream, &encode(&pong).unwrap_or_default()).await?;
                    continue;
                }
                0xE4 | ABORT => return Ok(()),
                _ => {}
            }
            // The core speaks RFC 7252 messages: present the request as a
            // non-confirmable one (no ACKs, no deduplication on a reliable
            // transport) from a validated endpoint.
            request.header.set_type(MessageType::NonConfirmable);
            let answer = match server.reliable(&request, from, Instant::now()) {
                Answer::Now(answer) => answer,
                // Answered in order: the next request waits (RFC 8323
                // allows answers out of order; this loop keeps it simple).
                Answer::Later(pending) => pending.await,
            };
            if let Some(answer) = answer {
                send(&mut stream, &encode(&answer).unwrap_or_default()).await?;
            }
            deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
        }
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(read) => read?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::{CoapOption, RequestType};

    #[test]
    fn frames_round_trip_at_every_length_encoding() {
        for len in [0usize, 12, 13, 268, 269, 65_804, 65_805, 70_000] {
            let mut p = Packet::new();
            p.header.code = MessageClass::Request(RequestType::Post);
            p.set_token(vec![1, 2, 3]);
            p.add_option(CoapOption::UriPath, b"x".to_vec());
            p.payload = vec![7; len];
            let frame = encode(&p).expect("encode");
            assert_eq!(frame_len(&frame), Some(frame.len()), "{len}");
            let (code, back) = decode(&frame).expect("decode");
            assert_eq!(code, 0x02);
            assert_eq!(back.payload.len(), len);
            assert_eq!(back.get_token(), &[1, 2, 3]);
            assert_eq!(back.get_first_option(CoapOption::UriPath), Some(&b"x".to_vec()));
        }
    }

    #[test]
    fn hostile_frames_are_refused() {
        assert_eq!(decode(&[0x09, 0x01]).map(|_| ()), Err(FrameError::Token));
        assert_eq!(frame_len(&[0xD0]), None, "extended length still to come");
        assert_eq!(
            frame_len(&[0xF0, 0xFF, 0xFF, 0xFF, 0xFF]),
            Some(2 + 4 + 65805 + 0xFFFF_FFFF)
        );
        // A payload marker with no payload after it (RFC 7252 §3).
        assert_eq!(
            decode(&[0x10, 0x02, 0xFF]).map(|_| ()),
            Err(FrameError::Malformed)
        );
        assert_eq!(decode(&[]).map(|_| ()), Err(FrameError::Malformed));
    }
}

/// A client's connection: the stream and the bytes read past the last frame.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    /// Connect to `server` and send this side's CSM (RFC 8323 §5.3).
    pub async fn connect(server: SocketAddr) -> std::io::Result<Self> {
        let mut stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&csm()).await?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// The local endpoint.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Send `request` and read frames until the response with its token;
    /// signaling messages in between are handled (Ping answered).
    pub async fn exchange(
        &mut self,
        request: &Packet,
        timeout: std::time::Duration,
    ) -> std::io::Result<Packet> {
        let frame = encode(request).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.stream.write_all(&frame).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            while let Some(len) = frame_len(&self.buf) {
                if len > MAX_MESSAGE_SIZE + 16 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        FrameError::TooLarge(len),
                    ));
                }
                if self.buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = self.buf.drain(..len).collect();
                let (code, packet) =
                    decode(&frame).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                match code {
                    CSM | PONG => {}
                    PING => {
                        let mut pong = Packet::new();
                        pong.header.code = MessageClass::from(PONG);
                        pong.set_token(packet.get_token().to_vec());
                        self.stream.write_all(&encode(&pong).unwrap_or_default()).await?;
                    }
                    0xE4 | ABORT => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the peer aborted",
                        ))
                    }
                    _ if packet.get_token() == request.get_token() => return Ok(packet),
                    _ => {}
                }
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            let n =
                read.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CoAP response"))??;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}
