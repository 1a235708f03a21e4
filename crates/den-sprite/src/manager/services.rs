//! Services (Sprites §2.6): the one place that acts on a sprite's services.
//!
//! Front ends (the HTTP API, MCP, the console through the API) parse their
//! input into a [`ServiceDef`] and call these operations; the rules a
//! definition must meet are `den_agent::service_def`, which the agent
//! applies too.
//!
//! Definitions live in the sprite record, so a cold sprite's services are
//! listed without waking it (all stopped). Create, start and stop wake the
//! sprite for the duration of the request only (the returned
//! [`ServiceWatch`] holds it awake): services don't keep a sprite awake.

use std::collections::HashMap;

use den_agent::client::{ServiceEventStream, ServiceLogStream, ServiceState, ServiceStatus};
use den_agent::protocol::ServiceDef;
use den_agent::service_def::{InvalidService, validate_set};

use super::{Activity, Phase, SpriteManager};
use crate::error::{Result, SpriteError};
use crate::record::SpriteStatus;

/// A service's events from just before the operation took effect, and the
/// activity that keeps the sprite awake while someone follows them.
pub struct ServiceWatch {
    pub activity: Activity,
    pub events: ServiceEventStream,
}

impl From<InvalidService> for SpriteError {
    fn from(e: InvalidService) -> Self {
        match e {
            InvalidService::Invalid(m) => SpriteError::Invalid(m),
            InvalidService::Conflict(m) => SpriteError::Conflict(m),
        }
    }
}

fn not_found(sprite: &str, service: &str) -> SpriteError {
    SpriteError::ServiceNotFound {
        sprite: sprite.to_string(),
        service: service.to_string(),
    }
}

fn not_running(service: &str) -> SpriteError {
    SpriteError::Conflict(format!("service {service:?} is not running"))
}

/// `defs` with `def` added, or replacing the service of its name.
fn with_def(defs: &[ServiceDef], def: &ServiceDef) -> Result<Vec<ServiceDef>> {
    let mut next = defs.to_vec();
    match next.iter_mut().find(|d| d.name == def.name) {
        Some(d) => *d = def.clone(),
        None => next.push(def.clone()),
    }
    validate_set(&next)?;
    Ok(next)
}

impl SpriteManager {
    /// The sprite's service definitions, in creation order.
    pub fn services(&self, name: &str) -> Result<Vec<ServiceDef>> {
        Ok(self.slot(name)?.record.lock().services.clone())
    }

    /// One definition.
    pub fn service(&self, name: &str, service: &str) -> Result<ServiceDef> {
        self.services(name)?
            .into_iter()
            .find(|d| d.name == service)
            .ok_or_else(|| not_found(name, service))
    }

    /// Runtime states by service name. A cold sprite is not woken: all its
    /// services are stopped (an empty map).
    pub async fn service_states(&self, name: &str) -> Result<HashMap<String, ServiceStatus>> {
        if self.get(name)?.status == SpriteStatus::Cold {
            return Ok(HashMap::new());
        }
        let act = self.wake(name).await?;
        let list = act.agent().services_status().await?;
        Ok(list.into_iter().map(|s| (s.name.clone(), s)).collect())
    }

    /// Creates or replaces a service and starts it.
    pub async fn put_service(&self, name: &str, def: ServiceDef) -> Result<ServiceWatch> {
        // Refuse a bad definition before waking anything; the update checks
        // again under the sprite's lock.
        with_def(&self.services(name)?, &def)?;
        let activity = self.wake(name).await?;
        let events = activity.agent().service_events(Some(&def.name)).await?;
        self.update_services(name, |defs| {
            *defs = with_def(defs, &def)?;
            Ok(())
        })
        .await?;
        Ok(ServiceWatch { activity, events })
    }

    /// Removes a service (it is stopped; its logs stay). Refused while
    /// another service needs it.
    pub async fn delete_service(&self, name: &str, service: &str) -> Result<()> {
        self.service(name, service)?;
        self.update_services(name, |defs| {
            if let Some(d) = defs.iter().find(|d| d.needs.iter().any(|n| n == service)) {
                return Err(SpriteError::Conflict(format!(
                    "service {:?} needs {service:?}",
                    d.name
                )));
            }
            // Gone already if a concurrent delete won: same outcome.
            defs.retain(|d| d.name != service);
            Ok(())
        })
        .await
    }

