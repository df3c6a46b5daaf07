//! Drive a client and a server session against each other in memory.
//!
//! Deterministic and IO-free: used by the contract tests, `atls demo` and the
//! benchmarks. Flights keep flowing after a failure so that a fatal alert
//! reaches the other side, as it would over a real transport.

use std::time::Instant;

use crate::error::Error;
use crate::session::{Role, Session};

/// Upper bound on round trips; no handshake needs more than a handful.
const MAX_ROUNDS: usize = 16;

/// One flight that crossed between the two sessions.
#[derive(Clone, Debug)]
pub struct Flight {
    /// Who sent it.
    pub from: Role,
    /// The payload: whole records.
    pub bytes: Vec<u8>,
}

/// What happened during [`exchange`].
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    /// Every flight in order.
    pub flights: Vec<Flight>,
    /// The first error the client reported.
    pub client_error: Option<Error>,
    /// The first error the server reported.
    pub server_error: Option<Error>,
}

impl Transcript {
    /// Whether neither side failed.
    pub fn is_ok(&self) -> bool {
        self.client_error.is_none() && self.server_error.is_none()
    }
}

fn record(slot: &mut Option<Error>, e: Error) {
    if slot.is_none() {
        *slot = Some(e);
    }
}

/// Move one flight (if any) from `src` to `dst`. Returns whether one moved.
fn step(src: &mut Session, dst: &mut Session, now: Instant, t: &mut Transcript, from: Role) -> bool {
    let (src_err, dst_err) = match from {
        Role::Client => (&mut t.client_error, &mut t.server_error),
        Role::Server => (&mut t.server_error, &mut t.client_error),
    };
    match src.take_flight(now) {
        Ok(Some(bytes)) => {
            if !dst.is_closed() {
                if let Err(e) = dst.push_flight(&bytes, now) {
                    record(dst_err, e);
                }
            }
            t.flights.push(Flight { from, bytes });
            true
        }
        Ok(None) => false,
        Err(e) => {
            record(src_err, e);
            false
        }
    }
}

/// Exchange flights until neither side has anything left to send.
pub fn exchange(client: &mut Session, server: &mut Session, now: Instant) -> Transcript {
    let mut t = Transcript::default();
    for _ in 0..MAX_ROUNDS {
        let a = step(client, server, now, &mut t, Role::Client);
        let b = step(server, client, now, &mut t, Role::Server);
        if !a && !b {
            break;
        }
    }
    t
}
