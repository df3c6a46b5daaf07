//! Hostile input: every byte pushed into a session may be malicious. Bad
//! flights give typed errors, never panics, and other sessions (and, for
//! framing errors, the same session) keep working.

use std::sync::Arc;
use std::time::Instant;

use atls_core::pair::exchange;
use atls_core::{
    ClientEndpoint, Error, FlightError, Limits, ServerEndpoint, ServerSessionParams, Session, TlsVersion,
};
use atls_openssl::OpenSslEngine;
use atls_tests::*;
use proptest::prelude::*;

const VERSIONS: [TlsVersion; 3] = [TlsVersion::Tls12, TlsVersion::Tls13, TlsVersion::Dtls12];

/// Every engine/version pair that exists.
/// A client endpoint, a server endpoint and the version they run.
type Setup = (Arc<dyn ClientEndpoint>, Arc<dyn ServerEndpoint>, TlsVersion);
/// A bad flight and the error it must produce.
type BadFlight = (Vec<u8>, fn(&Error) -> bool);

fn setups() -> Vec<Setup> {
    let mut out = Vec::new();
    for engine in engines() {
        for version in VERSIONS {
            if !engine.capabilities().versions.contains(&version) {
                continue;
            }
            let (c, s) = endpoints(engine, &client_config(version), engine, &server_config(version));
            out.push((c, s, version));
        }
    }
    out
}

fn client_hello(c: &dyn ClientEndpoint) -> Vec<u8> {
    let mut client = Session::client(c, &client_params()).expect("client");
    client.take_flight(Instant::now()).expect("take").expect("hello")
}

fn fresh_server(s: &dyn ServerEndpoint) -> Session {
    Session::server(s, &ServerSessionParams::default()).expect("server")
}

#[test]
fn framing_errors_are_typed_and_leave_the_session_usable() {
    for (c, s, version) in setups() {
        let now = Instant::now();
        let hello = client_hello(&*c);
        let mut server = fresh_server(&*s);
        let bad: Vec<BadFlight> = vec![
            (Vec::new(), |e| {
                matches!(e, Error::MalformedFlight(FlightError::Empty))
            }),
            (b"POST / HTTP/1.1\r\n\r\n".to_vec(), |e| {
                matches!(e, Error::MalformedFlight(FlightError::UnknownContentType { .. }))
            }),
            (hello[..hello.len() - 1].to_vec(), |e| {
                matches!(e, Error::MalformedFlight(FlightError::Truncated { .. }))
            }),
            (hello[..3].to_vec(), |e| {
                matches!(e, Error::MalformedFlight(FlightError::Truncated { .. }))
            }),
            ([hello.as_slice(), &[22]].concat(), |e| {
                matches!(e, Error::MalformedFlight(FlightError::Truncated { .. }))
            }),
        ];
        for (flight, expected) in bad {
            let err = server.push_flight(&flight, now).expect_err("bad flight");
            assert!(
                expected(&err),
                "{} {version}: unexpected {err:?}",
                s.engine_name()
            );
            assert!(!server.is_closed(), "framing errors never reach the engine");
        }
        // The same session then completes a real handshake.
        let mut client = Session::client(&*c, &client_params()).expect("client");
        let t = exchange(&mut client, &mut server, now);
        assert!(t.is_ok(), "{} {version}: {t:?}", s.engine_name());
        assert!(server.is_handshake_complete());
    }
}

#[test]
fn oversized_flights_are_refused_before_parsing() {
    let mut sc = server_config(TlsVersion::Tls13);
    sc.common.limits = Limits {
        max_flight_len: 4096,
        ..Limits::default()
    };
    let s = atls_core::Engine::server(&OpenSslEngine, &sc).expect("server");
    let mut server = fresh_server(&*s);
    let huge = [&[23u8, 3, 3, 0x10, 0][..], &vec![0u8; 4096]].concat();
    assert_eq!(
        server.push_flight(&huge, Instant::now()),
        Err(Error::FlightTooLarge {
            size: 4101,
            limit: 4096
        })
    );
    let record_too_long = [23u8, 3, 3, 0xFF, 0xFF];
    assert!(matches!(
        server.push_flight(&record_too_long, Instant::now()),
        Err(Error::MalformedFlight(FlightError::RecordTooLong { .. }))
    ));
}

