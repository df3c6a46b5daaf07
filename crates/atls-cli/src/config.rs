//! `--config FILE` for `atls serve` and `atls gateway`: a TOML file with one
//! `flag-name = value` entry per option (a string, a number, a boolean for
//! a flag, or an array for a repeatable option).
//!
//! Precedence, highest first: the command line, the environment
//! (`ATLS_SERVE_<FLAG>`, `ATLS_GATEWAY_<FLAG>`), the file, the defaults. The
//! file's entries become command-line options placed before the user's, for
//! options that neither the command line nor the environment set; clap then
//! parses and checks them as it checks everything else.

use std::ffi::OsString;

/// The commands that read a configuration file, and their environment
/// prefixes.
const COMMANDS: &[(&str, &str)] = &[("serve", "ATLS_SERVE_"), ("gateway", "ATLS_GATEWAY_")];

/// The command line with the configuration file's entries in it.
#[derive(Debug, Default)]
pub(crate) struct Expanded {
    /// The arguments clap parses.
    pub(crate) argv: Vec<OsString>,
    /// The file the entries came from, if any.
    pub(crate) file: Option<String>,
    /// The long names of the options the file set.
    pub(crate) from_file: Vec<String>,
}

impl Expanded {
    /// Whether clap's `error` is about an option the file set: then the
    /// message should name the file.
    pub(crate) fn blames_file(&self, error: &clap::Error) -> Option<String> {
        let file = self.file.as_ref()?;
        let arg = match error.get(clap::error::ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(arg)) => arg.clone(),
            _ => return None,
        };
        let key = arg.strip_prefix("--")?.split([' ', '=']).next()?.to_owned();
        self.from_file
            .contains(&key)
            .then(|| format!("`{key}` comes from the configuration file {file}"))
    }
}

/// `argv` with the entries of the configuration file (if one is named)
/// inserted after the subcommand, each as one `--flag=value` argument.
pub(crate) fn expand(argv: Vec<OsString>, command: &clap::Command) -> Result<Expanded, String> {
    let unchanged = |argv| {
        Ok(Expanded {
            argv,
            ..Expanded::default()
        })
    };
    let text: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    // The subcommand is the first argument that is no option (nor the
    // value of the global --log-format).
    let mut at = None;
    let mut i = 1;
    while let Some(a) = text.get(i) {
        if a == "--log-format" {
            i = i.saturating_add(2);
            continue;
        }
        if !a.starts_with('-') {
            at = Some(i);
            break;
        }
        i = i.saturating_add(1);
    }
    let Some((at, name, prefix)) = at.and_then(|i| {
        let a = text.get(i)?;
        COMMANDS.iter().find(|(c, _)| c == a).map(|(c, p)| (i, *c, *p))
    }) else {
        return unchanged(argv);
    };
    if text.iter().skip(at).any(|a| a == "--help" || a == "-h") {
        return unchanged(argv);
    }
    let user = text.get(at.saturating_add(1)..).unwrap_or_default();
    let named = user
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| user.get(i.saturating_add(1)).cloned())
        .or_else(|| {
            user.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_owned))
        })
        .or_else(|| std::env::var(format!("{prefix}CONFIG")).ok());
    let Some(path) = named else {
        return unchanged(argv);
    };
    let content = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let table: toml::Table = content.parse().map_err(|e| format!("{path}: {e}"))?;
    let Some(sub) = command.find_subcommand(name) else {
        return unchanged(argv);
    };
    // The subcommand's options and the global ones (--log-format).
    let known: Vec<(String, bool)> = sub
        .get_arguments()
        .chain(command.get_arguments().filter(|a| a.is_global_set()))
        .filter_map(|a| {
            let repeatable = matches!(a.get_action(), clap::ArgAction::Append);
            a.get_long().map(|l| (l.to_owned(), repeatable))
        })
        .collect();
    let mut tokens: Vec<OsString> = Vec::new();
    let mut from_file = Vec::new();
    for (key, value) in &table {
        let Some((_, repeatable)) = known.iter().find(|(k, _)| k == key).filter(|_| key != "config") else {
            return Err(format!("{path}: `{key}` is not an option of atls {name}"));
        };
        let flag = format!("--{key}");
        let given = user
            .iter()
            .chain(text.get(1..at).unwrap_or_default())
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        let env = if key == "log-format" {
            "ATLS_LOG_FORMAT".to_owned()
        } else {
            format!("{prefix}{}", key.to_ascii_uppercase().replace('-', "_"))
        };
        if given || std::env::var_os(&env).is_some() {
            continue;
        }
        from_file.push(key.clone());
        let scalar = |v: &toml::Value| -> Result<Option<String>, String> {
            match v {
                toml::Value::String(s) => Ok(Some(s.clone())),
                toml::Value::Integer(n) => Ok(Some(n.to_string())),
                toml::Value::Float(f) => Ok(Some(f.to_string())),
                toml::Value::Boolean(_) => Ok(None),
                _ => Err(format!(
                    "{path}: `{key}` must be a string, a number, a boolean or an array of them"
                )),
            }
        };
        // One `--flag=value` argument each: a value that starts with `-`
        // stays a value.
        match value {
            toml::Value::Boolean(true) => tokens.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(_) if !repeatable => {
                return Err(format!("{path}: `{key}` takes one value, not an array"));
            }
            toml::Value::Array(items) => {
                for item in items {
                    let Some(v) = scalar(item)? else {
                        return Err(format!("{path}: `{key}` holds a boolean in its array"));
                    };
                    tokens.push(format!("{flag}={v}").into());
                }
            }
            other => {
                if let Some(v) = scalar(other)? {
                    tokens.push(format!("{flag}={v}").into());
                }
            }
        }
    }
    let mut out = argv;
    let tail = out.split_off(at.saturating_add(1));
    out.extend(tokens);
    out.extend(tail);
    Ok(Expanded {
        argv: out,
        file: Some(path),
        from_file,
    })
}
