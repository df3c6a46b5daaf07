//! Stateless address validation with Echo (RFC 9175 §2.4; draft §7): an
//! endpoint that has not shown it receives what is sent to it gets a 4.01
//! with an Echo value computed from its address, its port and the time, so
//! the challenge needs no state (as DTLS's HelloVerifyRequest), and is sent
//! at most [`AMPLIFICATION_FACTOR`] times the bytes it sent.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use coap_lite::{CoapOption, Packet, ResponseType};

/// An unvalidated endpoint is sent at most this many times the bytes it sent.
pub const AMPLIFICATION_FACTOR: usize = 3;
/// CoAP option number of Echo (RFC 9175).
pub const OPTION_ECHO: u16 = 252;
/// How long an Echo value stays valid (it changes every window; the current
/// and the previous one are accepted).
const ECHO_WINDOW_SECS: u64 = 60;

/// The key and clock of stateless Echo values.
pub struct EchoGuard {
    secret: [u8; 32],
    created: Instant,
}

impl std::fmt::Debug for EchoGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoGuard").finish_non_exhaustive()
    }
}

impl Default for EchoGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl EchoGuard {
    /// A guard with a fresh random key.
    pub fn new() -> Self {
        Self {
            secret: crate::message::random::<32>(),
            created: Instant::now(),
        }
    }

    fn window(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.created).as_secs() / ECHO_WINDOW_SECS
    }

    /// The Echo value of `addr` in time window `window`: a keyed hash,
    /// unpredictable without the key.
    fn value(&self, addr: SocketAddr, window: u64) -> [u8; 8] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(self.secret);
        h.update(window.to_be_bytes());
        match addr.ip() {
            IpAddr::V4(ip) => h.update(ip.octets()),
            IpAddr::V6(ip) => h.update(ip.octets()),
        }
        h.update(addr.port().to_be_bytes());
        let digest = h.finalize();
        let mut value = [0u8; 8];
        value.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
        value
    }

    /// Whether `echo` is a current value of `addr`.
    pub fn valid(&self, addr: SocketAddr, echo: &[u8], now: Instant) -> bool {
        let window = self.window(now);
        echo == self.value(addr, window) || window.checked_sub(1).is_some_and(|w| echo == self.value(addr, w))
    }

    /// `Ok` when `request` (of `len` bytes, from the not yet validated
    /// `addr`) carries a valid Echo value and validates its endpoint;
    /// otherwise `Err` with the challenge to answer with, or `None` when
    /// even the challenge would exceed the amplification bound.
    pub fn check(
        &self,
        request: &Packet,
        len: usize,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<(), Option<Vec<u8>>> {
        let echo = request.get_first_option(CoapOption::Unknown(OPTION_ECHO));
        if echo.is_some_and(|e| self.valid(addr, e, now)) {
            return Ok(());
        }
        let mut challenge = crate::message::answer(request, ResponseType::Unauthorized);
        challenge.add_option(
            CoapOption::Unknown(OPTION_ECHO),
            self.value(addr, self.window(now)).to_vec(),
        );
        let bytes = challenge.to_bytes().ok();
        Err(bytes.filter(|b| b.len() <= len.saturating_mul(AMPLIFICATION_FACTOR)))
    }
}
