//! The daemon's side of the web UI (`ringblock-web`): its flags, starting and stopping it, and
//! the CLI commands that talk to a running daemon through its API (`volume`, `status`; `export`
//! in `export_cmd`) or manage its token (`token reset`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ringblock_engine::Engine;
use ringblock_transports::nbd::server::{BoundAddr, ClientRegistry, NbdServer};
use ringblock_transports::ublk::{self, UblkError, UblkInfo, UblkOptions};
use ringblock_web::api::{
    unix_s, CreateVolumeRequest, NbdClient, NbdStatus, UblkControl, UblkControlError, UblkExport,
    UblkExportStats,
};
use ringblock_web::client::{self, ApiClient, ClientError};
use ringblock_web::size::{format_size, parse_size};
use ringblock_web::{BoundWeb, TokenStore, WebServer};

use crate::config::DaemonConfig;
use crate::serve::Failure;

/// `ringblock serve` flags of the web UI.
#[derive(clap::Args, Default, Clone, Debug)]
pub struct WebArgs {
    /// Web UI/API address, e.g. `127.0.0.1:8080` (replaces `[web] listen`; port 0 picks one).
    #[arg(long = "web-listen", value_name = "ADDR")]
    pub web_listen: Option<String>,
    /// Directory of the API token's hash (replaces `[web] state_dir`).
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Run without the web UI/API.
    #[arg(long = "no-web")]
    pub no_web: bool,
}

/// The web UI, bound but not yet serving.
pub struct Prepared {
    bound: BoundWeb,
    addr: SocketAddr,
    state_dir: PathBuf,
    allowed_hosts: Vec<String>,
}

pub(crate) fn state_dir(
    args_dir: &Option<PathBuf>,
    cfg: &DaemonConfig,
) -> Result<PathBuf, Failure> {
    match args_dir.clone().or_else(|| cfg.web.state_dir.clone()) {
        Some(dir) => Ok(dir),
        None => ringblock_web::default_state_dir().map_err(|e| Failure::Config(e.into())),
    }
}

/// Bind the web address before anything starts, so a bad or taken address is reported at
/// once. An address the operator chose must work; the built-in default (127.0.0.1:8080) is
/// best effort: if it is taken the daemon serves storage without the web UI and says so.
/// Under socket activation (a client launching the daemon captive) the web UI runs only if
/// an address was configured.
pub fn prepare(
    args: &WebArgs,
    cfg: &DaemonConfig,
    activated: bool,
    say: &dyn Fn(String),
) -> Result<Option<Prepared>, Failure> {
    if args.no_web || !cfg.web.enabled {
        return Ok(None);
    }
    let chosen = args.web_listen.clone().or_else(|| cfg.web.listen.clone());
    if chosen.is_none() && activated {
        return Ok(None);
    }
    let text = chosen
        .clone()
        .unwrap_or_else(|| ringblock_web::DEFAULT_WEB_LISTEN.to_string());
    let addr: SocketAddr = text.parse().map_err(|_| {
        Failure::Config(anyhow::anyhow!(
            "web listen address {text:?} is not an address:port"
        ))
    })?;
    let bound = match WebServer::bind(addr) {
        Ok(b) => b,
        Err(e) if chosen.is_none() => {
            say(format!(
                "ringblock: web UI not started: cannot listen on {addr}: {e} (set [web] listen or --web-listen)"
            ));
            return Ok(None);
        }
        Err(e) => {
            return Err(Failure::Config(anyhow::anyhow!(
                "web: cannot listen on {addr}: {e}"
            )))
        }
    };
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the web UI listens beyond loopback over plain HTTP: the API token crosses the network in clear text");
    }
    Ok(Some(Prepared {
        addr: bound.local_addr(),
        bound,
        state_dir: state_dir(&args.state_dir, cfg)?,
        allowed_hosts: cfg.web.allowed_hosts.clone(),
    }))
}

/// What the API reports about NBD: the server's listeners and its client registry (neither
/// holds an engine reference).
struct NbdView {
    addrs: Vec<BoundAddr>,
    read_only: Vec<String>,
    registry: Arc<ClientRegistry>,
}

