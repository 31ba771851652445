//! The web API cannot be blocked by clients without the token: idle connections, slowloris
//! request heads, and SSE streams up to their cap leave room for an authenticated request.
//! Raw TCP on loopback; every wait is bounded and generous (nothing asserts speed).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{http, http_auth, parse_http_response, start_with_web};

/// Mirrors `ringblock_web::MAX_SSE_STREAMS`.
const MAX_SSE_STREAMS: usize = 32;
/// More idle connections than the server serves at once (256).
const IDLE_CONNECTIONS: usize = 300;
/// How long an authenticated request may take while the attack goes on: generous; without
/// the limits it waits for the 60 s idle timeout of the connections ahead of it.
const SERVED_WITHIN: Duration = Duration::from_secs(30);

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Open an SSE stream and read its response head (the body keeps coming; left unread).
fn open_sse(addr: &str, token: &str) -> (TcpStream, String) {
    let mut s = connect(addr);
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// One authenticated `GET /api/volumes` on a fresh connection; its status once answered.
fn authenticated_get(addr: &str, token: &str) -> u16 {
    let mut s = connect(addr);
    write!(
        s,
        "GET /api/volumes HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_http_response(&raw).status
}

/// SSE streams up to `MAX_SSE_STREAMS`, each checked to be streaming.
fn open_sse_streams(addr: &str, token: &str) -> Vec<TcpStream> {
    (0..MAX_SSE_STREAMS)
        .map(|i| {
            let (s, head) = open_sse(addr, token);
            assert!(head.starts_with("HTTP/1.1 200"), "stream {i}: {head:?}");
            s
        })
        .collect()
}

#[test]
fn sse_streams_need_the_token_and_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr, token) = start_with_web(None, &dir.path().join("state"));
    assert_eq!(http(&addr, "GET", "/api/events", &[], None).status, 401);
    let streams = open_sse_streams(&addr, &token);
    // One more is refused with a clear 503 and Retry-After (only the head is read: a stream
    // that was let through never ends); other calls still work.
    let (mut over, head) = open_sse(&addr, &token);
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 503"), "{head:?}");
    assert!(lower.contains("retry-after:"), "{head:?}");
    let body_len: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; body_len];
    over.read_exact(&mut body).unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("event streams"), "{body}");
    assert_eq!(
        http_auth(&addr, &token, "GET", "/api/status", &[], None).status,
        200
    );
    // A closed stream gives its place back (bounded wait for the server to notice).
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, head) = open_sse(&addr, &token);
        if head.starts_with("HTTP/1.1 200") {
            drop(s);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SSE place came back: {head:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.stop_clean();
}

#[test]
fn idle_slow_and_streaming_clients_cannot_lock_out_a_token_holder() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr, token) = start_with_web(None, &dir.path().join("state"));
    let streams = open_sse_streams(&addr, &token);

    // Slowloris: request heads that trickle in, one byte a second.
    let mut slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = connect(&addr);
            s.write_all(b"GET /api/volumes HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // More idle connections than the server serves at once, none sending anything.
    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS).map(|_| connect(&addr)).collect();

    let (tx, rx) = std::sync::mpsc::channel();
    let (a, t) = (addr.clone(), token.clone());
    std::thread::spawn(move || {
        let _ = tx.send(authenticated_get(&a, &t));
    });
    let started = Instant::now();
    let status = loop {
        for s in &mut slow {
            let _ = s.write_all(b"X");
        }
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(s) => break Some(s),
            Err(_) if started.elapsed() >= SERVED_WITHIN => break None,
            Err(_) => {}
        }
    };
    assert_eq!(
        status,
        Some(200),
        "an authenticated GET was not answered within {SERVED_WITHIN:?} behind {IDLE_CONNECTIONS} idle connections, 8 slow ones and {MAX_SSE_STREAMS} SSE streams"
    );
    drop((idle, slow, streams));
    d.stop_clean();
}

#[test]
fn a_request_head_that_trickles_in_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr, _token) = start_with_web(None, &dir.path().join("state"));
    let mut s = connect(&addr);
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(b"GET /api/volumes HTTP/1.1\r\n").unwrap();
    // One header byte a second, each well within the 60 s idle timeout: the server must
    // still close the connection once the head's deadline has passed.
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(60) {
        if s.write_all(b"X").is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 1024];
        match s.read(&mut b) {
            Ok(_) => {
                // 0: EOF; >0: an error response (408) before the close. Either ends it.
                closed = true;
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "a request head sent one byte a second was still being read after 60 s"
    );
    // The server is fine.
    let r = http(&addr, "GET", "/api/openapi.json", &[], None);
    assert_eq!(r.status, 200);
    d.stop_clean();
}
