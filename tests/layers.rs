//! The crate's layers (docs/architecture.md) as a test: every `crate::…` path in `src/` points
//! to the same or a lower layer, and inside a module directory the files, the directory's
//! `mod.rs` included, import each other without a circle. A re-export (`pub use`, or an alias
//! `const`/`type`/`fn` naming another module's item) is an import like any other, so an alias
//! that points up or closes a circle fails too. Comments and `#[cfg(test)]` modules are not
//! counted. Every item has one public path: a `pub use` may only re-export a private child
//! module's items from that child's `mod.rs` (or parent file), besides the crate root's few
//! named in `ROOT_REEXPORTS`.
//!
//! `CALIBRL_LAYERS_SRC` points the checks at another `src/` (to see them fail on an older
//! revision: `git archive REV src | tar -x -C /tmp/old`, then run this test with
//! `CALIBRL_LAYERS_SRC=/tmp/old/src`).

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

/// The file's code lines (1-based number, text) without comments, up to its `#[cfg(test)]`
/// module (in there `super::` is the file itself).
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push((n + 1, line.split("//").next().unwrap_or("").to_string()));
    }
    out
}

/// Identifiers used as a path's first segment in `line` (`name::…`, not `a::name::…`):
/// in a `mod.rs`, the child modules it names.
fn path_heads(line: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let after_path = start >= 2 && chars[start - 1] == ':' && chars[start - 2] == ':';
            let followed = chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':');
            if followed && !after_path {
                heads.push(chars[start..i].iter().collect());
            }
        } else {
            i += 1;
        }
    }
    heads
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

