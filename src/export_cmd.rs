//! `ringblock export …`: ask the running daemon, through its web API, to add, stop or list ublk
//! exports. The daemon does the work in-process (`ringblock_transports::ublk`).
//!
//! Routes (served by the web crate):
//!   GET    /api/ublk              → 200, a JSON list of exports
//!   POST   /api/ublk              {"volume": NAME} → 201, the new export
//!   DELETE /api/ublk/{volume}     → 204
//!
//! Flags, environment, defaults and exit codes are those of `ringblock volume …`.

use ringblock_web::client;

use crate::serve::Failure;
use crate::web::{client_failure, connect, print_json, ApiArgs};

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
    let (c, _) = connect(api)?;
    match cmd {
        ExportCommand::Ublk { volume } => {
            let e = c.start_ublk(&volume).map_err(client_failure)?;
            if api.json {
                print_json(&e);
            } else {
                println!("{} serves volume {}", e.path, e.volume);
            }
        }
        ExportCommand::Stop { volume } => {
            c.stop_ublk(&volume).map_err(client_failure)?;
            if !api.json {
                println!("stopped the ublk export of volume {volume}");
            }
        }
        ExportCommand::List => {
            let list = c.ublk_exports().map_err(client_failure)?;
            if api.json {
                print_json(&list);
            } else {
                print!("{}", client::ublk_table(&list));
            }
        }
    }
    Ok(())
}
