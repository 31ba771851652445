//! `ringblock replica …`: see and drive the copies of replicated volumes on other nodes,
//! through the running daemon's web API (its peer runtime does the work).
//!
//! Routes (served by the web crate):
//!   GET  /api/replication                                   → 200, every replicated volume
//!   POST /api/volumes/{name}/replicas/{node}/suspend|resume → 200, {"message": …}
//!   POST /api/volumes/{name}/resolve {"discard": NODE}      → 200, {"message": …}
//!   POST /api/volumes/{name}/replicas {"node", "address", "mode"} → 200, {"message": …}
//!   DELETE /api/volumes/{name}/replicas/{node}              → 200, {"message": …}
//!   POST /api/volumes/{name}/verify[?repair=true]           → 202, then GET it (`verify_cmd`)
//!
//! `ringblock volume promote|demote` use `/api/volumes/{name}/promote|demote` the same way.
//! Peers are named by node id (32 hex digits; `ringblock check-config` on a node prints its
//! own). Flags, environment, defaults and exit codes are those of `ringblock volume …`.

use ringblock_web::replication_view;

use crate::serve::Failure;
use crate::web::{client_failure, connect, print_json, ApiArgs};

#[derive(clap::Subcommand, Debug, PartialEq, Eq)]
pub enum ReplicaCommand {
    /// Every replicated volume's peers (or VOLUME's): role, mode, state, dirty bytes, resync
    /// progress, rate and ETA, and why a peer is not up to date.
    List { volume: Option<String> },
    /// Stop sending VOLUME's writes to NODE: they only mark its dirty bitmap until `resume`.
    Suspend { volume: String, node: String },
    /// Send to NODE again: it resyncs what it missed, then follows every write.
    Resume { volume: String, node: String },
    /// End a split brain of VOLUME by discarding NODE's changes since the common generation.
    /// Run it on NODE (the copy discarded here is then fully synced from the other side).
    Resolve {
        volume: String,
        /// The node (id, 32 hex digits) whose changes are discarded.
        #[arg(long, value_name = "NODE")]
        discard: String,
    },
    /// Add NODE (its id, 32 hex digits) at ADDRESS (host:port of its peer listener) as a
    /// copy of VOLUME. On the primary it gets a full sync; on a replica copy it may then
    /// connect as this copy's primary. Kept across restarts (in the state directory).
    Add {
        volume: String,
        node: String,
        address: String,
        #[arg(long, value_parser = ["sync", "async"], default_value = "sync")]
        mode: String,
    },
    /// Remove NODE from VOLUME's copies: its link ends and writes no longer wait for it.
    /// Kept across restarts (in the state directory).
    Remove { volume: String, node: String },
    /// Compare VOLUME's up-to-date replicas with this primary copy online (per-region
    /// checksums, while writes go on) and report the byte ranges that differ. Run it on the
    /// primary. Exits 1 when a region differs and was not repaired.
    Verify {
        volume: String,
        /// Resync the regions that differ (the link reconnects and copies them).
        #[arg(long)]
        repair: bool,
        /// Stop waiting after this many seconds (the verify goes on in the daemon).
        #[arg(long, value_name = "SECONDS", default_value_t = 86400)]
        timeout_s: u64,
    },
}

/// What `volume promote --force` says before it asks.
pub fn force_warning(volume: &str) -> String {
    format!(
        "ringblock: warning: --force promotes {volume} here even while another node is primary \
         for it: if both copies take writes they diverge (split brain), and `ringblock replica \
         resolve {volume} --discard NODE` must then throw one side's changes away"
    )
}

/// A command's answer: the daemon's line, or `{"message": …}` with --json.
pub fn print_message(api: &ApiArgs, message: &str) {
    if api.json {
        print_json(&serde_json::json!({ "message": message }));
    } else {
        println!("{message}");
    }
}

pub fn run(api: &ApiArgs, cmd: ReplicaCommand) -> Result<(), Failure> {
    let (c, _) = connect(api)?;
    let message = match cmd {
        ReplicaCommand::List { volume } => {
            let status = c.replication().map_err(client_failure)?;
            if api.json {
                print_json(&status);
                return Ok(());
            }
            if status.volumes.is_empty() && volume.is_none() {
                println!("no replicated volumes");
                return Ok(());
            }
            match replication_view::replica_table(&status, volume.as_deref()) {
                Some(table) => print!("{table}"),
                None => {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "volume {}: not replicated on this node",
                        volume.unwrap_or_default()
                    )))
                }
            }
            return Ok(());
        }
        ReplicaCommand::Suspend { volume, node } => c.suspend_replica(&volume, &node),
        ReplicaCommand::Resume { volume, node } => c.resume_replica(&volume, &node),
        ReplicaCommand::Resolve { volume, discard } => c.resolve(&volume, &discard),
        ReplicaCommand::Add {
            volume,
            node,
            address,
            mode,
        } => c.add_replica(&volume, &node, &address, &mode),
        ReplicaCommand::Remove { volume, node } => c.remove_replica(&volume, &node),
        ReplicaCommand::Verify {
            volume,
            repair,
            timeout_s,
        } => return crate::verify_cmd::run(api, &volume, repair, timeout_s),
    }
    .map_err(client_failure)?;
    print_message(api, &message);
    Ok(())
}
