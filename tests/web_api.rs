//! The management API over HTTP against the real daemon: every endpoint, the token, Host and
//! Origin checks, bad input, a volume in use, the SSE stream, the CLI, token persistence.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use common::{
    http, http_auth, nbd_connect, nbd_endpoints, run, start_with_web, wait_for, web_endpoint,
    write_file, Daemon,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

struct Web {
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
    addr: String,
    token: String,
    nbd: String,
}

impl Web {
    /// A daemon with a RAM device holding `alpha` (64 MiB) and `ro` (16 MiB, read-only).
    fn start() -> Web {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_file(
            dir.path(),
            "web.toml",
            "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = 268435456\n\
             [[volume]]\nname = \"alpha\"\ndevice = \"ram0\"\nsize_bytes = 67108864\n\
             [[volume]]\nname = \"ro\"\ndevice = \"ram0\"\nsize_bytes = 16777216\n\
             [nbd]\nread_only = [\"ro\"]\n",
        );
        let state = dir.path().join("state");
        let (daemon, addr, token) = start_with_web(Some(&cfg), &state);
        let nbd = nbd_endpoints(&daemon).0.unwrap();
        Web {
            daemon: Some(daemon),
            dir,
            addr,
            token,
            nbd,
        }
    }

    fn get(&self, path: &str) -> common::HttpResponse {
        http_auth(&self.addr, &self.token, "GET", path, &[], None)
    }

    fn send(&self, method: &str, path: &str, body: Option<Value>) -> common::HttpResponse {
        let body = body.map(|b| b.to_string());
        http_auth(
            &self.addr,
            &self.token,
            method,
            path,
            &[],
            body.as_deref().map(str::as_bytes),
        )
    }

    fn state_dir(&self) -> String {
        self.dir.path().join("state").to_str().unwrap().to_string()
    }

    fn stop(mut self) {
        self.daemon.take().unwrap().stop_clean();
    }
}

/// Status, error shape and message of an error response.
fn assert_error(r: &common::HttpResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{r:?}"
    );
    let e = r.error();
    assert!(
        e.to_lowercase().contains(&needle.to_lowercase()),
        "error {e:?} should mention {needle:?}"
    );
}

