//! Options shared by `serve` and `request`: engines, versions, PEM files,
//! the state directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use atls_core::{Certificate, CertifiedKey, Engine, PrivateKey, Psk, TlsVersion};
use atls_openssl::OpenSslEngine;
use atls_rustls::RustlsEngine;

/// The engine called `name`.
pub(crate) fn engine(name: &str) -> anyhow::Result<&'static dyn Engine> {
    match name {
        "openssl" => Ok(&OpenSslEngine),
        "rustls" => Ok(&RustlsEngine),
        other => bail!("unknown engine {other:?} (openssl, rustls)"),
    }
}

/// The versions `--tls-version` selects (both when absent).
pub(crate) fn versions(version: Option<&str>) -> anyhow::Result<Vec<TlsVersion>> {
    Ok(match version {
        None => vec![TlsVersion::Tls13, TlsVersion::Tls12],
        Some("1.3") => vec![TlsVersion::Tls13],
        Some("1.2") => vec![TlsVersion::Tls12],
        Some("dtls1.2") => vec![TlsVersion::Dtls12],
        Some(other) => bail!("unknown TLS version {other:?} (1.2, 1.3, dtls1.2)"),
    })
}

pub(crate) fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub(crate) fn certificates(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    Certificate::all_from_pem(&read(path)?).with_context(|| format!("certificates in {}", path.display()))
}

pub(crate) fn certified_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    Ok(CertifiedKey {
        chain: certificates(cert)?,
        key: PrivateKey::from_pem(&read(key)?)
            .with_context(|| format!("private key in {}", key.display()))?,
    })
}

pub(crate) fn psks(specs: &[String]) -> anyhow::Result<Vec<Psk>> {
    specs
        .iter()
        .map(|s| Psk::parse(s).context("--psk expects IDENTITY:HEXKEY"))
        .collect()
}

/// The default state directory: `$XDG_DATA_HOME/atls`, else `~/.local/share/atls`.
/// A listener address: `HOST:PORT` with a name (`localhost:8080`) or an
/// address (`127.0.0.1:8080`, `[::1]:8080`); a name takes its first address.
pub(crate) fn listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("{text:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{text:?} names no address"))
}

/// Seconds, as a duration: a finite number, 0 or more (`1`, `0.25`).
/// Bounded by a year, so that deadlines computed from it cannot overflow.
pub(crate) fn seconds(text: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?}: seconds must be a finite number, 0 or more"));
    }
    if secs > 365.0 * 24.0 * 3600.0 {
        return Err(format!("{text:?}: more than a year"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Seconds, more than 0.
pub(crate) fn positive_seconds(text: &str) -> Result<std::time::Duration, String> {
    let d = seconds(text)?;
    if d.is_zero() {
        return Err(format!("{text:?}: must be more than 0 seconds"));
    }
    Ok(d)
}

/// An upstream URL: `http://` or `https://` with a host. Messages show it
/// with any password redacted.
pub(crate) fn http_url(raw: &str) -> Result<String, String> {
    let shown = atls_http::app::redact_url(raw);
    let text = shown.as_str();
    match reqwest::Url::parse(raw) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => Ok(raw.to_owned()),
        Ok(url) if url.host_str().is_none() || !raw.contains("://") => Err(format!(
            "{text:?} is not a URL: give the scheme too, e.g. http://{text}"
        )),
        Ok(url) => Err(format!(
            "{text:?}: the scheme {} is not http or https",
            url.scheme()
        )),
        Err(_) => Err(format!(
            "{text:?} is not a URL: give the scheme too, e.g. http://{text}"
        )),
    }
}

/// clap's value parser for URLs that may carry a password: its errors show
/// the value redacted, where clap's own message would repeat it whole.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HttpUrlParser;

impl clap::builder::TypedValueParser for HttpUrlParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let name = arg
            .and_then(clap::Arg::get_long)
            .map_or_else(String::new, |l| format!("--{l}: "));
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("{name}the URL is not UTF-8\n"),
            )
            .with_cmd(cmd)
        })?;
        http_url(text).map_err(|e| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{name}{e}\n")).with_cmd(cmd)
        })
    }
}

/// Create `dir` (and its parents) readable by the owner only (0700), as
/// docs/SECURITY.md asks of the state directory.
pub(crate) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    // A directory that is already there (e.g. /tmp) keeps its mode: only
    // one this call creates is restricted.
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    }
    Ok(())
}

/// A configuration error with the file it comes from named: a key that
/// does not belong to its certificate says which two files.
pub(crate) fn explain(
    e: atls_core::Error,
    what: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Error {
    let text = e.to_string();
    let mismatch = text.contains("key values mismatch") || text.contains("KeyMismatch");
    match (mismatch, cert, key) {
        (true, Some(cert), Some(key)) => anyhow::anyhow!(
            "{what}: the private key in {} does not belong to the certificate in {}",
            key.display(),
            cert.display()
        ),
        _ => anyhow::Error::new(e).context(what.to_owned()),
    }
}

pub(crate) fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("atls");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/atls"),
        None => std::env::temp_dir().join("atls"),
    }
}

/// Write `contents` readable by the owner only (a private key).
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))
}
