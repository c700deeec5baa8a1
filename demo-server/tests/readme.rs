//! The README's Rust blocks cannot rot: each must appear, line for line (leading whitespace and
//! blank lines aside), in `examples/readme.rs`, which is compiled with every build of the tests
//! (and by clippy with `-D warnings`). Edit a block in the README, then the same lines there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

/// The non-blank lines of `text`, without their leading whitespace.
fn lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim_start).filter(|l| !l.is_empty()).collect()
}

/// The fenced blocks of `markdown` whose info string starts with `rust`.
fn rust_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match current.as_mut() {
            None if line.starts_with("```rust") => current = Some((n + 1, String::new())),
            None => {}
            Some(_) if line.starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed code block in the README");
    blocks
}

#[test]
fn every_rust_block_of_the_readme_is_compiled_in_the_readme_example() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/readme.rs")).unwrap();
    let example = lines(&example);
    let blocks = rust_blocks(&readme);
    assert!(blocks.len() >= 10, "the README lost its examples? found {}", blocks.len());
    for (line, block) in blocks {
        let wanted = lines(&block);
        let found = example.windows(wanted.len()).any(|window| window == wanted.as_slice());
        assert!(found, "README.md's Rust block at line {line} is not in demo-server/examples/readme.rs:\n{block}");
    }
}

#[test]
fn the_checker_sees_a_changed_block() {
    let readme = "text\n```rust\nlet a = 1;\nlet b = 2;\n```\n```sh\nls\n```\n";
    let blocks = rust_blocks(readme);
    assert_eq!(blocks, vec![(2, "let a = 1;\nlet b = 2;\n".to_owned())]);
    let example = lines("fn f() {\n    let a = 1;\n\n    let b = 2;\n}");
    let wanted = lines(&blocks[0].1);
    assert!(example.windows(wanted.len()).any(|w| w == wanted.as_slice()));
    let changed = lines("let a = 1;\nlet b = 3;");
    assert!(!example.windows(changed.len()).any(|w| w == changed.as_slice()));
}
