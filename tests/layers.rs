//! The library's layering, checked: each module imports only from the
//! layers listed before its own in `src/lib.rs` (its own submodules aside),
//! so the import graph has no cycle and no upward edge. Test modules at the
//! end of a file are left out: a test may reach anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, lowest first, as `src/lib.rs` lists them.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["config"],
    &["types"],
    &["schema"],
    &["change", "checksum"],
    &["verify"],
    &["stores"],
    &["pipeline"],
    &["postgres", "kafka", "clickhouse", "sim"],
    &["stack"],
    &["commands"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file: comments dropped, and everything from its first
/// inline `#[cfg(test)]` module on (they end the file here).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            let next = lines.peek().map(|l| l.trim_start()).unwrap_or("");
            let is_mod = ["mod ", "pub mod ", "pub(crate) mod "].iter().any(|p| next.starts_with(p));
            if is_mod && next.trim_end().ends_with(';') {
                lines.next(); // a test-only module in a file of its own
                continue;
            }
            if is_mod {
                break;
            }
        }
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The top-level modules a piece of code names as `crate::<module>`,
/// including inside `use crate::{a::b, c}`.
fn imports(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn no_module_imports_from_its_own_layer_or_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let top = relative.components().next().expect("a component").as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let own = layer_of(&module).unwrap_or_else(|| panic!("src/lib.rs's layers do not list module {module}"));
        let text = std::fs::read_to_string(file).expect("a source file");
        for imported in imports(&code_of(&text)) {
            if imported == module {
                continue;
            }
            let Some(theirs) = layer_of(&imported) else {
                wrong.push(format!("{}: imports crate::{imported}, which no layer lists", relative.display()));
                continue;
            };
            if theirs >= own {
                wrong.push(format!(
                    "{}: {module} (layer {}) imports {imported} (layer {})",
                    relative.display(),
                    own + 1,
                    theirs + 1
                ));
            }
        }
        checked += 1;
    }
    assert!(checked > 30, "only {checked} files found under {}", src.display());
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_nested_imports() {
    let code = code_of(
        "use crate::{stores::Sink, types};\n// crate::cli in a comment\nfn f() { crate::verify::run() }\n\
         #[cfg(test)]\nmod tests { use crate::commands; }\n",
    );
    let found: Vec<String> = imports(&code).into_iter().collect();
    assert_eq!(found, ["stores", "types", "verify"]);
}
