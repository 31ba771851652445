//! A file device on a file system that fills up (a small tmpfs mounted for the test): the
//! first write that does not fit is answered ENOSPC (not EIO), and failed writes leave no
//! chunk allocated.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{http_auth, nbd_endpoints, start_with_web, write_file, Daemon};
use ringblock_transports::nbd::wire::{
    Greeting, InfoRequest, OptionReply, Request, SimpleReply, CMD_FLUSH, CMD_WRITE, ENOSPC,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, GREETING_LEN, OPTION_REPLY_HEADER_LEN, OPT_GO,
    SIMPLE_REPLY_LEN,
};

const MIB: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A tmpfs of `size_mib` mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(parent: &Path, size_mib: u64) -> Tmpfs {
        let dir = parent.join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700")])
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .expect("run mount(8)");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the daemon may still hold the file for a moment.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A minimal NBD client: fixed newstyle, OPT_GO, simple replies.
struct Nbd {
    s: TcpStream,
    next_cookie: u64,
}

impl Nbd {
    fn connect(addr: &str, export: &str) -> Nbd {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        Greeting::decode(&g).unwrap();
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut v = Vec::new();
        InfoRequest::encode_option(&mut v, OPT_GO, export, &[]);
        s.write_all(&v).unwrap();
        for _ in 0..8 {
            let mut buf = vec![0u8; OPTION_REPLY_HEADER_LEN];
            s.read_exact(&mut buf).unwrap();
            let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
            buf.resize(OPTION_REPLY_HEADER_LEN + len, 0);
            s.read_exact(&mut buf[OPTION_REPLY_HEADER_LEN..]).unwrap();
            match OptionReply::decode(&buf).unwrap().1 {
                OptionReply::Ack => return Nbd { s, next_cookie: 1 },
                OptionReply::Error { reply, message } => panic!("GO: {reply:#x} {message}"),
                _ => {}
            }
        }
        panic!("no ACK to OPT_GO");
    }

    /// Send one command and return the error of its simple reply.
    fn command(&mut self, kind: u16, offset: u64, payload: &[u8]) -> u32 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut v = Vec::new();
        Request {
            flags: 0,
            kind,
            cookie,
            offset,
            length: payload.len() as u64,
        }
        .encode(false, &mut v);
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut b).unwrap();
        let (r, _) = SimpleReply::decode(&b).unwrap();
        assert_eq!(r.cookie, cookie);
        r.error
    }
}

#[test]
fn a_full_file_system_answers_enospc_and_allocates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(tmp.path(), 12);
    // The device claims far more than the file system holds, as a sparse file does.
    let cfg = write_file(
        tmp.path(),
        "full.toml",
        &format!(
            "[[device]]\nname = \"d0\"\nkind = \"file\"\npath = \"{}/d0.img\"\n\
             size_bytes = 67108864\n\
             [[volume]]\nname = \"v\"\ndevice = \"d0\"\nsize_bytes = 50331648\n",
            fs.dir.display()
        ),
    );
    let state = tmp.path().join("state");
    let (daemon, web, token) = start_with_web(Some(&cfg), &state);
    let addr = nbd_endpoints(&daemon).0.expect("NBD TCP address");
    let mut nbd = Nbd::connect(&addr, "v");
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    // Bounded: 48 chunks of 1 MiB into 12 MiB of space.
    let mut written = 0u64;
    let mut first_error = None;
    for i in 0..48 {
        let e = nbd.command(CMD_WRITE, i * MIB, &data);
        if e != 0 {
            first_error = Some((i, e));
            break;
        }
        written += 1;
    }
    let (at, errno) = first_error.expect("the file system never filled up");
    assert_eq!(
        errno, ENOSPC,
        "the first failed write (chunk {at}, after {written} written) got errno {errno}, not ENOSPC"
    );
    // Later writes fail the same way, and none of the failures keeps a chunk.
    for i in at + 1..(at + 4).min(48) {
        assert_eq!(nbd.command(CMD_WRITE, i * MIB, &data), ENOSPC, "chunk {i}");
    }
    assert_eq!(nbd.command(CMD_FLUSH, 0, &[]), 0, "flush after ENOSPC");
    let allocated = || {
        let v = http_auth(&web, &token, "GET", "/api/volumes/v", &[], None).json();
        v["allocated_chunks"].as_u64().expect("allocated_chunks")
    };
    assert_eq!(
        allocated(),
        written,
        "failed writes left chunks allocated ({written} writes succeeded)"
    );
    // Restart: the metadata holds exactly the chunks that were written.
    daemon.stop_clean();
    let daemon = Daemon::start(&[
        "--config",
        &cfg,
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        &web,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(allocated(), written, "after a restart");
    daemon.stop_clean();
}
