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
/// requests forever, printing each Partial IV, until it is killed.
#[test]
fn child_protects_until_killed() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
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
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "child_protects_until_killed",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
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
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
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
