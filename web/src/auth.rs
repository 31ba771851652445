//! Who may call the API.
//!
//! - Every `/api/*` route (except the OpenAPI document) and `/metrics` need
//!   `Authorization: Bearer TOKEN` → else 401 with `WWW-Authenticate: Bearer`.
//! - State-changing calls (POST, PUT, PATCH, DELETE) must carry a `Host` that names this
//!   server (its listen address, `localhost`/`127.0.0.1`/`[::1]` with its port, or a configured
//!   `allowed_hosts` entry) and, if an `Origin` is present, it must be `http://` + that Host →
//!   else 403. This defeats DNS rebinding and cross-site requests even before the token is
//!   looked at (a browser page elsewhere never has the token: it lives in the dashboard's
//!   sessionStorage, readable only by the dashboard's origin).
//! - The dashboard's static files load without a token; the page asks for it.
//!
//! The SSE stream is read by the dashboard with `fetch()` and a streamed body, so it sends the
//! token in the `Authorization` header like every other call: no token ever goes in a URL
//! (URLs end up in logs, history and `Referer`).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// Which `Host` header values name this server.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    port: u16,
    listen_ip: IpAddr,
    extra: Vec<String>,
}

impl HostPolicy {
    pub fn new(listen: SocketAddr, allowed_hosts: &[String]) -> Self {
        Self {
            port: listen.port(),
            listen_ip: listen.ip(),
            extra: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a request's `Host` header value names this server.
    pub fn host_ok(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        if self.extra.contains(&host) {
            return true;
        }
        let Some((name, port)) = split_host_port(&host) else {
            return false;
        };
        if port != self.port {
            return false;
        }
        if name == "localhost" {
            return true;
        }
        let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return false;
        };
        if self.listen_ip.is_unspecified() {
            // Listening on every address: any literal address of this machine will do; the
            // kernel only delivered the request because it was addressed to one of them.
            return true;
        }
        ip == self.listen_ip || (self.listen_ip.is_loopback() && ip.is_loopback())
    }

    /// Whether an `Origin` header value is this server as seen through `host`.
    pub fn origin_ok(&self, origin: &str, host: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        let host = host.trim().to_ascii_lowercase();
        match origin.strip_prefix("http://") {
            Some(rest) => {
                rest == host
                    || (split_host_port(rest) == split_host_port(&host)
                        && split_host_port(rest).is_some())
            }
            None => false,
        }
    }
}

/// `name:port` → (name, port); no port → port 80. IPv6 literals keep their brackets.
fn split_host_port(h: &str) -> Option<(&str, u16)> {
    if h.is_empty() || h.contains('/') || h.contains('@') {
        return None;
    }
    if let Some(end) = h.strip_prefix('[').and_then(|r| r.find(']')) {
        let name = &h[..end + 2];
        let rest = &h[end + 2..];
        return match rest.strip_prefix(':') {
            Some(p) => p.parse().ok().map(|p| (name, p)),
            None if rest.is_empty() => Some((name, 80)),
            None => None,
        };
    }
    match h.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => p.parse().ok().map(|p| (name, p)),
        Some(_) => None,
        None => Some((h, 80)),
    }
}

pub(crate) fn changes_state(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Middleware of every protected route: Host/Origin on state-changing calls, then the token.
pub(crate) async fn require_token(
    State(st): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if changes_state(req.method()) {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !st.0.hosts.host_ok(host) {
            return ApiError::forbidden(format!(
                "Host {host:?} does not name this server; state-changing calls must be addressed to its listen address or localhost"
            ))
            .into_response();
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !st.0.hosts.origin_ok(origin, host) {
                return ApiError::forbidden(format!(
                    "Origin {origin:?} does not match Host {host:?}: cross-site requests are refused"
                ))
                .into_response();
            }
        }
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented {
        None => ApiError::unauthorized("missing API token: send `Authorization: Bearer TOKEN`")
            .into_response(),
        Some(t) if !st.0.tokens.verify(t) => {
            ApiError::unauthorized("invalid API token").into_response()
        }
        Some(_) => {
            // The connection's idle/slow behaviour is no longer an anonymous client's.
            if let Some(conn) = req.extensions().get::<crate::listener::ConnHandle>() {
                conn.authenticated();
            }
            next.run(req).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let p = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &["ui.lan:443".into()]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
            "127.0.0.2:8080",
            "ui.lan:443",
        ] {
            assert!(p.host_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.com:8080",
            "127.0.0.1:8081",
            "localhost",
            "10.0.0.1:8080",
            "127.0.0.1:8080/x",
            "a@127.0.0.1:8080",
            "[::1",
        ] {
            assert!(!p.host_ok(bad), "{bad}");
        }
        let any = HostPolicy::new("0.0.0.0:80".parse().unwrap(), &[]);
        assert!(any.host_ok("192.0.2.7"));
        assert!(any.host_ok("192.0.2.7:80"));
        assert!(!any.host_ok("evil.com"));
        let v6 = HostPolicy::new("[::1]:9000".parse().unwrap(), &[]);
        assert!(v6.host_ok("[::1]:9000"));
        assert!(v6.host_ok("localhost:9000"));
    }

    #[test]
    fn origins() {
        let p = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &[]);
        assert!(p.origin_ok("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(p.origin_ok("http://localhost:8080", "localhost:8080"));
        assert!(!p.origin_ok("http://evil.com", "127.0.0.1:8080"));
        assert!(!p.origin_ok("null", "127.0.0.1:8080"));
        assert!(!p.origin_ok("https://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!p.origin_ok("http://localhost:8080", "127.0.0.1:8080"));
    }
}
