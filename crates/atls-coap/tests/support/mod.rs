//! Test support: a lossy UDP relay.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the relay did and saw.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Datagrams dropped, datagrams duplicated.
    pub(crate) counts: [AtomicUsize; 2],
    /// Plain CoAP datagrams towards the server, by type.
    pub(crate) confirmable: AtomicUsize,
    /// Likewise, non-confirmable.
    pub(crate) non_confirmable: AtomicUsize,
}

/// A UDP relay between one client and the server that drops, duplicates,
/// delays and so reorders datagrams in both directions, deterministically.
pub(crate) async fn lossy_relay(server: SocketAddr, seed: u64) -> (SocketAddr, Arc<Faults>) {
    let faults: Arc<Faults> = Arc::new(Faults::default());
    let counted = faults.clone();
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = front.local_addr().expect("addr");
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let rng = Arc::new(std::sync::Mutex::new(seed | 1));
    // xorshift64: the same faults in every run.
    let roll = move |rng: &std::sync::Mutex<u64>| {
        let mut x = rng.lock().expect("rng");
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x % 100
    };
    let forward =
        move |from: Arc<tokio::net::UdpSocket>, to: Arc<tokio::net::UdpSocket>, towards_server: bool| {
            let (client, rng, faults) = (client.clone(), rng.clone(), counted.clone());
            async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    let Ok((n, src)) = from.recv_from(&mut buf).await else {
                        return;
                    };
                    let target = if towards_server {
                        *client.lock().expect("lock") = Some(src);
                        server
                    } else {
                        match *client.lock().expect("lock") {
                            Some(c) => c,
                            None => continue,
                        }
                    };
                    if towards_server {
                        // The CoAP type of plain CoAP datagrams (version 1).
                        match buf.first().map(|b| (b >> 6, (b >> 4) & 3)) {
                            Some((1, 0)) => faults.confirmable.fetch_add(1, Ordering::Relaxed),
                            Some((1, 1)) => faults.non_confirmable.fetch_add(1, Ordering::Relaxed),
                            _ => 0,
                        };
                    }
                    let fate = roll(&rng);
                    if fate < 20 {
                        faults.counts[0].fetch_add(1, Ordering::Relaxed);
                        continue; // dropped
                    }
                    let copies = if fate >= 90 { 2 } else { 1 };
                    if copies == 2 {
                        faults.counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                    for _ in 0..copies {
                        let delay = Duration::from_millis(roll(&rng) % 30);
                        let (to, datagram) = (to.clone(), buf[..n].to_vec());
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = to.send_to(&datagram, target).await;
                        });
                    }
                }
            }
        };
    tokio::spawn(forward(front.clone(), back.clone(), true));
    tokio::spawn(forward(back, front, false));
    (addr, faults)
}

/// Bytes and datagrams a [`counting_relay`] forwarded, each way.
#[derive(Debug, Default)]
pub(crate) struct Counted {
    /// Towards the server: datagrams, bytes.
    pub(crate) to_server: [AtomicUsize; 2],
    /// Towards the client: datagrams, bytes.
    pub(crate) to_client: [AtomicUsize; 2],
}

impl Counted {
    /// (datagrams, bytes) to the server and to the client so far.
    pub(crate) fn read(&self) -> ((usize, usize), (usize, usize)) {
        let get = |a: &[AtomicUsize; 2]| (a[0].load(Ordering::SeqCst), a[1].load(Ordering::SeqCst));
        (get(&self.to_server), get(&self.to_client))
    }
}

/// A UDP relay between one client and the server that forwards everything
/// at once and counts what it forwards.
pub(crate) async fn counting_relay(server: SocketAddr) -> (SocketAddr, Arc<Counted>) {
    let counted: Arc<Counted> = Arc::new(Counted::default());
    let result = counted.clone();
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = front.local_addr().expect("addr");
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let forward =
        move |from: Arc<tokio::net::UdpSocket>, to: Arc<tokio::net::UdpSocket>, towards_server: bool| {
            let (client, counted) = (client.clone(), counted.clone());
            async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok((n, src)) = from.recv_from(&mut buf).await else {
                        return;
                    };
                    let (target, counter) = if towards_server {
                        *client.lock().expect("lock") = Some(src);
                        (server, &counted.to_server)
                    } else {
                        match *client.lock().expect("lock") {
                            Some(c) => (c, &counted.to_client),
                            None => continue,
                        }
                    };
                    counter[0].fetch_add(1, Ordering::SeqCst);
                    counter[1].fetch_add(n, Ordering::SeqCst);
                    let _ = to.send_to(&buf[..n], target).await;
                }
            }
        };
    tokio::spawn(forward(front.clone(), back.clone(), true));
    tokio::spawn(forward(back, front, false));
    (addr, result)
}
