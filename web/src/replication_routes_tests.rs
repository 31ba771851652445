//! The replication routes on a real server (a real engine with a RAM device, the real router,
//! auth and blocking pool) with a fake `ReplicationControl` that records what it was asked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringblock_engine::device::DeviceConfig;
use ringblock_engine::replication::{NodeId, PeerState, Role, VolumeReplication};
use ringblock_engine::{Engine, EngineConfig};
use serde_json::{json, Value};

use crate::api::{NbdClient, NbdStatus, UblkControl, UblkControlError, UblkExport};
use crate::replication::{
    ByteRange, PeerReplicationStatus, ReplicationControl, ReplicationControlError,
    ReplicationStatus, VerifyReplicaStatus, VerifyStatus, VolumeReplicationStatus,
};
use crate::{TokenStore, WebServer};

const MIB: u64 = 1 << 20;
const PEER: &str = "000000000000000000000000000000b0";

struct NoNbd;

impl NbdStatus for NoNbd {
    fn listeners(&self) -> Vec<String> {
        Vec::new()
    }
    fn export_uris(&self, _: &str) -> Vec<String> {
        Vec::new()
    }
    fn read_only(&self, _: &str) -> bool {
        false
    }
    fn clients(&self) -> Vec<NbdClient> {
        Vec::new()
    }
}

struct NoUblk;

impl UblkControl for NoUblk {
    fn list(&self) -> Vec<UblkExport> {
        Vec::new()
    }
    fn start(&self, _: &Engine, _: &str) -> Result<UblkExport, UblkControlError> {
        Err(UblkControlError::Unavailable("none here".into()))
    }
    fn stop(&self, _: &str) -> Result<(), UblkControlError> {
        Err(UblkControlError::Unavailable("none here".into()))
    }
    fn unavailable(&self) -> Option<String> {
        Some("none here".into())
    }
}

/// Records every command; refuses promote without force (409), an unknown peer (404), and
/// resolve of a node other than this one (409), as the runtime does.
#[derive(Default)]
struct FakeControl {
    calls: Mutex<Vec<String>>,
}

