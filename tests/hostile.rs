//! Hostile HTTP input that the chaos scenarios (tests/chaos.rs) do not cover: forged
//! OAuth `state` values. The hostile message corpus in `tests/hostile/` is scenario 4 of
//! tests/chaos.rs.

use crate::common;

use common::TestApp;

/// Forged, garbage and oversized OAuth `state` values get the "not valid" page (400),
/// never an error page that echoes the input. (Tampering with a real state, missing
/// API keys and oversized API bodies are covered in tests/api.rs and tests/discord.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_oauth_states_get_the_not_valid_page() {
    let app = TestApp::spawn_ingest().await;
    let base = format!("http://{}/oauth/discord/callback", app.addr);
    let client = reqwest::Client::new();
    let huge = "A".repeat(6000);
    let states = [
        "x",
        "",
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "'%20OR%20'1'%3D'1",
        "AAAA.BBBB.CCCC",
        "%00%00%00",
        "%FF%FE",
        huge.as_str(),
    ];
    for state in states {
        let r = client
            .get(format!("{base}?code=abc&state={state}"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let page = r.text().await.unwrap();
        assert_eq!(status, 400, "state {state:.40}: {page:.200}");
        assert!(!page.contains("<script>alert"), "input echoed: {page}");
    }
    app.stop().await;
}
