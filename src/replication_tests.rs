use std::os::unix::fs::PermissionsExt;

use super::*;

const BASE: &str = "[[device]]\nname='a'\nkind='ram'\nsize_bytes=67108864\n\
                    [[volume]]\nname='v'\ndevice='a'\nsize_bytes=4096\n";

/// A private, non-empty secret file in a fresh directory.
fn secret() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.secret");
    std::fs::write(&path, "s3cret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir, path)
}

fn peer(secret: &Path) -> String {
    format!(
        "[peer]\ncluster_id='lab'\nsecret_file='{}'\nnode_name='left'\n",
        secret.display()
    )
}

/// The role line a replicated volume needs (after BASE's [[volume]]).
const ROLE: &str = "role='primary'\n";

fn replica(node: &str, address: &str) -> String {
    format!("[[volume.replica]]\nnode='{node}'\naddress='{address}'\n")
}

const OTHER: &str = "0123456789abcdef0123456789abcdef";
const RIGHT: &str = "00000000000000000000000000000abc";

fn own() -> NodeId {
    "ffffffffffffffffffffffffffffffff".parse().unwrap()
}

/// The error `parse` + `validate` + `replication(own)` gives, all of which serve runs.
fn refused(text: &str) -> String {
    let r = DaemonConfig::parse(text)
        .and_then(|c| c.validate().map(|()| c))
        .and_then(|c| c.replication(own()));
    match r {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_full_replica_set_is_checked_into_the_runtime_form() {
    let (_d, s) = secret();
    let text = format!(
        "{BASE}{ROLE}{}mode='async'\n{}{}",
        replica(RIGHT, "10.0.0.2:10810"),
        replica(OTHER, "[::1]:10811"),
        peer(&s)
    );
    let cfg = DaemonConfig::parse(&text).unwrap();
    cfg.validate().unwrap();
    let r = cfg
        .replication(own())
        .unwrap()
        .expect("replicas configured");
    assert_eq!(r.node_id, own());
    assert_eq!(r.cluster_id, "lab");
    assert_eq!(r.listen, DEFAULT_PEER_LISTEN.parse().unwrap());
    // The configuration's default is where the peer listener listens by default.
    assert_eq!(
        r.listen,
        ringblock_transports::peer::listener::DEFAULT_PEER_LISTEN
    );
    assert_eq!(r.volumes.len(), 1);
    let reps = &r.volumes[0].replicas;
    assert_eq!(reps[0].node, RIGHT.parse().unwrap());
    assert_eq!(r.volumes[0].role, VolumeRole::Primary);
    assert_eq!(reps[0].mode, ReplicaMode::Async);
    assert_eq!(reps[0].queue_limit_bytes, DEFAULT_QUEUE_LIMIT_MIB << 20);
    assert_eq!(reps[1].node, OTHER.parse().unwrap());
    assert_eq!(reps[1].mode, ReplicaMode::Sync, "sync unless said");
    let lines = describe(&cfg, Some(own()));
    assert!(lines[0].contains(&own().to_string()) && lines[0].contains("left"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("copy on node {RIGHT} at 10.0.0.2:10810 (async)"))),
        "{lines:?}"
    );
    // The same text survives a round trip through the serializer.
    let again = DaemonConfig::parse(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn without_replicas_nothing_is_required() {
    let cfg = DaemonConfig::parse(BASE).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.replication(own()).unwrap(), None);
    assert_eq!(cfg.peer, PeerConfig::default());
    assert!(describe(&cfg, None)[0].contains("made at the first start"));
}

/// Node id number `n` as configuration text.
fn id(n: u128) -> String {
    format!("{n:032x}")
}

#[test]
fn each_mistake_is_named() {
    let (_d, s) = secret();
    let p = peer(&s);
    let r = id(0xabc);
    let many: String = (1..=5).map(|i| replica(&id(i), "10.0.0.2:1")).collect();
    let cases: Vec<(String, String)> = vec![
        (
            format!(
                "{BASE}{ROLE}{}{}{p}",
                replica(&r, "h:1"),
                replica(&r, "g:2")
            ),
            format!("node {r} is a replica of this volume twice"),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&own().to_string(), "h:1")),
            "is this node".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica("left", "h:1")),
            "replicas are named by node id".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica("right", "h:1")),
            "`ringblock check-config` on that node prints its id".into(),
        ),
        (format!("{BASE}{ROLE}{many}{p}"), "at most 4".into()),
        (
            format!("{BASE}{}{p}", replica(&r, "h:1")),
            "set role = \"primary\"".into(),
        ),
        (
            format!("{BASE}role='replica'\n{p}"),
            "sets a role but has no [[volume.replica]]".into(),
        ),
        (
            format!("{BASE}role='leader'\n{}{p}", replica(&r, "h:1")),
            "leader".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&r, "10.0.0.2")),
            "has no :port".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&r, "h:0")),
            "is not 1-65535".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&r, "h:http")),
            "is not 1-65535".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&r, "bad host:1")),
            "nor a DNS name".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&r, ":1")),
            "nor a DNS name".into(),
        ),
        (
            format!("{BASE}{ROLE}{}{p}", replica(&"0".repeat(32), "h:1")),
            "not a node id".into(),
        ),
        (
            format!("{BASE}{ROLE}{}mode='semi'\n{p}", replica(&r, "h:1")),
            "semi".into(),
        ),
        (
            format!(
                "{BASE}{ROLE}{}[peer]\nsecret_file='{}'\n",
                replica(&r, "h:1"),
                s.display()
            ),
            "cluster_id is required".into(),
        ),
        (
            format!(
                "{BASE}{ROLE}{}[peer]\ncluster_id='lab'\n",
                replica(&r, "h:1")
            ),
            "secret_file is required".into(),
        ),
        (
            format!("{BASE}[peer]\ncluster_id='a b'\n"),
            "cluster_id".into(),
        ),
        (
            format!("{BASE}[peer]\nlisten='nowhere'\n"),
            "[peer] listen".into(),
        ),
        (format!("{BASE}[peer]\nport=1\n"), "port".into()),
    ];
    for (text, says) in cases {
        let e = refused(&text);
        assert!(e.contains(&says), "expected {says:?} in: {e}\n{text}");
    }
}