impl FakeControl {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

impl ReplicationControl for FakeControl {
    fn status(&self) -> ReplicationStatus {
        ReplicationStatus {
            node_id: "000000000000000000000000000000a0".into(),
            node_name: None,
            cluster: "lab".into(),
            listen: "127.0.0.1:7900".into(),
            volumes: vec![VolumeReplicationStatus {
                volume: "rep".into(),
                role: "primary".into(),
                generation: Some("00000000000000ab".into()),
                history_len: 1,
                region_size_bytes: MIB,
                exportable: true,
                not_exportable_reason: None,
                peers: vec![PeerReplicationStatus {
                    node: PEER.into(),
                    address: "127.0.0.1:7901".into(),
                    mode: "sync".into(),
                    state: "up-to-date".into(),
                    reason: None,
                    connected_since_unix_ms: Some(1),
                    dirty_bytes: 0,
                    lag_bytes: 8192,
                    lag_ms: Some(2),
                    resync: None,
                    last_resync: None,
                }],
            }],
        }
    }
    fn promote(&self, volume: &str, force: bool) -> Result<String, ReplicationControlError> {
        self.record(format!("promote {volume} {force}"));
        if force {
            Ok(format!("{volume} is primary here"))
        } else {
            Err(ReplicationControlError::Conflict(
                "a primary is connected".into(),
            ))
        }
    }
    fn demote(&self, volume: &str) -> Result<String, ReplicationControlError> {
        self.record(format!("demote {volume}"));
        Err(ReplicationControlError::Failed(
            "metadata not durable".into(),
        ))
    }
    fn suspend(&self, volume: &str, node: &str) -> Result<String, ReplicationControlError> {
        self.record(format!("suspend {volume} {node}"));
        if node == PEER {
            Ok(format!("suspended {node}"))
        } else {
            Err(ReplicationControlError::NotFound(format!("no peer {node}")))
        }
    }
    fn resume(&self, volume: &str, node: &str) -> Result<String, ReplicationControlError> {
        self.record(format!("resume {volume} {node}"));
        Err(ReplicationControlError::Invalid("not suspended".into()))
    }
    fn resolve(&self, volume: &str, discard: &str) -> Result<String, ReplicationControlError> {
        self.record(format!("resolve {volume} {discard}"));
        Err(ReplicationControlError::Conflict(format!(
            "run this on node {discard}"
        )))
    }
    fn add_replica(
        &self,
        volume: &str,
        node: &str,
        address: &str,
        mode: &str,
    ) -> Result<String, ReplicationControlError> {
        self.record(format!("add {volume} {node} {address} {mode}"));
        if node == PEER {
            Err(ReplicationControlError::Conflict("already a peer".into()))
        } else {
            Ok(format!("added {node}"))
        }
    }
    fn remove_replica(&self, volume: &str, node: &str) -> Result<String, ReplicationControlError> {
        self.record(format!("remove {volume} {node}"));
        Ok(format!("removed {node}"))
    }
    fn start_verify(&self, volume: &str, repair: bool) -> Result<String, ReplicationControlError> {
        self.record(format!("verify {volume} {repair}"));
        Ok(format!("verifying {volume}"))
    }
    fn verify_status(&self, volume: &str) -> Result<VerifyStatus, ReplicationControlError> {
        self.record(format!("verify status {volume}"));
        Ok(VerifyStatus {
            volume: volume.into(),
            running: false,
            repair: true,
            started_unix_ms: Some(5),
            finished_unix_ms: Some(9),
            replicas: vec![VerifyReplicaStatus {
                node: PEER.into(),
                state: "done".into(),
                peer_state: "up-to-date".into(),
                regions_checked: 64,
                bytes_checked: 64 * MIB,
                mismatched_regions: 1,
                mismatched: vec![ByteRange {
                    offset_bytes: 3 * MIB,
                    len_bytes: MIB,
                }],
                repaired: true,
                ..VerifyReplicaStatus::default()
            }],
        })
    }
}

struct Harness {
    server: WebServer,
    engine: Option<Arc<Engine>>,
    token: String,
    agent: ureq::Agent,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: u16,
    body: Value,
    text: String,
}

impl Harness {
    fn start(control: Option<Arc<dyn ReplicationControl>>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(
            Engine::start(&EngineConfig {
                devices: vec![DeviceConfig::ram("ram0", 256 * MIB)],
                ..Default::default()
            })
            .expect("engine with a RAM device"),
        );
        engine.create_volume("ram0", "rep", 64 * MIB).unwrap();
        engine.create_volume("ram0", "plain", 16 * MIB).unwrap();
        let (tokens, token) = TokenStore::open_or_create(dir.path()).unwrap();
        let bound = WebServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = WebServer::start(
            bound,
            tokens,
            &[],
            engine.clone(),
            Arc::new(NoNbd),
            Arc::new(NoUblk),
            control,
        )
        .unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .proxy(None)
            .build()
            .into();
        Harness {
            server,
            engine: Some(engine),
            token: token.expect("a new token"),
            agent,
            _dir: dir,
        }
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    /// `method path` with the token (unless `token` is false), `headers` and a JSON body.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: bool,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        let url = format!("http://{}{path}", self.server.local_addr());
        let auth = format!("Bearer {}", self.token);
        let resp = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                if token {
                    r = r.header("Authorization", &auth);
                }
                r.call()
            }
            "DELETE" => {
                let mut r = self.agent.delete(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                if token {
                    r = r.header("Authorization", &auth);
                }
                r.call()
            }
            _ => {
                let mut r = self.agent.post(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                if token {
                    r = r.header("Authorization", &auth);
                }
                match body {
                    Some(b) => r.send_json(b),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = resp.expect("the server answers");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body, text }
    }

    fn get(&self, path: &str) -> Answer {
        self.call("GET", path, true, &[], None)
    }

    fn post(&self, path: &str, body: Option<Value>) -> Answer {
        self.call("POST", path, true, &[], body)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.stop();
        if let Some(engine) = self.engine.take().and_then(Arc::into_inner) {
            let _ = engine.shutdown();
        }
    }
}

#[test]
fn without_a_control_the_status_is_empty_and_commands_say_not_replicated() {
    let h = Harness::start(None);
    let r = h.get("/api/replication");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["volumes"], json!([]));
    assert_eq!(
        h.call("GET", "/api/replication", false, &[], None).status,
        401
    );
    let r = h.post("/api/volumes/rep/promote", Some(json!({"force": false})));
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.body["error"].as_str().unwrap().contains("not replicated"));
    let r = h.post("/api/volumes/rep/demote", None);
    assert_eq!(r.status, 404, "{}", r.text);
    // No replicated volume: a volume carries no replication, /metrics declares the families
    // with no sample.
    assert_eq!(h.get("/api/volumes/rep").body["replication"], Value::Null);
    let m = h.get("/metrics").text;
    assert!(m.contains("# TYPE ringblock_replica_state gauge"), "{m}");
    assert!(!m.contains("ringblock_replica_state{"), "{m}");
}

#[test]
fn commands_reach_the_control_and_its_errors_keep_their_status() {
    let fake = Arc::new(FakeControl::default());
    let h = Harness::start(Some(fake.clone()));

    let r = h.get("/api/replication");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["volumes"][0]["peers"][0]["node"], PEER);
    assert_eq!(r.body["volumes"][0]["peers"][0]["lag_bytes"], 8192);

