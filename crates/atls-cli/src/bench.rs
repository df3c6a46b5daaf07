//! `atls bench`: a load generator for `atls serve`, with a baseline measured
//! in the same run.
//!
//! K clients run operations one after another until a count or a duration
//! is reached: `request` (a request on an established session, each client
//! opening its session first) or `session` (a new session: a full
//! handshake, one request, close_notify). The same workload over plain
//! HTTP (`--baseline URL`, e.g. `atls serve --plain ADDR`, which serves the
//! same application without ATLS) runs right after, so that both share the
//! machine's state. With `--server-pid`, the server's CPU time per
//! operation comes from `/proc/PID/stat`, which leaves the load
//! generator's own share out.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use atls_core::{ClientConfig, CommonConfig};
use atls_http::{AtlsClient, ClientOptions, Mode};
use bytes::Bytes;

use crate::common;

/// Arguments of `atls bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// The `atls serve` to load: http://HOST:PORT (its built-in /echo by
    /// default, see --path).
    pub(crate) url: String,
    /// One operation: `request` (a request on an established session),
    /// `session` (a new session: full handshake, one request, close), or
    /// for memory, with --server-pid and --count: `hold` (open a session
    /// and keep it) or `half-open` (send a first flight and never continue);
    /// these report the growth of the server's resident memory per session.
    #[arg(long, default_value = "request", value_parser = ["request", "session", "hold", "half-open"])]
    pub(crate) workload: String,
    /// Protection of the requests.
    #[arg(long, default_value = "oscore")]
    pub(crate) mode: Mode,
    /// Concurrent clients.
    /// (At most 1,000: one open file each, and `atls serve` takes 100
    /// handshakes in progress per client address by default.)
    #[arg(short = 'c', long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) concurrency: u64,
    /// Seconds one operation may take; a slower one counts as an error.
    /// A client stops after 20 errors in a row.
    #[arg(long, default_value = "10", value_parser = common::positive_seconds)]
    pub(crate) timeout: Duration,
    /// Operations in all (instead of --duration).
    #[arg(short = 'n', long, conflicts_with = "duration")]
    pub(crate) count: Option<u64>,
    /// Seconds to run (default 5 when no --count).
    #[arg(short = 'd', long, value_parser = common::positive_seconds)]
    pub(crate) duration: Option<Duration>,
    /// The path requested (POSTed with --body-size bytes).
    #[arg(long, default_value = "/echo")]
    pub(crate) path: String,
    /// Bytes of each request body.
    #[arg(long, default_value_t = 64)]
    pub(crate) body_size: usize,
    /// The server's process ID: report its CPU time per operation.
    #[arg(long, value_name = "PID")]
    pub(crate) server_pid: Option<u32>,
    /// The same application without ATLS — over plain HTTP (`atls serve
    /// --plain ADDR`) or HTTPS with the same engine and certificate (`atls
    /// serve --plain-https ADDR`, trusted through --ca) — loaded with the
    /// same workload right after: the ratio of the two is printed.
    #[arg(long, value_name = "URL")]
    pub(crate) baseline: Option<String>,
    /// CA of the ATLS server certificate (default: a local `atls serve`'s
    /// development CA).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// TLS engine of the clients.
    #[arg(long, default_value = "openssl", value_parser = ["openssl", "rustls"])]
    pub(crate) engine: String,
    /// Only this TLS version (1.2 or 1.3).
    #[arg(long, value_name = "VERSION")]
    pub(crate) tls_version: Option<String>,
    /// Name the server certificate must carry (default: localhost).
    #[arg(long, default_value = "localhost")]
    pub(crate) server_name: String,
    /// Directory of a local `atls serve`'s development CA.
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Print one JSON object per measured target instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress bar (also when stderr is not a terminal).
    #[arg(long)]
    pub(crate) no_progress: bool,
}