impl NbdStatus for NbdView {
    fn listeners(&self) -> Vec<String> {
        self.addrs.iter().map(ToString::to_string).collect()
    }
    fn export_uris(&self, export: &str) -> Vec<String> {
        self.addrs.iter().map(|a| a.uri(export)).collect()
    }
    fn read_only(&self, export: &str) -> bool {
        self.read_only.iter().any(|r| r == export)
    }
    fn clients(&self) -> Vec<NbdClient> {
        self.registry
            .clients()
            .into_iter()
            .map(|c| NbdClient {
                id: c.id,
                peer: c.peer,
                export: c.export,
                listener: c.listener,
                connected_unix_s: unix_s(c.since),
                structured_replies: c.structured_replies,
                extended_headers: c.extended_headers,
                requests: c.requests,
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
                errors: c.errors,
            })
            .collect()
    }
}

/// ublk exports for the API: the process-wide registry of `ringblock_transports::ublk`, so
/// exports started here are stopped at shutdown with the configured ones (`ublk::stop_all`).
struct UblkView {
    /// `[ublk]` settings, so a restart finds runtime exports' state files where it looks for
    /// left-over devices.
    opts: UblkOptions,
}

fn ublk_export(i: UblkInfo) -> UblkExport {
    let s = i.stats;
    UblkExport {
        name: i.name,
        dev_id: i.dev_id,
        path: i.path,
        volume: i.volume,
        queues: i.queues,
        queue_depth: i.queue_depth,
        max_io_bytes: i.max_io_bytes,
        reactors: i.reactors,
        state: i.state,
        recovered: i.recovered,
        features: i.features,
        copy_mode: i.copy_mode,
        stats: UblkExportStats {
            reads: s.reads,
            writes: s.writes,
            read_bytes: s.read_bytes,
            write_bytes: s.write_bytes,
            flushes: s.flushes,
            discards: s.discards,
            write_zeroes: s.write_zeroes,
            errors: s.errors,
            in_flight: s.in_flight,
        },
    }
}

/// The API status a ublk failure deserves.
fn ublk_control_error(e: UblkError) -> UblkControlError {
    match &e {
        UblkError::NoDriver(_) => UblkControlError::Unavailable(e.to_string()),
        UblkError::Command { errno, .. } if errno.0 == libc::EPERM || errno.0 == libc::EACCES => {
            UblkControlError::Unavailable(format!("{e} (ublk needs root / CAP_SYS_ADMIN)"))
        }
        UblkError::InUse(_) => UblkControlError::Conflict(e.to_string()),
        // The engine's "no such volume" (a race with a delete) and stop's "has no ublk export".
        UblkError::Volume(m) if m.ends_with("no such volume") || m.ends_with("no ublk export") => {
            UblkControlError::NotFound(e.to_string())
        }
        UblkError::Volume(_) => UblkControlError::Invalid(e.to_string()),
        UblkError::Command { .. } | UblkError::Io(_) | UblkError::Queue(_) => {
            UblkControlError::Failed(e.to_string())
        }
    }
}

impl UblkControl for UblkView {
    fn list(&self) -> Vec<UblkExport> {
        ublk::registry().into_iter().map(ublk_export).collect()
    }
    fn start(&self, engine: &Engine, volume: &str) -> Result<UblkExport, UblkControlError> {
        let dev =
            ublk::start_ublk_export(engine, volume, &self.opts).map_err(ublk_control_error)?;
        let i = dev.info();
        tracing::info!(device = %i.path, volume = %i.volume, "ublk export started through the API");
        Ok(ublk_export(i))
    }
    fn stop(&self, volume: &str) -> Result<(), UblkControlError> {
        ublk::stop_ublk_export(volume).map_err(ublk_control_error)
    }
    fn unavailable(&self) -> Option<String> {
        match ublk::check_driver() {
            Err(e @ UblkError::NoDriver(_)) => Some(e.to_string()),
            _ => None,
        }
    }
}

