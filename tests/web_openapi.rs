//! The OpenAPI document the daemon serves lists exactly the routes its router serves, and
//! every route in it answers (is not an unknown route).

mod common;

use common::{http, http_auth, start_with_web};

#[test]
fn openapi_document_matches_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (d, addr, token) = start_with_web(None, &state);
    let r = http(&addr, "GET", "/api/openapi.json", &[], None);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let doc = r.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["responses"].is_object(),
                "{method} {path} documents its responses"
            );
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let served = ringblock_web::route_table();
    assert_eq!(documented, served, "OpenAPI document vs router");

    // Every route is really served: with the token, none answers "no route" (404 from the
    // fallback) or 405; unknown names give the handler's own 404.
    for (method, path) in &served {
        let concrete = path
            .replace("{name}", "default")
            .replace("{volume}", "default")
            .replace("{node}", "0123456789abcdef0123456789abcdef");
        if concrete == "/api/events" {
            continue; // a stream; covered by the SSE test
        }
        let body = (method == "POST").then_some(&b"{}"[..]);
        let r = http_auth(&addr, &token, method, &concrete, &[], body);
        assert!(r.status != 405, "{method} {path}: {r:?}");
        if r.status == 404 {
            assert!(
                !r.error().contains("no route"),
                "{method} {path} is not routed: {r:?}"
            );
        }
    }
    // Schemas the API uses are in the document.
    for schema in [
        "VolumeInfo",
        "DeviceInfo",
        "Sample",
        "ErrorBody",
        "CreateVolumeRequest",
        "NbdClient",
        "UblkExport",
        "StartUblkRequest",
        "ReplicationStatus",
        "PromoteRequest",
        "ResolveRequest",
        "CommandResult",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
    d.stop_clean();
}
