//! The router. Every route is added through [`Table`], which records `(METHOD, path)` so a test
//! can compare the served routes with the OpenAPI document.

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{self, MethodRouter};
use axum::Router;

use crate::error::ApiError;
use crate::{api, auth, replication_api, replication_verify, AppState, MAX_BODY_BYTES};

const INDEX_HTML: &str = include_str!("../static/index.html");
const DASHBOARD_JS: &str = include_str!("../static/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../static/dashboard.css");

/// Content-Security-Policy of the dashboard: its own scripts, styles and API only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Table {
    public: Router<AppState>,
    protected: Router<AppState>,
    list: Vec<(String, String)>,
}

impl Table {
    fn add(
        mut self,
        protected: bool,
        method: Method,
        path: &str,
        route: MethodRouter<AppState>,
    ) -> Self {
        self.list.push((method.to_string(), path.to_string()));
        if protected {
            self.protected = self.protected.route(path, route);
        } else {
            self.public = self.public.route(path, route);
        }
        self
    }
}

fn table() -> Table {
    use routing::{delete, get, post};
    let t = Table {
        public: Router::new(),
        protected: Router::new(),
        list: Vec::new(),
    };
    let (g, p, d) = (Method::GET, Method::POST, Method::DELETE);
    t.add(false, g.clone(), "/", get(dashboard_html))
        .add(false, g.clone(), "/dashboard.js", get(dashboard_js))
        .add(false, g.clone(), "/dashboard.css", get(dashboard_css))
        .add(false, g.clone(), "/api/openapi.json", get(openapi_json))
        .add(true, g.clone(), "/api/status", get(api::status))
        .add(true, g.clone(), "/api/volumes", get(api::list_volumes))
        .add(true, p.clone(), "/api/volumes", post(api::create_volume))
        .add(true, g.clone(), "/api/volumes/{name}", get(api::get_volume))
        .add(
            true,
            d.clone(),
            "/api/volumes/{name}",
            delete(api::delete_volume),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/grow",
            post(api::grow_volume),
        )
        .add(
            true,
            g.clone(),
            "/api/volumes/{name}/stats",
            get(api::volume_stats),
        )
        .add(true, g.clone(), "/api/devices", get(api::list_devices))
        .add(true, g.clone(), "/api/exports", get(api::list_exports))
        .add(true, g.clone(), "/api/clients", get(api::list_clients))
        .add(true, g.clone(), "/api/ublk", get(api::list_ublk))
        .add(true, p.clone(), "/api/ublk", post(api::start_ublk))
        .add(
            true,
            d.clone(),
            "/api/ublk/{volume}",
            delete(api::stop_ublk),
        )
        .add(
            true,
            g.clone(),
            "/api/replication",
            get(replication_api::status),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/promote",
            post(replication_api::promote),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/demote",
            post(replication_api::demote),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/replicas/{node}/suspend",
            post(replication_api::suspend),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/replicas/{node}/resume",
            post(replication_api::resume),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/resolve",
            post(replication_api::resolve),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/replicas",
            post(replication_api::add_replica),
        )
        .add(
            true,
            d,
            "/api/volumes/{name}/replicas/{node}",
            delete(replication_api::remove_replica),
        )
        .add(
            true,
            p.clone(),
            "/api/volumes/{name}/verify",
            post(replication_verify::start_verify),
        )
        .add(
            true,
            g.clone(),
            "/api/volumes/{name}/verify",
            get(replication_verify::verify_status),
        )
        .add(true, g.clone(), "/api/reactors", get(api::list_reactors))
        .add(true, g.clone(), "/api/stats", get(api::latest_stats))
        .add(true, g.clone(), "/api/events", get(api::events))
        .add(true, g, "/metrics", get(api::metrics))
}

/// `(METHOD, path)` of every route served, sorted (path parameters as `{name}`).
pub fn route_table() -> Vec<(String, String)> {
    let mut list = table().list;
    list.sort();
    list
}

/// The whole application: routes, auth on the protected ones, body limit, headers, fallbacks.
pub(crate) fn router(state: AppState) -> Router {
    let t = table();
    let protected = t.protected.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_token,
    ));
    t.public
        .merge(protected)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The dashboard page.
#[utoipa::path(get, path = "/", tag = "ui",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn dashboard_html() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// The dashboard's script.
#[utoipa::path(get, path = "/dashboard.js", tag = "ui",
    responses((status = 200, description = "JavaScript", content_type = "text/javascript", body = String)))]
pub async fn dashboard_js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

/// The dashboard's style sheet.
#[utoipa::path(get, path = "/dashboard.css", tag = "ui",
    responses((status = 200, description = "CSS", content_type = "text/css", body = String)))]
pub async fn dashboard_css() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

/// This API's OpenAPI 3.1 document (no token needed: it describes, it reveals no state).
#[utoipa::path(get, path = "/api/openapi.json", tag = "daemon",
    responses((status = 200, description = "OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document lists exactly the routes the router serves.
    #[test]
    fn openapi_matches_routes() {
        let served = route_table();
        let documented = crate::openapi::documented_operations();
        let missing: Vec<_> = served.iter().filter(|r| !documented.contains(r)).collect();
        let extra: Vec<_> = documented.iter().filter(|r| !served.contains(r)).collect();
        assert!(missing.is_empty(), "served but not documented: {missing:?}");
        assert!(extra.is_empty(), "documented but not served: {extra:?}");
        assert_eq!(served.len(), 31);
    }

    #[test]
    fn protected_routes_declare_bearer_security() {
        let doc: serde_json::Value = serde_json::from_str(&crate::openapi::document()).unwrap();
        for (method, path) in route_table() {
            let op = &doc["paths"][&path][method.to_lowercase()];
            let public =
                !path.starts_with("/api/") && path != "/metrics" || path == "/api/openapi.json";
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            assert_eq!(secured, !public, "{method} {path}: {op}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
