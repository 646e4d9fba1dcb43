//! Operating a coordinator: Prometheus metrics and `/healthz` on `metrics_listen`, and
//! `grpc.health.v1` on the mTLS port, against a real federation after a study.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// `GET path` over plain HTTP/1.1; returns the status line and the body.
async fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header and a body");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample of `metric` whose labels contain `with`.
fn sample(text: &str, metric: &str, with: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']) && l.contains(with))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_report_a_running_federation() {
    let agent_port = medfl::federation::free_port().expect("free port");
    let (table, _, tables) = iid_site_tables(3);
    let mut fed = Federation::builder()
        .tables(tables)
        .metrics()
        .build()
        .await
        .expect("federation starts");
    let port = fed.metrics_port.expect("metrics port");
    // One hospital's agent serves its own metrics (its config, restarted).
    let site = fed.site_names[0].clone();
    fed.stop_agent(&site).await;
    let config = fed.dir.join(&site).join("agent.toml");
    let text = std::fs::read_to_string(&config).expect("agent.toml");
    std::fs::write(&config, format!("metrics_listen = \"127.0.0.1:{agent_port}\"\n{text}")).expect("write");
    fed.start_agent(&site).expect("restart the agent");
    let (id, _) = complete_study(&mut fed, &manifest(&table.columns, 3, 3, 60, 1), 3).await;
    let (status, text) = get(agent_port, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        sample(&text, "medfl_agent_egress_messages_total", "kind=\"model_update\""),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "medfl_agent_egress_bytes_total", "kind=\"model_update\""),
        Some(3.0 * 31.0 * 4.0)
    );
    assert_eq!(
        sample(&text, "medfl_agent_epsilon_spent", "dataset=\"breast_cancer\""),
        Some(0.0),
        "{text}"
    );

    let (status, body) = get(port, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "ok\n");
    let (status, text) = get(port, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let study = format!("study=\"{id}\"");
    assert_eq!(
        sample(&text, "medfl_rounds_committed_total", &study),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "medfl_round_updates_total", &study), Some(9.0), "{text}");
    assert_eq!(sample(&text, "medfl_round_duration_seconds_count", &study), Some(3.0));
    assert_eq!(
        sample(&text, "medfl_study_state", "state=\"Completed\""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "medfl_sites_connected", ""), Some(3.0), "{text}");
    assert_eq!(sample(&text, "medfl_updates_received_total", ""), Some(9.0), "{text}");
    assert_eq!(
        sample(&text, "medfl_update_bytes_received_total", ""),
        Some(9.0 * 31.0 * 4.0)
    );
    assert!(sample(&text, "medfl_model_bytes_sent_total", "").is_some_and(|b| b >= 9.0 * 31.0 * 4.0));
    // Every update folded from its chunks, in at most one pass each.
    assert_eq!(sample(&text, "medfl_updates_folded_total", ""), Some(9.0), "{text}");
    assert!(
        sample(&text, "medfl_fold_passes_total", "").is_some_and(|p| (1.0..=9.0).contains(&p)),
        "{text}"
    );
    assert!(text.contains("# TYPE medfl_rounds_committed_total counter"));
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.contains(&study) || !l.contains("study="))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // grpc.health.v1 on the mTLS port, with any consortium certificate.
    let channel = fed
        .profile(&fed.site_names[0].clone())
        .expect("profile")
        .channel(None)
        .expect("channel");
    let mut health = HealthClient::new(channel);
    for service in ["", "medfl.v1.Site", "medfl.v1.Admin"] {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .expect("in time")
        .expect("health answers")
        .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "medfl.v1.Nope".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The readiness probe for Kubernetes: the coordinator's own config and identity.
    // A copy of its config and identity, to probe once the federation's folder is gone.
    let kept = tempfile::tempdir().expect("tempdir");
    for file in ["coordinator.toml", "profile.toml", "cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(fed.dir.join("coordinator").join(file), kept.path().join(file)).expect("copy");
    }
    let config = kept.path().join("coordinator.toml");
    let config = config.to_str().expect("utf-8 path");
    let probe = || {
        let config = config.to_string();
        tokio::task::spawn_blocking(move || medfl(&["coordinator", "--config", &config, "--probe"]))
    };
    let up = probe().await.expect("probe");
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    fed.shutdown().await.expect("clean shutdown");
    let down = probe().await.expect("probe");
    assert_eq!(down.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("not serving"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}
