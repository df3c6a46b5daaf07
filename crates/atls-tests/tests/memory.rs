//! Heap held per server session, as the C allocator counts it (glibc's
//! `mallinfo2`: Rust's allocations and OpenSSL's go through the same
//! malloc): an established session whose client uses the exported keys, an
//! established records-mode session, and a half-open handshake, on both
//! engines. These are bytes in use, not resident memory; resident figures
//! (with the allocator's fragmentation) are in docs/BENCHMARKS.md.
#![cfg(all(target_os = "linux", target_env = "gnu"))]
#![allow(unsafe_code)]

use std::sync::Mutex;
use std::time::Instant;

use atls_core::pair::exchange;
use atls_core::{ClientEndpoint, Engine, Limits, ServerEndpoint, ServerSessionParams, Session, TlsVersion};
use atls_sessions::{Policy, ServerSession, SessionTable};
use atls_tests::*;

/// Bytes malloc has handed out and not yet been given back, in all arenas.
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct; it
    // only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

/// Sessions opened per measurement.
const COUNT: usize = 200;

#[derive(Clone, Copy, PartialEq)]
enum Kept {
    /// Handshake done; the client used the exported keys.
    Released,
    /// Handshake done; records may follow.
    Records,
    /// The server answered the first flight; the client never went on.
    HalfOpen,
    /// The bare engine session of a completed handshake, outside any table.
    Bare,
}

type Table = SessionTable<Mutex<ServerSession>>;

fn open(
    table: &Table,
    bare: &mut Vec<Session>,
    client: &dyn ClientEndpoint,
    server: &dyn ServerEndpoint,
    kept: Kept,
) {
    let now = Instant::now();
    if kept == Kept::Bare {
        let mut c = Session::client(client, &client_params()).expect("client");
        let mut s = Session::server(server, &ServerSessionParams::default()).expect("server");
        assert!(exchange(&mut c, &mut s, now).is_ok());
        bare.push(s);
        return;
    }
    let mut c = Session::client(client, &client_params()).expect("client");
    let hello = c.take_flight(now).expect("hello").expect("a first flight");
    let admission = table.admit(None, &hello, now).expect("admitted");
    let id = admission.id();
    let mut s = ServerSession::accept(server, &admission, Limits::default(), 64 * 1024).expect("accept");
    let answer = s.push_flight(&hello, now).expect("first flight").output;
    let found = admission.insert(Mutex::new(s)).expect("inserted");
    if kept == Kept::HalfOpen {
        return;
    }
    c.push_flight(&answer, now).expect("server flight");
    let finished = c.take_flight(now).expect("finished").expect("a second flight");
    let mut s = found.entry.lock().expect("lock");
    let progress = s.push_flight(&finished, now).expect("finished accepted");
    assert!(progress.established);
    table.establish(&id, now).expect("established");
    if kept == Kept::Released {
        s.release_engine();
        assert!(!s.holds_engine() && !s.records_open());
    }
    assert!(s.established().is_some());
}

/// Live heap bytes per session kept.
fn per_session(engine: &dyn Engine, kept: Kept) -> usize {
    // Without resumption: the engines' resumption state is per endpoint and
    // bounded by its cache (rustls 4,096 sessions; OpenSSL 20,480, filled
    // with stateful tickets when 0-RTT is on), not a cost of the session
    // itself; docs/BENCHMARKS.md shows what it adds.
    let mut client_cfg = client_config(TlsVersion::Tls13);
    let mut server_cfg = server_config(TlsVersion::Tls13);
    client_cfg.common.resumption = false;
    server_cfg.common.resumption = false;
    let (client, server) = endpoints(engine, &client_cfg, engine, &server_cfg);
    let table = Table::new(Policy {
        max_sessions: 4 * COUNT,
        max_half_open: 4 * COUNT,
        max_half_open_per_client: 0,
        ..Policy::default()
    });
    let mut bare = Vec::new();
    // Warm up: lazily built statics, the table's first allocations.
    for _ in 0..COUNT {
        open(&table, &mut bare, client.as_ref(), server.as_ref(), kept);
    }
    let before = heap_in_use();
    for _ in 0..COUNT {
        open(&table, &mut bare, client.as_ref(), server.as_ref(), kept);
    }
    let after = heap_in_use();
    assert!(after > before, "keeping {COUNT} more sessions takes memory");
    let kept_count = table.stats().half_open + table.stats().established + bare.len();
    assert_eq!(kept_count, 2 * COUNT);
    (after - before) / COUNT
}

#[test]
fn heap_per_session_is_bounded() {
    let mut figures = Vec::new();
    for engine in engines() {
        let released = per_session(engine, Kept::Released);
        let records = per_session(engine, Kept::Records);
        let half_open = per_session(engine, Kept::HalfOpen);
        let bare = per_session(engine, Kept::Bare);
        eprintln!(
            "{}: released {released} B, records {records} B, half-open {half_open} B, bare engine session {bare} B",
            engine.name()
        );
        figures.push((engine.name(), released, records, half_open, bare));
    }
    for (name, released, records, half_open, bare) in figures {
        // A million sessions in about 2 GiB.
        assert!(released <= 2048, "{name}: {released} B per released session");
        // OpenSSL 3.0 keeps about 44 KiB per handshake in progress that no
        // API releases (docs/BENCHMARKS.md "Memory per session": a 21.8 KiB
        // handshake message buffer, the 7.5 KiB SSL object, a 4 KiB
        // buffering BIO); rustls keeps less than 16 KiB.
        let half_open_bound = if name == "openssl" { 56 * 1024 } else { 16 * 1024 };
        assert!(
            half_open <= half_open_bound,
            "{name}: {half_open} B per half-open handshake"
        );
        assert!(
            records > released,
            "{name}: the records-mode session keeps its engine"
        );
        assert!(
            records <= bare + 2048,
            "{name}: a records-mode session ({records} B) is more than its engine session ({bare} B) and 2 KiB"
        );
    }
}
