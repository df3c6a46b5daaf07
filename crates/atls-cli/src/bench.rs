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
    /// One operation: `request` (a request on an established session) or
    /// `session` (a new session: full handshake, one request, close).
    #[arg(long, default_value = "request", value_parser = ["request", "session"])]
    pub(crate) workload: String,
    /// Protection of the requests.
    #[arg(long, default_value = "oscore")]
    pub(crate) mode: Mode,
    /// Concurrent clients.
    #[arg(short = 'c', long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) concurrency: u64,
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
    /// The same application over plain HTTP (e.g. `atls serve --plain
    /// ADDR`), loaded with the same workload right after: the ratio of the
    /// two is printed.
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
    elapsed: Duration,
    latency: hdrhistogram::Histogram<u64>,
    /// Server CPU time over the run, when its PID was given.
    server_cpu: Option<Duration>,
    first_error: Option<String>,
}

impl Outcome {
    fn per_op_cpu(&self) -> Option<Duration> {
        let cpu = self.server_cpu?;
        (self.ops > 0).then(|| cpu / u32::try_from(self.ops).unwrap_or(u32::MAX))
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

/// The operations left to run: a count, or until a deadline.
#[derive(Debug)]
struct Budget {
    remaining: Option<AtomicU64>,
    deadline: Option<Instant>,
}

impl Budget {
    /// Take one operation, if any is left.
    fn take(&self) -> bool {
        if let Some(deadline) = self.deadline {
            if Instant::now() >= deadline {
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
    latency: hdrhistogram::Histogram<u64>,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            ops: 0,
            errors: 0,
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
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = self.latency.record(us.clamp(1, 60_000_000));
            }
            Err(e) => {
                self.errors += 1;
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
    },
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Atls { mode, .. } => format!("atls {mode}"),
            Target::Plain { .. } => "plain http".to_owned(),
        }
    }
}

/// One client's loop until the budget is spent.
async fn client_loop(
    target: Target,
    workload: Arc<str>,
    path: Arc<str>,
    body: Bytes,
    budget: Arc<Budget>,
    done: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::new();
    let session = &*workload == "session";
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
                    tally.errors += 1;
                    tally.first_error = Some(e.to_string());
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
                if let Err(e) = async { client.send(request()?).await.map_err(|e| e.to_string()) }.await {
                    tally.errors += 1;
                    tally.first_error = Some(e);
                    return tally;
                }
            }
            while budget.take() {
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
                }
                .await;
                tally.record(started, result, &done);
            }
        }
        Target::Plain { base } => {
            let tls = match atls_http::client::transport_tls_config(&atls_http::TransportTls::default()) {
                Ok(tls) => tls,
                Err(e) => {
                    tally.errors += 1;
                    tally.first_error = Some(e.to_string());
                    return tally;
                }
            };
            let mut builder = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(Duration::from_secs(30));
            if session {
                // A new connection per operation, as a new session is.
                builder = builder.pool_max_idle_per_host(0);
            }
            let client = match builder.build() {
                Ok(c) => c,
                Err(e) => {
                    tally.errors += 1;
                    tally.first_error = Some(e.to_string());
                    return tally;
                }
            };
            let url = format!("{}{}", base.trim_end_matches('/'), path);
            if !session {
                let _ = client.post(&url).body(body.clone()).send().await;
            }
            while budget.take() {
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
                }
                .await;
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
        deadline: None,
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
    let cpu_before = args.server_pid.map(process_cpu).transpose()?;
    let started = Instant::now();
    let budget = match duration {
        Some(d) => Arc::new(Budget {
            remaining: None,
            deadline: Some(started + d),
        }),
        None => budget,
    };
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        clients.spawn(client_loop(
            target.clone(),
            workload.clone(),
            path.clone(),
            body.clone(),
            budget.clone(),
            done.clone(),
        ));
    }
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
    while let Some(joined) = clients.join_next().await {
        let tally = joined.context("a client task failed")?;
        total.ops += tally.ops;
        total.errors += tally.errors;
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
        "{:<12} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>14}",
        "target", "ops", "errors", "ops/s", "p50", "p90", "p99", "max", "server CPU/op"
    );
    for o in outcomes {
        let q = |q: f64| micros(o.latency.value_at_quantile(q));
        println!(
            "{:<12} {:>9} {:>7} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>14}",
            o.target,
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
    if let Some(failed) = outcomes.iter().find(|o| o.ops == 0) {
        bail!(
            "no operation succeeded against {}: {}",
            failed.target,
            failed.first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(())
}
