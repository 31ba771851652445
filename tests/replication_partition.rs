//! Partitions between two real daemons, each in a network namespace the test makes (see
//! `support/netns.rs`): the replication link is cut with `ip link set … down` and healed. The
//! test reaches each daemon's API and NBD on its namespace's loopback.
//!
//! - A partitioned sync replica degrades the volume, which keeps serving writes.
//! - A forced split brain (the replica promoted with `force` while cut off, writes on both
//!   sides) is reported as diverged on both nodes after the heal, and no data moves.
//! - After `resolve` discards one side, the nodes converge to the survivor's data.

mod common;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/node_dir.rs"]
mod node_dir;
#[path = "support/required.rs"]
mod required;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{http_auth, nbd_connect, pattern, wait_for, web_endpoint, write_file, Daemon, BIN};
use netns::Pair;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 32 * MIB;
const A_ID: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
const B_ID: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
const PEER_PORT: u16 = 10810;
const NBD_PORT: u16 = 10809;
const LIMIT: Duration = Duration::from_secs(90);

struct Node {
    dir: PathBuf,
    ns: String,
    id: &'static str,
    repl: String,
}

struct Running {
    ns: String,
    daemon: Daemon,
    web: String,
    token: String,
    nbd: String,
}

impl Node {
    fn new(root: &Path, ns: &str, id: &'static str, repl: String) -> Node {
        let dir = node_dir::create(root, ns, id, "partition test secret\n");
        Node {
            dir,
            ns: ns.to_string(),
            id,
            repl,
        }
    }

    fn start(&self, role: &str, other: &Node) -> Running {
        let cfg = write_file(
            &self.dir,
            "ringblock.toml",
            &format!(
                "[peer]\ncluster_id = \"part\"\nlisten = \"{}:{PEER_PORT}\"\nsecret_file = \"{}\"\n\n\
                 [[device]]\nname = \"r\"\nkind = \"ram\"\nsize_bytes = {}\n\n\
                 [[volume]]\nname = \"v\"\ndevice = \"r\"\nsize_bytes = {VOLUME_BYTES}\nrole = \"{role}\"\n\n\
                 [[volume.replica]]\nnode = \"{}\"\naddress = \"{}:{PEER_PORT}\"\n",
                self.repl,
                self.dir.join("cluster.secret").display(),
                4 * VOLUME_BYTES,
                other.id,
                other.repl,
            ),
        );
        let nbd = format!("127.0.0.1:{NBD_PORT}");
        let web = "127.0.0.1:0".to_string();
        let mut cmd = Pair::command(&self.ns, BIN);
        cmd.args([
            "serve",
            "--config",
            &cfg,
            "--listen",
            &nbd,
            "--web-listen",
            &web,
            "--state-dir",
            self.dir.join("state").to_str().unwrap(),
        ])
        .stderr(Stdio::from(
            std::fs::File::create(self.dir.join("daemon.log")).unwrap(),
        ));
        let daemon = Daemon::start_command(cmd);
        let (web, token) = web_endpoint(&daemon);
        Running {
            ns: self.ns.clone(),
            daemon,
            web,
            token: token.expect("a first start prints its token"),
            nbd,
        }
    }
}

impl Running {
    fn status(&self) -> serde_json::Value {
        let (web, token) = (&self.web, &self.token);
        let r = Pair::in_ns(&self.ns, || {
            http_auth(web, token, "GET", "/api/replication", &[], None)
        });
        assert_eq!(r.status, 200, "{}", r.error());
        r.json()
    }

