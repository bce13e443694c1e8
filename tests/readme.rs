//! README.md's library example is downstream/src/main.rs, the program CI builds against the packaged crate and
//! runs (scripts/package-check.sh), and its dependency line is downstream/Cargo.toml's.

mod common;

use common::repo;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The body of the first fenced block that starts with "```" + `lang` after `heading`.
fn block_after<'a>(text: &'a str, heading: &str, lang: &str) -> &'a str {
    let section = &text[text.find(heading).unwrap_or_else(|| panic!("README has no {heading:?}"))..];
    let open = format!("```{lang}\n");
    let start = section.find(&open).unwrap_or_else(|| panic!("no {open:?} block after {heading:?}")) + open.len();
    let len = section[start..].find("```\n").expect("unclosed block");
    &section[start..start + len]
}

#[test]
fn readme_library_example_is_the_downstream_program() {
    let readme = read("README.md");
    let main = read("downstream/src/main.rs");
    let example = block_after(&readme, "## As a library", "rust,no_run");
    if example != main {
        let line = example.lines().zip(main.lines()).position(|(a, b)| a != b).map_or(0, |i| i + 1);
        panic!("README.md's library example differs from downstream/src/main.rs (first at line {line})");
    }
}

#[test]
fn readme_dependency_is_the_downstream_dependency() {
    let readme = read("README.md");
    let toml = block_after(&readme, "## As a library", "toml");
    let manifest = read("downstream/Cargo.toml");
    let deps = &manifest[manifest.find("[dependencies]\n").expect("no [dependencies]")..];
    let deps = deps.split("\n\n").next().unwrap();
    assert_eq!(toml.trim(), deps.trim(), "README.md's [dependencies] block vs downstream/Cargo.toml");
}

/// Relative links and images resolve in the repository (on GitHub directly; on crates.io through the
/// `repository` field of Cargo.toml, against which crates.io rewrites them).
#[test]
fn readme_relative_links_point_at_files_in_the_repository() {
    let readme = read("README.md");
    let mut checked = 0;
    for (i, _) in readme.match_indices("](") {
        let rest = &readme[i + 2..];
        let target = &rest[..rest.find(')').expect("unclosed link")];
        if target.starts_with("http://") || target.starts_with("https://") || target.starts_with('#') {
            continue;
        }
        let path = target.split('#').next().unwrap();
        assert!(repo().join(path).exists(), "README.md links to {target}, which is not in the repository");
        checked += 1;
    }
    assert!(checked > 10, "only {checked} relative links found: is the parser broken?");
}

/// The package's README (crates.io's page, Cargo.toml `readme`) has the same example and dependency line, and
/// only absolute links: crates.io resolves relative ones against a repository URL the crate does not name.
#[test]
fn crate_readme_has_the_downstream_program_and_absolute_links_only() {
    let readme = read("CRATE-README.md");
    assert_eq!(block_after(&readme, "## Example", "rust,no_run"), read("downstream/src/main.rs"));
    let manifest = read("downstream/Cargo.toml");
    let deps = &manifest[manifest.find("[dependencies]\n").expect("no [dependencies]")..];
    assert_eq!(block_after(&readme, "## Use", "toml").trim(), deps.split("\n\n").next().unwrap().trim());
    let mut links = 0;
    for (i, _) in readme.match_indices("](") {
        let rest = &readme[i + 2..];
        let target = &rest[..rest.find(')').expect("unclosed link")];
        assert!(target.starts_with("https://"), "CRATE-README.md links to {target}: use an absolute https link");
        links += 1;
    }
    assert!(links >= 3, "only {links} links found: is the parser broken?");
    let cargo = read("Cargo.toml");
    assert!(cargo.contains("readme = \"CRATE-README.md\"") && cargo.contains("\"/CRATE-README.md\""));
}
