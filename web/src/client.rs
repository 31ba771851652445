//! A small blocking client of the API, for `ringblock volume …` and `ringblock status`.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    CreateVolumeRequest, DeviceInfo, ExportsInfo, GrowVolumeRequest, NbdClient, StartUblkRequest,
    StatusInfo, UblkExport, VolumeInfo,
};
use crate::error::ErrorBody;
use crate::replication::{ReplicationStatus, VerifyStatus};
use crate::replication_api::{AddReplicaRequest, CommandResult, PromoteRequest, ResolveRequest};
use crate::size::format_size;

/// Default API address (the daemon's default listen address).
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";
/// Environment variable holding the token.
pub const TOKEN_ENV: &str = "RINGBLOCK_TOKEN";
/// Environment variable holding the API address.
pub const API_ENV: &str = "RINGBLOCK_API";
/// A command waits at most this long for the daemon.
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no API token: pass --token or set RINGBLOCK_TOKEN (the daemon prints it once at its first start; `ringblock token reset` makes a new one)")]
    NoToken,
    #[error("{0}")]
    Usage(String),
    #[error("{method} {path}: {message} (HTTP {status})")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach the ringblock API at {base}: {message}")]
    Transport { base: String, message: String },
    #[error("{method} {path}: unexpected answer: {message}")]
    Decode {
        method: String,
        path: String,
        message: String,
    },
}

