//! Architecture invariants that a test can hold: no import cycle between the top-level
//! modules of any crate of the workspace. A module depends on another when any of its
//! files (outside `#[cfg(test)]`) names `crate::other` or imports it from `use crate::{…}`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules of the crate at `src` and the modules each depends on.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files_of: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        let name = first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if matches!(name.as_str(), "lib" | "main" | "bin") {
            continue;
        }
        files_of.entry(name).or_default().push(file);
    }
    let modules: BTreeSet<String> = files_of.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (module, files) in &files_of {
        let mut deps = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(file).expect("read source");
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let mut names: Vec<&str> = text
                .split("crate::")
                .skip(1)
                .map(|rest| {
                    rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or("")
                })
                .collect();
            for group in text.split("use crate::{").skip(1) {
                let inner = group.split('}').next().unwrap_or("");
                names.extend(
                    inner
                        .split([',', ' ', '\n'])
                        .map(|n| n.split("::").next().unwrap_or("")),
                );
            }
            deps.extend(
                names
                    .into_iter()
                    .filter(|n| modules.contains(*n) && n != module)
                    .map(str::to_string),
            );
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

/// A cycle of the graph, if it has one (depth-first search with a path stack).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for krate in ["src", "proto/src", "shared/src", "coordinator/src", "site-agent/src"] {
        let graph = module_graph(&root().join(krate));
        assert!(graph.len() > 3, "{krate}: too few modules found, the scan is broken");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: import cycle {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(from, to)| (from.to_string(), BTreeSet::from([to.to_string()])))
        .collect();
    let cycle = find_cycle(&graph).expect("a → b → c → a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
}
