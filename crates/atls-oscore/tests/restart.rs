//! Appendix B.1: a process protecting messages is killed (SIGKILL) and
//! restarted from its redb store; no sequence number is ever reused, and the
//! server's replay window is recovered with Echo (B.1.2, RFC 9175).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use atls_core::{CoseAead, HkdfHash};
use atls_oscore::message::OPTION_ECHO;
use atls_oscore::*;
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use zeroize::Zeroizing;

const CHILD_ENV: &str = "ATLS_OSCORE_RESTART_CHILD_STORE";
const INTERVAL: u64 = 16;

fn params(client: bool) -> ContextParams {
    let (sender, recipient) = if client {
        (vec![], vec![1])
    } else {
        (vec![1], vec![])
    };
    ContextParams {
        master_secret: Zeroizing::new(vec![7; 16]),
        master_salt: Zeroizing::new(vec![8; 8]),
        aead: CoseAead::AesCcm16_64_128,
        hkdf: HkdfHash::Sha256,
        sender_id: sender,
        recipient_id: recipient,
        id_context: None,
        replay_window: 32,
    }
}

fn request() -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Get);
    p.add_option(CoapOption::UriPath, b"counter".to_vec());
    p
}

/// Not a test on its own: the child process of the kill test. It protects
/// requests forever, printing each Partial IV, until it is killed. Ignored,
/// so that it never counts as a test: [`spawn_child`] runs it with `--ignored`.
#[test]
#[ignore = "child process of killed_sender_never_reuses_a_sequence_number"]
fn child_protects_until_killed() {
    let path = child_env(CHILD_ENV, "killed_sender_never_reuses_a_sequence_number");
    let store = Arc::new(RedbStore::open(path.as_ref()).expect("store"));
    let mut ctx = SecurityContext::with_store(&params(true), store, INTERVAL).expect("context");
    loop {
        let (_, binding) = protect_request(&mut ctx, &request()).expect("protect");
        println!("piv {}", hex::encode(&binding.piv));
    }
}

fn seq(piv_hex: &str) -> u64 {
    hex::decode(piv_hex)
        .expect("hex")
        .iter()
        .fold(0, |a, b| (a << 8) | u64::from(*b))
}

#[test]
fn killed_sender_never_reuses_a_sequence_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oscore.redb");
    let mut highest_used = None;
    for round in 0..3 {
        let (mut child, stdout) =
            spawn_child("child_protects_until_killed", &[(CHILD_ENV, path.as_os_str())]);
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            if let Some(piv) = line.strip_prefix("piv ") {
                seen.push(seq(piv));
                if seen.len() == 100 + round * 37 {
                    break;
                }
            }
        }
        child.kill();
        let first = *seen.first().expect("the child protected messages");
        if let Some(previous) = highest_used {
            assert!(
                first > previous,
                "round {round}: restarted at {first}, but {previous} was already used"
            );
        }
        // The child may have used numbers it had not printed yet: bound by what was persisted.
        highest_used = Some(*seen.last().expect("seen"));
        let store = RedbStore::open(&path).expect("reopen");
        let ctx = SecurityContext::with_store(&params(true), Arc::new(store), INTERVAL).expect("context");
        assert!(
            ctx.next_sequence_number() > highest_used.expect("set"),
            "round {round}"
        );
        highest_used = Some(ctx.next_sequence_number() - 1);
    }
}