/// What one measured target did.
#[derive(Debug)]
struct Outcome {
    target: String,
    ops: u64,
    errors: u64,
    /// Clients that warmed up and ran.
    clients: u64,
    elapsed: Duration,
    latency: hdrhistogram::Histogram<u64>,
    /// Server CPU time over the run, when its PID was given.
    server_cpu: Option<Duration>,
    first_error: Option<String>,
}

impl Outcome {
    /// Server CPU per attempted operation (failed ones spent CPU too).
    fn per_op_cpu(&self) -> Option<Duration> {
        let cpu = self.server_cpu?;
        let attempts = self.ops.saturating_add(self.errors);
        (attempts > 0).then(|| cpu / u32::try_from(attempts).unwrap_or(u32::MAX))
    }

    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn to_json(&self, workload: &str) -> serde_json::Value {
        let us = |q: f64| self.latency.value_at_quantile(q);
        serde_json::json!({
            "target": self.target,
            "workload": workload,
            "ops": self.ops,
            "errors": self.errors,
            "clients": self.clients,
            "server_cpu_ms": self.server_cpu.map(|d| d.as_secs_f64() * 1e3),
            "seconds": self.elapsed.as_secs_f64(),
            "ops_per_sec": self.ops_per_sec(),
            "latency_us": { "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "max": self.latency.max() },
            "server_cpu_us_per_op": self.per_op_cpu().map(|d| d.as_secs_f64() * 1e6),
            "first_error": self.first_error,
        })
    }
}

/// The server's CPU time (user + system) so far, from `/proc/PID/stat`.
/// Linux reports it in USER_HZ ticks, which the kernel fixes at 100 per
/// second for user space.
fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is --server-pid right?)"))?;
    cpu_of_stat(&stat)
}

/// User + system CPU time from the text of `/proc/PID/stat`.
fn cpu_of_stat(stat: &str) -> anyhow::Result<Duration> {
    // The command name (field 2) may hold spaces; the fields after its
    // closing parenthesis are plain numbers.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13
    // after the state (field 3), which is the first here.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("unexpected /proc stat format")
    };
    let total = ticks(11)?.saturating_add(ticks(12)?);
    Ok(Duration::from_millis(total.saturating_mul(10)))
}

/// The operations left to run: a count, or until a deadline (set when the
/// measurement starts, after every client's warm-up).
#[derive(Debug)]
struct Budget {
    remaining: Option<AtomicU64>,
    duration: Option<Duration>,
    deadline: std::sync::OnceLock<Instant>,
}

