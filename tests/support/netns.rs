//! Network namespaces a test makes and removes: two nodes, each reachable from the test on its
//! own management link, and one replication link between them that the test cuts and heals.
//!
//! ```text
//!  test (root namespace)                      node A ns                 node B ns
//!  rbN-ma 10.R.1.1 ──── veth ──── mgmt 10.R.1.2
//!  rbN-mb 10.R.2.1 ──── veth ────────────────────────────────────────── mgmt 10.R.2.2
//!                                   repl 10.R.3.1 ──── veth ──── repl 10.R.3.2
//! ```
//!
//! `R` is picked per test process so concurrent tests never share addresses; every address is
//! in 10.0.0.0/8 on links that exist only inside these namespaces, so no test traffic leaves
//! the machine. Dropping the [`Pair`] deletes both namespaces (and with them every link).

#![allow(dead_code)]

use std::process::{Command, Stdio};

/// Why namespaces cannot be made here (not root, no `ip`), for `required::skip`.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("iproute2 (`ip`) is not installed".into()),
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and their links.
pub struct Pair {
    pub a: String,
    pub b: String,
    /// Second octet of every address.
    net: u8,
}

impl Pair {
    /// Make the namespaces and links; `tag` (a few letters) keeps names of tests apart.
    pub fn new(tag: &str) -> Pair {
        let pid = std::process::id();
        let net = 100 + (pid % 100) as u8;
        let n = format!("{tag}{}", pid % 10000);
        let pair = Pair {
            a: format!("rb{n}a"),
            b: format!("rb{n}b"),
            net,
        };
        // A leftover of a killed run with the same name goes first.
        for ns in [&pair.a, &pair.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        for ns in [&pair.a, &pair.b] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (ma, mb) = (format!("rb{n}ma"), format!("rb{n}mb"));
        pair.veth(&ma, None, "mgmt", Some(&pair.a), 1);
        pair.veth(&mb, None, "mgmt", Some(&pair.b), 2);
        pair.veth("repl", Some(&pair.a), "repl", Some(&pair.b), 3);
        pair
    }

    /// A veth pair: `left` in namespace `lns` (None: the test's) gets `10.net.subnet.1`,
    /// `right` in `rns` gets `.2`.
    fn veth(&self, left: &str, lns: Option<&str>, right: &str, rns: Option<&str>, subnet: u8) {
        let tmp_l = format!("rbt{}l{subnet}", std::process::id() % 100000);
        let tmp_r = format!("rbt{}r{subnet}", std::process::id() % 100000);
        ip(&[
            "link", "add", &tmp_l, "type", "veth", "peer", "name", &tmp_r,
        ]);
        for (tmp, name, ns, host) in [(&tmp_l, left, lns, 1), (&tmp_r, right, rns, 2)] {
            let addr = format!("10.{}.{subnet}.{host}/24", self.net);
            match ns {
                Some(ns) => {
                    ip(&["link", "set", tmp, "netns", ns, "name", name]);
                    ip(&["-n", ns, "addr", "add", &addr, "dev", name]);
                    ip(&["-n", ns, "link", "set", name, "up"]);
                }
                None => {
                    ip(&["link", "set", tmp, "name", name]);
                    ip(&["addr", "add", &addr, "dev", name]);
                    ip(&["link", "set", name, "up"]);
                }
            }
        }
    }

    /// Node A's management address (API, NBD), reachable from the test.
    pub fn mgmt_a(&self) -> String {
        format!("10.{}.1.2", self.net)
    }

    pub fn mgmt_b(&self) -> String {
        format!("10.{}.2.2", self.net)
    }

    /// Node A's and B's addresses on the replication link.
    pub fn repl_a(&self) -> String {
        format!("10.{}.3.1", self.net)
    }

    pub fn repl_b(&self) -> String {
        format!("10.{}.3.2", self.net)
    }

    /// Cut the replication link (both ends down: nothing passes either way).
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", "repl", "down"]);
        ip(&["-n", &self.b, "link", "set", "repl", "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.a, "link", "set", "repl", "up"]);
        ip(&["-n", &self.b, "link", "set", "repl", "up"]);
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // The management veths' test-side ends go with their peers in the namespaces.
    }
}