#[test]
fn restarted_server_recovers_its_replay_window_with_echo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_store: Arc<dyn SequenceStore> =
        Arc::new(RedbStore::open(&dir.path().join("server.redb")).expect("store"));
    let mut client = SecurityContext::new_in_memory(&params(true)).expect("client");
    let mut server =
        SecurityContext::with_store(&params(false), server_store.clone(), INTERVAL).expect("server");

    let mut before_restart = Vec::new();
    for _ in 0..3 {
        let (wire, binding) = protect_request(&mut client, &request()).expect("protect");
        let (_, sb) = unprotect_request(&mut server, &wire).expect("accepted");
        let response = protect_response(&mut server, &Packet::new(), &sb, true).expect("response");
        unprotect_response(&mut client, &response, &binding).expect("client verifies");
        before_restart.push(wire);
    }
    drop(server);

    // Restart: the server's sequence numbers continue past the stored value,
    // and its replay window is unknown.
    let mut server = SecurityContext::with_store(&params(false), server_store, INTERVAL).expect("restarted");
    assert_eq!(server.replay, ReplayWindow::Uninitialized);
    assert!(server.next_sequence_number() >= INTERVAL);

    // An old request replayed after the restart is not accepted.
    assert_eq!(
        unprotect_request(&mut server, &before_restart[2]).map(|_| ()),
        Err(OscoreError::FreshnessRequired)
    );

    // A new request meets an Echo challenge...
    let (wire, binding) = protect_request(&mut client, &request()).expect("protect");
    assert_eq!(
        unprotect_request(&mut server, &wire).map(|_| ()),
        Err(OscoreError::FreshnessRequired)
    );
    let challenge = protect_echo_challenge(&mut server, &wire, b"echo-8b!".to_vec()).expect("challenge");
    assert!(
        oscore_option(&challenge).expect("option").partial_iv.is_some(),
        "the challenge carries the server's own Partial IV"
    );
    let answer =
        unprotect_response(&mut client, &challenge, &binding).expect("client verifies the challenge");
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Unauthorized)
    );
    let echo = answer
        .get_option(CoapOption::Unknown(OPTION_ECHO))
        .and_then(|v| v.front())
        .expect("Echo")
        .clone();

    // ...which the client repeats with the Echo value, and is accepted.
    let mut retry = request();
    retry.add_option(CoapOption::Unknown(OPTION_ECHO), echo);
    let (wire2, _) = protect_request(&mut client, &retry).expect("protect");
    let (plain, _) = unprotect_request(&mut server, &wire2).expect("fresh");
    assert_eq!(
        plain
            .get_option(CoapOption::UriPath)
            .and_then(|v| v.front())
            .map(Vec::as_slice),
        Some(&b"counter"[..])
    );

    // From now on the window works, with the Echo request as its lower limit.
    assert_eq!(
        unprotect_request(&mut server, &wire2).map(|_| ()),
        Err(OscoreError::Replay)
    );
    assert_eq!(
        unprotect_request(&mut server, &wire).map(|_| ()),
        Err(OscoreError::Replay),
        "below the lower limit"
    );
    assert_eq!(
        unprotect_request(&mut server, &before_restart[0]).map(|_| ()),
        Err(OscoreError::Replay)
    );
    let (wire3, _) = protect_request(&mut client, &request()).expect("protect");
    unprotect_request(&mut server, &wire3).expect("a new request is accepted");
}

#[test]
fn in_memory_contexts_start_at_zero_and_a_wrong_echo_is_refused() {
    let store: Arc<dyn SequenceStore> = Arc::new(MemoryStore::default());
    let mut server = SecurityContext::with_store(&params(false), store.clone(), INTERVAL).expect("server");
    assert_eq!(
        server.replay,
        ReplayWindow::new(32),
        "a first start has a fresh window"
    );
    let mut client = SecurityContext::new_in_memory(&params(true)).expect("client");
    let (wire, _) = protect_request(&mut client, &request()).expect("protect");
    unprotect_request(&mut server, &wire).expect("accepted");
    protect_response(
        &mut server,
        &Packet::new(),
        &RequestBinding {
            kid: vec![],
            piv: vec![0],
        },
        true,
    )
    .expect("resp");
    drop(server);
    let mut server = SecurityContext::with_store(&params(false), store, INTERVAL).expect("restarted");
    let (wire, _) = protect_request(&mut client, &request()).expect("protect");
    protect_echo_challenge(&mut server, &wire, b"right".to_vec()).expect("challenge");
    let mut forged = request();
    forged.add_option(CoapOption::Unknown(OPTION_ECHO), b"wrong".to_vec());
    let (wire, _) = protect_request(&mut client, &forged).expect("protect");
    assert_eq!(
        unprotect_request(&mut server, &wire).map(|_| ()),
        Err(OscoreError::FreshnessRequired)
    );
}