/// The `src/` to check: this crate's, or `CALIBRL_LAYERS_SRC`.
fn src_dir() -> PathBuf {
    std::env::var_os("CALIBRL_LAYERS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn crate_paths_point_down_the_layers() {
    let src = src_dir();
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

/// A module directory (its path) and a file's name in it (a child's name, or "mod").
type Role = (Vec<String>, String);

/// The directories a file belongs to and its name in each: a file `a/b.rs` is child `b` of
/// `a`; a `a/b/mod.rs` is "mod" of `a/b` and child `b` of `a`.
fn roles(module: &[String], file: &Path) -> Vec<Role> {
    let is_mod = file.file_name().is_some_and(|f| f == "mod.rs");
    let mut out = Vec::new();
    if is_mod {
        out.push((module.to_vec(), "mod".to_string()));
    }
    if module.len() >= 2 {
        out.push((
            module[..module.len() - 1].to_vec(),
            module.last().unwrap().clone(),
        ));
    }
    out
}

#[test]
fn files_of_a_module_import_each_other_without_a_circle() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // Per module directory: file → files it names. A child names a sibling through `super::x`
    // or the directory's full path, and the directory's `mod.rs` (node "mod") through any other
    // item of `super::`; `mod.rs` names a child by a path starting with the child's name (a
    // `pub use child::…` or a call; the `mod child;` declaration itself is no import).
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    let roles: Vec<(&PathBuf, Vec<Role>)> = files
        .iter()
        .map(|file| (file, roles(&module_path(&src, file), file)))
        .collect();
    for (_, rs) in &roles {
        for (parent, me) in rs {
            if me != "mod" {
                children
                    .entry(parent.clone())
                    .or_default()
                    .insert(me.clone());
            }
            graphs
                .entry(parent.clone())
                .or_default()
                .entry(me.clone())
                .or_default();
        }
    }
    for (file, rs) in &roles {
        let text = fs::read_to_string(file).unwrap();
        let lines = code_lines(&text);
        for (parent, me) in rs {
            let siblings = children.get(parent).cloned().unwrap_or_default();
            let full = format!("crate::{}::", parent.join("::"));
            let mut targets = BTreeSet::new();
            for (_, line) in &lines {
                if me == "mod" {
                    let t = line.trim_start();
                    let t = t
                        .strip_prefix("pub(crate) ")
                        .or(t.strip_prefix("pub "))
                        .unwrap_or(t);
                    if t.starts_with("mod ") {
                        continue;
                    }
                    targets.extend(path_heads(line));
                    targets.extend(names_after(line, "self::"));
                    targets.extend(names_after(line, &full));
                } else {
                    for name in names_after(line, "super::")
                        .into_iter()
                        .chain(names_after(line, &full))
                    {
                        let to_mod = !siblings.contains(&name);
                        targets.insert(if to_mod { "mod".to_string() } else { name });
                    }
                }
            }
            let has_mod = graphs[parent].contains_key("mod");
            let edges = graphs.get_mut(parent).unwrap().get_mut(me).unwrap();
            edges.extend(
                targets
                    .into_iter()
                    .filter(|t| siblings.contains(t) || (t == "mod" && has_mod)),
            );
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

/// Re-exports at the crate root that name an item a second time, on purpose: the crate's
/// front door (`calibrl::Config`, `calibrl::Result`, ...). Nothing else may.
const ROOT_REEXPORTS: &[&str] = &["config::Config", "error::{CalibrlStatus, Error, Result}"];

/// The private child modules a file declares (`mod x;`, `pub(crate) mod x;`, not `pub mod x;`).
fn private_children(lines: &[(usize, String)]) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|(_, line)| {
            let t = line.trim();
            let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
            let name = t.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect()
}

/// The public re-exports of `lines` that give an item a second public path: a `pub use` of
/// anything but a private child module declared in the same file (which is how a split module
/// keeps one public path per item). Returns (line number, what it re-exports).
fn second_names(lines: &[(usize, String)], root: bool) -> Vec<(usize, String)> {
    let children = private_children(lines);
    let mut out = Vec::new();
    for (n, line) in lines {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end().trim_end_matches(';');
        let path = path.strip_prefix("self::").unwrap_or(path);
        let head: String = path
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let own_child = children.contains(&head) && path[head.len()..].starts_with("::");
        let front_door = root && ROOT_REEXPORTS.contains(&path);
        if !(own_child || front_door) {
            out.push((*n, path.to_string()));
        }
    }
    out
}

#[test]
fn every_item_has_one_public_path() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let lines = code_lines(&fs::read_to_string(file).unwrap());
        let root = file.strip_prefix(&src).unwrap() == Path::new("lib.rs");
        for (n, path) in second_names(&lines, root) {
            violations.push(format!(
                "{}:{n}: `pub use {path}` gives an item a second public path; import it from \
                 its owner instead (only a `mod.rs` re-exports its private children)",
                file.display()
            ));
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_checks_see_a_violation() {
    // The scanner itself: an upward path, an alias and a grouped sibling import are found;
    // comments and the test module are not.
    let text = "use crate::ops::loss;\n// crate::ffi::x\n#[deprecated(note = \"old\")]\npub const F: u8 = crate::ffi::G;\nuse super::{a, b::c};\n#[cfg(test)]\nmod tests {\n    use super::d;\n}\n";
    let lines = code_lines(text);
    let numbers: Vec<usize> = lines.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 3, 4, 5]);
    let crate_names: Vec<String> = lines
        .iter()
        .flat_map(|(_, l)| names_after(l, "crate::"))
        .collect();
    assert_eq!(crate_names, ["ops", "ffi"]);
    let super_names: Vec<String> = lines
        .iter()
        .flat_map(|(_, l)| names_after(l, "super::"))
        .collect();
    assert_eq!(super_names, ["a", "b"]);
    // A re-export of another module's item, or of a public child's, is a second name; a
    // private child's is not, nor is a `pub(crate) use`.
    let text = "pub mod open;\nmod shut;\npub(crate) mod inner;\npub use shut::{A, B};\npub use self::inner::C;\npub use open::D;\npub use crate::desc::Stream;\npub use super::x::E;\npub(crate) use crate::y::F;\npub use config::Config;\n";
    let lines = code_lines(text);
    let found: Vec<usize> = second_names(&lines, false)
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(found, [6, 7, 8, 10]);
    let found: Vec<usize> = second_names(&lines, true).iter().map(|(n, _)| *n).collect();
    assert_eq!(found, [6, 7, 8]);
    // In a mod.rs: the children named by a re-export or a path, not by nested segments.
    assert_eq!(
        path_heads("pub use compile::{Compiled, KernelSource}; &[&logits::LOGITS, x::loss::y]"),
        ["compile", "logits", "x"]
    );
}