    let r = h.post("/api/volumes/rep/promote", Some(json!({"force": true})));
    assert_eq!(
        (r.status, r.body["message"].as_str()),
        (200, Some("rep is primary here"))
    );
    let r = h.post("/api/volumes/rep/promote", Some(json!({})));
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.body["error"], "a primary is connected");
    let r = h.post("/api/volumes/rep/demote", None);
    assert_eq!(r.status, 500, "{}", r.text);
    let path = |action: &str, node: &str| format!("/api/volumes/rep/replicas/{node}/{action}");
    let r = h.post(&path("suspend", PEER), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["message"], format!("suspended {PEER}"));
    let other = "000000000000000000000000000000c0";
    assert_eq!(h.post(&path("suspend", other), None).status, 404);
    assert_eq!(h.post(&path("resume", PEER), None).status, 400);
    let r = h.post("/api/volumes/rep/resolve", Some(json!({"discard": PEER})));
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.body["error"].as_str().unwrap().contains("run this on"));
    // Upper-case hex is the same node: the control gets the canonical spelling.
    let r = h.post(&path("suspend", &PEER.to_uppercase()), None);
    assert_eq!(r.status, 200, "{}", r.text);

    // Refused before the control is asked: not a node id, an unknown volume, a bad body.
    let before = fake.calls().len();
    let r = h.post(&path("suspend", "left"), None);
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.body["error"].as_str().unwrap().contains("node id"));
    assert_eq!(h.post("/api/volumes/nope/demote", None).status, 404);
    for bad in [
        json!({}),
        json!({"discard": PEER, "extra": 1}),
        json!({"discard": "x"}),
    ] {
        assert_eq!(
            h.post("/api/volumes/rep/resolve", Some(bad.clone())).status,
            400,
            "{bad}"
        );
    }
    assert_eq!(
        h.post("/api/volumes/rep/promote", Some(json!({"force": "yes"})))
            .status,
        400
    );
    assert_eq!(fake.calls().len(), before, "{:?}", fake.calls());

    // Auth: no token, then a foreign Host and Origin on a state-changing call.
    let demote = "/api/volumes/rep/demote";
    assert_eq!(h.call("POST", demote, false, &[], None).status, 401);
    let addr = h.server.local_addr().to_string();
    assert_eq!(
        h.call("POST", demote, true, &[("Host", "evil.example:80")], None)
            .status,
        403
    );
    assert_eq!(
        h.call(
            "POST",
            demote,
            true,
            &[("Host", addr.as_str()), ("Origin", "http://evil.example")],
            None
        )
        .status,
        403
    );
    assert_eq!(fake.calls().len(), before, "{:?}", fake.calls());
    assert_eq!(
        fake.calls(),
        [
            "promote rep true".to_string(),
            "promote rep false".into(),
            "demote rep".into(),
            format!("suspend rep {PEER}"),
            format!("suspend rep {other}"),
            format!("resume rep {PEER}"),
            format!("resolve rep {PEER}"),
            format!("suspend rep {PEER}"),
        ]
    );
}

#[test]
fn add_and_remove_replica_reach_the_control() {
    let fake = Arc::new(FakeControl::default());
    let h = Harness::start(Some(fake.clone()));
    let other = "000000000000000000000000000000C0";
    let r = h.post(
        "/api/volumes/rep/replicas",
        Some(json!({"node": other, "address": "10.0.0.3:10810"})),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["message"], format!("added {}", other.to_lowercase()));
    let r = h.post(
        "/api/volumes/rep/replicas",
        Some(json!({"node": PEER, "address": "h:1", "mode": "async"})),
    );
    assert_eq!(r.status, 409, "{}", r.text);
    let before = fake.calls().len();
    for bad in [
        json!({"node": "x", "address": "h:1"}),
        json!({"node": PEER}),
        json!({"node": PEER, "address": "h:1", "extra": true}),
    ] {
        let r = h.post("/api/volumes/rep/replicas", Some(bad.clone()));
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
    }
    assert_eq!(fake.calls().len(), before);
    let r = h.call(
        "DELETE",
        &format!("/api/volumes/rep/replicas/{PEER}"),
        true,
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let r = h.call("DELETE", "/api/volumes/rep/replicas/left", true, &[], None);
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        h.call(
            "DELETE",
            &format!("/api/volumes/rep/replicas/{PEER}"),
            false,
            &[],
            None
        )
        .status,
        401
    );
    assert_eq!(
        fake.calls(),
        [
            format!("add rep {} 10.0.0.3:10810 sync", other.to_lowercase()),
            format!("add rep {PEER} h:1 async"),
            format!("remove rep {PEER}"),
        ]
    );
}

