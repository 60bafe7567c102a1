//! How one value of the config file is checked: integers in a range, durations, byte sizes,
//! addresses, users and groups, and how a failure becomes a [`ConfigError`] naming the file,
//! line and key. Every message about a single value is built here. Nothing here binds,
//! opens or creates anything; [`Validator::credentials`] only reads the user database.

use super::{Address, ConfigError, Credentials};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// Longest duration accepted anywhere, so that deadlines computed from them cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The units a byte size may carry (ASCII case ignored): decimal ones are powers of 1000,
/// binary ones powers of 1024, as their names say.
const SIZE_UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KB", 1_000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("TB", 1_000_000_000_000),
    ("TiB", 1 << 40),
];

/// What a byte size may look like, for messages.
const SIZE_FORMS: &str = "write a number of bytes (65536) or a string with a unit: \"512B\", \
                          \"64KiB\" (65536), \"64KB\" (64000), \"1MiB\", \"1MB\", \"1GiB\", \
                          \"1GB\"";

/// A TOML error (bad syntax, an unknown key, a wrong type) with its line and the table it
/// is in.
pub(super) fn syntax_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map_or(1, |s| line_of(text, s.start));
    let mut message = e.message().trim().to_owned();
    if let Some(table) = table_at(text, line) {
        message = format!("{message} (in {table})");
    }
    ConfigError::Syntax {
        path: path.to_owned(),
        line,
        message,
    }
}

/// Checks the values of one file, and names its path and the line of a bad value.
pub(super) struct Validator<'a> {
    pub text: &'a str,
    pub path: &'a Path,
}

