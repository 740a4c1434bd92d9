//! The crate's layers (docs/architecture.md) as a test: every `crate::…` path in `src/` points
//! to the same or a lower layer, and inside a module directory the files import each other
//! without a circle. Comments and `#[deprecated]` compatibility aliases (which keep an old
//! path alive and may point anywhere) are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// What each top-level module may import (besides itself). Keep in step with
/// docs/architecture.md.
const ALLOWED: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("tensor", &["error"]),
    ("config", &["error"]),
    ("rarity", &["error", "config"]),
    ("desc", &["error", "tensor", "config"]),
    ("cpu", &["error", "tensor", "config", "rarity", "desc"]),
    ("cuda", &["error", "tensor", "config", "desc"]),
    ("scheduler", &["error", "tensor", "config", "desc"]),
    (
        "ops",
        &[
            "error",
            "tensor",
            "config",
            "desc",
            "cpu",
            "cuda",
            "scheduler",
        ],
    ),
    (
        "ffi",
        &[
            "error",
            "tensor",
            "config",
            "rarity",
            "desc",
            "cpu",
            "cuda",
            "scheduler",
            "ops",
        ],
    ),
    ("lib", &[]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code lines (1-based number, text) without comments and `#[deprecated]` items.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[deprecated") {
            // Skip the item: to its first `;` at brace depth 0, or to its closing brace.
            let mut depth = 0i32;
            for (_, item) in lines.by_ref() {
                let code = item.split("//").next().unwrap_or("");
                depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
                let t = code.trim_end();
                if depth == 0 && (t.ends_with(';') || t.ends_with('}')) {
                    break;
                }
            }
            continue;
        }
        out.push((n + 1, line.split("//").next().unwrap_or("").to_string()));
    }
    out
}

/// Identifiers that follow `prefix` in `line` (`prefix::name` or `prefix::{a, b::c}`).
fn names_after(line: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            for part in group.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        } else {
            names.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// `src/a/b/c.rs` → ["a", "b", "c"]; `src/a/mod.rs` → ["a"]; `src/lib.rs` → ["lib"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") && parts.len() > 1 {
        parts.pop();
    }
    parts
}

#[test]
fn crate_paths_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let module = module_path(&src, file);
        let layer = module[0].as_str();
        let Some(may) = allowed.get(layer) else {
            violations.push(format!(
                "{}: top-level module `{layer}` has no layer in ALLOWED (tests/layers.rs)",
                file.display()
            ));
            continue;
        };
        let text = fs::read_to_string(file).unwrap();
        // In a top-level file (`src/x.rs`, `src/x/mod.rs`), `super::` is the crate root.
        let top_level = module.len() == 1;
        for (n, line) in code_lines(&text) {
            let mut targets = names_after(&line, "crate::");
            if top_level {
                targets.extend(names_after(&line, "super::"));
            }
            for t in targets {
                if t != layer && allowed.contains_key(t.as_str()) && !may.contains(t.as_str()) {
                    violations.push(format!(
                        "{}:{n}: `{layer}` imports `{t}`, a layer above it",
                        file.display(),
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn files_of_a_module_import_each_other_without_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // Per module directory: sibling → siblings it names through `super::` or its full path.
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let module = module_path(&src, file);
        if module.len() < 2 || file.file_name().is_some_and(|f| f == "mod.rs") {
            continue;
        }
        let (parent, me) = (module[..module.len() - 1].to_vec(), module.last().unwrap());
        let full = format!("crate::{}::", parent.join("::"));
        let text = fs::read_to_string(file).unwrap();
        let edges = graphs
            .entry(parent)
            .or_default()
            .entry(me.clone())
            .or_default();
        for (_, line) in code_lines(&text) {
            edges.extend(names_after(&line, "super::"));
            edges.extend(names_after(&line, &full));
        }
    }
    let mut circles = Vec::new();
    for (parent, graph) in &graphs {
        let siblings: BTreeSet<&String> = graph.keys().collect();
        // Depth-first search for a back edge among siblings.
        fn visit<'a>(
            node: &'a String,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            siblings: &BTreeSet<&String>,
            stack: &mut Vec<&'a String>,
            done: &mut BTreeSet<&'a String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = stack.iter().position(|s| *s == node) {
                let mut c: Vec<String> = stack[i..].iter().map(|s| s.to_string()).collect();
                c.push(node.clone());
                return Some(c);
            }
            if done.contains(node) {
                return None;
            }
            stack.push(node);
            for next in graph.get(node).into_iter().flatten() {
                if next != node && siblings.contains(next) {
                    if let Some(c) = visit(next, graph, siblings, stack, done) {
                        return Some(c);
                    }
                }
            }
            stack.pop();
            done.insert(node);
            None
        }
        let mut done = BTreeSet::new();
        for start in graph.keys() {
            if let Some(c) = visit(start, graph, &siblings, &mut Vec::new(), &mut done) {
                circles.push(format!("src/{}/: {}", parent.join("/"), c.join(" → ")));
                break;
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checks_see_a_violation() {
    // The scanner itself: an upward path and a grouped sibling import are found, comments and
    // deprecated aliases are not.
    let text = "use crate::ops::loss;\n// crate::ffi::x\n#[deprecated(note = \"old\")]\npub fn f() {\n    crate::ffi::g()\n}\nuse super::{a, b::c};\n";
    let lines = code_lines(text);
    let numbers: Vec<usize> = lines.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 7]);
    let crate_names: Vec<String> = lines
        .iter()
        .flat_map(|(_, l)| names_after(l, "crate::"))
        .collect();
    assert_eq!(crate_names, ["ops"]);
    let super_names: Vec<String> = lines
        .iter()
        .flat_map(|(_, l)| names_after(l, "super::"))
        .collect();
    assert_eq!(super_names, ["a", "b"]);
}
