//! Real processes for the command-line tests: `atls serve`, nginx,
//! tinyproxy, Python peers. Each is killed when its handle drops.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const ATLS: &str = env!("CARGO_BIN_EXE_atls");

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `atls serve`, with its bound address and development CA.
pub struct Serve {
    pub process: Process,
    pub http: String,
    pub https: Option<String>,
    pub coap: Option<String>,
    pub coap_tcp: Option<String>,
    pub coaps: Option<String>,
    pub ca: PathBuf,
    pub state: tempfile::TempDir,
}

pub fn serve(extra: &[&str]) -> Serve {
    let state = tempfile::tempdir().expect("state dir");
    let mut child = Command::new(ATLS)
        .args(["serve", "--http", "127.0.0.1:0", "--state-dir"])
        .arg(state.path())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("atls serve");
    let stdout = child.stdout.take().expect("stdout");
    let process = Process(child);
    let mut http = None;
    let mut https = None;
    let mut coap = None;
    let mut coap_tcp = None;
    let mut coaps = None;
    let wants_coaps = extra.contains(&"--coaps");
    let wants_coap_tcp = extra.contains(&"--coap-tcp");
    let wants_https = extra.contains(&"--https");
    let wants_coap = extra.contains(&"--coap");
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ATLS over HTTPS on ") {
            https = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("ATLS over HTTP on ") {
            http = rest
                .split_whitespace()
                .next()
                .map(|url| url.trim_start_matches("http://").to_owned());
        }
        if let Some(rest) = line.strip_prefix("ATLS over CoAP on ") {
            coap = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("ATLS over CoAP over TCP on ") {
            coap_tcp = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("ATLS over CoAP over DTLS on ") {
            coaps = rest.split_whitespace().next().map(str::to_owned);
        }
        if http.is_some()
            && (coaps.is_some() || !wants_coaps)
            && (https.is_some() || !wants_https)
            && (coap.is_some() || !wants_coap)
            && (coap_tcp.is_some() || !wants_coap_tcp)
        {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let http = http.expect("atls serve reports its address");
    Serve {
        process,
        http,
        https,
        coap,
        coap_tcp,
        coaps,
        ca: state.path().join("ca.pem"),
        state,
    }
}

/// A CA that issued nothing the servers use, written to `dir`: a wrong
/// trust anchor.
pub fn other_ca(dir: &Path) -> PathBuf {
    let path = dir.join("other-ca.pem");
    std::fs::write(
        &path,
        atls_pki::DevCa::new("another CA").expect("CA").certificate_pem(),
    )
    .expect("write");
    path
}

/// Run `atls request` with `args`.
pub fn request(args: &[&str]) -> Output {
    Command::new(ATLS)
        .arg("request")
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .expect("atls request")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A TCP port free right now on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Wait until something accepts connections on `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start listening on port {port}");
}

pub fn require(program: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(program);
        if path.exists() {
            return path;
        }
    }
    panic!("{program} is required for this test: run scripts/setup.sh");
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// nginx terminating transport TLS on `port` and proxying to `upstream`
/// (host:port), with the certificate and key given.
pub fn nginx(dir: &Path, port: u16, upstream: &str, cert: &Path, key: &Path) -> Process {
    nginx_with(dir, port, upstream, cert, key, "")
}

/// Like [`nginx`], with `extra` directives in the proxying location and an
/// access log of each request's URI and `Cookie` header in `dir/logs/cookies.log`.
pub fn nginx_with(dir: &Path, port: u16, upstream: &str, cert: &Path, key: &Path, extra: &str) -> Process {
    let nginx = require("nginx");
    for sub in ["logs", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).expect("nginx dirs");
    }
    let user = if running_as_root() { "user root;" } else { "" };
    let conf = format!(
        r#"{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/logs/access.log;
    log_format cookies '$request_uri "$http_cookie"';
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        access_log {dir}/logs/cookies.log cookies;
        location / {{
            {extra}
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_pass_header Set-Cookie;
        }}
    }}
}}
"#,
        dir = dir.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx");
    let process = Process(child);
    wait_for_port(port, "nginx");
    process
}

/// tinyproxy on `port`, logging to `dir/tinyproxy.log`.
pub fn tinyproxy(dir: &Path, port: u16) -> (Process, PathBuf) {
    let tinyproxy = require("tinyproxy");
    let log = dir.join("tinyproxy.log");
    let user = if running_as_root() {
        "User root\nGroup root\n"
    } else {
        ""
    };
    let conf = format!(
        "{user}Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{log}\"\nLogLevel Info\nMaxClients 20\nAllow 127.0.0.1\n",
        log = log.display()
    );
    let conf_path = dir.join("tinyproxy.conf");
    std::fs::write(&conf_path, conf).expect("tinyproxy.conf");
    let child = Command::new(tinyproxy)
        .arg("-d")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tinyproxy");
    let process = Process(child);
    wait_for_port(port, "tinyproxy");
    (process, log)
}

/// `atls gateway`, with its bound listeners and its log (stderr).
pub struct Gateway {
    pub process: Process,
    pub coap: Option<String>,
    pub coap_tcp: Option<String>,
    pub coaps: Option<String>,
    pub log: PathBuf,
    pub state: tempfile::TempDir,
}

impl Gateway {
    /// What the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn gateway(extra: &[&str]) -> Gateway {
    let state = tempfile::tempdir().expect("state dir");
    let log = state.path().join("gateway.log");
    let mut child = Command::new(ATLS)
        .args(["gateway", "--state-dir"])
        .arg(state.path())
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("atls gateway");
    let stdout = child.stdout.take().expect("stdout");
    let process = Process(child);
    let (mut coap, mut coap_tcp, mut coaps) = (None, None, None);
    let wants = |flag: &str| extra.contains(&flag);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ATLS gateway on ") {
            let url = rest.split_whitespace().next().map(str::to_owned);
            match url.as_deref() {
                Some(u) if u.starts_with("coap://") => coap = url,
                Some(u) if u.starts_with("coap+tcp://") => coap_tcp = url,
                Some(u) if u.starts_with("coaps://") => coaps = url,
                _ => {}
            }
        }
        if (coap.is_some() || !wants("--coap"))
            && (coap_tcp.is_some() || !wants("--coap-tcp"))
            && (coaps.is_some() || !wants("--coaps"))
        {
            break;
        }
    }
    // The rest of stdout is read (and dropped), so that later lines never
    // meet a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Gateway {
        process,
        coap,
        coap_tcp,
        coaps,
        log,
        state,
    }
}

/// pyOpenSSL and aiocoap with OSCORE, as `scripts/setup.sh` installs them.
pub fn require_python_interop() {
    let ok = Command::new("python3")
        .args(["-c", "import OpenSSL, aiocoap.oscore"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with pyOpenSSL and aiocoap[oscore] is required: run scripts/setup.sh"
    );
}