impl Validator<'_> {
    /// `key`, whose value is `at`, is not acceptable.
    pub fn invalid<T>(&self, at: &Spanned<T>, key: &str, message: &str) -> ConfigError {
        self.invalid_at(line_of(self.text, at.span().start), key, message)
    }

    /// `key` is not acceptable; what makes it so is on `line`.
    pub fn invalid_at(&self, line: usize, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    /// The line `at` starts on.
    pub fn line<T>(&self, at: &Spanned<T>) -> usize {
        line_of(self.text, at.span().start)
    }

    /// A string that must not be empty (a path, a file name), if given.
    pub fn non_empty<'v>(
        &self,
        value: &'v Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<&'v str>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v) if v.get_ref().is_empty() => Err(self.invalid(v, key, "must not be empty")),
            Some(v) => Ok(Some(v.get_ref())),
        }
    }

    /// One of the words in `choices`, as what it stands for; the first when absent.
    /// `hint` follows the word in the message for any other ("write ... or ...").
    pub fn choice<T: Copy>(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        choices: &[(&str, T)],
        hint: &str,
    ) -> Result<T, ConfigError> {
        let Some(v) = value else {
            return Ok(choices[0].1);
        };
        let word = v.get_ref().as_str();
        match choices.iter().find(|(w, _)| *w == word) {
            Some(&(_, meaning)) => Ok(meaning),
            None => Err(self.invalid(v, key, &format!("{word:?}: {hint}"))),
        }
    }

    /// An integer in `range`; `default` when absent.
    pub fn int(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: usize,
        range: RangeInclusive<i64>,
    ) -> Result<usize, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = *value.get_ref();
        if !range.contains(&n) {
            return Err(self.invalid(
                value,
                key,
                &format!("{n} is out of range ({} to {})", range.start(), range.end()),
            ));
        }
        Ok(n as usize)
    }

    /// A duration longer than zero and at most [`MAX_DURATION`]; `default` (written the
    /// same way) when absent.
    pub fn duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(humantime::parse_duration(default).expect("defaults parse"));
        };
        let d = humantime::parse_duration(value.get_ref()).map_err(|e| {
            self.invalid(
                value,
                key,
                &format!(
                    "{:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2m\"",
                    value.get_ref()
                ),
            )
        })?;
        if d.is_zero() {
            return Err(self.invalid(value, key, "must be longer than zero"));
        }
        if d > MAX_DURATION {
            return Err(self.invalid(value, key, "must be at most 7 days"));
        }
        Ok(d)
    }

    /// A duration of at most [`MAX_DURATION`], where zero (`"0s"`) turns a feature off:
    /// `None` then; `default` (written the same way) when absent.
    pub fn duration_or_off(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        let d = match value {
            None => humantime::parse_duration(default).expect("defaults parse"),
            Some(value) => {
                let d = humantime::parse_duration(value.get_ref()).map_err(|e| {
                    self.invalid(
                        value,
                        key,
                        &format!(
                            "{:?} is not a duration ({e}); write e.g. \"0s\" (off), \"30s\", \"2m\"",
                            value.get_ref()
                        ),
                    )
                })?;
                if d > MAX_DURATION {
                    return Err(self.invalid(value, key, "must be at most 7 days"));
                }
                d
            }
        };
        Ok((!d.is_zero()).then_some(d))
    }

    /// A number (integer or decimal) in `range`; `default` when absent.
    pub fn number(
        &self,
        value: &Option<Spanned<toml::Value>>,
        key: &str,
        default: f64,
        range: RangeInclusive<f64>,
    ) -> Result<f64, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = match value.get_ref() {
            toml::Value::Float(f) => *f,
            toml::Value::Integer(i) => *i as f64,
            other => {
                return Err(self.invalid(
                    value,
                    key,
                    &format!("expected a number, found a {}", other.type_str()),
                ));
            }
        };
        if !range.contains(&n) {
            return Err(self.invalid(
                value,
                key,
                &format!("{n} is out of range ({} to {})", range.start(), range.end()),
            ));
        }
        Ok(n)
    }

    /// A byte size in `range`: a TOML integer, or a string [`parse_size`] reads; `default`
    /// when absent.
    pub fn bytes(
        &self,
        value: &Option<Spanned<toml::Value>>,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let (n, written) = match value.get_ref() {
            toml::Value::Integer(n) => (Some(i128::from(*n)), n.to_string()),
            toml::Value::String(s) => (parse_size(s).map(i128::from), format!("{s:?}")),
            other => {
                return Err(self.invalid(
                    value,
                    key,
                    &format!(
                        "expected an integer or a string, found a {}; {SIZE_FORMS}",
                        other.type_str()
                    ),
                ));
            }
        };
        let Some(n) = n else {
            return Err(self.invalid(
                value,
                key,
                &format!("{written} is not a size; {SIZE_FORMS}"),
            ));
        };
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => {
                let bytes = if written == n.to_string() {
                    String::new()
                } else {
                    format!(" ({n} bytes)")
                };
                Err(self.invalid(
                    value,
                    key,
                    &format!(
                        "{written}{bytes} is out of range ({} to {} bytes)",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        }
    }

    /// A listening address, `IP:PORT` or `unix:PATH` (relative to `base`).
    pub fn address(
        &self,
        value: &Spanned<String>,
        key: &str,
        base: &Path,
    ) -> Result<Address, ConfigError> {
        let s = value.get_ref();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(self.invalid(
                    value,
                    key,
                    "unix: needs a path, as in \"unix:/run/baton/http.sock\"",
                ));
            }
            let path = base.join(path);
            if path.as_os_str().len() > 100 {
                return Err(self.invalid(
                    value,
                    key,
                    &format!("{} is too long for a Unix socket path", path.display()),
                ));
            }
            return Ok(Address::Unix(path));
        }
        s.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| {
            self.invalid(
                value,
                key,
                &format!(
                    "{s:?} is not an address: expected IP:PORT (\"127.0.0.1:8080\", \"[::]:8080\") or unix:PATH"
                ),
            )
        })
    }

    /// `worker.user` and `worker.group`, looked up (a read of the user database, nothing
    /// else).
    pub fn credentials(
        &self,
        user: &Option<Spanned<String>>,
        group: &Option<Spanned<String>>,
    ) -> Result<Option<Credentials>, ConfigError> {
        let Some(user) = user else {
            if let Some(group) = group {
                return Err(self.invalid(group, "worker.group", "needs worker.user"));
            }
            return Ok(None);
        };
        let found = nix::unistd::User::from_name(user.get_ref())
            .map_err(|e| self.invalid(user, "worker.user", &format!("cannot look it up: {e}")))?
            .ok_or_else(|| {
                self.invalid(
                    user,
                    "worker.user",
                    &format!("no user {:?}", user.get_ref()),
                )
            })?;
        let gid = match group {
            None => found.gid.as_raw(),
            Some(group) => nix::unistd::Group::from_name(group.get_ref())
                .map_err(|e| {
                    self.invalid(group, "worker.group", &format!("cannot look it up: {e}"))
                })?
                .ok_or_else(|| {
                    self.invalid(
                        group,
                        "worker.group",
                        &format!("no group {:?}", group.get_ref()),
                    )
                })?
                .gid
                .as_raw(),
        };
        if found.uid.is_root() {
            return Err(self.invalid(
                user,
                "worker.user",
                "must not be root (leave it out to run workers as the supervisor's user)",
            ));
        }
        Ok(Some(Credentials {
            user: user.get_ref().clone(),
            uid: found.uid.as_raw(),
            gid,
        }))
    }
}

/// A byte size written as a string: digits, then optional spaces and a unit of
/// [`SIZE_UNITS`] (none: bytes).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number: u64 = s[..digits].parse().ok()?;
    let unit = s[digits..].trim_start();
    let scale = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))?
            .1
    };
    number.checked_mul(scale)
}

/// The `[table]` header that line `line` falls under, if any.
fn table_at(text: &str, line: usize) -> Option<&str> {
    text.lines()
        .take(line)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last()
        .map(|l| l.split('#').next().unwrap_or(l).trim())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `d` in whole milliseconds, as workers are told it.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
