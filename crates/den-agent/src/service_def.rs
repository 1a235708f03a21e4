//! A service definition and the one set of rules it must satisfy.
//!
//! The host validates a definition before it persists it (and before it
//! wakes the sprite), and the agent validates every desired set it is
//! handed. Both call [`validate_set`], so the two can't disagree about what
//! a valid set of services is.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// One declared service (Sprites §2.6 plus the sticky `stopped` flag, which
/// the host persists alongside the definition).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ServiceDef {
    /// `[A-Za-z0-9_.-]{1,64}`; also the log file name.
    pub name: String,
    /// Looked up in the base environment's `PATH`; no shell is involved.
    pub cmd: String,
    pub args: Vec<String>,
    /// Added on top of the base environment (PATH, HOME, USER, ...).
    pub env: BTreeMap<String, String>,
    /// Working directory; default the user's home.
    pub dir: Option<String>,
    /// Services that must be running before this one is started.
    pub needs: Vec<String>,
    pub http_port: Option<u16>,
    /// Sticky stop: not started, not restarted after crashes.
    pub stopped: bool,
}

/// Why a definition or a set of them is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidService {
    /// The definition itself or its `needs` are wrong (a bad request).
    #[error("{0}")]
    Invalid(String),
    /// Valid alone, but it clashes with another service of the set.
    #[error("{0}")]
    Conflict(String),
}

/// `[A-Za-z0-9_.-]{1,64}`, but not `.` or `..`: the name is also a log file
/// name, and those two would escape the log directory.
pub fn valid_service_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && name != ".."
}

/// The message for a name [`valid_service_name`] refuses.
pub fn invalid_name_message(name: &str) -> String {
    format!("invalid service name {name:?}: 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
}

impl ServiceDef {
    /// The rules one definition must meet on its own.
    pub fn validate(&self) -> Result<(), InvalidService> {
        let invalid = |m: String| Err(InvalidService::Invalid(m));
        if !valid_service_name(&self.name) {
            return invalid(invalid_name_message(&self.name));
        }
        if self.cmd.trim().is_empty() {
            // The Sprites API's own wording.
            return invalid("cmd field is required".to_string());
        }
        if self.cmd.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return invalid(format!("service {:?}: NUL byte in cmd or args", self.name));
        }
        if self.dir.as_deref().is_some_and(|d| d.contains('\0')) {
            return invalid(format!("service {:?}: NUL byte in dir", self.name));
        }
        if let Some((k, _)) = self
            .env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return invalid(format!("service {:?}: invalid env variable {k:?}", self.name));
        }
        if self.http_port == Some(0) {
            return invalid(format!("service {:?}: http_port must be 1-65535", self.name));
        }
        if self.needs.contains(&self.name) {
            return invalid(format!("service {:?} cannot need itself", self.name));
        }
        Ok(())
    }
}

/// A whole desired set: every definition valid, names unique, `needs` name
/// services of the set without a cycle, and at most one service has an
/// `http_port` (the sprite URL's target; a [`InvalidService::Conflict`]).
pub fn validate_set(defs: &[ServiceDef]) -> Result<(), InvalidService> {
    let mut by_name: HashMap<&str, &ServiceDef> = HashMap::new();
    for d in defs {
        d.validate()?;
        if by_name.insert(d.name.as_str(), d).is_some() {
            return Err(InvalidService::Invalid(format!("duplicate service {:?}", d.name)));
        }
    }
    for d in defs {
        if let Some(n) = d.needs.iter().find(|n| !by_name.contains_key(n.as_str())) {
            return Err(InvalidService::Invalid(format!(
                "service {:?} needs unknown service {n:?}",
                d.name
            )));
        }
    }
    let with_port: Vec<&str> = defs
        .iter()
        .filter(|d| d.http_port.is_some())
        .map(|d| d.name.as_str())
        .collect();
    if with_port.len() > 1 {
        return Err(InvalidService::Conflict(format!(
            "another service already has an HTTP port configured ({})",
            with_port.join(", ")
        )));
    }
    // Depth-first search: a name met again while still on the stack closes a
    // cycle.
    fn visit<'a>(
        name: &'a str,
        by_name: &HashMap<&'a str, &'a ServiceDef>,
        on_stack: &mut HashSet<&'a str>,
        done: &mut HashSet<&'a str>,
    ) -> Result<(), InvalidService> {
        if done.contains(name) {
            return Ok(());
        }
        if !on_stack.insert(name) {
            return Err(InvalidService::Invalid(format!(
                "service needs form a cycle through {name:?}"
            )));
        }
        for n in &by_name[name].needs {
            visit(n, by_name, on_stack, done)?;
        }
        on_stack.remove(name);
        done.insert(name);
        Ok(())
    }
    let (mut on_stack, mut done) = (HashSet::new(), HashSet::new());
    for d in defs {
        visit(&d.name, &by_name, &mut on_stack, &mut done)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, needs: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            cmd: "true".into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn invalid(defs: &[ServiceDef]) -> bool {
        matches!(validate_set(defs), Err(InvalidService::Invalid(_)))
    }

    #[test]
    fn sets() {
        validate_set(&[def("a", &[]), def("b", &["a"]), def("c", &["a", "b"])]).unwrap();
        // A diamond is not a cycle.
        validate_set(&[
            def("a", &[]),
            def("b", &["a"]),
            def("c", &["a"]),
            def("d", &["b", "c"]),
        ])
        .unwrap();
        assert!(invalid(&[def("a", &["b"]), def("b", &["a"])]));
        assert!(invalid(&[def("a", &["b"]), def("b", &["c"]), def("c", &["a"])]));
        assert!(invalid(&[def("a", &["a"])]));
        assert!(invalid(&[def("a", &["zz"])]));
        assert!(invalid(&[def("a", &[]), def("a", &[])]));
        let port = |n: &str, p| ServiceDef {
            http_port: Some(p),
            ..def(n, &[])
        };
        validate_set(&[port("a", 80), def("b", &["a"])]).unwrap();
        assert!(matches!(
            validate_set(&[port("a", 1), port("b", 2)]),
            Err(InvalidService::Conflict(_))
        ));
    }

    #[test]
    fn definitions() {
        for name in ["a/b", "..", ".", "", &"x".repeat(65), "a b"] {
            assert!(invalid(&[def(name, &[])]), "{name:?}");
        }
        assert!(valid_service_name(&"x".repeat(64)));
        let with = |f: &dyn Fn(&mut ServiceDef)| {
            let mut d = def("a", &[]);
            f(&mut d);
            invalid(&[d])
        };
        assert!(with(&|d| d.cmd = String::new()));
        assert!(with(&|d| d.cmd = "  ".into()));
        assert!(with(&|d| d.args = vec!["x\0".into()]));
        assert!(with(&|d| d.dir = Some("/\0".into())));
        assert!(with(&|d| {
            d.env.insert("A=B".into(), "1".into());
        }));
        assert!(with(&|d| {
            d.env.insert("A".into(), "\0".into());
        }));
        assert!(with(&|d| d.http_port = Some(0)));
        assert!(!with(&|d| d.http_port = Some(8080)));
    }
}
