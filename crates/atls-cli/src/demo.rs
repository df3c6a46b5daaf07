//! `atls demo`: the draft's session establishment (Figure 11) in memory, on
//! each engine and version, showing per flight what crosses the wire and
//! whether both ends export the same keys.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Context};
use atls_core::inspect::inspect;
use atls_core::pair::exchange;
use atls_core::{
    CipherSuite, ClientConfig, ClientSessionParams, CommonConfig, ConnectionId, Engine, HkdfHash,
    ProtectionKind, Psk, Role, ServerConfig, ServerSessionParams, Session, TlsVersion,
};
use atls_openssl::OpenSslEngine;
use atls_pki::DevCa;
use atls_rustls::RustlsEngine;

/// Arguments of `atls demo`.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct DemoArgs {
    /// One of the draft's deployments alone (all of them, after every other
    /// scenario, without one).
    #[command(subcommand)]
    deployment: Option<crate::demo_deploy::Deployment>,
    /// Only scenarios whose client or server runs this engine (openssl, rustls).
    #[arg(long, global = true)]
    engine: Option<String>,
    /// Only the in-memory handshakes, no servers on loopback.
    #[arg(long)]
    memory_only: bool,
    /// Deployments through real third-party middleboxes started on
    /// loopback (nginx, mitmproxy, tinyproxy) instead of the demo's own.
    #[arg(long, global = true)]
    third_party: bool,
    /// Keep the deployments' working directory (configurations, logs,
    /// mitmproxy's record of what it intercepted) in DIR.
    #[arg(long, global = true, value_name = "DIR")]
    keep: Option<std::path::PathBuf>,
}

const SERVER_NAME: &str = "service.atls.example";

struct Scenario {
    client: &'static dyn Engine,
    server: &'static dyn Engine,
    version: TlsVersion,
    psk_suite: Option<&'static str>,
}

fn scenarios() -> Vec<Scenario> {
    let o: &'static dyn Engine = &OpenSslEngine;
    let r: &'static dyn Engine = &RustlsEngine;
    let mut out = Vec::new();
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        for (client, server) in [(o, o), (r, r), (r, o), (o, r)] {
            out.push(Scenario {
                client,
                server,
                version,
                psk_suite: None,
            });
        }
    }
    out.push(Scenario {
        client: o,
        server: o,
        version: TlsVersion::Dtls12,
        psk_suite: None,
    });
    out.push(Scenario {
        client: o,
        server: o,
        version: TlsVersion::Dtls12,
        psk_suite: Some("TLS_PSK_WITH_AES_128_CCM_8"),
    });
    out.push(Scenario {
        client: o,
        server: o,
        version: TlsVersion::Tls13,
        psk_suite: Some("TLS_AES_128_CCM_8_SHA256"),
    });
    out
}

fn hex_id(bytes: &[u8]) -> String {
    format!("h'{}'", hex::encode(bytes))
}

fn hkdf_name(h: HkdfHash) -> &'static str {
    match h {
        HkdfHash::Sha256 => "HKDF-SHA-256",
        HkdfHash::Sha384 => "HKDF-SHA-384",
        _ => "HKDF-SHA-512",
    }
}

/// One line per flight: direction, size and the records a middlebox sees.
fn describe_flight(from: Role, index: usize, bytes: &[u8]) -> String {
    let arrow = match from {
        Role::Client => "C → S",
        Role::Server => "S → C",
    };
    let view = inspect(bytes);
    let records: Vec<String> = view
        .records
        .iter()
        .map(|r| format!("{}({})", r.content_type.map_or("unknown", |t| t.name()), r.length))
        .collect();
    let mut line = format!(
        "  {arrow} flight {index}: {:>5} B  {}",
        bytes.len(),
        records.join(" ")
    );
    if let Some(ch) = view.client_hello() {
        let versions: Vec<_> = ch
            .versions
            .iter()
            .map(|v| atls_core::inspect::version_name(*v))
            .collect();
        let _ = write!(
            line,
            "\n                 middlebox sees ClientHello: SNI {:?}, versions [{}], {} suites, oscore_connection_id {}, cose_ext {}",
            ch.server_name.as_deref().unwrap_or("-"),
            versions.join(" "),
            ch.cipher_suites.len(),
            ch.oscore_cid.as_ref().map_or("-".to_owned(), |c| hex_id(c.as_bytes())),
            ch.cose_cid.as_ref().map_or("-".to_owned(), |c| hex_id(c.as_bytes())),
        );
    }
    line
}

fn configs(ca: &DevCa, s: &Scenario) -> anyhow::Result<(ClientConfig, ServerConfig)> {
    let common = CommonConfig {
        versions: vec![s.version],
        cipher_suites: s
            .psk_suite
            .map(|name| {
                CipherSuite::from_name(name)
                    .map(|c| vec![c])
                    .context("known suite")
            })
            .transpose()?,
        ..CommonConfig::default()
    };
    let server_cert = ca.issue_server(&[SERVER_NAME])?;
    let (client, server) = match s.psk_suite {
        Some(_) => {
            let psk = Psk::new(
                b"sensor-17".to_vec(),
                b"demo pre-shared key, 32 bytes!!!".to_vec(),
            )?;
            (
                ClientConfig {
                    common: common.clone(),
                    psk: Some(psk.clone()),
                    ..ClientConfig::default()
                },
                ServerConfig {
                    common,
                    psks: vec![psk],
                    ..ServerConfig::default()
                },
            )
        }
        None => (
            ClientConfig {
                common: common.clone(),
                trust_anchors: vec![ca.certificate().clone()],
                ..ClientConfig::default()
            },
            ServerConfig {
                common,
                identity: Some(server_cert.certified_key()),
                ..ServerConfig::default()
            },
        ),
    };
    Ok((client, server))
}