/// Open (or create) the token and start serving; prints the address, and the token if it was
/// just created. Call after the signal mask is set: the server's threads inherit it.
pub fn start(
    prepared: Prepared,
    engine: &Arc<Engine>,
    nbd: &NbdServer,
    cfg: &DaemonConfig,
    replication: Option<Arc<dyn ringblock_web::ReplicationControl>>,
    say: &dyn Fn(String),
) -> Result<WebServer, Failure> {
    let (tokens, new_token) = TokenStore::open_or_create(&prepared.state_dir)
        .context("web API token (set [web] state_dir or --state-dir to a writable directory)")
        .map_err(Failure::Config)?;
    let token_path = tokens.path().display().to_string();
    let view = Arc::new(NbdView {
        addrs: nbd.addrs(),
        read_only: cfg.nbd.read_only.clone(),
        registry: nbd.registry(),
    });
    let ublk = Arc::new(UblkView {
        opts: UblkOptions {
            state_dir: cfg.ublk.state_dir.clone(),
            queue_depth: None,
            max_io_bytes: None,
            recovery: cfg.ublk.recovery,
            user_copy: cfg.ublk.user_copy,
        },
    });
    let server = WebServer::start(
        prepared.bound,
        tokens,
        &prepared.allowed_hosts,
        engine.clone(),
        view,
        ublk,
        replication,
    )
    .context("starting the web server")
    .map_err(Failure::Runtime)?;
    let url = format!("http://{}/", prepared.addr);
    let first_file = prepared
        .state_dir
        .join(ringblock_web::token::FIRST_TOKEN_FILE);
    match new_token {
        // A terminal: shown once, and nowhere else.
        Some(t) if output_is_terminal() => say(format!(
            "ringblock: web UI on {url} — API token (shown once): {t}"
        )),
        // Output kept somewhere (the journal, a log file): only the path of a private file.
        Some(t) => {
            let path = ringblock_web::token::write_first_token(&prepared.state_dir, &t)
                .context("writing the first API token (`ringblock token reset` makes a new one)")
                .map_err(Failure::Runtime)?;
            say(format!(
                "ringblock: web UI on {url} — API token (first start) in {} (mode 0600; delete it once you have the token)",
                path.display()
            ));
        }
        None => {
            say(format!(
                "ringblock: web UI on {url} (API token hash in {token_path}; `ringblock token reset` prints a new token)"
            ));
            if first_file.exists() {
                tracing::warn!(path = %first_file.display(), "the API token of the first start is still in this file: delete it once you have the token");
            }
        }
    }
    Ok(server)
}

// ---------------------------------------------------------------------------------------------
// CLI commands.

