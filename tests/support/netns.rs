//! Network namespaces a test makes and removes: two nodes, each in its own namespace with its
//! own loopback (where its API and NBD listen), and one replication link between them that the
//! test cuts and heals.
//!
//! ```text
//!   node A ns                              node B ns
//!   lo 127.0.0.1 (API, NBD)                lo 127.0.0.1 (API, NBD)
//!   repl 10.R.3.1 ──────── veth ──────── repl 10.R.3.2
//! ```
//!
//! Nothing is added to the test's own namespace: the test reaches a node's loopback from a
//! thread that joins the node's namespace ([`Pair::in_ns`]). The replication addresses exist
//! only inside the two namespaces, so no test traffic can leave them. Dropping the [`Pair`]
//! deletes both namespaces, and the veth with them.

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

/// Two namespaces and the link between them.
pub struct Pair {
    pub a: String,
    pub b: String,
    /// Second octet of the replication addresses.
    net: u8,
}

impl Pair {
    /// Make the namespaces and the link; `tag` (a few letters) keeps names of tests apart.
    pub fn new(tag: &str) -> Pair {
        let pid = std::process::id();
        let n = format!("{tag}{}", pid % 10000);
        let pair = Pair {
            a: format!("rb{n}a"),
            b: format!("rb{n}b"),
            net: 100 + (pid % 100) as u8,
        };
        // A leftover of a killed run with the same names goes first.
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
        // Made in A with its peer moved to B: it never exists in the test's namespace.
        ip(&[
            "-n", &pair.a, "link", "add", "repl", "type", "veth", "peer", "name", "replb",
        ]);
        ip(&["-n", &pair.a, "link", "set", "replb", "netns", &pair.b]);
        ip(&["-n", &pair.b, "link", "set", "replb", "name", "repl"]);
        for (ns, host) in [(&pair.a, 1), (&pair.b, 2)] {
            let addr = format!("10.{}.3.{host}/24", pair.net);
            ip(&["-n", ns, "addr", "add", &addr, "dev", "repl"]);
            ip(&["-n", ns, "link", "set", "repl", "up"]);
        }
        pair
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

    /// Run `f` on a thread inside namespace `ns` (a network namespace is per thread), e.g. to
    /// reach a node's loopback; its panic is the caller's.
    pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{ns}");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path)
                        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
                    // SAFETY: a valid fd of a network namespace; setns moves only this
                    // thread, which ends with the scope.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
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
    }
}