#[test]
fn duplicated_tls_flight_is_refused_without_harming_the_session() {
    for (c, s, version) in setups() {
        if version == TlsVersion::Dtls12 {
            continue; // covered by the DTLS tests: duplicates are absorbed there
        }
        let now = Instant::now();
        let mut client = Session::client(&*c, &client_params()).expect("client");
        let mut server = fresh_server(&*s);
        let hello = client.take_flight(now).expect("take").expect("hello");
        server.push_flight(&hello, now).expect("first copy");
        assert_eq!(
            server.push_flight(&hello, now),
            Err(Error::DuplicateFlight),
            "{version}"
        );
        let answer = server.take_flight(now).expect("take").expect("answer");
        client.push_flight(&answer, now).expect("client");
        let t = exchange(&mut client, &mut server, now);
        assert!(t.is_ok(), "{} {version}: {t:?}", s.engine_name());
        assert!(client.is_handshake_complete() && server.is_handshake_complete());
    }
}

#[test]
fn out_of_order_flights_give_typed_errors() {
    for (c, s, version) in setups() {
        let now = Instant::now();
        // Run a full handshake to capture the client's second flight.
        let mut client = Session::client(&*c, &client_params()).expect("client");
        let mut server = fresh_server(&*s);
        let t = exchange(&mut client, &mut server, now);
        assert!(t.is_ok());
        let client_second = t
            .flights
            .iter()
            .filter(|f| f.from == atls_core::Role::Client)
            .nth(1)
            .expect("second client flight")
            .bytes
            .clone();
        let server_first = t
            .flights
            .iter()
            .find(|f| f.from == atls_core::Role::Server)
            .expect("server flight")
            .bytes
            .clone();

        // A fresh server receiving the client's *second* flight first.
        let mut fresh = fresh_server(&*s);
        let result = fresh.push_flight(&client_second, now);
        match version {
            // DTLS buffers or drops records from a future epoch: no progress, no error.
            TlsVersion::Dtls12 => {
                assert!(result.is_ok(), "{result:?}");
                assert!(!fresh.is_handshake_complete());
            }
            _ => assert!(
                matches!(result, Err(Error::Protocol(_))),
                "{} {version}: {result:?}",
                s.engine_name()
            ),
        }

        // A server flight pushed into a server.
        let mut fresh = fresh_server(&*s);
        let result = fresh.push_flight(&server_first, now);
        if version != TlsVersion::Dtls12 {
            assert!(
                matches!(result, Err(Error::Protocol(_))),
                "{} {version}: {result:?}",
                s.engine_name()
            );
            assert!(fresh.is_closed(), "a protocol error ends that session");
        }

        // A client that has not sent anything cannot receive.
        let mut unstarted = Session::client(&*c, &client_params()).expect("client");
        assert!(matches!(
            unstarted.push_flight(&server_first, now),
            Err(Error::Protocol(_))
        ));

        // Other sessions on the same endpoints are unaffected.
        let h = handshake(&*c, &client_params(), &*s, &ServerSessionParams::default());
        assert_complete(&h);
    }
}

#[test]
fn application_data_before_the_handshake_is_rejected() {
    for (_c, s, version) in setups() {
        if version == TlsVersion::Dtls12 {
            continue;
        }
        let mut server = fresh_server(&*s);
        let record = [23u8, 3, 3, 0, 4, 1, 2, 3, 4];
        let result = server.push_flight(&record, Instant::now());
        assert!(
            matches!(result, Err(Error::Protocol(_))),
            "{} {version}: {result:?}",
            s.engine_name()
        );
    }
}

fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if !bytes.is_empty() {
        for (pos, value) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random bytes and mutated real ClientHellos into servers of every
    /// engine and version: Ok or a typed error, never a panic; the endpoint
    /// still completes a handshake afterwards.
    #[test]
    fn servers_survive_mutated_client_hellos(
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..8),
        cut in proptest::option::of(any::<usize>()),
        random in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        for (c, s, _version) in setups() {
            let hello = client_hello(&*c);
            let mut server = fresh_server(&*s);
            let _ = server.push_flight(&mutate(hello, &flips, cut), Instant::now());
            let _ = server.take_flight(Instant::now());
            let mut server = fresh_server(&*s);
            let _ = server.push_flight(&random, Instant::now());
        }
    }

    /// Mutated server flights into clients mid-handshake.
    #[test]
    fn clients_survive_mutated_server_flights(
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        for (c, s, _version) in setups() {
            let now = Instant::now();
            let mut client = Session::client(&*c, &client_params()).expect("client");
            let mut server = fresh_server(&*s);
            let hello = client.take_flight(now).expect("take").expect("hello");
            server.push_flight(&hello, now).expect("push");
            let answer = server.take_flight(now).expect("take").expect("answer");
            let result = client.push_flight(&mutate(answer, &flips, cut), now);
            if let Err(e) = result {
                // Every failure is one of the typed variants, with a message.
                prop_assert!(!e.to_string().is_empty());
            }
            let _ = client.take_flight(now);
        }
    }
}