/// Where the API is and the token to use.
#[derive(clap::Args, Clone, Debug)]
pub struct ApiArgs {
    /// The daemon's web API (default: $RINGBLOCK_API, else http://127.0.0.1:8080).
    #[arg(long, global = true, value_name = "URL")]
    pub api: Option<String>,
    /// API token (default: $RINGBLOCK_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Subcommand)]
pub enum VolumeCommand {
    /// List volumes.
    List,
    /// Create a thin volume, e.g. `volume create vol1 --size 10G`.
    Create {
        name: String,
        /// Device to place it on (default: the only device, if there is one).
        #[arg(long)]
        device: Option<String>,
        /// Size: bytes, or with K, M, G, T, P (powers of 1024), e.g. 10G.
        #[arg(long)]
        size: String,
    },
    /// Delete a volume (refused while a client has it open).
    Delete { name: String },
    /// Grow a volume online, e.g. `volume grow vol1 --size 20G`.
    Grow {
        name: String,
        /// New size (bytes, or with K, M, G, T, P).
        #[arg(long)]
        size: String,
    },
    /// Make this node's copy of a replicated volume the primary (it then serves clients).
    Promote {
        name: String,
        /// Promote even while another node is primary for it (disaster recovery: both copies
        /// may then take writes, a split brain `replica resolve` must end).
        #[arg(long)]
        force: bool,
    },
    /// Make this node's copy of a replicated volume a replica (refused while exported).
    Demote { name: String },
}

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Make a new API token and print it (the old one stops working at once, also in a running
    /// daemon using the same state directory).
    Reset {
        /// State directory (default: `[web] state_dir` of --config, else the daemon's default).
        #[arg(long = "state-dir", value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The daemon's configuration file, to find its `[web] state_dir`.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

pub(crate) fn connect(api: &ApiArgs) -> Result<(ApiClient, String), Failure> {
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
        .or_else(|| std::env::var(client::TOKEN_ENV).ok());
    let c = ApiClient::new(&base, token).map_err(client_failure)?;
    Ok((c, base))
}

pub(crate) fn client_failure(e: ClientError) -> Failure {
    match e {
        ClientError::NoToken | ClientError::Usage(_) => Failure::Config(e.into()),
        e => Failure::Runtime(e.into()),
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

pub fn run_volume(api: &ApiArgs, cmd: VolumeCommand) -> Result<(), Failure> {
    let (c, _) = connect(api)?;
    let size =
        |text: &str| parse_size(text).map_err(|e| Failure::Config(anyhow::anyhow!("--size: {e}")));
    match cmd {
        VolumeCommand::List => {
            let vols = c.volumes().map_err(client_failure)?;
            if api.json {
                print_json(&vols);
            } else {
                print!("{}", client::volumes_table(&vols));
            }
        }
        VolumeCommand::Create {
            name,
            device,
            size: s,
        } => {
            let size_bytes = size(&s)?;
            let device = match device {
                Some(d) => d,
                None => {
                    let devices = c.devices().map_err(client_failure)?;
                    match devices.as_slice() {
                        [only] => only.name.clone(),
                        _ => {
                            let names: Vec<&str> =
                                devices.iter().map(|d| d.name.as_str()).collect();
                            return Err(Failure::Config(anyhow::anyhow!(
                                "--device is needed: the daemon has devices {}",
                                names.join(", ")
                            )));
                        }
                    }
                }
            };
            let v = c
                .create_volume(&CreateVolumeRequest {
                    name,
                    device,
                    size_bytes,
                })
                .map_err(client_failure)?;
            if api.json {
                print_json(&v);
            } else {
                println!(
                    "created volume {} on {} ({})",
                    v.name,
                    v.device,
                    format_size(v.size_bytes)
                );
            }
        }
        VolumeCommand::Delete { name } => {
            c.delete_volume(&name).map_err(client_failure)?;
            if !api.json {
                println!("deleted volume {name}");
            }
        }
        VolumeCommand::Promote { name, force } => {
            if force {
                eprintln!("{}", crate::replica_cmd::force_warning(&name));
            }
            let message = c.promote(&name, force).map_err(client_failure)?;
            crate::replica_cmd::print_message(api, &message);
        }
        VolumeCommand::Demote { name } => {
            let message = c.demote(&name).map_err(client_failure)?;
            crate::replica_cmd::print_message(api, &message);
        }
        VolumeCommand::Grow { name, size: s } => {
            let v = c.grow_volume(&name, size(&s)?).map_err(client_failure)?;
            if api.json {
                print_json(&v);
            } else {
                println!("volume {} is now {}", v.name, format_size(v.size_bytes));
            }
        }
    }
    Ok(())
}

pub fn run_status(api: &ApiArgs) -> Result<(), Failure> {
    let (c, base) = connect(api)?;
    let status = c.status().map_err(client_failure)?;
    if api.json {
        print_json(&status);
        return Ok(());
    }
    let devices = c.devices().map_err(client_failure)?;
    let vols = c.volumes().map_err(client_failure)?;
    let clients = c.clients().map_err(client_failure)?;
    let replication = c.replication().map_err(client_failure)?;
    print!(
        "{}",
        client::status_text(&base, &status, &devices, &vols, &clients, &replication)
    );
    Ok(())
}

/// Whether the daemon's output goes to a terminal (both streams: `say` uses either).
fn output_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

pub fn run_token(cmd: TokenCommand) -> Result<(), Failure> {
    match cmd {
        TokenCommand::Reset {
            state_dir: dir,
            config,
        } => {
            let cfg = match &config {
                Some(path) => DaemonConfig::load(path).map_err(Failure::Config)?,
                None => DaemonConfig::default(),
            };
            let dir = state_dir(&dir, &cfg)?;
            let token = TokenStore::reset(&dir)
                .context("resetting the API token")
                .map_err(Failure::Runtime)?;
            eprintln!(
                "ringblock: new API token stored (hashed) in {}; a daemon using this state directory accepts only the new token from now on",
                dir.join(ringblock_web::token::TOKEN_FILE).display()
            );
            println!("{token}");
            Ok(())
        }
    }
}
