//! `atls gateway`: the untrusted CoAP-to-HTTP gateway of draft Figure 9.
//! Devices speak CoAP (UDP, TCP, DTLS) to it; it forwards their ATLS
//! flights and OSCORE messages, which it cannot read, to HTTP(S) services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use atls_core::{CommonConfig, ServerConfig};
use atls_gateway::{Gateway, GatewayConfig, Route};

use crate::common;

/// How long a draining gateway waits for devices to fetch the Block2
/// blocks of answers already given, once nothing else is in progress.
const BLOCK2_LINGER: Duration = Duration::from_secs(5);

const DEVICES: &str = "Transport layer towards devices (coaps:// DTLS hop)";
const UPSTREAM: &str = "Transport layer towards services (HTTPS)";

/// Arguments of `atls gateway`.
///
/// The two layers are configured apart (draft §5.2): `--coaps-*` is the
/// transport layer towards devices, `--upstream-*` the transport layer
/// towards services. The gateway has no ATLS configuration at all: it
/// never terminates ATLS.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct GatewayArgs {
    /// Read options from this TOML file: `flag-name = value` for every
    /// option (`http = "127.0.0.1:8080"`, `psk = ["id:hex"]`, `https = ...`).
    /// Precedence: the command line, then the environment (ATLS_GATEWAY_<FLAG>),
    /// then this file, then the defaults.
    #[arg(long, value_name = "FILE", env = "ATLS_GATEWAY_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// CoAP over UDP listener for devices. Default 127.0.0.1:5683 when no
    /// listener is given.
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_GATEWAY_COAP")]
    pub(crate) coap: Option<SocketAddr>,
    /// CoAP over TCP listener (RFC 8323).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_GATEWAY_COAP_TCP")]
    pub(crate) coap_tcp: Option<SocketAddr>,
    /// CoAP over DTLS listener (coaps://): the transport layer towards
    /// devices, with the --coaps-cert certificate (default: a development
    /// certificate in --state-dir/gateway, its CA beside it; devices may
    /// ignore its validation errors, §5.3) and any --coaps-psk keys.
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_GATEWAY_COAPS")]
    pub(crate) coaps: Option<SocketAddr>,
    /// PSK of the coaps:// hop (repeatable): IDENTITY:HEXKEY.
    #[arg(long, value_name = "ID:HEX", help_heading = DEVICES, env = "ATLS_GATEWAY_COAPS_PSK", hide_env_values = true, value_delimiter = ',')]
    pub(crate) coaps_psk: Vec<String>,
    /// Certificate chain of the coaps:// hop (PEM).
    #[arg(long, value_name = "FILE", requires = "coaps_key", help_heading = DEVICES, env = "ATLS_GATEWAY_COAPS_CERT")]
    pub(crate) coaps_cert: Option<PathBuf>,
    /// Private key of the coaps:// hop (PEM).
    #[arg(long, value_name = "FILE", requires = "coaps_cert", help_heading = DEVICES, env = "ATLS_GATEWAY_COAPS_KEY")]
    pub(crate) coaps_key: Option<PathBuf>,
    /// Require devices on coaps:// to present a certificate issued by this
    /// CA (PEM) — or a --coaps-psk key.
    #[arg(long, value_name = "FILE", help_heading = DEVICES, env = "ATLS_GATEWAY_COAPS_CLIENT_CA")]
    pub(crate) coaps_client_ca: Option<PathBuf>,
    /// The service of devices whose ClientHello names no --route (default
    /// http://127.0.0.1:8080, where `atls serve` listens, when no --route
    /// is given either).
    #[arg(long, value_name = "URL", value_parser = common::HttpUrlParser, env = "ATLS_GATEWAY_UPSTREAM", hide_env_values = true)]
    pub(crate) upstream: Option<String>,
    /// A service chosen by the SNI of a device's ClientHello (repeatable):
    /// NAME=URL.
    #[arg(
        long,
        value_name = "NAME=URL",
        env = "ATLS_GATEWAY_ROUTE",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub(crate) route: Vec<String>,
    /// Trust anchors for HTTPS to the services (PEM; besides the public roots).
    #[arg(long, value_name = "FILE", help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_CA")]
    pub(crate) upstream_ca: Option<PathBuf>,
    /// Do not verify the services' HTTPS certificates.
    #[arg(long, help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_INSECURE")]
    pub(crate) upstream_insecure: bool,
    /// The gateway's client certificate chain for services that ask for
    /// one (PEM).
    #[arg(long, value_name = "FILE", requires = "upstream_key", help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_CERT")]
    pub(crate) upstream_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "upstream_cert", help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_KEY")]
    pub(crate) upstream_key: Option<PathBuf>,
    /// Only this TLS version towards the services (1.2 or 1.3).
    #[arg(long, value_name = "VERSION", help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_TLS_VERSION")]
    pub(crate) upstream_tls_version: Option<String>,
    /// An HTTP forward proxy for every upstream request.
    #[arg(long, value_name = "URL", help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_PROXY", hide_env_values = true)]
    pub(crate) upstream_proxy: Option<String>,
    /// Seconds a service may take to answer (then 5.04 Gateway Timeout).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = common::positive_seconds, help_heading = UPSTREAM, env = "ATLS_GATEWAY_UPSTREAM_TIMEOUT")]
    pub(crate) upstream_timeout: Duration,
    /// CoAP Content-Format number of ATLS payloads.
    #[arg(long, default_value_t = atls_coap::CONTENT_FORMAT_ATLS, env = "ATLS_GATEWAY_COAP_CONTENT_FORMAT")]
    pub(crate) coap_content_format: u16,
    /// CoAP block size of Block2 answers (16..=1024, a power of two).
    #[arg(long, default_value_t = 512, env = "ATLS_GATEWAY_COAP_BLOCK_SIZE")]
    pub(crate) coap_block_size: usize,
    /// Most devices remembered at once.
    #[arg(long, default_value_t = 4096, env = "ATLS_GATEWAY_MAX_DEVICES")]
    pub(crate) max_devices: usize,
    /// Most devices remembered per IP address (IPv6: per /64).
    #[arg(long, default_value_t = 1024, env = "ATLS_GATEWAY_MAX_DEVICES_PER_IP")]
    pub(crate) max_devices_per_ip: usize,
    /// Seconds a device that has not completed a handshake is remembered
    /// without a message.
    #[arg(long, default_value_t = 30, env = "ATLS_GATEWAY_HANDSHAKE_TIMEOUT")]
    pub(crate) handshake_timeout: u64,
    /// Seconds an established device is remembered without a message.
    #[arg(long, default_value_t = 300, env = "ATLS_GATEWAY_IDLE_TIMEOUT")]
    pub(crate) idle_timeout: u64,
    /// Prometheus metrics listener (forwarded exchanges by kind and CoAP
    /// code, refusals by reason, devices).
    #[arg(long, value_name = "ADDR", value_parser = common::listen_addr, env = "ATLS_GATEWAY_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Seconds exchanges in progress may take to finish after SIGTERM or
    /// SIGINT (new ones get 5.03 meanwhile); a second signal exits at once.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = common::seconds, env = "ATLS_GATEWAY_SHUTDOWN_GRACE")]
    pub(crate) shutdown_grace: Duration,
    /// Directory for the coaps:// development certificate.
    #[arg(long, value_name = "DIR", env = "ATLS_GATEWAY_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
}

