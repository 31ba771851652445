//! The project's NBD client (`ringblock_transports::nbd::client`) against the real daemon,
//! over TCP and a Unix socket, in every reply mode: what the bench and the other tests rely on.

mod common;

use std::path::Path;

use common::{pattern, start_on_tcp_and_unix, Daemon};
use ringblock_transports::nbd::client::{Client, ClientError, Options};
use ringblock_transports::nbd::wire::{
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, EINVAL, EPERM, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, REP_ERR_UNKNOWN, STATE_HOLE,
};

const MIB: u64 = 1 << 20;
const SMALL_BYTES: u64 = 64 * MIB;

struct Fixture {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    tcp: String,
    unix: String,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, tcp, unix) = start_on_tcp_and_unix(
        dir.path(),
        "client.toml",
        "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = 134217728\n\
         [[volume]]\nname = \"small\"\ndevice = \"ram0\"\nsize_bytes = 67108864\n\
         [[volume]]\nname = \"ro\"\ndevice = \"ram0\"\nsize_bytes = 16777216\n\
         [nbd]\nread_only = [\"ro\"]\n",
    );
    Fixture {
        tcp,
        unix,
        _dir: dir,
        daemon,
    }
}

/// Every command in one reply mode, on a connection of either kind.
fn exercise<S: std::io::Read + std::io::Write>(c: &mut Client<S>, opts: Options, seed: u64) {
    let e = c.export().clone();
    assert_eq!(e.size_bytes, SMALL_BYTES);
    assert_eq!(
        (e.structured, e.extended),
        (opts.structured || opts.extended, opts.extended)
    );
    let want = FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    assert_eq!(e.transmission_flags & want, want, "{e:?}");
    assert_eq!(e.transmission_flags & FLAG_READ_ONLY, 0);
    let bs = e.block_size.expect("the daemon sends block sizes");
    assert!(bs.min <= 4096 && bs.max >= 65536, "{bs:?}");

    let at = seed * 4 * MIB;
    let data = pattern(seed, 65536);
    c.write(at, &data, 0).unwrap();
    c.write(at + 65536, &data[..4096], CMD_FLAG_FUA).unwrap();
    c.flush().unwrap();
    assert_eq!(c.read(at, 65536).unwrap(), data);
    // A read across written data and a never-written hole.
    let r = c.read(at + 61440, 12288).unwrap();
    assert_eq!(&r[..4096], &data[61440..]);
    assert_eq!(&r[4096..8192], &data[..4096]);
    assert!(r[8192..].iter().all(|&b| b == 0));

    c.write_zeroes(at, 8192, CMD_FLAG_NO_HOLE).unwrap();
    assert!(c.read(at, 8192).unwrap().iter().all(|&b| b == 0));
    assert_eq!(c.read(at + 8192, 4096).unwrap(), data[8192..12288]);
    c.trim(at + MIB, MIB).unwrap();

    if e.base_allocation_id.is_some() {
        let extents = c.block_status(at, 2 * MIB).unwrap();
        assert!(!extents.is_empty());
        assert_eq!(extents[0].status & u64::from(STATE_HOLE), 0, "{extents:?}");
        assert!(extents.iter().map(|x| x.length).sum::<u64>() <= 2 * MIB);
    }

    // An NBD error is an error value, and the connection stays usable.
    let past_end = c.read(SMALL_BYTES, 4096).unwrap_err();
    assert_eq!(past_end.errno(), Some(EINVAL), "{past_end}");
    assert_eq!(c.read(at, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn every_command_in_every_reply_mode_over_tcp_and_unix() {
    let f = start();
    let modes = [
        Options::default(),
        Options {
            structured: true,
            base_allocation: true,
            ..Options::default()
        },
        Options {
            extended: true,
            base_allocation: true,
            ..Options::default()
        },
    ];
    for (i, opts) in modes.into_iter().enumerate() {
        let mut c = Client::connect_tcp(f.tcp.as_str(), "small", opts).unwrap();
        exercise(&mut c, opts, i as u64);
        c.disconnect();
        let mut c = Client::connect_unix(Path::new(&f.unix), "small", opts).unwrap();
        exercise(&mut c, opts, 4 + i as u64);
        c.disconnect();
    }
    f.daemon.stop();
}

#[test]
fn refusals_are_clear_errors() {
    let f = start();
    let e = Client::connect_tcp(f.tcp.as_str(), "nope", Options::default()).unwrap_err();
    assert!(
        matches!(
            &e,
            ClientError::Refused {
                reply: REP_ERR_UNKNOWN,
                ..
            }
        ),
        "{e:?}"
    );
    let mut ro = Client::connect_tcp(f.tcp.as_str(), "ro", Options::default()).unwrap();
    assert_ne!(ro.export().transmission_flags & FLAG_READ_ONLY, 0);
    let e = ro.write(0, &[1; 4096], 0).unwrap_err();
    assert_eq!(e.errno(), Some(EPERM), "{e}");
    assert_eq!(ro.read(0, 4096).unwrap(), vec![0; 4096]);
    ro.disconnect();
    // Block status without the context negotiated is the client's own refusal.
    let mut c = Client::connect_tcp(f.tcp.as_str(), "small", Options::default()).unwrap();
    let e = c.block_status(0, 4096).unwrap_err();
    assert!(matches!(e, ClientError::InvalidRequest(_)), "{e:?}");
    c.disconnect();
    f.daemon.stop();
}
