//! The command line parses as documented (no daemon needed).

use clap::Parser;

use super::{Cli, Command};
use crate::replica_cmd::ReplicaCommand;
use crate::web::VolumeCommand;

const NODE: &str = "0123456789abcdef0123456789abcdef";

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("ringblock").chain(args.iter().copied()))
}

fn replica(args: &[&str]) -> ReplicaCommand {
    match parse(args).unwrap().command {
        Some(Command::Replica { command, .. }) => command,
        _ => panic!("{args:?} is not a replica command"),
    }
}

#[test]
fn replica_commands_parse() {
    assert_eq!(
        replica(&["replica", "list"]),
        ReplicaCommand::List { volume: None }
    );
    assert_eq!(
        replica(&["replica", "list", "db"]),
        ReplicaCommand::List {
            volume: Some("db".into())
        }
    );
    assert_eq!(
        replica(&["replica", "suspend", "db", NODE]),
        ReplicaCommand::Suspend {
            volume: "db".into(),
            node: NODE.into()
        }
    );
    assert_eq!(
        replica(&["replica", "resume", "db", NODE]),
        ReplicaCommand::Resume {
            volume: "db".into(),
            node: NODE.into()
        }
    );
    assert_eq!(
        replica(&["replica", "resolve", "db", "--discard", NODE]),
        ReplicaCommand::Resolve {
            volume: "db".into(),
            discard: NODE.into()
        }
    );
    assert_eq!(
        replica(&["replica", "verify", "db"]),
        ReplicaCommand::Verify {
            volume: "db".into(),
            repair: false,
            timeout_s: 86400
        }
    );
    assert_eq!(
        replica(&["replica", "verify", "db", "--repair", "--timeout-s", "60"]),
        ReplicaCommand::Verify {
            volume: "db".into(),
            repair: true,
            timeout_s: 60
        }
    );
    // The API flags go anywhere, as for `volume`.
    match parse(&["replica", "list", "--json", "--api", "http://127.0.0.1:9"])
        .unwrap()
        .command
    {
        Some(Command::Replica { api, .. }) => {
            assert!(api.json);
            assert_eq!(api.api.as_deref(), Some("http://127.0.0.1:9"));
        }
        _ => panic!("not a replica command"),
    }
    for bad in [
        &["replica", "resolve", "db"][..],
        &["replica", "suspend", "db"],
        &["replica", "add", "db", NODE],
    ] {
        assert!(parse(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn promote_and_demote_are_volume_commands() {
    let volume = |args: &[&str]| match parse(args).unwrap().command {
        Some(Command::Volume { command, .. }) => command,
        _ => panic!("{args:?} is not a volume command"),
    };
    assert!(matches!(
        volume(&["volume", "promote", "db"]),
        VolumeCommand::Promote { name, force: false } if name == "db"
    ));
    assert!(matches!(
        volume(&["volume", "promote", "db", "--force"]),
        VolumeCommand::Promote { name, force: true } if name == "db"
    ));
    assert!(matches!(
        volume(&["volume", "demote", "db"]),
        VolumeCommand::Demote { name } if name == "db"
    ));
    assert!(parse(&["volume", "demote", "db", "--force"]).is_err());
    let warning = crate::replica_cmd::force_warning("db");
    assert!(warning.contains("split brain") && warning.contains("resolve db"));
}