#[test]
fn the_secret_file_must_exist_hold_something_and_stay_private() {
    let (dir, s) = secret();
    let text = |path: &Path| format!("{BASE}{ROLE}{}{}", replica(&id(0xabc), "h:1"), peer(path));
    let e = refused(&text(&dir.path().join("missing")));
    assert!(
        e.contains("secret_file") && e.contains("No such file"),
        "{e}"
    );
    std::fs::write(&s, " \n").unwrap();
    assert!(refused(&text(&s)).contains("is empty"));
    std::fs::write(&s, "s3cret").unwrap();
    for (mode, says) in [
        (0o644, "any local user can read"),
        (0o620, "writable by group or others"),
    ] {
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = refused(&text(&s));
        assert!(e.contains(says) && e.contains("chmod 600"), "{mode:o}: {e}");
    }
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o640)).unwrap();
    DaemonConfig::parse(&text(&s)).unwrap().validate().unwrap();
    std::fs::write(&s, vec![b'x'; 5000]).unwrap();
    assert!(refused(&text(&s)).contains("5000 bytes"));
    assert!(refused(&text(dir.path())).contains("not a regular file"));
}

#[test]
fn an_async_queue_bound_is_checked() {
    let (_d, s) = secret();
    let with = |extra: &str| {
        format!(
            "{BASE}{ROLE}{}{extra}{}",
            replica(RIGHT, "10.0.0.2:10810"),
            peer(&s)
        )
    };
    let cfg = DaemonConfig::parse(&with("mode='async'\nqueue_limit_mib=8\n")).unwrap();
    cfg.validate().unwrap();
    let r = cfg.replication(own()).unwrap().unwrap();
    assert_eq!(r.volumes[0].replicas[0].queue_limit_bytes, 8 << 20);
    let e = refused(&with("queue_limit_mib=8\n"));
    assert!(e.contains("queue_limit_mib is for mode = \"async\""), "{e}");
    for bad in [0, 4097] {
        let e = refused(&with(&format!("mode='async'\nqueue_limit_mib={bad}\n")));
        assert!(e.contains("outside 1..=4096"), "{e}");
    }
}