#[test]
fn volumes_and_metrics_show_the_engine_replication_state() {
    let fake = Arc::new(FakeControl::default());
    let h = Harness::start(Some(fake));
    let v = h.engine().volume("rep").unwrap();
    let peer: NodeId = PEER.parse().unwrap();
    let r = VolumeReplication::new(Role::Primary, v.size_bytes(), 20, &[peer]).unwrap();
    r.mark_dirty(&[peer], 0, 5 * MIB);
    r.replica(peer)
        .unwrap()
        .status
        .set(PeerState::Behind, Some("timed out"));
    v.set_replication(Some(Arc::new(r)));

    let info = h.get("/api/volumes/rep").body;
    assert_eq!(
        info["replication"],
        json!({"role": "primary", "peers": [{"node": PEER, "state": "behind", "dirty_bytes": 5 * MIB}]})
    );
    assert_eq!(h.get("/api/volumes/plain").body["replication"], Value::Null);
    let list = h.get("/api/volumes").body;
    let rep = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "rep")
        .unwrap();
    assert_eq!(rep["replication"]["role"], "primary");

    let m = h.get("/metrics").text;
    for line in [
        "ringblock_volume_replication_role{volume=\"rep\",role=\"primary\"} 1\n".to_string(),
        "ringblock_volume_replication_role{volume=\"rep\",role=\"replica\"} 0\n".into(),
        format!("ringblock_replica_state{{volume=\"rep\",node=\"{PEER}\",state=\"behind\"}} 1\n"),
        format!(
            "ringblock_replica_state{{volume=\"rep\",node=\"{PEER}\",state=\"up-to-date\"}} 0\n"
        ),
        format!(
            "ringblock_replica_dirty_bytes{{volume=\"rep\",node=\"{PEER}\"}} {}\n",
            5 * MIB
        ),
        format!("ringblock_replica_lag_bytes{{volume=\"rep\",node=\"{PEER}\"}} 8192\n"),
    ] {
        assert!(m.contains(&line), "{line:?} missing:\n{m}");
    }
    assert!(!m.contains("volume=\"plain\",role="), "{m}");
}

#[test]
fn verify_starts_with_202_and_shows_the_control_status() {
    let fake = Arc::new(FakeControl::default());
    let h = Harness::start(Some(fake.clone()));
    let r = h.post("/api/volumes/rep/verify?repair=true", None);
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body["message"], "verifying rep");
    let r = h.post("/api/volumes/rep/verify", None);
    assert_eq!(r.status, 202, "{}", r.text);
    let r = h.get("/api/volumes/rep/verify");
    assert_eq!(r.status, 200, "{}", r.text);
    let replica = &r.body["replicas"][0];
    assert_eq!(replica["node"], PEER);
    assert_eq!(
        replica["mismatched"],
        json!([{"offset_bytes": 3 * MIB, "len_bytes": MIB}])
    );
    assert_eq!(
        (replica["repaired"].as_bool(), r.body["running"].as_bool()),
        (Some(true), Some(false))
    );
    // Refused before the control is asked: a bad query, an unknown volume, no token.
    let before = fake.calls().len();
    assert_eq!(
        h.post("/api/volumes/rep/verify?repair=yes", None).status,
        400
    );
    assert_eq!(h.post("/api/volumes/nope/verify", None).status, 404);
    assert_eq!(h.get("/api/volumes/nope/verify").status, 404);
    assert_eq!(
        h.call("POST", "/api/volumes/rep/verify", false, &[], None)
            .status,
        401
    );
    assert_eq!(fake.calls().len(), before);
    assert_eq!(
        fake.calls(),
        ["verify rep true", "verify rep false", "verify status rep"]
    );
}
