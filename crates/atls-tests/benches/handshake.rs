//! Cost of one complete in-memory ATLS handshake per engine and version, and
//! of the §9 key export on an established session.

use std::time::Instant;

use atls_core::pair::exchange;
use atls_core::{ProtectionKind, ServerSessionParams, Session, TlsVersion};
use atls_tests::{client_config, client_params, endpoints, engines, handshake, server_config};
use criterion::{criterion_group, criterion_main, Criterion};

fn handshakes(c: &mut Criterion) {
    for resumed in [false, true] {
        let mut group = c.benchmark_group(if resumed {
            "handshake_resumed"
        } else {
            "handshake_full"
        });
        for engine in engines() {
            for version in [TlsVersion::Tls13, TlsVersion::Tls12, TlsVersion::Dtls12] {
                if !engine.capabilities().versions.contains(&version) {
                    continue;
                }
                let mut cc = client_config(version);
                let mut sc = server_config(version);
                cc.common.resumption = resumed;
                sc.common.resumption = resumed;
                let (client, server) = endpoints(engine, &cc, engine, &sc);
                if resumed {
                    // Prime the client's ticket cache; every iteration leaves a fresh ticket.
                    let h = handshake(
                        &*client,
                        &client_params(),
                        &*server,
                        &ServerSessionParams::default(),
                    );
                    assert!(h.transcript.is_ok());
                }
                group.bench_function(format!("{}/{version}", engine.name()), |b| {
                    b.iter(|| {
                        let mut c = Session::client(&*client, &client_params()).expect("client");
                        let mut s =
                            Session::server(&*server, &ServerSessionParams::default()).expect("server");
                        let t = exchange(&mut c, &mut s, Instant::now());
                        assert!(t.is_ok() && s.is_handshake_complete());
                        assert_eq!(c.handshake_info().expect("info").resumed, resumed);
                    });
                });
            }
        }
        group.finish();
    }
}

fn exports(c: &mut Criterion) {
    let mut group = c.benchmark_group("atls_keys");
    for engine in engines() {
        for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
            let (client, server) =
                endpoints(engine, &client_config(version), engine, &server_config(version));
            let h = handshake(
                &*client,
                &client_params(),
                &*server,
                &ServerSessionParams::default(),
            );
            group.bench_function(format!("{}/{version}", engine.name()), |b| {
                b.iter(|| h.client.atls_keys(ProtectionKind::Oscore).expect("keys"));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, handshakes, exports);
criterion_main!(benches);
