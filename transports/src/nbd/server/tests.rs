use super::*;
use crate::nbd::wire::{
    ClientOption, Greeting, OptionReply, FLAG_C_FIXED_NEWSTYLE, GREETING_LEN,
    OPTION_REPLY_HEADER_LEN,
};
use crate::nbd::EngineCatalog;
use ringblock_engine::{DeviceConfig, EngineConfig};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::OnceLock;

fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let engine = Engine::start(&EngineConfig {
                devices: vec![DeviceConfig::ram("r", 64 << 20)],
                cores: vec![0],
                ..Default::default()
            })
            .expect("engine starts");
            engine.create_volume("r", "v", 32 << 20).expect("volume");
            Arc::new(engine)
        })
        .clone()
}

fn start(config: ServerConfig) -> NbdServer {
    let engine = engine();
    let catalog = Arc::new(EngineCatalog {
        engine: engine.clone(),
        read_only: vec![],
    });
    NbdServer::start(engine, catalog, config).expect("server starts")
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tcp_addr(server: &NbdServer) -> SocketAddr {
    match server.addrs()[0] {
        BoundAddr::Tcp(a) => a,
        ref other => panic!("{other:?}"),
    }
}

/// Greeting, flags, OPT_LIST: returns the export names.
fn list<S: Read + Write>(s: &mut S) -> Vec<String> {
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    Greeting::decode(&g).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let mut v = Vec::new();
    ClientOption::List.encode(&mut v);
    s.write_all(&v).unwrap();
    let mut names = Vec::new();
    for _ in 0..16 {
        let mut buf = vec![0u8; OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut buf).unwrap();
        let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
        buf.resize(OPTION_REPLY_HEADER_LEN + len, 0);
        s.read_exact(&mut buf[OPTION_REPLY_HEADER_LEN..]).unwrap();
        match OptionReply::decode(&buf).unwrap().1 {
            OptionReply::Server { name, .. } => names.push(name.to_string()),
            OptionReply::Ack => return names,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    panic!("no ACK");
}

#[test]
fn tcp_and_unix_listeners_serve_handshakes_and_stop() {
    let dir = tempfile_dir();
    let path = dir.join("nbd.sock");
    let server = start(ServerConfig {
        tcp: vec![localhost()],
        unix: Some(path.clone()),
        ..Default::default()
    });
    let addrs = server.addrs();
    assert_eq!(addrs.len(), 2);
    let tcp = tcp_addr(&server);
    assert_ne!(tcp.port(), 0);
    assert_eq!(addrs[1], BoundAddr::Unix(Some(path.clone())));
    assert_eq!(
        addrs[1].to_string(),
        format!("nbd+unix:///?socket={}", path.display())
    );
    assert_eq!(addrs[0].uri("v"), format!("nbd://{tcp}/v"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, UNIX_SOCKET_MODE);

    let mut t = TcpStream::connect(tcp).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(list(&mut t), vec!["v".to_string()]);
    let mut u = UnixStream::connect(&path).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(list(&mut u), vec!["v".to_string()]);

    // Stopping aborts the two handshakes in progress, closes the listeners and removes
    // the socket file.
    server.stop();
    let mut rest = Vec::new();
    assert_eq!(t.read_to_end(&mut rest).unwrap_or(0), 0);
    assert!(!path.exists());
    assert!(TcpStream::connect(tcp).is_err());
    server.stop();
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unix_socket_path_rules() {
    let dir = tempfile_dir();
    // A stale socket file is replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = start(ServerConfig {
        unix: Some(stale.clone()),
        ..Default::default()
    });
    // A live one is not.
    let engine = engine();
    let catalog = Arc::new(EngineCatalog {
        engine: engine.clone(),
        read_only: vec![],
    });
    let e = NbdServer::start(
        engine.clone(),
        catalog.clone(),
        ServerConfig {
            unix: Some(stale.clone()),
            ..Default::default()
        },
    )
    .err()
    .expect("second server on a live socket fails");
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    drop(server);
    assert!(!stale.exists());
    // A regular file is never replaced.
    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let e = NbdServer::start(
        engine.clone(),
        catalog.clone(),
        ServerConfig {
            tcp: vec![localhost()],
            unix: Some(file.clone()),
            ..Default::default()
        },
    )
    .err()
    .expect("refuses a regular file");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn slow_clients_time_out_and_a_full_handshake_table_cuts_off_the_oldest() {
    let server = start(ServerConfig {
        tcp: vec![localhost()],
        handshake_timeout: Duration::from_millis(300),
        handshake_deadline: Duration::from_secs(5),
        max_handshakes: 2,
        ..Default::default()
    });
    let addr = tcp_addr(&server);
    // Two silent clients take both slots.
    let mut silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut silent {
        let mut g = [0u8; GREETING_LEN];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut g).unwrap();
    }
    // A third is served: the oldest silent client makes room (or has timed out already).
    let mut third = TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(list(&mut third), vec!["v".to_string()]);
    // The silent clients are dropped (cut off, or after the timeout).
    for s in &mut silent {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    // And the server still serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; GREETING_LEN];
        if t.read_exact(&mut g).is_ok() {
            assert_eq!(list_after_greeting(&mut t), vec!["v".to_string()]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server never freed its handshake slots"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn list_after_greeting(s: &mut TcpStream) -> Vec<String> {
    // `list` expects to read the greeting itself: replay it through a chained reader.
    struct Replay<'a> {
        head: std::io::Cursor<Vec<u8>>,
        s: &'a mut TcpStream,
    }
    impl Read for Replay<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = self.head.read(b)?;
            if n > 0 {
                return Ok(n);
            }
            self.s.read(b)
        }
    }
    impl Write for Replay<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.s.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.s.flush()
        }
    }
    let greeting = Greeting {
        flags: crate::nbd::handshake::SERVER_HANDSHAKE_FLAGS,
    }
    .to_bytes()
    .to_vec();
    list(&mut Replay {
        head: std::io::Cursor::new(greeting),
        s,
    })
}

#[test]
fn garbage_clients_lose_only_their_connection() {
    let server = start(ServerConfig {
        tcp: vec![localhost()],
        ..Default::default()
    });
    let addr = tcp_addr(&server);
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xff; 64], &[0u8; 4]] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(garbage);
        let _ = s.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(list(&mut t), vec!["v".to_string()]);
    }
}

fn tempfile_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ringblock-nbd-server-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
