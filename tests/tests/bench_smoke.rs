//! The smoke run of `cargo xtask bench scale` (the benchmark itself is not part of CI): at 1k
//! services, briefly, every figure of its table is produced, with its peer when
//! `../shared/peers` is beside the checkout.

use std::process::Command;

use switchyard_tests::sandbox::{bin, require_root};

#[test]
fn scale_benchmark_smoke_run_at_1k_services() {
    require_root();
    let out = Command::new(bin("sy-bench"))
        .args(["scale", "--smoke"])
        .output()
        .expect("running sy-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sy-bench scale --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let peers = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/peers")
        .exists();
    let row = |figure: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {figure}")) && l.contains("| 1000 |"))
            .unwrap_or_else(|| panic!("no `{figure}` row at 1000 services:\n{stdout}"));
        let cells: Vec<String> = line.split('|').map(|c| c.trim().to_string()).collect();
        assert!(!cells[3].starts_with("failed"), "{figure}: {cells:?}");
        cells
    };
    // A figure of ours that is a measurement (a number), and, with the peers, its peer's.
    let number = |cell: &str| -> f64 {
        cell.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no number in `{cell}`:\n{stdout}"))
    };
    for figure in [
        "cold start, API server",
        "cold start, manifests",
        "one endpoint change",
        "network_programming_duration_seconds",
        "RSS after cold start (API server)",
        "RSS after churn",
        "RSS after cold start (manifests)",
        "new connections/s, tc path",
        "new connections/s, socket LB",
    ] {
        let cells = row(figure);
        assert!(number(&cells[3]) > 0.0, "{figure}: {cells:?}");
        if peers && (figure.starts_with("cold start") || figure.starts_with("new connections")) {
            assert!(
                number(&cells[4]) > 0.0,
                "{figure} without its peer: {cells:?}"
            );
        }
    }
    let dns = row("DNS QPS");
    if peers {
        assert!(
            number(&dns[3]) > 0.0 && number(&dns[4]) > 0.0,
            "DNS: {dns:?}"
        );
    }
}