impl ClientError {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// `base` like `http://127.0.0.1:8080`; `token` from the flag or the environment.
    pub fn new(base: &str, token: Option<String>) -> Result<ApiClient, ClientError> {
        let token = token
            .filter(|t| !t.trim().is_empty())
            .ok_or(ClientError::NoToken)?
            .trim()
            .to_string();
        let base = base.trim().trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(ClientError::Usage(format!(
                "--api {base:?}: expected http://HOST:PORT"
            )));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            // A local daemon: never through a proxy from the environment.
            .proxy(None)
            .build()
            .into();
        Ok(ApiClient { base, token, agent })
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let auth = format!("Bearer {}", self.token);
        let transport = |e: ureq::Error| ClientError::Transport {
            base: self.base.clone(),
            message: e.to_string(),
        };
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b),
            ("POST", None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
            _ => unreachable!("unsupported call {method} {path}"),
        };
        let mut resp = resp.map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(transport)?;
        let decode = |message: String| ClientError::Decode {
            method: method.into(),
            path: path.into(),
            message,
        };
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| text.trim().chars().take(200).collect());
            return Err(ClientError::Api {
                method: method.into(),
                path: path.into(),
                status,
                message,
            });
        }
        if status == 204 {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| decode(e.to_string()))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>("GET", path, None)?
            .ok_or_else(|| ClientError::Decode {
                method: "GET".into(),
                path: path.into(),
                message: "empty answer".into(),
            })
    }

    pub fn status(&self) -> Result<StatusInfo, ClientError> {
        self.get("/api/status")
    }
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        self.get("/api/volumes")
    }
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        self.get("/api/devices")
    }
    pub fn exports(&self) -> Result<ExportsInfo, ClientError> {
        self.get("/api/exports")
    }
    pub fn clients(&self) -> Result<Vec<NbdClient>, ClientError> {
        self.get("/api/clients")
    }

    pub fn create_volume(&self, req: &CreateVolumeRequest) -> Result<VolumeInfo, ClientError> {
        self.call("POST", "/api/volumes", Some(req))?
            .ok_or_else(|| ClientError::Decode {
                method: "POST".into(),
                path: "/api/volumes".into(),
                message: "empty answer".into(),
            })
    }

    pub fn grow_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo, ClientError> {
        let path = format!("/api/volumes/{}/grow", path_segment(name)?);
        self.call("POST", &path, Some(&GrowVolumeRequest { size_bytes }))?
            .ok_or_else(|| ClientError::Decode {
                method: "POST".into(),
                path,
                message: "empty answer".into(),
            })
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/api/volumes/{}", path_segment(name)?);
        self.call::<(), serde_json::Value>("DELETE", &path, None)
            .map(|_| ())
    }

    pub fn ublk_exports(&self) -> Result<Vec<UblkExport>, ClientError> {
        self.get("/api/ublk")
    }

    /// Export `volume` as `/dev/ublkbN`; returns once the device is live.
    pub fn start_ublk(&self, volume: &str) -> Result<UblkExport, ClientError> {
        let req = StartUblkRequest {
            volume: volume.into(),
        };
        self.call("POST", "/api/ublk", Some(&req))?
            .ok_or_else(|| ClientError::Decode {
                method: "POST".into(),
                path: "/api/ublk".into(),
                message: "empty answer".into(),
            })
    }

    pub fn stop_ublk(&self, volume: &str) -> Result<(), ClientError> {
        let path = format!("/api/ublk/{}", path_segment(volume)?);
        self.call::<(), serde_json::Value>("DELETE", &path, None)
            .map(|_| ())
    }

    pub fn replication(&self) -> Result<ReplicationStatus, ClientError> {
        self.get("/api/replication")
    }

    /// A replication command: POST `path` (with `body`, if any); the operator's line.
    fn command<B: Serialize>(&self, path: String, body: Option<&B>) -> Result<String, ClientError> {
        self.call::<B, CommandResult>("POST", &path, body)?
            .map(|r| r.message)
            .ok_or_else(|| ClientError::Decode {
                method: "POST".into(),
                path,
                message: "empty answer".into(),
            })
    }

    pub fn promote(&self, volume: &str, force: bool) -> Result<String, ClientError> {
        let path = format!("/api/volumes/{}/promote", path_segment(volume)?);
        self.command(path, Some(&PromoteRequest { force }))
    }

    pub fn demote(&self, volume: &str) -> Result<String, ClientError> {
        let path = format!("/api/volumes/{}/demote", path_segment(volume)?);
        self.command::<()>(path, None)
    }

    /// Stop sending `volume`'s writes to the peer `node` (a node id).
    pub fn suspend_replica(&self, volume: &str, node: &str) -> Result<String, ClientError> {
        self.replica_command(volume, node, "suspend")
    }

    pub fn resume_replica(&self, volume: &str, node: &str) -> Result<String, ClientError> {
        self.replica_command(volume, node, "resume")
    }

    fn replica_command(
        &self,
        volume: &str,
        node: &str,
        action: &str,
    ) -> Result<String, ClientError> {
        let path = format!(
            "/api/volumes/{}/replicas/{}/{action}",
            path_segment(volume)?,
            path_segment(node)?
        );
        self.command::<()>(path, None)
    }

    /// Add the peer `node` (a node id) at `address` to `volume`, with `mode`.
    pub fn add_replica(
        &self,
        volume: &str,
        node: &str,
        address: &str,
        mode: &str,
    ) -> Result<String, ClientError> {
        let path = format!("/api/volumes/{}/replicas", path_segment(volume)?);
        let body = AddReplicaRequest {
            node: node.into(),
            address: address.into(),
            mode: mode.into(),
        };
        self.command(path, Some(&body))
    }

    /// Remove the peer `node` from `volume`.
    pub fn remove_replica(&self, volume: &str, node: &str) -> Result<String, ClientError> {
        let path = format!(
            "/api/volumes/{}/replicas/{}",
            path_segment(volume)?,
            path_segment(node)?
        );
        self.call::<(), CommandResult>("DELETE", &path, None)?
            .map(|r| r.message)
            .ok_or_else(|| ClientError::Decode {
                method: "DELETE".into(),
                path,
                message: "empty answer".into(),
            })
    }

    /// Start an online verify of `volume`'s replicas (202); the operator's line.
    pub fn start_verify(&self, volume: &str, repair: bool) -> Result<String, ClientError> {
        let path = format!(
            "/api/volumes/{}/verify?repair={repair}",
            path_segment(volume)?
        );
        self.command::<()>(path, None)
    }

    /// The last verify of `volume`.
    pub fn verify_status(&self, volume: &str) -> Result<VerifyStatus, ClientError> {
        self.get(&format!("/api/volumes/{}/verify", path_segment(volume)?))
    }

    pub fn resolve(&self, volume: &str, discard: &str) -> Result<String, ClientError> {
        let path = format!("/api/volumes/{}/resolve", path_segment(volume)?);
        let body = ResolveRequest {
            discard: discard.into(),
        };
        self.command(path, Some(&body))
    }
}

