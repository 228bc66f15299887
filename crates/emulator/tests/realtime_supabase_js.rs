//! Fidelity test with the official client: runs `tests/js/fidelity.js` (supabase-js with
//! the `ws` transport) against a started emulator with the legacy JWT keys.
// NOTE: supabase-js 2.109 also sends an `sb_` key as `Authorization: Bearer`, which the
// emulator's PostgREST rejects with PGRST301 as hosted PostgREST does, so the script is
// not run with the opaque keys.

mod realtime_support;

use std::path::Path;
use std::process::Command;

use realtime_support::TestServer;

fn run_fidelity_script(server: &TestServer, anon_key: &str, service_key: &str) {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        folder.join("node_modules/@supabase/supabase-js").is_dir(),
        "supabase-js is not installed: run `npm ci` in {}",
        folder.display()
    );
    let output = Command::new("node")
        .arg("fidelity.js")
        .current_dir(&folder)
        .env("SUPABASE_URL", server.emulator.url())
        .env("SUPABASE_ANON_KEY", anon_key)
        .env("SUPABASE_SERVICE_ROLE_KEY", service_key)
        .output()
        .expect("run node (is Node.js 20 or later installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "fidelity.js failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("OK"), "fidelity.js output:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_with_jwt_keys() {
    let server = TestServer::start().await;
    let anon = server.keys.anon_jwt.clone();
    let service = server.keys.service_role_jwt.clone();
    tokio::task::block_in_place(|| run_fidelity_script(&server, &anon, &service));
}
