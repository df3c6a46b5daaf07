//! The aiocoap (Python) OSCORE peer: context files, a server process, a
//! client run and CoAP exchanges over UDP, for the interop tests.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use atls_oscore::ContextParams;
use coap_lite::Packet;

/// The peer script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/aiocoap_peer.py")
}

/// Fail clearly when the peer is not installed.
pub fn require_aiocoap() {
    let ok = Command::new("python3")
        .args(["-c", "import aiocoap.oscore, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with aiocoap[oscore] is required: run scripts/setup.sh"
    );
}

/// Write aiocoap's settings.json for the mirror image of `ours`.
pub fn write_aiocoap_context(dir: &Path, ours: &ContextParams, alg: &str, hkdf: &str) {
    let settings = format!(
        r#"{{"sender-id_hex": "{}", "recipient-id_hex": "{}", "secret_hex": "{}", "salt_hex": "{}", "algorithm": "{}", "kdf-hashfun": "{}"}}"#,
        hex::encode(&ours.recipient_id),
        hex::encode(&ours.sender_id),
        hex::encode(&*ours.master_secret),
        hex::encode(&*ours.master_salt),
        alg,
        hkdf
    );
    std::fs::write(dir.join("settings.json"), settings).expect("settings.json");
}

/// A UDP port free right now on loopback.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running aiocoap server, killed on drop.
#[derive(Debug)]
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the aiocoap OSCORE server and wait until it listens.
pub fn start_aiocoap_server(dir: &Path, port: u16) -> Server {
    let mut child = Command::new("python3")
        .arg(script())
        .args(["server", dir.to_str().expect("utf-8"), &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start aiocoap server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("ready line");
    assert!(
        line.starts_with("ready"),
        "aiocoap server did not start: {line:?}"
    );
    Server(child)
}

/// One confirmable request/response exchange over UDP.
pub fn exchange(socket: &UdpSocket, request: &Packet) -> Packet {
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let bytes = request.to_bytes().expect("encode");
    let mut buf = [0u8; 2048];
    for _ in 0..5 {
        socket.send(&bytes).expect("send");
        // A slow peer first acknowledges with an empty ACK, then sends the
        // response separately (RFC 7252 §5.2.2), as a CON we must ACK.
        while let Ok(n) = socket.recv(&mut buf) {
            let packet = Packet::from_bytes(&buf[..n]).expect("response");
            if packet.header.code == coap_lite::MessageClass::Empty {
                continue;
            }
            if packet.header.get_type() == coap_lite::MessageType::Confirmable {
                let mut ack = Packet::new();
                ack.header.set_type(coap_lite::MessageType::Acknowledgement);
                ack.header.code = coap_lite::MessageClass::Empty;
                ack.header.message_id = packet.header.message_id;
                let _ = socket.send(&ack.to_bytes().expect("encode"));
            }
            return packet;
        }
    }
    panic!("no response from aiocoap");
}

pub fn aiocoap_client(dir: &Path, port: u16, path: &str, method: &str, payload: &str) -> (String, Vec<u8>) {
    let out = Command::new("python3")
        .arg(script())
        .args([
            "client",
            dir.to_str().expect("utf-8"),
            &format!("coap://127.0.0.1:{port}/{path}"),
            method,
            payload,
        ])
        .output()
        .expect("run aiocoap client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "aiocoap client failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = stdout
        .lines()
        .find_map(|l| l.strip_prefix("code "))
        .expect("code")
        .to_owned();
    let payload = hex::decode(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("payload "))
            .expect("payload"),
    )
    .expect("hex");
    (code, payload)
}
