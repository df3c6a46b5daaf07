//! Bytes on the wire per handshake with HTTP/1.1 framing: what a TCP relay
//! between client and server forwards for a new session (the flights in
//! `POST /.well-known/atls` and their answers, heads and cookies included),
//! then for one OSCORE request. One kept-alive connection, so no TCP
//! handshake is counted. Run with `--nocapture` to print the table of
//! docs/BENCHMARKS.md. (DTLS flights over HTTP, which the server also
//! accepts, are left out: over HTTP's reliable transport TLS is the usual
//! ATLS layer.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use atls_core::records::Framing;
use atls_http::{Mode, ServerLimits};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP relay to `server` counting the bytes each way: (to server, to client).
async fn counting_relay(server: std::net::SocketAddr) -> (String, Arc<[AtomicUsize; 2]>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let counts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(server).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (index, mut from, mut to) in [
                (
                    0,
                    Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (1, Box::new(ro), Box::new(wi)),
            ] {
                let counts = shared.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        // Counted before it is passed on: once the other
                        // side can read it, it is in the count.
                        counts[index].fetch_add(n, Ordering::SeqCst);
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown().await;
                });
            }
        }
    });
    (url, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_bytes_with_http_framing() {
    for config in atls_tests::wire_configs() {
        if config.client.common.framing().expect("framing") == Framing::Dtls {
            continue;
        }
        let server = serve(config.engine, &config.server, ServerLimits::default()).await;
        let (url, counts) = counting_relay(server.addr).await;
        let client = client(config.engine, &config.client, &url, mode_options(Mode::Oscore));
        let read = || (counts[0].load(Ordering::SeqCst), counts[1].load(Ordering::SeqCst));
        client
            .send(get("/hello"))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", config.name));
        let (up, down) = read();
        client.send(get("/hello")).await.expect("second request");
        let (up2, down2) = read();
        let (req, resp) = (up2.checked_sub(up), down2.checked_sub(down));
        let (Some(req), Some(resp)) = (req, resp) else {
            panic!("{}: counts went back", config.name);
        };
        let (Some(hs_up), Some(hs_down)) = (up.checked_sub(req), down.checked_sub(resp)) else {
            panic!("{}: the first exchange was smaller than the second", config.name);
        };
        println!(
            "| {} | {hs_up} B | {hs_down} B | {} B | {req} B → {resp} B |",
            config.name,
            hs_up + hs_down
        );
        assert!(
            hs_up > req && hs_down > resp,
            "{}: the handshake costs more than a request",
            config.name
        );
    }
}
