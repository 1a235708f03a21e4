//! Exec query parameters (§3.1): repeated `cmd`/`env`, Go durations, and the
//! defaults that differ between TTY and non-TTY commands.

use std::collections::BTreeMap;
use std::time::Duration;

use den_agent::protocol::ExecRequest;

use crate::error::ApiError;

/// The parsed query of an exec request.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ExecParams {
    pub cmd: Vec<String>,
    pub path: Option<String>,
    /// `None` when no `env` was given (the default environment applies).
    pub env: Option<BTreeMap<String, String>>,
    pub dir: Option<String>,
    pub tty: bool,
    pub stdin: bool,
    pub cols: u16,
    pub rows: u16,
    pub max_run_after_disconnect: Option<Duration>,
    /// den extension: hard limit on the run time.
    pub timeout: Option<Duration>,
    /// Legacy attach (`?id=`).
    pub id: Option<String>,
    /// Whether a legacy flag that HTTP exec refuses was given.
    pub detachable: bool,
    pub cc: bool,
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ApiError> {
    match v.to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ApiError::bad_request(format!("{key}={v:?} is not a boolean"))),
    }
}

fn parse_u16(key: &str, v: &str) -> Result<u16, ApiError> {
    v.trim()
        .parse::<u16>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::bad_request(format!("{key}={v:?} must be a number from 1 to 65535")))
}

/// A Go `time.Duration` string: `10s`, `1m30s`, `5.0s`, `250ms`, `0`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." {
            return None;
        }
        let n: f64 = num.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = next;
    }
    // Bounded so the conversion cannot panic (and nobody means centuries).
    (total.is_finite() && total <= 100.0 * 365.0 * 86400.0).then(|| Duration::from_secs_f64(total))
}

fn duration(key: &str, v: &str) -> Result<Duration, ApiError> {
    parse_go_duration(v)
        .ok_or_else(|| ApiError::bad_request(format!("{key}={v:?} is not a duration (like 10s or 1m30s)")))
}

impl ExecParams {
    /// From the raw query pairs; unknown keys are ignored (clients send
    /// things like `args` and `session_id`).
    pub fn parse(pairs: &[(String, String)]) -> Result<ExecParams, ApiError> {
        let mut p = ExecParams {
            cols: 80,
            rows: 24,
            ..Default::default()
        };
        let mut stdin = None;
        for (k, v) in pairs {
            match k.as_str() {
                "cmd" | "cmd[]" => p.cmd.push(v.clone()),
                "path" if !v.is_empty() => p.path = Some(v.clone()),
                "env" | "env[]" => {
                    let Some((key, val)) = v.split_once('=') else {
                        return Err(ApiError::bad_request(format!("env {v:?} must be KEY=VALUE")));
                    };
                    if key.is_empty() || key.contains('\0') || val.contains('\0') {
                        return Err(ApiError::bad_request(format!("env {v:?} must be KEY=VALUE")));
                    }
                    p.env
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key.into(), val.into());
                }
                "dir" if !v.is_empty() => p.dir = Some(v.clone()),
                // The Rust SDK says `cwd`; `dir` (the reference's name) wins.
                "cwd" if !v.is_empty() => {
                    p.dir.get_or_insert_with(|| v.clone());
                }
                "tty" => p.tty = parse_bool(k, v)?,
                "stdin" => stdin = Some(parse_bool(k, v)?),
                "cols" => p.cols = parse_u16(k, v)?,
                "rows" => p.rows = parse_u16(k, v)?,
                "max_run_after_disconnect" if !v.is_empty() => {
                    p.max_run_after_disconnect = Some(duration(k, v)?)
                }
                "timeout" if !v.is_empty() => {
                    let t = duration(k, v)?;
                    if t.is_zero() {
                        return Err(ApiError::bad_request("timeout must be more than 0"));
                    }
                    p.timeout = Some(t);
                }
                "id" if !v.is_empty() => p.id = Some(v.clone()),
                "detachable" => p.detachable = parse_bool(k, v)?,
                "cc" => p.cc = parse_bool(k, v)?,
                _ => {}
            }
        }
        // TTY sessions read the terminal unless told not to; pipes only on request.
        p.stdin = stdin.unwrap_or(p.tty);
        Ok(p)
    }

    /// The agent request for a new command. `sprite_env` is the sprite's
    /// `environment` attribute, added to the default environment only.
    pub fn to_exec_request(
        &self,
        sprite_env: BTreeMap<String, String>,
        default_timeout: Option<Duration>,
    ) -> Result<ExecRequest, ApiError> {
        if self.cmd.is_empty() {
            return Err(ApiError::bad_request("No command specified"));
        }
        let mut argv = self.cmd.clone();
        if let Some(path) = &self.path {
            argv[0] = path.clone();
        }
        if argv[0].is_empty() {
            return Err(ApiError::bad_request("No command specified"));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(ApiError::bad_request("cmd must not contain NUL bytes"));
        }
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok(ExecRequest {
            argv,
            extra_env: if self.env.is_none() {
                sprite_env
            } else {
                BTreeMap::new()
            },
            env: self.env.clone(),
            cwd: Some(self.dir.clone().unwrap_or_else(|| "/home/sprite".into())),
            tty: self.tty,
            stdin: self.stdin,
            cols: Some(self.cols),
            rows: Some(self.rows),
            max_run_after_disconnect_ms: self.max_run_after_disconnect.map(millis),
            timeout_ms: self.timeout.or(default_timeout).map(millis),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("5.0s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "10", "s", "1x", "-1s", "1e9h", "."] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_and_repeats() {
        let p = ExecParams::parse(&q(&[
            ("cmd", "sh"),
            ("cmd[]", "-c"),
            ("cmd", "echo"),
            ("env", "A=1=2"),
            ("detachable", "true"),
            ("args", "x"),
        ]))
        .unwrap();
        assert_eq!(p.cmd, ["sh", "-c", "echo"]);
        assert_eq!(p.env.as_ref().unwrap()["A"], "1=2");
        assert!(!p.stdin && !p.tty && (p.cols, p.rows) == (80, 24));
        let r = p
            .to_exec_request([("X".into(), "y".into())].into(), None)
            .unwrap();
        assert!(r.extra_env.is_empty(), "env replaces the sprite environment too");
        assert_eq!(r.cwd.as_deref(), Some("/home/sprite"));
        let tty = ExecParams::parse(&q(&[("cmd", "sh"), ("tty", "true")])).unwrap();
        assert!(tty.stdin);
        let r = tty
            .to_exec_request([("X".into(), "y".into())].into(), Some(Duration::from_secs(3)))
            .unwrap();
        assert_eq!(r.extra_env["X"], "y");
        assert_eq!(r.timeout_ms, Some(3000));
        assert!(ExecParams::parse(&q(&[("tty", "maybe")])).is_err());
        assert!(ExecParams::parse(&q(&[("env", "NOEQUALS")])).is_err());
        assert!(ExecParams::parse(&q(&[("rows", "0")])).is_err());
        let dir = |pairs: &[(&str, &str)]| ExecParams::parse(&q(pairs)).unwrap().dir;
        assert_eq!(dir(&[("cwd", "/a")]).as_deref(), Some("/a"));
        assert_eq!(dir(&[("cwd", "/a"), ("dir", "/b")]).as_deref(), Some("/b"));
        assert_eq!(dir(&[("dir", "/b"), ("cwd", "/a")]).as_deref(), Some("/b"));
        let none = ExecParams::parse(&q(&[])).unwrap();
        assert_eq!(
            none.to_exec_request(BTreeMap::new(), None).unwrap_err().message,
            "No command specified"
        );
    }
}
