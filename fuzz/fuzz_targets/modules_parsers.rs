//! The kernel-module indexes (`modules.dep`, `.softdep`, `.alias`, `.builtin`,
//! `.builtin.modinfo`), the closure over them, `fnmatch`, and the init's load list.

#![no_main]

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use initrd::modules::{
    fnmatch, name_from_path, parse_load_list, render_load_list, Indexes, ModuleTree,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    dep: &'a str,
    softdep: &'a str,
    alias: &'a str,
    builtin: &'a str,
    builtin_modinfo: &'a [u8],
    roots: Vec<&'a str>,
    load_list: &'a str,
    paths: Vec<String>,
    pattern: &'a str,
    name: &'a str,
}

fuzz_target!(|input: Input| {
    let indexes = Indexes {
        dep: input.dep,
        softdep: input.softdep,
        alias: input.alias,
        builtin: input.builtin,
        builtin_modinfo: input.builtin_modinfo,
    };
    if let Ok(tree) = ModuleTree::from_indexes("/lib/modules/6.1.0-fuzz", &indexes) {
        assert_eq!(tree.version(), "6.1.0-fuzz");
        let first = tree.closure(&input.roots);
        if let Ok(order) = &first {
            // Each module once, under the name its path gives, at a path inside the tree.
            let mut seen = BTreeSet::new();
            for m in order {
                assert!(seen.insert(&m.name), "{} twice", m.name);
                assert_eq!(name_from_path(&m.path), m.name);
                assert!(!m.path.starts_with('/') && !m.path.split('/').any(|c| c == ".."));
            }
        }
        // The order depends only on the tree and the roots.
        let again = tree.closure(&input.roots);
        assert_eq!(
            format!("{first:?}"),
            format!("{again:?}"),
            "closure is not deterministic"
        );
    }

    for entry in parse_load_list(input.load_list) {
        assert!(!entry.path.is_empty() && !entry.path.starts_with('#'));
        assert!(!entry.path.contains(char::is_whitespace));
        assert_eq!(entry.params, entry.params.trim());
    }
    // Paths the load list can carry come back unchanged.
    let paths: Vec<String> = input
        .paths
        .into_iter()
        .filter(|p| !p.is_empty() && !p.starts_with('#') && !p.contains(char::is_whitespace))
        .collect();
    let parsed = parse_load_list(&render_load_list(&paths));
    assert_eq!(parsed.len(), paths.len());
    for (entry, path) in parsed.iter().zip(&paths) {
        assert_eq!(&entry.path, path);
        assert!(entry.params.is_empty());
    }

    let matched = fnmatch(input.pattern, input.name);
    if !input.pattern.contains(['*', '?', '[']) {
        assert_eq!(matched, input.pattern == input.name);
    }
    assert!(fnmatch("*", input.name));
    if !input.name.contains(['*', '?', '[']) {
        assert!(fnmatch(input.name, input.name));
    }
});