    fn peer_state(&self) -> String {
        self.status()["volumes"][0]["peers"][0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_state(&self, state: &str, what: &str) {
        wait_for(LIMIT, what, || (self.peer_state() == state).then_some(()));
    }

    fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (web, token) = (&self.web, &self.token);
        let r = Pair::in_ns(&self.ns, || {
            http_auth(
                web,
                token,
                "POST",
                path,
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
        });
        (r.status, r.json())
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let nbd = &self.nbd;
        Pair::in_ns(&self.ns, || {
            let mut c = nbd_connect(nbd, "v");
            c.write(offset, data, 0).unwrap();
            c.flush().unwrap();
            c.disconnect();
        });
    }

    fn read(&self, offset: u64, len: u32) -> Vec<u8> {
        let nbd = &self.nbd;
        Pair::in_ns(&self.ns, || {
            let mut c = nbd_connect(nbd, "v");
            let mut data = Vec::with_capacity(len as usize);
            // In pieces any server takes.
            while (data.len() as u32) < len {
                let piece = (len - data.len() as u32).min(4 << 20);
                data.extend(c.read(offset + data.len() as u64, piece).unwrap());
            }
            c.disconnect();
            data
        })
    }
}

#[test]
fn partitions_degrade_then_a_forced_split_brain_waits_for_resolve() {
    const T: &str = "partitions_degrade_then_a_forced_split_brain_waits_for_resolve";
    if let Some(why) = netns::unavailable() {
        return required::skip(T, &why);
    }
    let net = Pair::new("p");
    let root = tempfile::tempdir().unwrap();
    let a = Node::new(root.path(), &net.a, A_ID, net.repl_a());
    let b = Node::new(root.path(), &net.b, B_ID, net.repl_b());
    let rb = b.start("replica", &a);
    let ra = a.start("primary", &b);
    ra.wait_state("up-to-date", "the replica to come up to date");
    let first = pattern(1, MIB as usize);
    ra.write(0, &first);

    // Cut: the primary degrades and keeps serving.
    net.cut();
    let during = pattern(2, MIB as usize);
    ra.write(4 * MIB, &during);
    assert_ne!(ra.peer_state(), "up-to-date");
    assert_eq!(ra.read(4 * MIB, MIB as u32), during);

    // Forced split brain: the replica is promoted while cut off; both sides write.
    let (status, body) = rb.post("/api/volumes/v/promote", "{\"force\": true}");
    assert_eq!(status, 200, "{body}");
    let (on_a, on_b) = (pattern(3, MIB as usize), pattern(4, MIB as usize));
    ra.write(8 * MIB, &on_a);
    rb.write(8 * MIB, &on_b);

    // Healed: both see the divergence, and nothing moved.
    net.heal();
    ra.wait_state("diverged", "the old primary to report the split brain");
    rb.wait_state("diverged", "the promoted replica to report the split brain");
    assert_eq!(ra.read(8 * MIB, MIB as u32), on_a);
    assert_eq!(rb.read(8 * MIB, MIB as u32), on_b);
    assert_eq!(rb.read(4 * MIB, MIB as u32), vec![0u8; MIB as usize]);

    // Resolve by discarding B: it becomes a replica again and gets A's data.
    // (Our last NBD client's disconnect may still be on its way to the server.)
    wait_for(LIMIT, "the demote of B", || {
        let (status, body) = rb.post("/api/volumes/v/demote", "{}");
        match status {
            200 => Some(()),
            409 if body.to_string().contains("NBD client") => None,
            _ => panic!("demote: {status} {body}"),
        }
    });
    let (status, body) = rb.post(
        "/api/volumes/v/resolve",
        &format!("{{\"discard\": \"{B_ID}\"}}"),
    );
    assert_eq!(status, 200, "{body}");
    ra.wait_state("up-to-date", "the discarded side to be resynced");
    let image_a = ra.read(0, VOLUME_BYTES as u32);
    ra.daemon.stop_clean();
    let (status, body) = rb.post("/api/volumes/v/promote", "{\"force\": false}");
    assert_eq!(status, 200, "{body}");
    assert!(
        rb.read(0, VOLUME_BYTES as u32) == image_a,
        "after resolve the nodes differ"
    );
    rb.daemon.stop_clean();
}
