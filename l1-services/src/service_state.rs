//! A service's part of the VM state tree: the `service/<name>` section a snapshot, a
//! migration and a live update carry (base_vmm::state treats its payload as opaque).
//!
//! Payload: u32 LE length, JSON of [`Head`] (plugin file, configuration, or why the service
//! declined to save), then the service's state bytes as they are (raw, not a JSON array).

use std::path::PathBuf;

use base_vmm::state::{Section, SERVICE_SECTION_VERSION};
use serde::{Deserialize, Serialize};

use crate::manager::HandedService;

/// A `service/<name>` section that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("section {id}: {why}")]
pub struct ServiceSectionError {
    /// The section.
    pub id: String,
    /// What is wrong.
    pub why: String,
}

/// What the VM state records of one attached service.
#[derive(Debug, Clone)]
pub enum ServiceRecord {
    /// It handed its state over: attach it again from the same file, then `resume-from`.
    Handed(HandedService),
    /// It declined (its `detach` failed): recorded so that a restore says why it is missing.
    Declined {
        /// Its name.
        name: String,
        /// What it said.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Head {
    path: Option<PathBuf>,
    #[serde(default)]
    config: String,
    #[serde(default)]
    async_port_writes: bool,
    /// The attach's tick period, when it overrode the manifest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tick_period_ms: Option<u32>,
    #[serde(default)]
    declined: Option<String>,
}

impl ServiceRecord {
    /// The service's name.
    pub fn name(&self) -> &str {
        match self {
            ServiceRecord::Handed(h) => &h.name,
            ServiceRecord::Declined { name, .. } => name,
        }
    }

    /// The section that carries it.
    pub fn to_section(&self) -> Section {
        let (head, state): (Head, &[u8]) = match self {
            ServiceRecord::Handed(h) => (
                Head {
                    path: Some(h.path.clone()),
                    config: h.config.clone(),
                    async_port_writes: h.async_port_writes,
                    tick_period_ms: h.tick_period_ms,
                    declined: None,
                },
                &h.state,
            ),
            ServiceRecord::Declined { reason, .. } => (
                Head {
                    path: None,
                    config: String::new(),
                    async_port_writes: false,
                    tick_period_ms: None,
                    declined: Some(reason.clone()),
                },
                &[],
            ),
        };
        let json = serde_json::to_vec(&head).expect("a service head always serializes");
        let mut data = Vec::with_capacity(4 + json.len() + state.len());
        data.extend_from_slice(&(json.len() as u32).to_le_bytes());
        data.extend_from_slice(&json);
        data.extend_from_slice(state);
        Section {
            id: format!("service/{}", self.name()),
            version: SERVICE_SECTION_VERSION,
            data,
        }
    }

    /// Reads a `service/<name>` section back.
    pub fn from_section(s: &Section) -> Result<Self, ServiceSectionError> {
        let bad = |why: String| ServiceSectionError {
            id: s.id.clone(),
            why,
        };
        let name =
            s.id.strip_prefix("service/")
                .ok_or_else(|| bad("not a service section".into()))?
                .to_string();
        if s.version > SERVICE_SECTION_VERSION {
            return Err(bad(format!(
                "v{} is newer than this spanvmm understands (v{SERVICE_SECTION_VERSION})",
                s.version
            )));
        }
        let jlen = s
            .data
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("truncated".into()))?;
        let json = s
            .data
            .get(4..4usize.saturating_add(jlen))
            .ok_or_else(|| bad(format!("head length {jlen} runs past the section")))?;
        let head: Head =
            serde_json::from_slice(json).map_err(|e| bad(format!("does not parse: {e}")))?;
        let state = s.data[4 + jlen..].to_vec();
        Ok(match (head.declined, head.path) {
            (Some(reason), _) => ServiceRecord::Declined { name, reason },
            (None, Some(path)) => ServiceRecord::Handed(HandedService {
                name,
                path,
                config: head.config,
                async_port_writes: head.async_port_writes,
                tick_period_ms: head.tick_period_ms,
                state,
            }),
            (None, None) => return Err(bad("neither a plugin file nor a reason".into())),
        })
    }

    /// The records of a hand-over: what was handed, then what declined.
    pub fn of_hand_over(
        handed: &[HandedService],
        declined: &[(String, crate::ServiceError)],
    ) -> Vec<ServiceRecord> {
        let declined = declined.iter().map(|(name, e)| ServiceRecord::Declined {
            name: name.clone(),
            reason: e.to_string(),
        });
        handed
            .iter()
            .cloned()
            .map(ServiceRecord::Handed)
            .chain(declined)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_sections() {
        let h = ServiceRecord::Handed(HandedService {
            name: "counter".into(),
            path: "/p/libcounter.so".into(),
            config: "x=1".into(),
            async_port_writes: true,
            tick_period_ms: Some(20),
            state: vec![0, 1, 2, 255],
        });
        let s = h.to_section();
        assert_eq!(s.id, "service/counter");
        let ServiceRecord::Handed(back) = ServiceRecord::from_section(&s).unwrap() else {
            panic!("handed");
        };
        assert_eq!(back.state, vec![0, 1, 2, 255]);
        assert_eq!(back.config, "x=1");
        let d = ServiceRecord::Declined {
            name: "n".into(),
            reason: "busy".into(),
        };
        let back = ServiceRecord::from_section(&d.to_section()).unwrap();
        assert!(matches!(back, ServiceRecord::Declined { reason, .. } if reason == "busy"));
        let mut t = h.to_section();
        t.data.truncate(3);
        assert!(ServiceRecord::from_section(&t).is_err());
    }
}