/// Run one scenario; returns whether the keys agreed.
fn run_scenario(ca: &DevCa, s: &Scenario) -> anyhow::Result<bool> {
    let title = match s.psk_suite {
        Some(suite) => format!("{} PSK ({suite})", s.version),
        None => s.version.to_string(),
    };
    println!(
        "== {} client → {} server, {title}",
        s.client.name(),
        s.server.name()
    );
    let (client_config, server_config) = configs(ca, s)?;
    let client_endpoint = s.client.client(&client_config)?;
    let server_endpoint = s.server.server(&server_config)?;
    let client_params = ClientSessionParams {
        server_name: Some(SERVER_NAME.into()),
        oscore_cid: Some(ConnectionId::new(vec![0xC1])?),
        cose_cid: Some(ConnectionId::new(vec![0xC2])?),
    };
    let server_params = ServerSessionParams {
        oscore_cid: Some(ConnectionId::new(vec![0x5E, 0x01])?),
        cose_cid: Some(ConnectionId::new(vec![0x5E, 0x02])?),
        ..ServerSessionParams::default()
    };
    let mut client = Session::client(&*client_endpoint, &client_params)?;
    let mut server = Session::server(&*server_endpoint, &server_params)?;
    let transcript = exchange(&mut client, &mut server, Instant::now());
    let (mut c_count, mut s_count) = (0, 0);
    for flight in &transcript.flights {
        let n = match flight.from {
            Role::Client => {
                c_count += 1;
                c_count
            }
            Role::Server => {
                s_count += 1;
                s_count
            }
        };
        println!("{}", describe_flight(flight.from, n, &flight.bytes));
    }
    if let Some(e) = transcript
        .client_error
        .as_ref()
        .or(transcript.server_error.as_ref())
    {
        bail!("handshake failed: {e}");
    }
    let info = client.handshake_info().context("client handshake incomplete")?;
    let mapping = info.cipher_suite.atls_mapping()?;
    println!(
        "  negotiated {} {} → {} (COSE {}), {}",
        info.version,
        info.cipher_suite,
        mapping.aead.name(),
        mapping.aead.cose_id(),
        hkdf_name(mapping.hkdf)
    );
    let mut agree = true;
    for kind in [ProtectionKind::Oscore, ProtectionKind::Cose] {
        let c = client.atls_keys(kind)?;
        let srv = server.atls_keys(kind)?;
        let equal = c.master_secret == srv.master_secret && c.master_salt == srv.master_salt;
        agree &= equal;
        let ids = client.protection_ids(kind)?;
        println!(
            "  {:<12} {} B exported; client and server keys {}; client Sender ID {} Recipient ID {} ({:?})",
            String::from_utf8_lossy(kind.label()),
            c.algorithms.export_len(),
            if equal { "AGREE" } else { "DIFFER" },
            hex_id(&ids.sender_id),
            hex_id(&ids.recipient_id),
            ids.source,
        );
    }
    println!();
    Ok(agree)
}

pub(crate) fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let deploy = crate::demo_deploy::DeployOptions {
        third_party: args.third_party,
        keep: args.keep.clone(),
    };
    if let Some(deployment) = args.deployment {
        let (ran, failures) = crate::demo_deploy::run(&[deployment], &deploy)?;
        println!("{ran} scenarios, {} succeeded, {failures} failed", ran - failures);
        if failures > 0 {
            bail!("{failures} scenario(s) failed");
        }
        return Ok(());
    }
    let ca = DevCa::new("atls demo CA")?;
    println!("ATLS demo: TLS flights as opaque payloads, then keys exported for OSCORE and COSE.");
    println!("Each flight below is one HTTP body or CoAP payload (draft §7, §8).\n");
    let mut failures = 0;
    let mut ran = 0;
    for scenario in scenarios() {
        if let Some(filter) = &args.engine {
            if scenario.client.name() != filter && scenario.server.name() != filter {
                continue;
            }
        }
        ran += 1;
        match run_scenario(&ca, &scenario) {
            Ok(true) => {}
            Ok(false) => failures += 1,
            Err(e) => {
                println!("  FAILED: {e:#}\n");
                failures += 1;
            }
        }
    }
    if !args.memory_only {
        let (http_ran, http_failed) = crate::demo_http::run(args.engine.as_deref())?;
        ran += http_ran;
        failures += http_failed;
        let (coap_ran, coap_failed) = crate::demo_coap::run(args.engine.as_deref())?;
        ran += coap_ran;
        failures += coap_failed;
        let (deploy_ran, deploy_failed) =
            crate::demo_deploy::run(&crate::demo_deploy::Deployment::ALL, &deploy)?;
        ran += deploy_ran;
        failures += deploy_failed;
    }
    if ran == 0 {
        bail!("no scenario matches the engine filter");
    }
    println!("{ran} scenarios, {} succeeded, {failures} failed", ran - failures);
    if failures > 0 {
        bail!("{failures} scenario(s) failed");
    }
    Ok(())
}