#[test]
fn established_contexts_survive_a_restart_when_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let mut p = params(false);
    p.id_context = Some(vec![0xAB, 0xCD]);
    p.aead = CoseAead::ChaCha20Poly1305;
    p.hkdf = HkdfHash::Sha384;
    p.master_secret = Zeroizing::new(vec![3; 32]);
    let mut client_params = params(true);
    client_params.id_context = p.id_context.clone();
    client_params.aead = p.aead;
    client_params.hkdf = p.hkdf;
    client_params.master_secret = p.master_secret.clone();
    let mut client = SecurityContext::new_in_memory(&client_params).expect("client");
    {
        let store = Arc::new(RedbStore::open(&path).expect("store"));
        store.save_context(b"cid-5e", &p).expect("save");
        let mut server = SecurityContext::with_store(&p, store, INTERVAL).expect("server");
        let (wire, _) = protect_request(&mut client, &request()).expect("protect");
        unprotect_request(&mut server, &wire).expect("accepted");
    }
    // A new process: the context comes back from the state directory.
    let store = Arc::new(RedbStore::open(&path).expect("reopen"));
    let restored = store.load_context(b"cid-5e").expect("load").expect("present");
    assert_eq!(
        atls_oscore::context::derive_keys(&restored).expect("keys"),
        atls_oscore::context::derive_keys(&p).expect("keys")
    );
    let server = SecurityContext::with_store(&restored, store.clone(), INTERVAL).expect("server");
    assert_eq!(
        server.replay,
        ReplayWindow::Uninitialized,
        "replay state is not trusted after a restart"
    );
    assert!(server.next_sequence_number() >= INTERVAL);
    assert!(store.load_context(b"other").expect("load").is_none());
    store.remove_context(b"cid-5e").expect("remove");
    assert!(store.load_context(b"cid-5e").expect("load").is_none());
    assert!(!format!("{restored:?}").contains("0303"), "secrets never print");
}

const SERVER_CHILD_ENV: &str = "ATLS_OSCORE_RESTART_SERVER_STORE";

/// Not a test on its own: a killed-and-restarted OSCORE server. It serves
/// OSCORE over UDP on the port it prints, persisting to the given store,
/// answering an uninitialised window with an Echo challenge. Ignored, like
/// [`child_protects_until_killed`].
#[test]
#[ignore = "child process of killed_server_recovers_its_replay_window_with_echo"]
fn child_server_until_killed() {
    let path = child_env(
        SERVER_CHILD_ENV,
        "killed_server_recovers_its_replay_window_with_echo",
    );
    let port: u16 = std::env::var("ATLS_OSCORE_RESTART_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let store = Arc::new(RedbStore::open(path.as_ref()).expect("store"));
    let mut ctx = SecurityContext::with_store(&params(false), store, INTERVAL).expect("context");
    let socket = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("bind");
    println!("port {}", socket.local_addr().expect("addr").port());
    let mut buf = [0u8; 2048];
    let mut challenges = 0u8;
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(request) = Packet::from_bytes(&buf[..n]) else {
            continue;
        };
        let mut response = match unprotect_request(&mut ctx, &request) {
            Ok((_, binding)) => {
                let mut inner = Packet::new();
                inner.header.code = MessageClass::Response(ResponseType::Content);
                inner.payload = b"fresh".to_vec();
                protect_response(&mut ctx, &inner, &binding, false).expect("protect")
            }
            Err(OscoreError::FreshnessRequired) => {
                challenges += 1;
                protect_echo_challenge(&mut ctx, &request, vec![0xEC, challenges]).expect("challenge")
            }
            Err(e) => error_response(&request, &e).expect("error response"),
        };
        response.header.message_id = request.header.message_id;
        socket
            .send_to(&response.to_bytes().expect("encode"), peer)
            .expect("send");
    }
}