/// Volume names and node ids are plain (see `validate_volume_name`); refuse anything that
/// would need escaping rather than build a surprising URL.
fn path_segment(name: &str) -> Result<&str, ClientError> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name != "."
        && name != ".."
    {
        Ok(name)
    } else {
        Err(ClientError::Usage(format!(
            "{name:?} must be characters of A-Z a-z 0-9 - _ . (a volume name or a node id)"
        )))
    }
}

/// Render rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

pub fn volumes_table(vols: &[VolumeInfo]) -> String {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.device.clone(),
                format_size(v.size_bytes),
                format!(
                    "{} ({:.1}%)",
                    format_size(v.allocated_bytes),
                    100.0 * v.allocated_bytes as f64 / v.size_bytes.max(1) as f64
                ),
                if v.read_only { "ro" } else { "rw" }.into(),
                v.nbd_clients.to_string(),
                replication_cell(v),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "DEVICE",
            "SIZE",
            "ALLOCATED",
            "MODE",
            "CLIENTS",
            "REPLICATION",
        ],
        &rows,
    )
}

/// `primary: up-to-date, behind` (the role, then each peer's state), or `-`.
fn replication_cell(v: &VolumeInfo) -> String {
    match &v.replication {
        None => "-".into(),
        Some(r) if r.peers.is_empty() => r.role.clone(),
        Some(r) => {
            let states: Vec<&str> = r.peers.iter().map(|p| p.state.as_str()).collect();
            format!("{}: {}", r.role, states.join(", "))
        }
    }
}

pub fn ublk_table(exports: &[UblkExport]) -> String {
    let rows: Vec<Vec<String>> = exports
        .iter()
        .map(|e| {
            vec![
                e.path.clone(),
                e.volume.clone(),
                e.queues.to_string(),
                e.queue_depth.to_string(),
                e.copy_mode.clone(),
                e.state.clone(),
            ]
        })
        .collect();
    table(
        &["DEVICE", "VOLUME", "QUEUES", "DEPTH", "COPY", "STATE"],
        &rows,
    )
}

/// `ringblock status` as text.
pub fn status_text(
    api: &str,
    s: &StatusInfo,
    devices: &[DeviceInfo],
    vols: &[VolumeInfo],
    clients: &[NbdClient],
    replication: &ReplicationStatus,
) -> String {
    let mut out = format!(
        "ringblock {} at {api}: up {}s, {} reactor(s), {} device(s) ({} unhealthy), {} volume(s), {} NBD client(s)\n",
        s.version,
        s.uptime_s,
        s.reactors.len(),
        s.devices,
        s.devices_unhealthy,
        s.volumes,
        s.nbd_clients
    );
    out.push_str(&format!("nbd: {}\n", s.nbd_listeners.join(", ")));
    match &s.ublk_unavailable {
        Some(why) if s.ublk_exports == 0 => out.push_str(&format!("ublk: {why}\n")),
        _ => out.push_str(&format!("ublk: {} export(s)\n", s.ublk_exports)),
    }
    for line in crate::replication_view::status_lines(replication) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("\nreactors\n");
    let rows: Vec<Vec<String>> = s
        .reactors
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.core.map_or("-".into(), |c| c.to_string()),
                format!("{:.1}%", r.busy_percent),
                r.ops_in_flight.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["ID", "CORE", "BUSY", "IN-FLIGHT"], &rows));
    out.push_str("\ndevices\n");
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.kind.clone(),
                d.profile.name.clone(),
                format_size(d.size_bytes),
                format!("{}/{}", d.used_chunks, d.total_chunks),
                d.health.status.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["NAME", "KIND", "PROFILE", "SIZE", "CHUNKS USED", "HEALTH"],
        &rows,
    ));
    out.push_str("\nvolumes\n");
    out.push_str(&volumes_table(vols));
    if !clients.is_empty() {
        out.push_str("\nclients\n");
        let rows: Vec<Vec<String>> = clients
            .iter()
            .map(|c| {
                vec![
                    c.id.to_string(),
                    c.peer.clone(),
                    c.export.clone(),
                    c.requests.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&["ID", "PEER", "EXPORT", "REQUESTS"], &rows));
    }
    out
}
