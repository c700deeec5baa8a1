//! The README's Rust blocks cannot rot: each must appear, line for line (leading whitespace and
//! blank lines aside), in `examples/readme.rs`, which is compiled with every build of the tests
//! (and by clippy with `-D warnings`). Edit a block in the README, then the same lines there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

/// The non-blank lines of `text`, without their leading whitespace.
fn lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim_start).filter(|l| !l.is_empty()).collect()
}

/// A fence (backticks or tildes, indented or not) and its info string, if `line` opens or closes one.
fn fence(line: &str) -> Option<(&str, &str)> {
    let line = line.trim_start();
    let marker = ["```", "~~~"].into_iter().find(|m| line.starts_with(m))?;
    let run = line.len() - line.trim_start_matches(marker.as_bytes()[0] as char).len();
    Some((&line[..run], line[run..].trim()))
}

/// The fenced blocks of `markdown` in Rust (info string `rust...` or `rs`, any case).
fn rust_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    // The open fence, whether it is Rust, where it started and what it holds.
    let mut current: Option<(String, bool, usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match (current.as_mut(), fence(line)) {
            (None, Some((marker, info))) => {
                let lang = info.split([',', ' ']).next().unwrap_or("").to_ascii_lowercase();
                let rust = lang.starts_with("rust") || lang == "rs";
                current = Some((marker.to_owned(), rust, n + 1, String::new()));
            }
            (None, None) => {}
            (Some((open, ..)), Some((marker, ""))) if marker.starts_with(open.as_str()) => {
                if let Some((_, true, start, text)) = current.take() {
                    blocks.push((start, text));
                }
            }
            (Some((.., text)), _) => {
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
        assert!(!wanted.is_empty(), "README.md's Rust block at line {line} is empty");
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
    // Other spellings of a Rust block are blocks too; other languages are not.
    let others =
        "```Rust,ignore\nlet c = 3;\n```\n  ~~~rs\nlet d = 4;\n  ~~~\n````rust\n```\n````\n```toml\nx = 1\n```\n";
    let found: Vec<String> = rust_blocks(others).into_iter().map(|(_, text)| text).collect();
    assert_eq!(found, ["let c = 3;\n", "let d = 4;\n", "```\n"]);
    let changed = lines("let a = 1;\nlet b = 3;");
    assert!(!example.windows(changed.len()).any(|w| w == changed.as_slice()));
}
