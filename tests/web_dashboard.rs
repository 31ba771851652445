//! The dashboard in a real browser: headless Chromium loads it while `fio --ioengine=nbd`
//! writes through NBD, and the DevTools protocol reads what the page shows. The live numbers
//! must appear and change; create/grow/delete work from the page; a refused delete shows the
//! API's error; a bad token brings the token dialog back. A screenshot is kept as an artefact
//! (`target/tmp/web-dashboard.png`).

mod common;
#[path = "support/required.rs"]
mod required;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    have_tool, http, http_auth, nbd_endpoints, run_tool, start_with_web, wait_for, write_file,
};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

const MIB: u64 = 1 << 20;

/// Headless Chromium in its own process group (killed as a group when dropped).
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    devtools_port: u16,
}

impl Browser {
    fn launch(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                &format!("--user-data-dir={}", profile.path().display()),
                url,
            ])
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        // Chromium writes its DevTools port (port 0 = any free one) into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let devtools_port = wait_for(Duration::from_secs(60), "chromium's DevTools port", || {
            let text = std::fs::read_to_string(&port_file).ok()?;
            text.lines().next()?.trim().parse().ok()
        });
        Browser {
            child,
            _profile: profile,
            devtools_port,
        }
    }

    /// The DevTools WebSocket of the page showing `url_prefix`.
    fn page(&self, url_prefix: &str) -> Cdp {
        let addr = format!("127.0.0.1:{}", self.devtools_port);
        let ws_url = wait_for(Duration::from_secs(30), "the page target", || {
            let list = http(&addr, "GET", "/json/list", &[], None);
            if list.status != 200 {
                return None;
            }
            let targets: Value = serde_json::from_str(&list.body).ok()?;
            targets.as_array()?.iter().find_map(|t| {
                (t["type"] == "page" && t["url"].as_str()?.starts_with(url_prefix))
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(String::from))?
            })
        });
        let stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (ws, _) = tungstenite::client(ws_url.as_str(), stream).expect("DevTools WebSocket");
        Cdp { ws, next_id: 1 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pg = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A minimal Chrome DevTools Protocol client.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).expect("send to DevTools");
        // Bounded: events in between are skipped, at most this many.
        for _ in 0..100_000 {
            match self.ws.read().expect("read from DevTools") {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["id"] == id {
                        assert!(v.get("error").is_none(), "{method}: {v}");
                        return v["result"].clone();
                    }
                }
                Message::Close(_) => panic!("DevTools closed the connection"),
                _ => {}
            }
        }
        panic!("no answer to {method}")
    }

    /// Evaluate JavaScript in the page; the value it returns (by value).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it returns something truthy (bounded).
    fn wait(&mut self, limit: Duration, what: &str, expr: &str) -> Value {
        let until = Instant::now() + limit;
        // Exceptions (e.g. the page is still loading) count as "not yet".
        let guarded =
            format!("(() => {{ try {{ return ({expr}); }} catch (e) {{ return null; }} }})()");
        loop {
            let v = self.eval(&guarded);
            if !(v.is_null() || v == json!(false)) {
                return v;
            }
            if Instant::now() >= until {
                let page = self.eval(&format!("(() => {{ try {{ return {READ_PAGE}; }} catch (e) {{ return String(e); }} }})()"));
                panic!("timed out waiting for {what}: last {v}; the page shows {page}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What the page shows, read from its DOM.
const READ_PAGE: &str = r#"(() => {
  const q = (id) => document.getElementById(id);
  return {
    seq: +(document.body.dataset.seq || 0),
    read_iops: +q('total-read-iops').dataset.value,
    write_iops: +q('total-write-iops').dataset.value,
    write_mib: +q('total-write-mib').dataset.value,
    write_iops_text: q('total-write-iops').textContent,
    clients: q('nbd-clients').textContent,
    live: q('live').textContent,
    login: !q('login').hidden,
    volumes: [...document.querySelectorAll('#volumes tbody tr[data-volume]')].map((r) => r.dataset.volume),
    health: [...document.querySelectorAll('#devices tbody .badge')].map((b) => b.textContent),
    exports: document.querySelectorAll('#exports tbody code').length,
    reactors: document.querySelectorAll('#reactors tbody tr').length,
    hash: location.hash,
  };
})()"#;

/// Painted (non-transparent) pixels of a canvas.
fn painted(cdp: &mut Cdp, id: &str) -> u64 {
    cdp.eval(&format!(
        "(() => {{ const c = document.getElementById('{id}'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }})()"
    ))
    .as_u64()
    .unwrap()
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 byte {c}"),
        }
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let take = chunk.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    out
}

/// The page's viewport as a PNG artefact in `target/tmp/`.
fn save_screenshot(page: &mut Cdp, file: &str) {
    let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    std::fs::write(&path, &png).unwrap();
    println!("dashboard screenshot: {}", path.display());
}

/// A replicated volume on the page: `/api/replication` answers (in the page only) a status
/// built from the API's own type, with a resyncing peer. The row shows its state, progress,
/// rate and ETA; its Suspend button reaches the daemon, whose refusal (this daemon has no
/// replicated volume) the page shows.
fn show_replication(page: &mut Cdp) {
    use ringblock_web::replication::{
        PeerReplicationStatus, ReplicationStatus, ResyncStatus, VolumeReplicationStatus,
    };
    const NODE: &str = "0123456789abcdef0123456789abcdef";
    let status = ReplicationStatus {
        node_id: "fedcba9876543210fedcba9876543210".into(),
        node_name: Some("left".into()),
        cluster: "lab".into(),
        listen: "127.0.0.1:7900".into(),
        volumes: vec![VolumeReplicationStatus {
            volume: "default".into(),
            role: "primary".into(),
            generation: Some("00000000000000ab".into()),
            history_len: 2,
            region_size_bytes: MIB,
            exportable: true,
            not_exportable_reason: None,
            peers: vec![PeerReplicationStatus {
                node: NODE.into(),
                address: "127.0.0.1:7901".into(),
                mode: "sync".into(),
                state: "resyncing".into(),
                reason: Some("came back after a timeout".into()),
                connected_since_unix_ms: Some(1),
                dirty_bytes: 96 * MIB,
                lag_bytes: 8192,
                lag_ms: Some(2),
                resync: Some(ResyncStatus {
                    total_bytes: 128 * MIB,
                    done_bytes: 32 * MIB,
                    started_unix_ms: 1,
                    finished_unix_ms: None,
                    rate_bytes_per_s: (16 * MIB) as f64,
                    eta_s: Some(6.0),
                }),
                last_resync: Some(ResyncStatus {
                    total_bytes: 128 * MIB,
                    done_bytes: 32 * MIB,
                    started_unix_ms: 1,
                    finished_unix_ms: None,
                    rate_bytes_per_s: (16 * MIB) as f64,
                    eta_s: Some(6.0),
                }),
            }],
        }],
    };
    let body = serde_json::to_string(&serde_json::to_string(&status).unwrap()).unwrap();
    page.eval(&format!(
        "(() => {{ const real = window.fetch; window.fetch = (u, o) => String(u).endsWith('/api/replication') ? Promise.resolve(new Response({body}, {{ status: 200, headers: {{ 'Content-Type': 'application/json' }} }})) : real(u, o); return true; }})()"
    ));
    let row = page.wait(
        Duration::from_secs(20),
        "the replicated volume's row",
        &format!("(() => {{ const r = document.querySelector('#replication tr[data-node=\"{NODE}\"]'); return r ? {{ state: r.dataset.state, badge: r.querySelector('.badge').className, percent: r.querySelector('td.resync').dataset.percent, text: r.textContent }} : null; }})()"),
    );
    assert_eq!(row["state"], "resyncing", "{row}");
    assert_eq!(row["badge"], "badge peer-resyncing", "{row}");
    assert_eq!(row["percent"], "25.0", "{row}");
    let text = row["text"].as_str().unwrap();
    for part in [
        "default",
        "primary",
        "sync",
        "96 MiB",
        "25.0% · 16 MiB/s · ETA 6 s",
        "came back after a timeout",
    ] {
        assert!(text.contains(part), "{part:?} not in {text:?}");
    }
    page.eval("document.getElementById('replication').scrollIntoView(); true");
    save_screenshot(page, "web-dashboard-replication.png");
    page.eval(&format!("window.confirm = () => true; document.querySelector('#replication tr[data-node=\"{NODE}\"] button.peer-action').click(); true"));
    let msg = page.wait(
        Duration::from_secs(20),
        "the suspend refusal",
        "(() => { const m = document.getElementById('message'); return !m.hidden && m.className === 'error' ? m.textContent : null; })()",
    );
    assert!(msg.as_str().unwrap().contains("not replicated"), "{msg}");
    page.eval("document.getElementById('message').hidden = true; true");
}

#[test]
fn dashboard_shows_live_numbers_in_chromium() {
    for tool in ["chromium", "fio"] {
        if !have_tool(tool) {
            return required::skip(
                "dashboard_shows_live_numbers_in_chromium",
                &format!("{tool} is not installed"),
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "dash.toml",
        "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = 536870912\n\
         [[volume]]\nname = \"default\"\ndevice = \"ram0\"\nsize_bytes = 268435456\n\
         [[volume]]\nname = \"archive\"\ndevice = \"ram0\"\nsize_bytes = 67108864\n",
    );
    let state = dir.path().join("state");
    let (d, web, token) = start_with_web(Some(&cfg), &state);
    let nbd = nbd_endpoints(&d).0.unwrap();

    // fio writes (and reads) through NBD for a bounded time while the page watches.
    let uri = format!("--uri=nbd://{nbd}/default");
    let fio = std::thread::spawn(move || {
        run_tool(
            150,
            "fio",
            &[
                "--name=dashboard",
                "--ioengine=nbd",
                &uri,
                "--rw=randrw",
                "--rwmixread=60",
                "--bs=4k",
                "--iodepth=8",
                "--size=128m",
                "--time_based",
                "--runtime=40",
                "--output-format=json",
            ],
            &[],
        )
    });
    wait_for(
        Duration::from_secs(60),
        "fio's writes in /api/stats",
        || {
            let s = http_auth(&web, &token, "GET", "/api/stats", &[], None).json();
            let v = s["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == "default")?
                .clone();
            (v["write_iops"].as_f64()? > 0.0).then_some(())
        },
    );

    // The token travels in the URL fragment (never sent to the server); the page moves it to
    // sessionStorage and removes it from the address bar.
    let base = format!("http://{web}/");
    let t0 = Instant::now();
    let browser = Browser::launch(&format!("{base}#token={token}"));
    eprintln!("chromium up after {:?}", t0.elapsed());
    let mut page = browser.page(&base);
    eprintln!("page attached after {:?}", t0.elapsed());
    let first = page.wait(
        Duration::from_secs(60),
        "live numbers on the page",
        &format!("(() => {{ const s = {READ_PAGE}; return s.seq > 0 && s.write_iops > 0 && s.volumes.length === 2 && s.health.length > 0 ? s : null; }})()"),
    );
    assert_eq!(first["hash"], "", "token removed from the URL: {first}");
    assert_eq!(first["login"], false, "{first}");
    assert_eq!(first["live"], "live", "{first}");
    assert_eq!(first["volumes"], json!(["default", "archive"]));
    assert_eq!(first["health"], json!(["ok"]));
    assert_eq!(first["clients"], "1", "{first}");
    assert!(first["exports"].as_u64().unwrap() >= 2, "{first}");
    assert!(first["reactors"].as_u64().unwrap() >= 1, "{first}");
    assert!(first["write_iops_text"].as_str().unwrap() != "–", "{first}");
    // No ublk device: the table says "none", and why ublk cannot be used on a machine without
    // the driver.
    let ublk = page.wait(
        Duration::from_secs(30),
        "the ublk table",
        "(() => document.querySelector('#ublk tbody').textContent || null)()",
    );
    let ublk = ublk.as_str().unwrap();
    assert!(ublk.starts_with("none"), "{ublk}");
    if !std::path::Path::new("/dev/ublk-control").exists() {
        assert!(ublk.contains("ublk_drv"), "{ublk}");
    }

    // No replicated volume: the replication table says so.
    let replication = page.wait(
        Duration::from_secs(30),
        "the replication table",
        "(() => document.querySelector('#replication tbody').textContent || null)()",
    );
    assert_eq!(replication, "no replicated volumes");

    // The numbers keep changing: later samples, different rates.
    let second = page.wait(
        Duration::from_secs(30),
        "a later sample on the page",
        &format!("(() => {{ const s = {READ_PAGE}; return s.seq >= {} + 2 && s.write_iops > 0 ? s : null; }})()", first["seq"]),
    );
    assert!(
        ["read_iops", "write_iops", "write_mib"]
            .iter()
            .any(|k| first[*k] != second[*k]),
        "the displayed rates did not change: {first} then {second}"
    );
    for chart in ["chart-iops", "chart-mib", "chart-lat", "chart-cpu"] {
        let n = painted(&mut page, chart);
        assert!(n > 1000, "{chart}: only {n} painted pixels");
    }

    // The artefact: the dashboard under load, once the charts have some history.
    page.wait(
        Duration::from_secs(30),
        "more samples",
        &format!("+document.body.dataset.seq >= {} + 8", first["seq"]),
    );
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    );
    std::thread::sleep(Duration::from_millis(1500));
    save_screenshot(&mut page, "web-dashboard.png");

    show_replication(&mut page);

    // Deleting the volume fio has open is refused; the page shows the API's error.
    page.eval("window.confirm = () => true; window.prompt = () => null; document.querySelector('tr[data-volume=\"default\"] button.danger').click(); true");
    let msg = page.wait(
        Duration::from_secs(20),
        "the refusal message",
        "(() => { const m = document.getElementById('message'); return !m.hidden && m.className === 'error' ? m.textContent : null; })()",
    );
    assert!(msg.as_str().unwrap().contains("in use"), "{msg}");
    assert_eq!(
        http_auth(&web, &token, "GET", "/api/volumes/default", &[], None).status,
        200
    );

    // Create, grow and delete a volume from the page (confirmations accepted).
    page.eval("(() => { const f = document.getElementById('create'); f.elements.namedItem('name').value = 'fromui'; f.elements.namedItem('size').value = '32M'; f.requestSubmit(); return true; })()");
    wait_for(
        Duration::from_secs(20),
        "the volume created from the page",
        || {
            let r = http_auth(&web, &token, "GET", "/api/volumes/fromui", &[], None);
            (r.status == 200 && r.json()["size_bytes"] == 32 * MIB).then_some(())
        },
    );
    page.wait(
        Duration::from_secs(20),
        "the new row",
        "!!document.querySelector('tr[data-volume=\"fromui\"]')",
    );
    page.eval("window.prompt = () => '48M'; document.querySelector('tr[data-volume=\"fromui\"] button.small').click(); true");
    wait_for(
        Duration::from_secs(20),
        "the volume grown from the page",
        || {
            let r = http_auth(&web, &token, "GET", "/api/volumes/fromui", &[], None);
            (r.json()["size_bytes"] == 48 * MIB).then_some(())
        },
    );
    page.wait(
        Duration::from_secs(20),
        "the grown row",
        "!!document.querySelector('tr[data-volume=\"fromui\"]')",
    );
    page.eval("document.querySelector('tr[data-volume=\"fromui\"] button.danger').click(); true");
    wait_for(
        Duration::from_secs(20),
        "the volume deleted from the page",
        || {
            (http_auth(&web, &token, "GET", "/api/volumes/fromui", &[], None).status == 404)
                .then_some(())
        },
    );
    // A refused confirmation changes nothing.
    page.eval("window.confirm = () => false; document.querySelector('tr[data-volume=\"archive\"] button.danger').click(); true");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        http_auth(&web, &token, "GET", "/api/volumes/archive", &[], None).status,
        200
    );

    // A wrong token: the page asks for one again.
    page.eval("sessionStorage.setItem('ringblock.token', 'wrong'); setTimeout(() => location.reload(), 50); true");
    let why = page.wait(
        Duration::from_secs(30),
        "the token dialog",
        "(() => { const l = document.getElementById('login'); const e = document.getElementById('login-error'); return l && !l.hidden && !e.hidden ? e.textContent : null; })()",
    );
    assert!(why.as_str().unwrap().contains("refused"), "{why}");
    drop(page);
    drop(browser);

    let out = fio.join().unwrap();
    assert!(out.ok(), "fio failed: {}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("\"jobs\""), "{}", out.stdout);
    d.stop_clean();
}
