//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations. A test
//! checks that it lists exactly the routes the router serves.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;
use crate::replication_api;
use crate::replication_verify;
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ringblock management API",
        description = "Volumes, devices, NBD exports and clients, ublk exports, live statistics and metrics of a ringblock daemon. Every operation except this document and the dashboard's static files needs `Authorization: Bearer TOKEN` (the token is printed once at the daemon's first start; `ringblock token reset` makes a new one). State-changing calls must be addressed to the daemon's listen address or localhost (`Host`) and, from a browser, come from the dashboard's own origin (`Origin`). Errors are `{\"error\": \"...\"}`. Replication: `/api/replication` (status of every replicated volume and its peers) and the commands promote, demote, suspend, resume, resolve, and adding and removing a replica; their answers are `{\"message\": \"...\"}`. `POST /api/volumes/{name}/verify` starts an online verify of a primary's replicas (202) and `GET` the same path shows its progress and result."
    ),
    paths(
        api::status,
        api::list_volumes,
        api::create_volume,
        api::get_volume,
        api::delete_volume,
        api::grow_volume,
        api::volume_stats,
        api::list_devices,
        api::list_exports,
        api::list_clients,
        api::list_ublk,
        api::start_ublk,
        api::stop_ublk,
        api::list_reactors,
        replication_api::status,
        replication_api::promote,
        replication_api::demote,
        replication_api::suspend,
        replication_api::resume,
        replication_api::resolve,
        replication_api::add_replica,
        replication_api::remove_replica,
        replication_verify::start_verify,
        replication_verify::verify_status,
        api::latest_stats,
        api::events,
        api::metrics,
        routes::openapi_json,
        routes::dashboard_html,
        routes::dashboard_js,
        routes::dashboard_css,
    ),
    modifiers(&Bearer),
    tags(
        (name = "volumes", description = "Thin volumes"),
        (name = "devices", description = "Storage devices"),
        (name = "nbd", description = "NBD exports and clients"),
        (name = "ublk", description = "Volumes as local block devices /dev/ublkbN (kernel ublk driver)"),
        (name = "replication", description = "Copies of volumes on other nodes: roles, peers, resync, and the operator's commands"),
        (name = "stats", description = "Live statistics"),
        (name = "daemon", description = "The daemon as a whole"),
        (name = "ui", description = "The dashboard (no token needed to load it)"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON text.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// `(METHOD, path)` of every operation in the document, sorted.
pub fn documented_operations() -> Vec<(String, String)> {
    let doc = ApiDoc::openapi();
    let mut ops = Vec::new();
    for (path, item) in &doc.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("PUT", item.put.is_some()),
            ("POST", item.post.is_some()),
            ("DELETE", item.delete.is_some()),
            ("OPTIONS", item.options.is_some()),
            ("HEAD", item.head.is_some()),
            ("PATCH", item.patch.is_some()),
            ("TRACE", item.trace.is_some()),
        ];
        for (m, present) in methods {
            if present {
                ops.push((m.to_string(), path.clone()));
            }
        }
    }
    ops.sort();
    ops
}