/// A gateway with its listeners bound, serving. Dropping it stops them.
pub(crate) struct Running {
    pub(crate) coap: Option<SocketAddr>,
    pub(crate) coap_tcp: Option<SocketAddr>,
    pub(crate) coaps: Option<SocketAddr>,
    pub(crate) gateway: Arc<Gateway>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Running {
    /// Serve until a listener fails.
    pub(crate) async fn wait(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(e.into()),
            None => Ok(()),
        }
    }
}

fn url(text: &str, what: &str) -> anyhow::Result<reqwest::Url> {
    let checked = common::http_url(text).map_err(|e| anyhow::anyhow!("{what} {e}"))?;
    reqwest::Url::parse(&checked).with_context(|| format!("{what}: not a URL"))
}

/// Build the gateway and bind its listeners.
pub(crate) async fn start(args: &GatewayArgs) -> anyhow::Result<Running> {
    let mut routes = Vec::new();
    for spec in &args.route {
        let Some((name, target)) = spec.split_once('=') else {
            bail!(
                "--route expects NAME=URL, got {:?}",
                atls_http::app::redact_url(spec)
            );
        };
        if name.is_empty() {
            bail!("--route {:?} has no name", atls_http::app::redact_url(target));
        }
        routes.push(Route {
            name: name.to_owned(),
            upstream: url(target, "--route")?,
        });
    }
    let default_upstream = match (&args.upstream, routes.is_empty()) {
        (Some(u), _) => Some(url(u, "--upstream")?),
        (None, true) => Some(url("http://127.0.0.1:8080", "--upstream")?),
        (None, false) => None,
    };
    let config = GatewayConfig {
        routes,
        default_upstream,
        content_format: args.coap_content_format,
        block_size: args.coap_block_size,
        max_devices: args.max_devices,
        max_devices_per_ip: args.max_devices_per_ip,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        upstream_timeout: args.upstream_timeout,
        upstream_tls: atls_http::TransportTls {
            insecure: args.upstream_insecure,
            roots: args
                .upstream_ca
                .as_deref()
                .map(common::certificates)
                .transpose()?
                .unwrap_or_default(),
            identity: match (&args.upstream_cert, &args.upstream_key) {
                (Some(cert), Some(key)) => Some(common::certified_key(cert, key)?),
                _ => None,
            },
            versions: match &args.upstream_tls_version {
                Some(v) => common::versions(Some(v))?,
                None => Vec::new(),
            },
        },
        upstream_proxy: args.upstream_proxy.clone(),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(config)?;
    if let Some(addr) = args.metrics {
        crate::serve::install_metrics(addr)?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    let coap_addr = match args.coap {
        None if args.coap_tcp.is_none() && args.coaps.is_none() => {
            Some(SocketAddr::from(([127, 0, 0, 1], 5683)))
        }
        other => other,
    };
    let mut coap = None;
    if let Some(addr) = coap_addr {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding UDP {addr}"))?;
        coap = Some(socket.local_addr()?);
        let g = gateway.clone();
        tasks.spawn(async move { atls_coap::udp::serve(socket, g).await.context("CoAP listener") });
    }
    let mut coap_tcp = None;
    if let Some(addr) = args.coap_tcp {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP {addr}"))?;
        coap_tcp = Some(listener.local_addr()?);
        let g = gateway.clone();
        tasks.spawn(async move {
            atls_coap::tcp::serve(listener, g)
                .await
                .context("CoAP over TCP listener")
        });
    }
    let mut coaps = None;
    if let Some(addr) = args.coaps {
        // A certificate always (devices that have no PSK), PSKs beside it.
        let identity = match (&args.coaps_cert, &args.coaps_key) {
            (Some(cert), Some(key)) => Some(common::certified_key(cert, key)?),
            _ => {
                let dir = args.state_dir.clone().unwrap_or_else(common::default_state_dir);
                Some(crate::serve::dev_pki(&dir.join("gateway"))?.identity)
            }
        };
        let mut common = CommonConfig {
            versions: vec![atls_core::TlsVersion::Dtls12],
            ..CommonConfig::default()
        };
        common.resumption = false;
        common.dtls.cookie_exchange = true;
        let transport = common::engine("openssl")?
            .server(&ServerConfig {
                common,
                identity,
                psks: common::psks(&args.coaps_psk)?,
                client_auth_roots: args
                    .coaps_client_ca
                    .as_deref()
                    .map(common::certificates)
                    .transpose()?,
                ..ServerConfig::default()
            })
            .context("configuring the coaps:// DTLS hop")?;
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding UDP {addr}"))?;
        coaps = Some(socket.local_addr()?);
        let g = gateway.clone();
        tasks.spawn(async move {
            atls_coap::dtls::serve(socket, transport, g, atls_coap::DtlsServerConfig::default())
                .await
                .context("CoAP over DTLS listener")
        });
    }
    // Let go of devices that went quiet even when no message arrives.
    let g = gateway.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let stats = g.stats(std::time::Instant::now());
            metrics::gauge!("atls_gateway_devices", "state" => "half_open").set(stats.half_open as f64);
            metrics::gauge!("atls_gateway_devices", "state" => "established").set(stats.established as f64);
            metrics::gauge!("atls_gateway_upstream_in_flight").set(stats.upstream_in_flight as f64);
        }
    });
    Ok(Running {
        coap,
        coap_tcp,
        coaps,
        gateway,
        tasks,
    })
}

