//! `ringblock export …`: ask the running daemon, through its web API, to add, stop or list ublk
//! exports. The daemon does the work in-process (`ringblock_transports::ublk`).
//!
//! Routes (served by the web crate):
//!   GET    /api/ublk              → 200, a JSON list of exports (`ublk::UblkInfo` fields)
//!   POST   /api/ublk              {"volume": NAME} → 201, the new export
//!   DELETE /api/ublk/{volume}     → 204
//!
//! `ringblock_web::client::ApiClient` has no generic call yet, so this carries its own small
//! blocking HTTP/1.1 request; flags, environment and defaults are the web client's.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use ringblock_web::client;

use crate::serve::Failure;
use crate::web::ApiArgs;

/// Largest response read.
const MAX_RESPONSE_BYTES: u64 = 16 << 20;

#[derive(clap::Subcommand)]
pub enum ExportCommand {
    /// Export VOLUME as a local block device /dev/ublkbN.
    Ublk { volume: String },
    /// Stop the ublk export of VOLUME (removes /dev/ublkbN).
    Stop { volume: String },
    /// List the daemon's ublk exports.
    List,
}

pub fn run(api: &ApiArgs, cmd: ExportCommand) -> Result<(), Failure> {
    let r = match cmd {
        ExportCommand::Ublk { volume } => request(
            api,
            "POST",
            "/api/ublk",
            Some(&serde_json::json!({ "volume": volume }).to_string()),
        )
        .map(|body| {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if api.json || v.get("path").is_none() {
                body
            } else {
                format!(
                    "{} serves volume {}",
                    v["path"].as_str().unwrap_or("?"),
                    v["volume"].as_str().unwrap_or("?")
                )
            }
        }),
        ExportCommand::Stop { volume } => request(
            api,
            "DELETE",
            &format!("/api/ublk/{}", percent_encode(&volume)),
            None,
        ),
        ExportCommand::List => request(api, "GET", "/api/ublk", None).map(|body| {
            if api.json {
                return body;
            }
            let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|e| {
                    let s = |k: &str| match &e[k] {
                        serde_json::Value::String(s) => s.clone(),
                        v => v.to_string(),
                    };
                    vec![
                        s("path"),
                        s("volume"),
                        s("queues"),
                        s("queue_depth"),
                        s("state"),
                    ]
                })
                .collect();
            client::table(&["DEVICE", "VOLUME", "QUEUES", "DEPTH", "STATE"], &rows)
        }),
    };
    match r {
        Ok(out) => {
            if !out.trim().is_empty() {
                println!("{}", out.trim_end());
            }
            Ok(())
        }
        Err(e) => Err(Failure::Runtime(e)),
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn request(api: &ApiArgs, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let base = api
        .api
        .clone()
        .or_else(|| {
            std::env::var(client::API_ENV)
                .ok()
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| client::DEFAULT_API.to_string());
    let token = api
        .token
        .clone()
        .or_else(|| std::env::var(client::TOKEN_ENV).ok())
        .filter(|t| !t.trim().is_empty())
        .with_context(|| format!("no API token: pass --token or set {}", client::TOKEN_ENV))?;
    let Some(hostport) = base.trim().strip_prefix("http://") else {
        bail!("--api {base:?}: expected http://HOST:PORT");
    };
    let hostport = hostport.trim_end_matches('/');
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("--api {base:?}"))?
        .next()
        .with_context(|| format!("--api {base:?} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the daemon's API at {base}"))?;
    // Starting an export waits for the kernel (START_DEV): allow for a slow machine.
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nAccept: application/json\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n",
        token.trim(),
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    if !(200..300).contains(&status) {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        bail!("{method} {path}: HTTP {status}: {msg}");
    }
    Ok(body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    // Bounded by the input: every round consumes a size line or stops.
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
