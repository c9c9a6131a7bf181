//! Keeps the import graph between `src/`'s top-level modules acyclic: each module's
//! `crate::<module>` references (test modules and `tests.rs` files left out) are edges,
//! and a cycle fails the test with the files that close it. The layer order this allows
//! is written in the README's "Layout" section.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// module -> (module it references -> a file that does).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(graph.len() > 10, "found only {:?} under src/", graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        let mut why = String::new();
        for pair in cycle.windows(2) {
            let file = &graph[&pair[0]][&pair[1]];
            why.push_str(&format!("\n  {} -> {} (in src/{file})", pair[0], pair[1]));
        }
        panic!("the top-level modules import each other in a cycle:{why}");
    }
}

#[test]
fn the_scanner_sees_grouped_imports_and_skips_test_code() {
    let text = r#"
        use crate::a::X;
        use crate::{b, c::{D, E}};
        // crate::comment is not an import
        let s = "crate::string";
        #[cfg(test)]
        mod tests {
            use crate::t;
            fn f() { let c = '{'; }
        }
        fn g() -> crate::after::Y {}
    "#;
    let found: Vec<String> = references(text).into_iter().collect();
    assert_eq!(found, ["a", "after", "b", "c"]);
}

fn graph(src: &Path) -> Graph {
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir()
            || (path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main")
        {
            modules.insert(name);
        }
    }
    let mut graph = Graph::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if !modules.contains(&top) || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let edges = graph.entry(top.clone()).or_default();
        let text = std::fs::read_to_string(&file).unwrap();
        for target in references(&text) {
            if target != top && modules.contains(&target) {
                edges
                    .entry(target)
                    .or_insert_with(|| rel.display().to_string());
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The top-level modules `text` names after `crate::`, outside comments, string
/// literals and `#[cfg(test)] mod … { }` blocks.
fn references(text: &str) -> BTreeSet<String> {
    let code = strip_tests(&code_only(text));
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `foo_crate::x`
        }
        let rest_trimmed = rest.trim_start();
        if let Some(group) = rest_trimmed.strip_prefix('{') {
            // `crate::{a, b::{C, D}}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        found.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    c if c.is_whitespace() => {}
                    _ => item_start = false,
                }
            }
        } else {
            found.insert(ident(rest_trimmed));
        }
    }
    found.remove("");
    found
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// `text` with comments blanked and literals emptied, so braces and paths in them count
/// for nothing.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_is_ident(&chars, i)
        {
            // Raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && is_char_literal(&chars, i) {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// `'x'` or `'\n'`, as opposed to a lifetime `'a`.
fn is_char_literal(chars: &[char], i: usize) -> bool {
    match chars.get(i + 1) {
        Some('\\') => true,
        Some(_) => chars.get(i + 2) == Some(&'\''),
        None => false,
    }
}

/// `code` without its `#[cfg(test)] mod name { … }` blocks.
fn strip_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let item = after.trim_start();
        let is_inline_mod = item
            .strip_prefix("mod ")
            .and_then(|m| {
                m.trim_start()
                    .split_once(|c: char| !(c.is_alphanumeric() || c == '_'))
            })
            .is_some_and(|(_, tail)| tail.trim_start().starts_with('{'));
        if !is_inline_mod {
            rest = after;
            continue;
        }
        let open = item.find('{').unwrap();
        let mut depth = 0;
        let mut end = item.len();
        for (i, c) in item[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// A cycle as `[a, b, …, a]`, if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::OnPath);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::OnPath => {
                    let start = path.iter().position(|n| n == next).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        let new = marks.get(node).copied().unwrap_or(Mark::New) == Mark::New;
        if let Some(cycle) = new
            .then(|| visit(node, graph, &mut marks, &mut Vec::new()))
            .flatten()
        {
            return Some(cycle);
        }
    }
    None
}