#[test]
fn every_endpoint_with_auth_and_bad_input() {
    let w = Web::start();
    assert_eq!(w.token.len(), 64, "32 random bytes as hex");
    // Only the hash is stored.
    let stored = std::fs::read_to_string(format!("{}/api-token.sha256", w.state_dir())).unwrap();
    assert!(
        stored.starts_with("sha256:") && !stored.contains(&w.token),
        "{stored}"
    );

    // The dashboard loads without a token, with a strict CSP.
    let page = http(&w.addr, "GET", "/", &[], None);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("<canvas"), "{}", page.body);
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));
    for asset in ["/dashboard.js", "/dashboard.css"] {
        let r = http(&w.addr, "GET", asset, &[], None);
        assert_eq!(r.status, 200, "{asset}");
        assert!(!r.body.is_empty());
    }

    // Every documented operation: without a token 401 (protected) or 200 (public); with a bad
    // token 401 too. None of them is an unknown route.
    let doc = http(&w.addr, "GET", "/api/openapi.json", &[], None);
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    let mut protected = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_uppercase();
            let concrete = path.replace("{name}", "alpha").replace("{volume}", "alpha");
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            let body = (method == "POST").then_some(&b"{}"[..]);
            let r = http(&w.addr, &method, &concrete, &[], body);
            if secured {
                protected += 1;
                assert_error(&r, 401, "missing API token");
                assert_eq!(
                    r.header("www-authenticate"),
                    Some("Bearer"),
                    "{method} {path}"
                );
                let bad = http(
                    &w.addr,
                    &method,
                    &concrete,
                    &[("Authorization", "Bearer nope")],
                    body,
                );
                assert_error(&bad, 401, "invalid API token");
                let basic = http(
                    &w.addr,
                    &method,
                    &concrete,
                    &[("Authorization", &format!("Basic {}", w.token))],
                    body,
                );
                assert_eq!(basic.status, 401, "{method} {path} with Basic");
            } else {
                assert_eq!(r.status, 200, "{method} {path} is public: {r:?}");
            }
        }
    }
    assert!(protected >= 14, "{protected} protected operations");
    assert!(
        !doc["paths"]
            .as_object()
            .unwrap()
            .contains_key("/api/replicas"),
        "no placeholder routes"
    );

    // Reads.
    let status = w.get("/api/status").json();
    assert_eq!(status["volumes"], 2);
    assert_eq!(status["devices"], 1);
    assert_eq!(status["nbd_listeners"][0], w.nbd.as_str());
    let vols = w.get("/api/volumes").json();
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "ro"]);
    assert_eq!(vols[1]["read_only"], true);
    let alpha = w.get("/api/volumes/alpha").json();
    assert_eq!(alpha["size_bytes"], 64 * MIB);
    assert_eq!(alpha["device"], "ram0");
    assert_eq!(alpha["allocated_chunks"], 0);
    assert_error(&w.get("/api/volumes/nope"), 404, "no such volume");
    assert_error(&w.get("/api/volumes/nope/stats"), 404, "no such volume");
    let stats = w.get("/api/volumes/alpha/stats").json();
    assert_eq!(stats["counters"]["writes"], 0);
    assert_eq!(
        stats["write_latency"]["buckets"].as_array().unwrap().len(),
        64
    );
    let devs = w.get("/api/devices").json();
    let d = &devs[0];
    assert_eq!(d["name"], "ram0");
    assert_eq!(d["kind"], "ram");
    assert_eq!(d["health"]["status"], "ok");
    assert!(d["profile"]["logical_block_size_bytes"].as_u64().unwrap() >= 512);
    assert!(d["total_chunks"].as_u64().unwrap() > 0);
    assert_eq!(d["volumes"], json!(["alpha", "ro"]));
    let exports = w.get("/api/exports").json();
    assert_eq!(exports["listeners"][0], w.nbd.as_str());
    assert_eq!(
        exports["exports"][0]["uris"][0],
        format!("nbd://{}/alpha", w.nbd)
    );
    assert_eq!(exports["exports"][1]["read_only"], true);
    assert_eq!(w.get("/api/clients").json(), json!([]));
    let reactors = w.get("/api/reactors").json();
    assert!(!reactors.as_array().unwrap().is_empty());
    assert!(reactors[0]["busy_ns"].is_u64());
    let sample = wait_for(Duration::from_secs(10), "a second stats sample", || {
        let s = w.get("/api/stats").json();
        (s["seq"].as_u64().unwrap() >= 2).then_some(s)
    });
    assert_eq!(sample["volumes"].as_array().unwrap().len(), 2);
    assert!(sample["reactors"][0]["busy_percent"].is_number());
    let metrics = w.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    for needle in [
        "ringblock_volume_reads_total{volume=\"alpha\"} 0",
        "ringblock_volume_latency_seconds_bucket{volume=\"alpha\",op=\"read\",le=\"+Inf\"} 0",
        "ringblock_reactor_busy_seconds_total{reactor=\"0\"",
        "ringblock_reactor_parks_total",
        "ringblock_reactor_ops_in_flight",
        "ringblock_reactor_zero_copy_sends_total{reactor=\"0\"",
        "ringblock_reactor_zero_copy_kernel_copied_total{reactor=\"0\"",
        ",reason=\"small\"} 0",
        ",reason=\"unsupported\"} 0",
        "ringblock_device_healthy{device=\"ram0\",kind=\"ram\"",
        "ringblock_device_write_errors_total",
        "ringblock_nbd_clients{export=\"alpha\"} 0",
    ] {
        assert!(
            metrics.body.contains(needle),
            "metrics lack {needle:?}:\n{}",
            metrics.body
        );
    }

    // Create: good, duplicate, and every kind of bad input.
    let r = w.send(
        "POST",
        "/api/volumes",
        Some(json!({"name": "beta", "device": "ram0", "size_bytes": 8 * MIB})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["name"], "beta");
    assert_eq!(w.get("/api/volumes/beta").json()["size_bytes"], 8 * MIB);
    let r = w.send(
        "POST",
        "/api/volumes",
        Some(json!({"name": "beta", "device": "ram0", "size_bytes": 8 * MIB})),
    );
    assert_error(&r, 409, "exists");
    for (body, needle) in [
        (
            json!({"name": "bad name", "device": "ram0", "size_bytes": MIB}),
            "volume name",
        ),
        (
            json!({"name": ".hidden", "device": "ram0", "size_bytes": MIB}),
            "volume name",
        ),
        (
            json!({"name": "gamma", "device": "ram0", "size_bytes": 0}),
            "greater than 0",
        ),
        (
            json!({"name": "gamma", "device": "ram0", "size_bytes": 1000}),
            "multiple",
        ),
        (
            json!({"name": "gamma", "device": "nvme9", "size_bytes": MIB}),
            "no device",
        ),
        (
            json!({"name": "gamma", "device": "ram0", "size_bytes": 1u64 << 40}),
            "larger than",
        ),
        (json!({"name": "gamma", "device": "ram0"}), "size_bytes"),
        (
            json!({"name": "gamma", "device": "ram0", "size_bytes": "1G"}),
            "size_bytes",
        ),
        (
            json!({"name": "gamma", "device": "ram0", "size_bytes": -1}),
            "size_bytes",
        ),
        (
            json!({"name": "gamma", "device": "ram0", "size_bytes": MIB, "colour": "red"}),
            "colour",
        ),
        (json!("gamma"), "invalid type"),
    ] {
        let r = w.send("POST", "/api/volumes", Some(body.clone()));
        assert_error(&r, 400, needle);
        assert!(
            !w.get("/api/volumes").body.contains("gamma"),
            "{body} created something"
        );
    }
    let r = http_auth(
        &w.addr,
        &w.token,
        "POST",
        "/api/volumes",
        &[],
        Some(b"{\"name\": "),
    );
    assert_error(&r, 400, "");
    let r = http_auth(
        &w.addr,
        &w.token,
        "POST",
        "/api/volumes",
        &[("Content-Type", "text/plain")],
        Some(b"{}"),
    );
    assert_error(&r, 415, "content-type");
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(100 << 10));
    let r = http_auth(
        &w.addr,
        &w.token,
        "POST",
        "/api/volumes",
        &[],
        Some(huge.as_bytes()),
    );
    assert_error(&r, 413, "larger than 65536 bytes");

    // Host and Origin on state-changing calls: 403 even with the token; reads are not checked.
    let body = json!({"name": "delta", "device": "ram0", "size_bytes": MIB}).to_string();
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
        vec![("Origin", "https://127.0.0.1")],
        vec![("Host", "evil.example")],
        vec![
            ("Host", "rebound.example:80"),
            ("Origin", "http://rebound.example:80"),
        ],
    ] {
        let r = http_auth(
            &w.addr,
            &w.token,
            "POST",
            "/api/volumes",
            &headers,
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 403, "{headers:?}: {r:?}");
        assert!(
            r.error().contains("Origin") || r.error().contains("Host"),
            "{r:?}"
        );
        let r = http_auth(
            &w.addr,
            &w.token,
            "DELETE",
            "/api/volumes/beta",
            &headers,
            None,
        );
        assert_eq!(r.status, 403, "DELETE with {headers:?}");
    }
    // A bad Origin is refused before the token is even looked at.
    let r = http(
        &w.addr,
        "DELETE",
        "/api/volumes/beta",
        &[("Origin", "http://evil.example")],
        None,
    );
    assert_eq!(r.status, 403);
    assert_eq!(w.get("/api/volumes/beta").status, 200, "still there");
    let origin = format!("http://{}", w.addr);
    let r = http_auth(
        &w.addr,
        &w.token,
        "POST",
        "/api/volumes",
        &[("Origin", &origin)],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "same-origin create: {r:?}");
    let port = w.addr.rsplit(':').next().unwrap();
    let localhost = format!("localhost:{port}");
    let r = http_auth(
        &w.addr,
        &w.token,
        "DELETE",
        "/api/volumes/delta",
        &[
            ("Host", &localhost),
            ("Origin", &format!("http://{localhost}")),
        ],
        None,
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = http_auth(
        &w.addr,
        &w.token,
        "GET",
        "/api/volumes",
        &[("Origin", "http://evil.example")],
        None,
    );
    assert_eq!(r.status, 200, "reads carry no Origin check");

    // Grow.
    let r = w.send(
        "POST",
        "/api/volumes/beta/grow",
        Some(json!({"size_bytes": 16 * MIB})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["size_bytes"], 16 * MIB);
    assert_error(
        &w.send(
            "POST",
            "/api/volumes/beta/grow",
            Some(json!({"size_bytes": 4 * MIB})),
        ),
        400,
        "shrinking",
    );
    assert_error(
        &w.send(
            "POST",
            "/api/volumes/beta/grow",
            Some(json!({"size_bytes": 16 * MIB + 1})),
        ),
        400,
        "multiple",
    );
    assert_error(
        &w.send(
            "POST",
            "/api/volumes/beta/grow",
            Some(json!({"size_bytes": 1u64 << 40})),
        ),
        400,
        "larger than",
    );
    assert_error(
        &w.send("POST", "/api/volumes/beta/grow", Some(json!({"size": 1}))),
        400,
        "size",
    );
    assert_error(
        &w.send(
            "POST",
            "/api/volumes/nope/grow",
            Some(json!({"size_bytes": MIB})),
        ),
        404,
        "no such volume",
    );

    // Delete.
    assert_eq!(w.send("DELETE", "/api/volumes/beta", None).status, 204);
    assert_error(&w.get("/api/volumes/beta"), 404, "no such volume");
    assert_error(
        &w.send("DELETE", "/api/volumes/beta", None),
        404,
        "no such volume",
    );

    // Unknown routes and methods.
    assert_error(&w.get("/api/nothing"), 404, "no route");
    assert_error(
        &http(&w.addr, "GET", "/nothing", &[], None),
        404,
        "no route",
    );
    assert_error(
        &w.send("PUT", "/api/volumes", Some(json!({}))),
        405,
        "not allowed",
    );
    w.stop();
}

#[test]
fn deleting_a_volume_in_use_is_refused_with_409() {
    let w = Web::start();
    let mut client = nbd_connect(&w.nbd, "alpha");
    assert_eq!(client.export().size_bytes, 64 * MIB);
    client.write(0, &[0x5a; 4096], 0).unwrap();
    client.write(8 * MIB, &[0xa5; 8192], 0).unwrap();
    let clients = wait_for(
        Duration::from_secs(10),
        "the client in /api/clients",
        || {
            let c = w.get("/api/clients").json();
            (c.as_array().unwrap().len() == 1).then_some(c)
        },
    );
    assert_eq!(clients[0]["export"], "alpha");
    assert!(clients[0]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(clients[0]["requests"].as_u64().unwrap() >= 2);
    assert_eq!(w.get("/api/volumes/alpha").json()["nbd_clients"], 1);

    let r = w.send("DELETE", "/api/volumes/alpha", None);
    assert_error(&r, 409, "in use");
    assert_eq!(w.get("/api/volumes/alpha").status, 200, "still there");
    // The CLI says the same, with exit code 1.
    let (code, _, err) = run(&[
        "volume",
        "delete",
        "alpha",
        "--api",
        &format!("http://{}", w.addr),
        "--token",
        &w.token,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use") && err.contains("409"), "{err}");

    // The writes show in the counters, the thin allocation and the metrics.
    let stats = w.get("/api/volumes/alpha/stats").json();
    assert_eq!(stats["counters"]["writes"], 2);
    assert_eq!(stats["counters"]["write_bytes"], 4096 + 8192);
    assert_eq!(stats["write_latency"]["count"], 2);
    assert!(stats["write_latency"]["p99_us"].as_f64().unwrap() > 0.0);
    assert_eq!(w.get("/api/volumes/alpha").json()["allocated_chunks"], 2);
    let m = w.get("/metrics").body;
    for needle in [
        "ringblock_volume_writes_total{volume=\"alpha\"} 2\n",
        "ringblock_volume_write_bytes_total{volume=\"alpha\"} 12288\n",
        "ringblock_volume_latency_seconds_count{volume=\"alpha\",op=\"write\"} 2\n",
        "ringblock_volume_latency_seconds_bucket{volume=\"alpha\",op=\"write\",le=\"+Inf\"} 2\n",
        "ringblock_volume_allocated_bytes{volume=\"alpha\"} 2097152\n",
        "ringblock_nbd_clients{export=\"alpha\"} 1\n",
    ] {
        assert!(m.contains(needle), "metrics lack {needle:?}:\n{m}");
    }
    // Histogram buckets are cumulative and end at the count.
    let buckets: Vec<u64> = m
        .lines()
        .filter(|l| {
            l.starts_with("ringblock_volume_latency_seconds_bucket{volume=\"alpha\",op=\"write\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|p| p[0] <= p[1]), "{buckets:?}");
    assert_eq!(*buckets.last().unwrap(), 2);

    // Once the client is gone the volume can be deleted.
    client.disconnect();
    wait_for(Duration::from_secs(10), "the client to go", || {
        (w.get("/api/clients").json() == json!([])).then_some(())
    });
    let r = wait_for(Duration::from_secs(10), "the volume to be closed", || {
        let r = w.send("DELETE", "/api/volumes/alpha", None);
        (r.status != 409).then_some(r)
    });
    assert_eq!(r.status, 204, "{r:?}");
    assert_error(&w.get("/api/volumes/alpha"), 404, "no such volume");
    w.stop();
}

/// Read SSE events from a raw connection: (event name, data) pairs.
fn read_events(reader: &mut impl BufRead, n: usize, limit: Duration) -> Vec<(String, Value)> {
    let until = Instant::now() + limit;
    let mut out = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    while out.len() < n {
        assert!(
            Instant::now() < until,
            "only {} events in {limit:?}",
            out.len()
        );
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("stream ended after {} events", out.len());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        // Chunked transfer encoding: skip the chunk-size lines (hex digits only).
        if !line.is_empty() && line.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.trim_start());
        } else if line.is_empty() && !data.is_empty() {
            out.push((
                std::mem::take(&mut event),
                serde_json::from_str(&data).unwrap(),
            ));
            data.clear();
        }
    }
    out
}

#[test]
fn sse_stream_sends_live_stats_every_second() {
    let w = Web::start();
    assert_error(
        &http(&w.addr, "GET", "/api/events", &[], None),
        401,
        "missing API token",
    );
    // Let a few samples accumulate: a new stream starts with them (history), then goes live.
    std::thread::sleep(Duration::from_millis(2500));
    let mut s = std::net::TcpStream::connect(&w.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        w.addr, w.token
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_ascii_lowercase());
    }
    assert!(head[0].contains(" 200 "), "{head:?}");
    assert!(
        head.iter().any(|h| h == "content-type: text/event-stream"),
        "{head:?}"
    );
    let mut client = nbd_connect(&w.nbd, "alpha");
    let started = Instant::now();
    let mut writes = 0u64;
    let mut seen_rate = false;
    let mut last_seq = 0;
    // Stop after live events show the writes we make between them (bounded: 20 events).
    for _ in 0..20 {
        for i in 0..50 {
            client.write(i * 4096, &[7; 4096], 0).unwrap();
            writes += 1;
        }
        let ev = read_events(&mut reader, 1, Duration::from_secs(10)).remove(0);
        assert_eq!(ev.0, "stats");
        let seq = ev.1["seq"].as_u64().unwrap();
        assert!(
            seq > last_seq,
            "sequence numbers increase: {seq} after {last_seq}"
        );
        last_seq = seq;
        let alpha = ev.1["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "alpha")
            .unwrap()
            .clone();
        if alpha["write_iops"].as_f64().unwrap() > 0.0 {
            assert!(alpha["write_mib_s"].as_f64().unwrap() > 0.0, "{alpha}");
            assert!(alpha["write_p50_us"].as_f64().unwrap() > 0.0, "{alpha}");
            assert!(
                alpha["write_p99_us"].as_f64().unwrap() >= alpha["write_p50_us"].as_f64().unwrap()
            );
            assert!(alpha["writes_total"].as_u64().unwrap() <= writes);
            assert!(ev.1["reactors"][0]["busy_percent"].as_f64().unwrap() >= 0.0);
            assert_eq!(ev.1["nbd_clients"], 1);
            seen_rate = true;
            break;
        }
    }
    assert!(seen_rate, "no event showed the writes");
    assert!(started.elapsed() < Duration::from_secs(60));
    // Live events keep coming about once a second.
    let t0 = Instant::now();
    let evs = read_events(&mut reader, 2, Duration::from_secs(10));
    assert!(evs[1].1["seq"].as_u64().unwrap() == evs[0].1["seq"].as_u64().unwrap() + 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "paced, not a flood"
    );
    client.disconnect();
    drop(reader);
    w.stop();
}

#[test]
fn cli_volume_and_status_commands() {
    let w = Web::start();
    let api = format!("http://{}", w.addr);
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--api", &api, "--token", &w.token]);
        run(&a)
    };
    let (code, out, err) = cli(&[
        "volume", "create", "vol1", "--device", "ram0", "--size", "10M",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("created volume vol1 on ram0 (10 MiB)"),
        "{out}"
    );
    let (code, out, err) = cli(&["volume", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("vol1 ") && l.contains("10 MiB")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ro ") && l.contains(" ro ")),
        "{out}"
    );
    let (code, out, err) = cli(&["volume", "grow", "vol1", "--size", "20MiB"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vol1 is now 20 MiB"), "{out}");
    let (code, out, _) = cli(&["volume", "list", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "vol1")
            .unwrap()["size_bytes"],
        20 * MIB
    );
    let (code, out, err) = cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("reactors") && out.contains("ram0") && out.contains("vol1"),
        "{out}"
    );
    assert!(out.contains(&w.nbd), "{out}");
    let (code, out, _) = cli(&["status", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["volumes"], 3);
    let (code, out, err) = cli(&["volume", "delete", "vol1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted volume vol1"), "{out}");
    // Errors: the API's message, exit 1; bad usage, exit 2.
    let (code, _, err) = cli(&["volume", "delete", "vol1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no such volume") && err.contains("404"),
        "{err}"
    );
    let (code, _, err) = cli(&["volume", "create", "x", "--size", "ten"]);
    assert_eq!(code, 2);
    assert!(err.contains("--size"), "{err}");
    let (code, _, err) = run(&["volume", "list", "--api", &api, "--token", "wrong"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid API token") && err.contains("401"),
        "{err}"
    );
    let out = std::process::Command::new(common::BIN)
        .args(["volume", "list", "--api", &api])
        .env_remove("RINGBLOCK_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RINGBLOCK_TOKEN"));
    // The token from the environment.
    let out = std::process::Command::new(common::BIN)
        .args(["volume", "list", "--api", &api])
        .env("RINGBLOCK_TOKEN", &w.token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing listening.
    let (code, _, err) = run(&["status", "--api", "http://127.0.0.1:1", "--token", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
    w.stop();
}

#[test]
fn token_survives_restarts_and_reset_replaces_it() {
    let w = Web::start();
    let old = w.token.clone();
    let state = w.state_dir();
    // stdout is not a terminal here (a pipe, like the journal): the token is not printed, only
    // the path of the private file holding it.
    let first = std::path::Path::new(&state).join("api-token.first");
    let lines = &w.daemon.as_ref().unwrap().stdout_lines;
    assert!(
        !lines.iter().any(|l| l.contains(&old)),
        "the token went to a stdout that is not a terminal: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&first.display().to_string()) && l.contains("0600")),
        "{lines:?}"
    );
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&first).unwrap().mode() & 0o777, 0o600);
    }
    let cfg = w.dir.path().join("web.toml");
    let dir = w.dir;
    w.daemon.unwrap().stop_clean();

    let d = Daemon::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
    ]);
    let (addr, token) = web_endpoint(&d);
    assert_eq!(
        token, None,
        "the token is shown only once: {:?}",
        d.stdout_lines
    );
    assert!(
        d.stdout_lines.iter().any(|l| l.contains("token reset")),
        "{:?}",
        d.stdout_lines
    );
    assert!(!d.stdout_lines.iter().any(|l| l.contains(&old)));
    assert_eq!(
        http_auth(&addr, &old, "GET", "/api/volumes", &[], None).status,
        200
    );

    // Reset while the daemon runs: the old token stops working at once.
    let (code, out, err) = run(&["token", "reset", "--state-dir", &state]);
    assert_eq!(code, 0, "{err}");
    let new = out.trim().to_string();
    assert_eq!(new.len(), 64, "{out}");
    assert!(err.contains("api-token.sha256"), "{err}");
    assert_ne!(new, old);
    assert!(!first.exists(), "the first token is stale after a reset");
    assert_error(
        &http_auth(&addr, &old, "GET", "/api/volumes", &[], None),
        401,
        "invalid",
    );
    assert_eq!(
        http_auth(&addr, &new, "GET", "/api/volumes", &[], None).status,
        200
    );
    let stored = std::fs::read_to_string(format!("{state}/api-token.sha256")).unwrap();
    assert!(!stored.contains(&new));
    // `[web] state_dir` in a config file is honoured by `token reset --config`.
    let other = dir.path().join("other-state");
    let cfg2 = write_file(dir.path(), "other.toml", &format!("[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\n[web]\nstate_dir = \"{}\"\n", other.display()));
    let (code, _, err) = run(&["token", "reset", "--config", &cfg2]);
    assert_eq!(code, 0, "{err}");
    assert!(other.join("api-token.sha256").exists());
    d.stop_clean();
}

#[test]
fn web_listen_errors_and_no_web() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        &taken_addr,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("web: cannot listen on") && err.contains(&taken_addr),
        "{err}"
    );
    let (code, _, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "localhost",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("not an address:port"), "{err}");
    let bad = write_file(dir.path(), "bad.toml", "[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\n[web]\nlisten = \"nowhere\"\n");
    let (code, _, err) = run(&["serve", "--config", &bad]);
    assert_eq!(code, 2);
    assert!(err.contains("[web] listen"), "{err}");
    // A state directory that cannot be created is a clear error, not a panic.
    let file = write_file(dir.path(), "plain-file", "x");
    let (code, _, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "127.0.0.1:0",
        "--state-dir",
        &format!("{file}/sub"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("state_dir") && !err.contains("panicked"),
        "{err}"
    );

    // A state directory other users can write is refused with the fix.
    let shared = dir.path().join("shared-state");
    std::fs::create_dir(&shared).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    // Bounded: a daemon that accepted the directory would serve until killed.
    let out = common::run_tool(
        60,
        common::BIN,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--state-dir",
            shared.to_str().unwrap(),
        ],
        &[],
    );
    let (code, err) = (out.code, out.stderr);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("1777") && err.contains(&format!("chmod 700 {}", shared.display())),
        "{err}"
    );
    assert!(!shared.join("api-token.sha256").exists());

    let d = Daemon::start(&["--listen", "127.0.0.1:0", "--no-web"]);
    assert!(
        !d.stdout_lines.iter().any(|l| l.contains("web UI")),
        "{:?}",
        d.stdout_lines
    );
    d.stop_clean();
    let off = write_file(
        dir.path(),
        "off.toml",
        "[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\n[web]\nenabled = false\n",
    );
    let d = Daemon::start(&["--config", &off, "--listen", "127.0.0.1:0"]);
    assert!(
        !d.stdout_lines.iter().any(|l| l.contains("web UI")),
        "{:?}",
        d.stdout_lines
    );
    d.stop_clean();
}

/// ublk routes and `ringblock export …` on a machine without the ublk driver (this one): the
/// list is empty, starting an export says why it cannot (503, the daemon keeps serving),
/// unknown volumes and volumes without an export are 404, and the usual token/Host checks hold.
/// The real devices are tested in the VM (tests/vm_ublk.rs, ublk-fs.sh).
#[test]
fn ublk_routes_and_cli_without_a_driver() {
    let w = Web::start();
    let no_driver = !std::path::Path::new("/dev/ublk-control").exists();

    // Every ublk route needs the token; state-changing ones also a good Host/Origin.
    for (method, path, body) in [
        ("GET", "/api/ublk", None),
        ("POST", "/api/ublk", Some(&br#"{"volume": "alpha"}"#[..])),
        ("DELETE", "/api/ublk/alpha", None),
    ] {
        let r = http(&w.addr, method, path, &[], body);
        assert_error(&r, 401, "missing API token");
        let bad = http(
            &w.addr,
            method,
            path,
            &[("Authorization", "Bearer nope")],
            body,
        );
        assert_error(&bad, 401, "invalid API token");
        if method != "GET" {
            let r = http_auth(
                &w.addr,
                &w.token,
                method,
                path,
                &[("Origin", "http://evil.example")],
                body,
            );
            assert_eq!(r.status, 403, "{method} {path}: {r:?}");
        }
    }

    assert_eq!(w.get("/api/ublk").json(), json!([]));
    assert_eq!(w.get("/api/status").json()["ublk_exports"], 0);
    assert_error(
        &w.send("POST", "/api/ublk", Some(json!({"volume": "nope"}))),
        404,
        "no such volume",
    );
    assert_error(&w.send("POST", "/api/ublk", Some(json!({}))), 400, "volume");
    assert_error(
        &w.send(
            "POST",
            "/api/ublk",
            Some(json!({"volume": "alpha", "queues": 2})),
        ),
        400,
        "queues",
    );
    assert_error(
        &w.send("DELETE", "/api/ublk/alpha", None),
        404,
        "no ublk export",
    );
    assert_error(
        &w.send("DELETE", "/api/ublk/nope", None),
        404,
        "no such volume",
    );
    if no_driver {
        let r = w.send("POST", "/api/ublk", Some(json!({"volume": "alpha"})));
        assert_error(&r, 503, "ublk");
        assert!(r.error().contains("ublk_drv"), "{r:?}");
        let why = w.get("/api/status").json()["ublk_unavailable"].clone();
        assert!(why.as_str().is_some_and(|s| s.contains("ublk")), "{why}");
        // The daemon keeps serving, and the failed start left the volume closed.
        assert_eq!(w.get("/api/ublk").json(), json!([]));
        let r = w.send("DELETE", "/api/volumes/alpha", None);
        assert_eq!(r.status, 204, "{r:?}");
    } else {
        println!("/dev/ublk-control exists: the 503 case is not checked here");
    }

    // The CLI: same answers, exit code 1 for API errors, 2 for bad usage.
    let api = format!("http://{}", w.addr);
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--api", &api, "--token", &w.token]);
        run(&a)
    };
    let (code, out, err) = cli(&["export", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "DEVICE  VOLUME  QUEUES  DEPTH  COPY  STATE",
        "{out}"
    );
    let (code, out, err) = cli(&["export", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
    if no_driver {
        let (code, out, err) = cli(&["export", "ublk", "ro"]);
        assert_eq!(code, 1, "{out} {err}");
        assert!(
            err.contains("503") && err.contains("ublk is not available"),
            "{err}"
        );
    }
    let (code, _, err) = cli(&["export", "ublk", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("404") && err.contains("no such volume"),
        "{err}"
    );
    let (code, _, err) = cli(&["export", "stop", "ro"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("404") && err.contains("no ublk export"),
        "{err}"
    );
    let (code, _, err) = cli(&["export", "stop", "../x"]);
    assert_eq!(code, 2, "{err}");
    let out = std::process::Command::new(common::BIN)
        .args(["export", "list", "--api", &api])
        .env_remove("RINGBLOCK_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RINGBLOCK_TOKEN"));
    let (code, _, err) = run(&["export", "list", "--api", &api, "--token", "wrong"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\nublk: "), "{out}");
    w.stop();
}