impl Budget {
    /// Take one operation, if any is left.
    fn take(&self) -> bool {
        if let (Some(d), Some(start)) = (self.duration, self.deadline.get()) {
            if Instant::now() >= *start + d {
                return false;
            }
        }
        match &self.remaining {
            None => true,
            Some(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// Per-client tallies, merged at the end.
#[derive(Debug)]
struct Tally {
    ops: u64,
    errors: u64,
    errors_in_a_row: u32,
    /// The client warmed up and ran.
    active: bool,
    latency: hdrhistogram::Histogram<u64>,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            ops: 0,
            errors: 0,
            errors_in_a_row: 0,
            active: false,
            // 1 µs to 60 s, 3 significant digits.
            latency: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("constant, valid histogram bounds"),
            first_error: None,
        }
    }

    fn record(&mut self, started: Instant, result: Result<(), String>, done: &AtomicU64) {
        match result {
            Ok(()) => {
                self.ops += 1;
                self.errors_in_a_row = 0;
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = self.latency.record(us.clamp(1, 60_000_000));
            }
            Err(e) => {
                self.errors += 1;
                self.errors_in_a_row = self.errors_in_a_row.saturating_add(1);
                self.first_error.get_or_insert(e);
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the clients run against.
#[derive(Clone)]
enum Target {
    Atls {
        base: String,
        endpoint: Arc<dyn atls_core::ClientEndpoint>,
        mode: Mode,
        server_name: String,
    },
    Plain {
        base: String,
        /// Trusted for an https:// baseline (the ATLS server's CA).
        roots: Arc<Vec<atls_core::Certificate>>,
    },
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Atls { mode, .. } => format!("atls {mode}"),
            Target::Plain { base, .. } if base.starts_with("https:") => "plain https".to_owned(),
            Target::Plain { .. } => "plain http".to_owned(),
        }
    }
}

/// One client's loop until the budget is spent.
/// `op` within `limit`; running out is an error like any other.
async fn timed<T>(
    limit: Duration,
    op: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, op)
        .await
        .unwrap_or_else(|_| Err("no answer within --timeout".to_owned()))
}

/// The plain-HTTP client of baselines and first flights (`fresh`: a new
/// connection for every request).
fn plain_client(fresh: bool, roots: &[atls_core::Certificate]) -> Result<reqwest::Client, String> {
    let transport = atls_http::TransportTls {
        roots: roots.to_vec(),
        ..atls_http::TransportTls::default()
    };
    let mut tls = atls_http::client::transport_tls_config(&transport).map_err(|e| e.to_string())?;
    // An HTTPS baseline is HTTP/1.1 as the ATLS clients' outer hop is, and
    // every new connection a full handshake as every new ATLS session is.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30));
    if fresh {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().map_err(|e| e.to_string())
}

/// Errors in a row after which a client gives up.
const MAX_ERRORS_IN_A_ROW: u32 = 20;

/// One client: warm up, wait for every other client at `ready`, then run
/// operations until the budget is spent. `active` counts the clients that
/// warmed up.
#[allow(clippy::too_many_arguments)]
async fn client_loop(
    target: Target,
    workload: Arc<str>,
    path: Arc<str>,
    body: Bytes,
    budget: Arc<Budget>,
    done: Arc<AtomicU64>,
    ready: Arc<tokio::sync::Barrier>,
    op_timeout: Duration,
) -> Tally {
    let mut tally = Tally::new();
    let session = &*workload == "session";
    // Every path through here waits at `ready` exactly once.
    let mut ready = Some(ready);
    let mut arrive = || {
        let barrier = ready.take();
        async move {
            if let Some(b) = barrier {
                b.wait().await;
            }
        }
    };
    match target {
        Target::Atls {
            base,
            endpoint,
            mode,
            server_name,
        } => {
            let options = ClientOptions {
                mode,
                server_name: Some(server_name),
                early_data: false,
                ..ClientOptions::default()
            };
            let client = match AtlsClient::new(&base, endpoint, options) {
                Ok(c) => c,
                Err(e) => {
                    tally.first_error = Some(e.to_string());
                    arrive().await;
                    return tally;
                }
            };
            let request = || {
                http::Request::post(&*path)
                    .header(http::header::HOST, "bench")
                    .body(body.clone())
                    .map_err(|e| e.to_string())
            };
            if !session {
                // The session is opened outside the measurement.
                let warm = async { client.send(request()?).await.map_err(|e| e.to_string()) };
                if let Err(e) = timed(op_timeout, warm).await {
                    tally.first_error = Some(format!("warm-up: {e}"));
                    arrive().await;
                    return tally;
                }
            }
            tally.active = true;
            arrive().await;
            while budget.take() && tally.errors_in_a_row < MAX_ERRORS_IN_A_ROW {
                let started = Instant::now();
                let result = async {
                    let response = client.send(request()?).await.map_err(|e| e.to_string())?;
                    if !response.status().is_success() {
                        return Err(format!("inner status {}", response.status()));
                    }
                    if session {
                        client.close().await;
                    }
                    Ok(())
                };
                let result = timed(op_timeout, result).await;
                if result.is_err() && session {
                    // A half-done session is not reused.
                    client.reset().await;
                }
                tally.record(started, result, &done);
            }
        }
        Target::Plain { base, roots } => {
            // A new connection per operation for `session`, as a new
            // session is.
            let client = match plain_client(session, &roots) {
                Ok(c) => c,
                Err(e) => {
                    tally.first_error = Some(e);
                    arrive().await;
                    return tally;
                }
            };
            let url = format!("{}{}", base.trim_end_matches('/'), path);
            if !session {
                let warm = async {
                    client
                        .post(&url)
                        .body(body.clone())
                        .send()
                        .await
                        .map_err(|e| e.to_string())
                };
                if let Err(e) = timed(op_timeout, warm).await {
                    tally.first_error = Some(format!("warm-up: {e}"));
                    arrive().await;
                    return tally;
                }
            }
            tally.active = true;
            arrive().await;
            while budget.take() && tally.errors_in_a_row < MAX_ERRORS_IN_A_ROW {
                let started = Instant::now();
                let result = async {
                    let response = client
                        .post(&url)
                        .body(body.clone())
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = response.status();
                    response.bytes().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("status {status}"));
                    }
                    Ok(())
                };
                let result = timed(op_timeout, result).await;
                tally.record(started, result, &done);
            }
        }
    }
    tally
}

/// Run the workload against one target and measure it.
async fn measure(args: &BenchArgs, target: Target, progress: bool) -> anyhow::Result<Outcome> {
    let duration = match (args.count, args.duration) {
        (Some(_), _) => None,
        (None, d) => Some(d.unwrap_or(Duration::from_secs(5))),
    };
    let budget = Arc::new(Budget {
        remaining: args.count.map(AtomicU64::new),
        duration,
        deadline: std::sync::OnceLock::new(),
    });
    let name = target.name();
    let bar = if progress {
        let bar = match (args.count, duration) {
            (Some(n), _) => indicatif::ProgressBar::new(n),
            (None, Some(d)) => indicatif::ProgressBar::new(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            (None, None) => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.clone());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let done = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(vec![b'x'; args.body_size]);
    let workload: Arc<str> = Arc::from(args.workload.as_str());
    let path: Arc<str> = Arc::from(args.path.as_str());
    let clients_n = usize::try_from(args.concurrency).unwrap_or(1);
    // Every client and this task: the measurement starts when all clients
    // have warmed up (opened their sessions).
    let ready = Arc::new(tokio::sync::Barrier::new(clients_n + 1));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..clients_n {
        clients.spawn(client_loop(
            target.clone(),
            workload.clone(),
            path.clone(),
            body.clone(),
            budget.clone(),
            done.clone(),
            ready.clone(),
            args.timeout,
        ));
    }
    bar.set_message("warming up");
    ready.wait().await;
    let cpu_before = args.server_pid.map(process_cpu).transpose()?;
    let started = Instant::now();
    let _ = budget.deadline.set(started);
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        let count = args.count.is_some();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = done.load(Ordering::Relaxed);
                if count {
                    bar.set_position(n);
                } else {
                    bar.set_position(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                }
                bar.set_message(format!("{n} ops"));
            }
        })
    };
    let mut total = Tally::new();
    let mut active = 0u64;
    while let Some(joined) = clients.join_next().await {
        let tally = joined.context("a client task failed")?;
        total.ops += tally.ops;
        total.errors += tally.errors;
        active += u64::from(tally.active);
        let _ = total.latency.add(&tally.latency);
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    let cpu_after = args.server_pid.map(process_cpu).transpose()?;
    Ok(Outcome {
        target: name,
        ops: total.ops,
        errors: total.errors,
        clients: active,
        elapsed,
        latency: total.latency,
        server_cpu: cpu_before.zip(cpu_after).map(|(a, b)| b.saturating_sub(a)),
        first_error: total.first_error,
    })
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn print_table(args: &BenchArgs, outcomes: &[Outcome]) {
    println!(
        "workload {} ({} clients, {} B bodies, {})",
        args.workload, args.concurrency, args.body_size, args.path
    );
    println!(
        "{:<12} {:>7} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>14}",
        "target", "clients", "ops", "errors", "ops/s", "p50", "p90", "p99", "max", "server CPU/op"
    );
    for o in outcomes {
        let q = |q: f64| micros(o.latency.value_at_quantile(q));
        println!(
            "{:<12} {:>7} {:>9} {:>7} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>14}",
            o.target,
            o.clients,
            o.ops,
            o.errors,
            o.ops_per_sec(),
            q(0.5),
            q(0.9),
            q(0.99),
            micros(o.latency.max()),
            o.per_op_cpu()
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1} µs", d.as_secs_f64() * 1e6)),
        );
        if let Some(e) = &o.first_error {
            println!("  first error: {e}");
        }
    }
    if let [atls, baseline] = outcomes {
        match (atls.per_op_cpu(), baseline.per_op_cpu()) {
            (Some(a), Some(b)) if !a.is_zero() => println!(
                "ratios: server CPU per op baseline/atls {:.2}; ops/s atls/baseline {:.2}",
                b.as_secs_f64() / a.as_secs_f64(),
                atls.ops_per_sec() / baseline.ops_per_sec().max(1e-9)
            ),
            _ => println!(
                "ratio: ops/s atls/baseline {:.2}",
                atls.ops_per_sec() / baseline.ops_per_sec().max(1e-9)
            ),
        }
    }
}

/// The server's resident memory, from `/proc/PID/status`.
fn process_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is --server-pid right?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
        .context("no VmRSS in /proc status")
}

/// `hold` and `half-open`: open `count` sessions (or first flights) from
/// `concurrency` tasks, keep them, and report the server's memory growth.
async fn memory(
    args: &BenchArgs,
    endpoint: Arc<dyn atls_core::ClientEndpoint>,
    pid: u32,
    count: u64,
) -> anyhow::Result<()> {
    let half_open = args.workload == "half-open";
    let before = process_rss(pid)?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (next, endpoint) = (next.clone(), endpoint.clone());
        let base = args.url.clone();
        let server_name = args.server_name.clone();
        let mode = args.mode;
        let timeout = args.timeout;
        let path = args.path.clone();
        tasks.spawn(async move {
            let mut kept = Vec::new();
            let mut failures = 0u64;
            let mut first_error = None;
            let plain = plain_client(false, &[])?;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let result = if half_open {
                    let opened = async {
                        let params = atls_core::ClientSessionParams {
                            server_name: Some(server_name.clone()),
                            ..atls_core::ClientSessionParams::default()
                        };
                        let mut session = atls_core::Session::client(endpoint.as_ref(), &params)
                            .map_err(|e| e.to_string())?;
                        let hello = session
                            .take_flight(Instant::now())
                            .map_err(|e| e.to_string())?
                            .ok_or("no first flight")?;
                        let response = plain
                            .post(format!("{}/.well-known/atls", base.trim_end_matches('/')))
                            .header(http::header::CONTENT_TYPE, atls_http::wire::CONTENT_TYPE_ATLS)
                            .body(hello)
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        if response.status() != http::StatusCode::OK {
                            return Err(format!("status {}", response.status()));
                        }
                        Ok::<_, String>(())
                    };
                    timed(timeout, opened).await
                } else {
                    // No kept-alive connection: the server then holds the
                    // session alone, not an HTTP connection beside it.
                    let options = ClientOptions {
                        mode,
                        server_name: Some(server_name.clone()),
                        no_connection_reuse: true,
                        ..ClientOptions::default()
                    };
                    let opened = async {
                        let client =
                            AtlsClient::new(&base, endpoint.clone(), options).map_err(|e| e.to_string())?;
                        let request = http::Request::post(path.as_str())
                            .header(http::header::HOST, "bench")
                            .body(Bytes::from_static(b"hold"))
                            .map_err(|e| e.to_string())?;
                        client.send(request).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>(client)
                    };
                    timed(timeout, opened).await.map(|client| kept.push(client))
                };
                if let Err(e) = result {
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
            Ok::<_, String>((kept, failures, first_error))
        });
    }
    let mut kept = Vec::new();
    let mut failures = 0u64;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a client task failed")? {
            Ok((k, f, e)) => {
                kept.extend(k);
                failures += f;
                if first_error.is_none() {
                    first_error = e;
                }
            }
            Err(e) => bail!("{e}"),
        }
    }
    // Let the server finish what it was doing before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = process_rss(pid)?;
    let opened = count.saturating_sub(failures);
    let growth = after.saturating_sub(before);
    let per = growth.checked_div(opened).unwrap_or(0);
    let what = if half_open {
        "half-open handshakes"
    } else {
        "established sessions"
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": args.workload,
                "mode": args.mode.to_string(),
                "opened": opened,
                "errors": failures,
                "rss_before": before,
                "rss_after": after,
                "bytes_per_session": per,
                "first_error": first_error,
            })
        );
    } else {
        println!(
            "{opened} {what} held: server resident memory {:.1} MiB -> {:.1} MiB, {:.1} KiB each",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            per as f64 / 1024.0
        );
    }
    drop(kept);
    if failures > 0 {
        bail!(
            "{failures} of {count} failed: {}",
            first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(())
}

/// Run `atls bench`; fails (exit 1) when no operation succeeded.
pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(&args.url).with_context(|| format!("{:?} is not a URL", args.url))?;
    if url.scheme() != "http" {
        bail!("atls bench loads an http:// ATLS server (CoAP to come)");
    }
    let ca = match &args.ca {
        Some(ca) => ca.clone(),
        None => args
            .state_dir
            .clone()
            .unwrap_or_else(common::default_state_dir)
            .join("ca.pem"),
    };
    let mut common = CommonConfig {
        versions: common::versions(args.tls_version.as_deref())?,
        ..CommonConfig::default()
    };
    // Every new session a full handshake.
    common.resumption = false;
    let config = ClientConfig {
        common,
        trust_anchors: common::certificates(&ca)?,
        ..ClientConfig::default()
    };
    let endpoint = common::engine(&args.engine)?
        .client(&config)
        .context("configuring the ATLS clients")?;
    let progress = !args.no_progress && !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let runtime = tokio::runtime::Runtime::new()?;
    if matches!(args.workload.as_str(), "hold" | "half-open") {
        let (Some(pid), Some(count)) = (args.server_pid, args.count) else {
            bail!("--workload {} needs --server-pid and --count", args.workload);
        };
        return runtime.block_on(memory(args, endpoint, pid, count));
    }
    let outcomes = runtime.block_on(async {
        let mut outcomes = vec![
            measure(
                args,
                Target::Atls {
                    base: args.url.clone(),
                    endpoint,
                    mode: args.mode,
                    server_name: args.server_name.clone(),
                },
                progress,
            )
            .await?,
        ];
        if let Some(baseline) = &args.baseline {
            outcomes.push(
                measure(
                    args,
                    Target::Plain {
                        base: baseline.clone(),
                        roots: Arc::new(config.trust_anchors.clone()),
                    },
                    progress,
                )
                .await?,
            );
        }
        Ok::<_, anyhow::Error>(outcomes)
    })?;
    if args.json {
        for o in &outcomes {
            println!("{}", o.to_json(&args.workload));
        }
    } else {
        print_table(args, &outcomes);
    }
    for o in &outcomes {
        if o.server_cpu.is_some_and(|c| c < Duration::from_secs(1)) {
            eprintln!(
                "atls: warning: {}: the server used {:.0} ms of CPU, in 10 ms ticks: run longer for a CPU figure to trust",
                o.target,
                o.server_cpu.unwrap_or_default().as_secs_f64() * 1e3
            );
        }
        if o.clients < args.concurrency {
            eprintln!(
                "atls: warning: {}: only {} of {} clients warmed up",
                o.target, o.clients, args.concurrency
            );
        }
    }
    if let Some(failed) = outcomes.iter().find(|o| o.ops == 0) {
        bail!(
            "no operation succeeded against {}: {}",
            failed.target,
            failed.first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    // Figures with errors in them are not figures: say so in the status.
    if let Some(failed) = outcomes.iter().find(|o| o.errors > 0) {
        bail!(
            "{} of {} operations against {} failed: {}",
            failed.errors,
            failed.errors + failed.ops,
            failed.target,
            failed.first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 3 0";
        assert_eq!(cpu_of_stat(stat).expect("parsed"), Duration::from_millis(2_900));
        assert!(cpu_of_stat("4242 (x) S 1").is_err());
    }
}
