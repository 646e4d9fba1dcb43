//! The example files under deploy/ are what users copy: they must parse and validate.

use std::path::PathBuf;

fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn example_manifest_validates_and_matches_the_bundled_data() {
    let manifest = medfl_shared::manifest::StudyManifest::from_toml(&example("manifest.toml")).expect("valid manifest");
    let header =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/breast_cancer_wisconsin.csv"))
            .expect("bundled data");
    let columns: Vec<&str> = header.lines().next().expect("header").split(',').collect();
    assert!(manifest.data.features.iter().all(|f| columns.contains(&f.as_str())));
    assert_eq!(manifest.data.features.len(), 30);
}

#[test]
fn example_site_level_manifest_plans_within_its_budget() {
    let manifest =
        medfl_shared::manifest::StudyManifest::from_toml(&example("manifest-site-dp.toml")).expect("valid manifest");
    let plan = manifest.privacy_plan().expect("plan").expect("privacy on");
    assert_eq!(plan.per_round.q, 1.0);
    assert!(
        plan.epsilon_all_rounds <= 8.0 && plan.epsilon_all_rounds > 7.9,
        "{plan:?}"
    );
}

#[test]
fn example_coordinator_and_agent_configs_parse() {
    let coordinator: medfl_coordinator::ConfigFile =
        toml::from_str(&example("coordinator.toml")).expect("coordinator.toml");
    assert_eq!(coordinator.listen.port(), 7443);
    let agent: medfl_site_agent::agent::ConfigFile = toml::from_str(&example("agent.toml")).expect("agent.toml");
    let policy: medfl_site_agent::policy::Policy = toml::from_str(&example("policy.toml")).expect("policy.toml");
    policy.validate().expect("the example policy validates");
    assert_eq!(agent.datasets.len(), 1);
    for h in ["a", "b", "c"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("deploy/compose/hospital-{h}.toml"));
        let text = std::fs::read_to_string(path).expect("compose agent config");
        let _: medfl_site_agent::agent::ConfigFile = toml::from_str(&text).expect("compose agent config parses");
    }
    let read = |path: &str| std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)).expect(path);
    let compose: medfl_coordinator::ConfigFile =
        toml::from_str(&read("deploy/compose/coordinator.toml")).expect("compose coordinator config parses");
    assert!(compose.dashboard_listen.is_some() && compose.metrics_listen.is_some());
    // The Kubernetes ConfigMap's coordinator.toml: the block under `coordinator.toml: |`.
    let k8s = read("deploy/k8s/coordinator.yaml");
    let block: String = k8s
        .split("coordinator.toml: |\n")
        .nth(1)
        .expect("the ConfigMap's coordinator.toml")
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    let k8s: medfl_coordinator::ConfigFile = toml::from_str(&block).expect("the ConfigMap's coordinator.toml parses");
    assert!(k8s.dashboard_cert.is_some() && k8s.dashboard_key.is_some(), "{block}");
}

#[test]
fn example_query_validates_and_the_example_policy_answers_it() {
    let query = medfl_shared::query::QueryManifest::from_toml(&example("query.toml")).expect("valid query");
    let plan = query.plan().expect("plan");
    assert!(plan.epsilon <= 0.5 && plan.epsilon > 0.49, "{plan:?}");
    let policy: medfl_site_agent::policy::Policy = toml::from_str(&example("policy.toml")).expect("policy.toml");
    let reasons = policy.review_query(&query, plan.epsilon, &[("breast_cancer".into(), None)], 0);
    assert!(reasons.is_empty(), "{reasons:?}");
}