/// Run `atls gateway` until interrupted.
pub(crate) fn run(args: &GatewayArgs) -> anyhow::Result<()> {
    crate::init_tracing();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut signals = crate::serve::Signals::new();
        let mut running = start(args).await?;
        let config = running.gateway.config();
        for route in &config.routes {
            println!(
                "route: SNI {} -> {}",
                route.name,
                atls_http::app::redact_url(route.upstream.as_str())
            );
        }
        if let Some(url) = &config.default_upstream {
            println!("default service: {}", atls_http::app::redact_url(url.as_str()));
        }
        if let Some(addr) = running.coap {
            println!("ATLS gateway on coap://{addr}");
        }
        if let Some(addr) = running.coap_tcp {
            println!("ATLS gateway on coap+tcp://{addr}");
        }
        if let Some(addr) = running.coaps {
            println!("ATLS gateway on coaps://{addr}");
        }
        if let Some(addr) = args.metrics {
            println!("metrics on http://{addr}/metrics");
        }
        let gateway = running.gateway.clone();
        tokio::select! {
            result = running.wait() => return result,
            name = signals.next() => {
                tracing::info!(signal = name, "stopping: new exchanges get 5.03; finishing those in progress");
            }
        }
        gateway.drain();
        let drained = async {
            let deadline = tokio::time::Instant::now() + args.shutdown_grace;
            // First the upstream requests and Block1 uploads in progress;
            // then a short while for devices to fetch the Block2 blocks of
            // their answers (an answer nobody fetches would hold the drain
            // for its whole lifetime).
            let mut settled: Option<tokio::time::Instant> = None;
            loop {
                let s = gateway.stats(std::time::Instant::now());
                let now = tokio::time::Instant::now();
                if s.upstream_in_flight == 0 && s.block1_transfers == 0 {
                    let since = *settled.get_or_insert(now);
                    if s.block2_bytes == 0 || now >= since + BLOCK2_LINGER {
                        return true;
                    }
                } else {
                    settled = None;
                }
                if now >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            drained = drained => {
                if drained {
                    tracing::info!("stopped");
                } else {
                    tracing::warn!(grace_secs = args.shutdown_grace.as_secs_f64(), "stopped with exchanges still in progress after the grace period");
                }
                Ok(())
            }
            name = signals.next() => crate::serve::force_exit(name),
        }
    })
}
