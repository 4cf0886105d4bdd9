//! The crate's layering: a module only imports modules of lower layers (so no import cycles).
//! Reads every file under `src/` (comments stripped, so doc links do not count) for
//! `crate::<module>` paths, including `use crate::{a, b::c}` groups. A new top-level module
//! must be given a layer here (ARCHITECTURE.md explains the layers).

use std::collections::BTreeMap;
use std::path::Path;

/// Layer of each top-level module, lowest first. Modules of one layer do not import each other.
const LAYERS: &[(&str, usize)] = &[
    ("ops", 0),
    ("io", 0),
    ("device", 1),
    ("weights", 1),
    ("lora", 2),
    ("nn", 3),
    ("scheduler", 3),
    ("data", 3),
    ("unet", 4),
    ("vae", 4),
    ("text", 4),
    ("pipeline", 5),
    ("train", 6),
    ("tiny", 6),
    ("plot", 7),
    ("commands", 8),
];

/// `src/a/b.rs` -> `a`; files that are not modules of a layer (lib.rs, prelude.rs, bin/) -> None.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "prelude" | "bin")).then(|| name.to_string())
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named by `crate::` paths in `code`.
fn imports(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::x, b, c::{d, e}}`: the first segment of each top-level item
            let mut depth = 0;
            let mut item_start = true;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[k..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        let name: String = group[k..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        out.push(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, usize> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = 0;
    let mut bad = Vec::new();
    for f in &files {
        let Some(m) = top_module(&src, f) else {
            continue;
        };
        let Some(&from) = layer.get(m.as_str()) else {
            panic!("module `{m}` has no layer in tests/layers.rs");
        };
        let code = strip_comments(&std::fs::read_to_string(f).unwrap());
        for to in imports(&code) {
            if to == m || to == "prelude" {
                continue;
            }
            let Some(&at) = layer.get(to.as_str()) else {
                panic!("{}: imports `crate::{to}`, which has no layer", f.display());
            };
            edges += 1;
            if at >= from {
                bad.push(format!(
                    "{} (`{m}`, layer {from}) imports `crate::{to}` (layer {at})",
                    f.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        edges > 100,
        "only {edges} imports found: is the scan broken?"
    );
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

/// The scanner itself: groups, nesting, plain paths.
#[test]
fn the_import_scanner_reads_groups_and_paths() {
    let code = "use crate::{a::x, b, c::{d, e}};\nlet y = crate::f::g();";
    assert_eq!(imports(code), ["a", "b", "c", "f"]);
    assert_eq!(
        imports(&strip_comments("// crate::z\nx")),
        Vec::<String>::new()
    );
}