    /// Starts a service, clearing a sticky stop.
    pub async fn start_service(&self, name: &str, service: &str) -> Result<ServiceWatch> {
        self.service(name, service)?;
        let activity = self.wake(name).await?;
        let events = activity.agent().service_events(Some(service)).await?;
        self.update_services(name, |defs| {
            match defs.iter_mut().find(|d| d.name == service) {
                Some(d) => d.stopped = false,
                None => {
                    return Err(SpriteError::Conflict(format!(
                        "service {service:?} was deleted meanwhile"
                    )));
                }
            }
            Ok(())
        })
        .await?;
        Ok(ServiceWatch { activity, events })
    }

    /// Stops a service and keeps it stopped (across wakes) until started
    /// again. Returns as soon as the stop is under way: the events tell
    /// when the process is gone.
    pub async fn stop_service(&self, name: &str, service: &str) -> Result<ServiceWatch> {
        let def = self.service(name, service)?;
        if def.stopped || self.get(name)?.status == SpriteStatus::Cold {
            return Err(not_running(service));
        }
        let activity = self.wake(name).await?;
        let running = activity
            .agent()
            .services_status()
            .await?
            .into_iter()
            .any(|s| s.name == service && s.status != ServiceState::Stopped);
        if !running {
            return Err(not_running(service));
        }
        let events = activity.agent().service_events(Some(service)).await?;
        // The agent answers the update once the process is gone, so run it
        // next to the caller's stream: the caller sees `stopping` right away.
        let (mgr, sprite, svc) = (self.clone(), name.to_string(), service.to_string());
        tokio::spawn(async move {
            let res = mgr
                .update_services(&sprite, |defs| {
                    if let Some(d) = defs.iter_mut().find(|d| d.name == svc) {
                        d.stopped = true;
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = res {
                tracing::warn!(sprite = %sprite, service = %svc, error = %e, "stopping a service");
            }
        });
        Ok(ServiceWatch { activity, events })
    }

    /// Signals a running service's process group (`TERM`, `SIGHUP`, `9`, …).
    pub async fn signal_service(&self, name: &str, service: &str, signal: &str) -> Result<()> {
        if den_agent::protocol::parse_signal(signal).is_none() {
            return Err(SpriteError::Invalid(format!("invalid signal {signal:?}")));
        }
        let def = self.service(name, service)?;
        if def.stopped || self.get(name)?.status == SpriteStatus::Cold {
            return Err(not_running(service));
        }
        let act = self.wake(name).await?;
        act.agent().service_signal(service, signal).await?;
        Ok(())
    }

    /// The last `lines` lines of a service's combined log (kept after the
    /// service is deleted), with the activity that keeps the sprite awake
    /// while they are read.
    pub async fn service_logs(
        &self,
        name: &str,
        service: &str,
        lines: usize,
    ) -> Result<(Activity, ServiceLogStream)> {
        if !den_agent::service_def::valid_service_name(service) {
            return Err(SpriteError::Invalid(
                den_agent::service_def::invalid_name_message(service),
            ));
        }
        let act = self.wake(name).await?;
        let tail = act.agent().service_logs(service, Some(lines), false).await?;
        Ok((act, tail))
    }

    /// Changes the definitions (validated by `f`), persists them and, if the
    /// sprite is awake, hands them to its agent.
    async fn update_services<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Vec<ServiceDef>) -> Result<T>,
    ) -> Result<T> {
        let slot = self.slot(name)?;
        let phase = slot.phase.lock().await;
        let mut services = slot.record.lock().services.clone();
        let out = f(&mut services)?;
        if let Phase::Awake(live) = &*phase {
            live.agent.services_set(&services).await?;
        }
        self.update_record(&slot, |r| r.services = services).await?;
        Ok(out)
    }
}
