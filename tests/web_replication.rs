//! Replication through a real daemon's API and CLI, on a daemon without replicated volumes:
//! the status is empty, every command says the volume is not replicated (404) after the
//! checks the API makes itself (node ids, bodies, Host), the CLI prints the API's answers
//! with the usual exit codes, and `/metrics` declares the replication families. (The route
//! unit tests in `web/src/replication_routes_tests.rs` cover a control that answers.)

mod common;

use common::{http_auth, run, start_with_web, write_file};
use serde_json::Value;

const NODE: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn replication_api_and_cli_without_replicated_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "repl.toml",
        "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = 134217728\n\
         [[volume]]\nname = \"db\"\ndevice = \"ram0\"\nsize_bytes = 16777216\n",
    );
    let (d, addr, token) = start_with_web(Some(&cfg), &dir.path().join("state"));
    let call = |method: &str, path: &str, body: Option<&str>| {
        http_auth(&addr, &token, method, path, &[], body.map(str::as_bytes))
    };

    let r = call("GET", "/api/replication", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["volumes"], Value::Array(Vec::new()));
    assert_eq!(
        call("GET", "/api/volumes/db", None).json()["replication"],
        Value::Null
    );
    for (path, body) in [
        ("/api/volumes/db/promote", Some(r#"{"force": true}"#)),
        ("/api/volumes/db/demote", None),
        (
            &format!("/api/volumes/db/replicas/{NODE}/suspend")[..],
            None,
        ),
        (&format!("/api/volumes/db/replicas/{NODE}/resume")[..], None),
        (
            "/api/volumes/db/resolve",
            Some(&format!(r#"{{"discard": "{NODE}"}}"#)[..]),
        ),
        (
            "/api/volumes/db/replicas",
            Some(&format!(r#"{{"node": "{NODE}", "address": "10.0.0.2:10810"}}"#)[..]),
        ),
        ("/api/volumes/db/verify?repair=true", None),
    ] {
        let r = call("POST", path, body);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert!(r.error().contains("not replicated"), "{path}: {r:?}");
    }
    let r = call("DELETE", &format!("/api/volumes/db/replicas/{NODE}"), None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.error().contains("not replicated"), "{r:?}");
    let r = call("GET", "/api/volumes/db/verify", None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.error().contains("not replicated"), "{r:?}");
    let r = call("POST", "/api/volumes/db/replicas/left/suspend", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("node id"), "{r:?}");
    assert_eq!(call("POST", "/api/volumes/nope/demote", None).status, 404);
    let r = http_auth(
        &addr,
        &token,
        "POST",
        "/api/volumes/db/demote",
        &[("Host", "evil.example:80")],
        None,
    );
    assert_eq!(r.status, 403, "{r:?}");
    let m = call("GET", "/metrics", None).body;
    for family in [
        "ringblock_volume_replication_role",
        "ringblock_replica_state",
        "ringblock_replica_dirty_bytes",
        "ringblock_replica_lag_bytes",
        "ringblock_replica_resync_done_bytes",
        "ringblock_replica_resync_total_bytes",
    ] {
        assert!(
            m.contains(&format!("# TYPE {family} gauge\n")),
            "{family}:\n{m}"
        );
    }

    // The CLI: the API's answers, exit 1 for a refusal, 2 for bad usage.
    let api = format!("http://{addr}");
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--api", &api, "--token", &token]);
        run(&a)
    };
    let (code, out, err) = cli(&["replica", "list"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "no replicated volumes\n"),
        "{err}"
    );
    let (code, out, err) = cli(&["replica", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["volumes"],
        Value::Array(Vec::new())
    );
    let (code, _, err) = cli(&["replica", "list", "db"]);
    assert_eq!(code, 1);
    assert!(err.contains("db: not replicated"), "{err}");
    let (code, _, err) = cli(&["volume", "promote", "db", "--force"]);
    assert_eq!(code, 1);
    assert!(err.contains("split brain"), "the warning: {err}");
    assert!(
        err.contains("not replicated") && err.contains("404"),
        "{err}"
    );
    for args in [
        &["volume", "demote", "db"][..],
        &["replica", "suspend", "db", NODE],
        &["replica", "resume", "db", NODE],
        &["replica", "resolve", "db", "--discard", NODE],
        &[
            "replica",
            "add",
            "db",
            NODE,
            "10.0.0.2:10810",
            "--mode",
            "sync",
        ],
        &["replica", "remove", "db", NODE],
        &["replica", "verify", "db", "--repair"],
    ] {
        let (code, _, err) = cli(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("not replicated"), "{args:?}: {err}");
    }
    let (code, _, err) = cli(&["replica", "suspend", "db", "left"]);
    assert_eq!(code, 1);
    assert!(err.contains("node id") && err.contains("400"), "{err}");
    let (code, _, err) = cli(&["replica", "resolve", "db"]);
    assert_eq!(code, 2, "missing --discard: {err}");
    let (code, _, err) = cli(&["replica", "add", "db", NODE, "h:1", "--mode", "fast"]);
    assert_eq!(code, 2, "a mode that is not sync or async: {err}");
    let (code, out, err) = cli(&["volume", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().next().unwrap().ends_with("REPLICATION"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("db ") && l.ends_with(" -")),
        "{out}"
    );
    let (code, out, err) = cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("replication"), "no replicated volume: {out}");
    d.stop_clean();
}