/// A server child process, SIGKILLed when dropped so that a failing test
/// leaves nothing running.
struct ChildProcess(std::process::Child);

impl ChildProcess {
    fn kill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The store path a child process was started with. Run directly (with
/// `--ignored` or `--include-ignored`) a child has nothing to do: it fails
/// rather than pass as a test.
fn child_env(var: &str, parent: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("not a test: the child process of {parent}, which runs it"))
}

/// Run one ignored child "test" of this binary (`test`) as a child process with `envs`.
fn spawn_child(test: &str, envs: &[(&str, &std::ffi::OsStr)]) -> (ChildProcess, std::process::ChildStdout) {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    (ChildProcess(child), stdout)
}

fn spawn_server(path: &std::path::Path, port: u16) -> (ChildProcess, u16) {
    let port = port.to_string();
    let (child, stdout) = spawn_child(
        "child_server_until_killed",
        &[
            (SERVER_CHILD_ENV, path.as_os_str()),
            ("ATLS_OSCORE_RESTART_PORT", port.as_ref()),
        ],
    );
    let port = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.rsplit_once("port ").and_then(|(_, p)| p.trim().parse().ok()))
        .expect("the server reports its port");
    (child, port)
}

fn send(socket: &std::net::UdpSocket, message: &Packet) -> Packet {
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        socket.send(&message.to_bytes().expect("encode")).expect("send");
        if let Ok(n) = socket.recv(&mut buf) {
            return Packet::from_bytes(&buf[..n]).expect("response");
        }
    }
    panic!("no answer from the server process");
}

/// The server process is SIGKILLed and started again on the same store: a
/// request recorded before the kill is refused when replayed, and the client
/// recovers through the Echo challenge.
#[test]
fn killed_server_recovers_its_replay_window_with_echo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.redb");
    let (mut server, port) = spawn_server(&path, 0);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(("127.0.0.1", port)).expect("connect");
    let mut client = SecurityContext::new_in_memory(&params(true)).expect("client");

    let mut recorded = Vec::new();
    for _ in 0..3 {
        let (wire, binding) = protect_request(&mut client, &request()).expect("protect");
        let answer = unprotect_response(&mut client, &send(&socket, &wire), &binding).expect("verified");
        assert_eq!(answer.payload, b"fresh");
        recorded.push(wire);
    }
    server.kill();
    let (mut server, _) = spawn_server(&path, port);

    // A replay of a request from before the kill: challenged, never served.
    let replay = send(&socket, &recorded[1]);
    assert_ne!(replay.payload, b"fresh".to_vec());
    assert!(
        replay.get_option(CoapOption::Oscore).is_some(),
        "the challenge is OSCORE-protected"
    );

    // A new request is challenged, then accepted with the echoed value.
    let (wire, binding) = protect_request(&mut client, &request()).expect("protect");
    let challenge = unprotect_response(&mut client, &send(&socket, &wire), &binding).expect("verified");
    assert_eq!(
        challenge.header.code,
        MessageClass::Response(ResponseType::Unauthorized)
    );
    let echo = challenge
        .get_option(CoapOption::Unknown(OPTION_ECHO))
        .and_then(|v| v.front())
        .expect("Echo")
        .clone();
    let mut retry = request();
    retry.add_option(CoapOption::Unknown(OPTION_ECHO), echo);
    let (wire, binding) = protect_request(&mut client, &retry).expect("protect");
    let answer = unprotect_response(&mut client, &send(&socket, &wire), &binding).expect("verified");
    assert_eq!(answer.header.code, MessageClass::Response(ResponseType::Content));
    assert_eq!(answer.payload, b"fresh");

    // The old requests stay refused: below the window's new lower limit.
    let replay = send(&socket, &recorded[2]);
    assert_eq!(
        replay.header.code,
        MessageClass::Response(ResponseType::Unauthorized)
    );
    assert_eq!(replay.payload, b"Replay detected");
    server.kill();
}
