//! Finding the privacy-accounting reference values; shared by the accountant's test and
//! the CLI's test through `#[path]`.

/// The reference values: `MEDFL_DP_REFERENCE`, else the project's `../shared/reference/`
/// beside the repository (it may hold more cases than the copy), else the copy in
/// `shared/tests/data/`. `repo_root` is the repository's root directory.
pub fn reference(repo_root: &std::path::Path) -> Vec<serde_json::Value> {
    let path = match std::env::var("MEDFL_DP_REFERENCE") {
        Ok(p) => p.into(),
        Err(_) => {
            let beside = repo_root.join("../shared/reference/dp_accounting.json");
            if beside.exists() {
                beside
            } else {
                repo_root.join("shared/tests/data/dp_accounting.json")
            }
        }
    };
    eprintln!("reference values: {}", path.display());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read the reference values at {}: {e} (set MEDFL_DP_REFERENCE)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("reference file is a JSON array")
}
