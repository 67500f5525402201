//! Many sandboxes at once. Needs root.

use std::collections::HashSet;

use cordon_testkit::{runtime_in, TestOptions, TestSandbox, TestStateDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sandboxes_run_at_once_with_distinct_id_ranges() {
    let state = TestStateDir::new();
    let runtime = runtime_in(state.path());
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let runtime = runtime.clone();
        starting.spawn(async move { TestSandbox::start_in(runtime, TestOptions::default()).await });
    }
    let mut sandboxes = Vec::new();
    while let Some(sandbox) = starting.join_next().await {
        sandboxes.push(sandbox.unwrap());
    }
    let mut ranges = HashSet::new();
    for sandbox in &sandboxes {
        let map = sandbox.sh("cat /proc/self/uid_map; echo x > /tmp/x").await;
        let base = map.split_whitespace().nth(1).unwrap().to_string();
        assert!(
            ranges.insert(base),
            "two sandboxes share an id range: {map}"
        );
    }
    assert_eq!(ranges.len(), 20);
}
